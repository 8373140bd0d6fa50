"""What ptxas makes of the Triton kernels, compiled offline for a GPU target: registers,
spills, shared memory and instruction counts per kernel and tile configuration. No GPU is
needed (Triton ships ptxas and cuobjdump), so a tile configuration can be vetted before any
timing: a kernel that spills or needs more than 255 registers per thread will not be fast.

    python -m benchmarks.triton_resources [--arch 90] [--dtype bfloat16] [--problem single]
        [--tiles 128,128,64,8,3 128,256,64,8,3] [--loads tma pointers]

The arguments mirror the launchers' calls for the problem (contiguous inputs, the fused score
strategy) and Triton's own specialisation of them: integers equal to 1 become constants,
integers and pointers divisible by 16 carry that hint. Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from amdim_kernels.backend_settings import TRITON_LOADS
from amdim_kernels.triton_nce import config, forward, grad_rows, grad_tiles, operands

from . import problems

PROBLEMS = {"single": problems.SINGLE_GPU, "share": problems.ONE_GPU_SHARE, "cifar": problems.CIFAR}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


class Const:
    """A constexpr argument."""

    def __init__(self, value):
        self.value = value


@dataclass(frozen=True)
class Desc:
    """A host tensor descriptor argument (TensorDescriptor) of this dtype and box."""
    dtype: torch.dtype
    block: tuple[int, int]


@dataclass
class Resources:
    registers: int
    spill_bytes: int  # the stack frame ptxas gives spilled registers
    spill_instructions: int  # STL/LDL in the SASS
    shared_bytes: int
    instructions: int
    tensor_core_instructions: int  # HGMMA (sm_90) or HMMA
    global_loads: int  # LDG: loads through registers
    async_copies: int  # LDGSTS: global -> shared copies of the software pipeline
    tma_loads: int  # UTMALDG: boxes the copy engine fetches into shared memory


def _cuda_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _signature(kernel, args: dict):
    """(signature, constexprs, attrs) as Triton's launcher would specialise these values."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if isinstance(value, Const) or isinstance(value, bool) or (isinstance(value, int) and value == 1):
            consts[name] = value.value if isinstance(value, Const) else value
            sig[name] = "constexpr"
        elif isinstance(value, Desc):
            sig[name] = f"tensordesc<{TRITON_TYPES[value.dtype]}[{value.block[0]}, {value.block[1]}]>"
        elif isinstance(value, torch.dtype):  # a pointer to this dtype, 16-byte aligned
            sig[name] = "*" + TRITON_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {value!r}")
    return sig, consts, attrs


def compile_resources(kernel, args: dict, num_warps: int, num_stages: int, arch: int,
                      max_registers: int | None = None) -> Resources:
    sig, consts, attrs = _signature(kernel, args)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if max_registers is not None:
        options["maxnreg"] = max_registers
    options = backend.parse_options(options)
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuda_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    instructions = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass, re.M)
    return Resources(
        registers=int(regs), spill_bytes=int(stack),
        spill_instructions=sum(1 for i in instructions if re.search(r"\b(STL|LDL)\b", i)),
        shared_bytes=compiled.metadata.shared, instructions=len(instructions),
        tensor_core_instructions=sum(1 for i in instructions if re.search(r"\bH[G]?MMA\b", i)),
        global_loads=sum(1 for i in instructions if re.search(r"\bLDG\b", i)),
        async_copies=sum(1 for i in instructions if re.search(r"\bLDGSTS\b", i)),
        tma_loads=sum(1 for i in instructions if re.search(r"\bUTMALDG\b", i)),
    )


def _shape_args(p: problems.Problem) -> dict:
    """The kernels' size and stride arguments of the problem's inputs as the kernels see them (shapes only: meta
    tensors). The launchers hand them targets whose features are contiguous (copied chunk by
    chunk where they are not); a "feature-map" problem shows what its layout would compile
    to if read in place."""
    src = torch.empty(p.n, p.d, device="meta")
    if p.trg_layout == "contiguous":
        trg = torch.empty(p.m, p.l, p.d, device="meta")
    else:
        trg = torch.empty(p.m, p.d, p.l, device="meta").transpose(1, 2)
    return dict(operands.source_args(src), **operands.target_args(trg))


def _loss_options(p: problems.Problem, clip: bool, tile: bool = False) -> dict:
    """The kernels' scale and clip arguments: the default scale 1/sqrt(D), and the
    problem's tclip or no clipping (tile: as the tile kernels take them, with SHIFT_TCLIP)."""
    clip_args = config.tile_clip_args if tile else config.clip_args
    return dict(scale=p.d ** -0.5, **clip_args(p.tclip if clip else None))


def _tile_args(p: problems.Problem, dtype: torch.dtype, cfg: config.TileConfig, clip: bool, tma: bool) -> dict:
    """The tile kernels' common arguments; tma: descriptors for src and trg, as the launchers
    passes them where the operands are tma_ready."""
    if tma:
        operands = dict(src=Desc(dtype, (cfg.block_n, cfg.block_k)), trg=Desc(dtype, (cfg.block_j, cfg.block_k)))
    else:
        operands = dict(src=dtype, trg=dtype)
    return dict(
        operands, pos_idx_ptr=torch.int64, **_shape_args(p), TMA=tma, **_loss_options(p, clip, tile=True),
        BLOCK_N=Const(cfg.block_n), BLOCK_J=Const(cfg.block_j), BLOCK_K=Const(cfg.block_k),
        DOT_PRECISION=Const(config.dot_precision(dtype)), UPCAST=False, FROM_SCORES=False,
        EVEN_K=p.d % cfg.block_k == 0,
    )


def forward_args(p: problems.Problem, dtype: torch.dtype, cfg: config.TileConfig, clip: bool, tma: bool,
                 masked: bool) -> dict:
    """nce_fwd_kernel's arguments for forward.forward's plain or masked launch (fused strategy)."""
    row_blocks = triton.cdiv(p.n, cfg.block_n)
    _, per_split = config.split_columns(p.columns, row_blocks, cfg, sms=132)
    return dict(
        _tile_args(p, dtype, cfg.masked if masked else cfg, clip, tma), MASKED=masked,
        part_sum_ptr=torch.float32, part_max_ptr=torch.float32, part_sq_ptr=torch.float32, a_pos_ptr=torch.float32,
        scores_ptr=torch.float32, stride_scores=p.n, chunk_begin=0, chunk_end=p.columns, split_base=0,
        cols_per_split=per_split, BLOCK_L=Const(config.SELECT_LOCATIONS), PLAIN_J=Const(cfg.block_j),
    )


def grad_args(p: problems.Problem, dtype: torch.dtype, cfg: config.TileConfig, clip: bool, tma: bool) -> dict:
    """nce_grad_tile_kernel's arguments for grad_tiles.gradient_chunks' first chunk."""
    trg = torch.empty(p.m, p.l, p.d, dtype=dtype, device="meta")
    per_column = config.column_bytes(p.n, trg, False, backward=True)
    c = config.chunk_columns(p.n, p.m, p.l, cfg, 132, per_column, config.MIN_CHUNK_BYTES)
    return dict(
        _tile_args(p, dtype, cfg, clip, tma),
        neg_lse_ptr=torch.float32, r_ptr=torch.float32, g_pos_ptr=torch.float32, reg_coef_ptr=torch.float32,
        g_ptr=dtype, stride_gn=c, g_scale_ptr=torch.float32, scores_ptr=dtype, stride_scores=c, col_begin=0, C=c,
        BLOCK_L=Const(grad_tiles.positives_block(p.l)), SCALED=Const(dtype == torch.float16),
    )


def merge_args(p: problems.Problem, clip: bool) -> dict:
    return dict(
        part_sum_ptr=torch.float32, part_max_ptr=torch.float32, part_sq_ptr=torch.float32,
        a_pos_ptr=torch.float32, loss_ptr=torch.float32, neg_lse_ptr=torch.float32, sq_ptr=torch.float32,
        N=p.n, L=p.l, SPLITS=4 * 132, **config.clip_args(p.tclip if clip else None),
        BLOCK_S=Const(32), BLOCK_L=Const(config.location_block(p.l)),
    )


def totals_args(p: problems.Problem) -> dict:
    return dict(loss_ptr=torch.float32, sq_ptr=torch.float32, mean_ptr=torch.float32, reg_ptr=torch.float32,
                NL=p.n * p.l, N=p.n, inv_nl=1.0 / (p.n * p.l), reg_c=0.05 / (p.n * p.m * p.l), BLOCK=Const(1024))


def factors_args(p: problems.Problem, clip: bool) -> dict:
    block_n, block_l = grad_rows.factors_blocks(p.l)
    # the mean's upstream gradient, one value broadcast (strides 0), as the autograd formula passes it
    return dict(a_pos_ptr=torch.float32, grad_loss_ptr=torch.float32, stride_wn=0, stride_wl=0,
                neg_lse_ptr=torch.float32, grad_sq_ptr=torch.float32, stride_sq=0, g_pos_ptr=torch.float32,
                r_ptr=torch.float32, reg_coef_ptr=torch.float32, N=p.n, L=p.l, **_loss_options(p, clip),
                loss_weight=1.0 / (p.n * p.l), sq_weight=0.05 / (p.n * p.m * p.l),
                BLOCK_N=Const(block_n), BLOCK_L=Const(block_l))


def rows(p, dtype, tile_configs, arch: int, clips=(True, False), loads=("tma",)):
    """(kernel, loads, clip, tiles, Resources) for every kernel, operand loads ("tma",
    "pointers"; the tile kernels only), clip mode and tile configuration."""
    for clip in clips:
        for tma in (way == "tma" for way in loads):
            for cfg in tile_configs:
                for name, kernel, args, cap in (
                    ("fwd plain", forward.nce_fwd_kernel, forward_args(p, dtype, cfg, clip, tma, False),
                     cfg.plain_max_registers),
                    ("fwd masked", forward.nce_fwd_kernel, forward_args(p, dtype, cfg, clip, tma, True), None),
                    ("grad", grad_tiles.nce_grad_tile_kernel, grad_args(p, dtype, cfg, clip, tma),
                     cfg.plain_max_registers),
                ):
                    resources = compile_resources(kernel, args, cfg.num_warps, cfg.num_stages, arch, cap)
                    yield name, "tma" if tma else "pointers", clip, cfg, resources
        merge = compile_resources(forward.nce_merge_kernel, merge_args(p, clip), 4, 1, arch)
        yield "merge", "-", clip, None, merge
        factors = compile_resources(grad_rows.nce_grad_factors_kernel, factors_args(p, clip), 4, 1, arch)
        yield "factors", "-", clip, None, factors
    yield "totals", "-", None, None, compile_resources(forward.nce_totals_kernel, totals_args(p), 4, 1, arch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--problem", default="single", choices=sorted(PROBLEMS))
    ap.add_argument("--tiles", nargs="+", default=["128,128,64,8,3,128,64", "128,256,64,8,3,0,64"],
                    help="BLOCK_N,BLOCK_J,BLOCK_K,num_warps,num_stages[,register cap of the forward's "
                         "plain launch and of the G kernel (0: none)[,the masked launch's BLOCK_J]]")
    ap.add_argument("--clip", choices=["both", "on", "off"], default="both")
    ap.add_argument("--tclip", type=float, default=None,
                    help="the clip's tclip (default: the problem's); past 40 the tile kernels keep a running "
                         "maximum instead of the constant shift (config.MAX_SHIFT_TCLIP)")
    ap.add_argument("--trg-layout", choices=["contiguous", "feature-map"], default="contiguous",
                    help="feature-map: the targets' strides as the trainer passes them, read in place")
    ap.add_argument("--loads", nargs="+", choices=TRITON_LOADS, default=None,
                    help="the tile kernels' operand loads (default: tma from sm_90 on, else pointers; "
                         "always pointers for feature-map targets, which TMA cannot read in place)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    dtype = getattr(torch, args.dtype)
    configs = [config.TileConfig(*[int(v) or None for v in t.split(",")]) for t in args.tiles]
    clips = {"both": (True, False), "on": (True,), "off": (False,)}[args.clip]
    p = dataclasses.replace(PROBLEMS[args.problem], trg_layout=args.trg_layout)
    if args.tclip is not None:
        p = dataclasses.replace(p, tclip=args.tclip)
    loads = args.loads or ["tma" if args.arch >= 90 else "pointers"]
    if p.trg_layout != "contiguous" and "tma" in loads:
        raise SystemExit("--loads tma needs contiguous targets: feature-map targets are read through pointers")
    print(f"sm_{args.arch}, triton {triton.__version__}, {args.dtype}, {p.name}, {p.trg_layout} targets, "
          f"tclip {p.tclip}")
    print("| kernel | loads | clip | tiles (BN, BJ, BK, warps, stages) | registers | spill bytes | spill instr | "
          "shared KiB | SASS instr | tensor-core instr | LDG | LDGSTS | UTMALDG |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, way, clip, cfg, r in rows(p, dtype, configs, args.arch, clips, loads):
        cap = "" if cfg is None or cfg.plain_max_registers is None or name.endswith("masked") else \
            f", maxnreg {cfg.plain_max_registers}"
        block_j = None if cfg is None else cfg.masked.block_j if name.endswith("masked") else cfg.block_j
        tiles = "-" if cfg is None else \
            f"({cfg.block_n}, {block_j}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages}{cap})"
        clip_mode = "-" if clip is None else "tclip" if clip else "none"
        print(f"| {name} | {way} | {clip_mode} | {tiles} | {r.registers} | {r.spill_bytes} | "
              f"{r.spill_instructions} | {r.shared_bytes / 1024:.0f} | {r.instructions} | "
              f"{r.tensor_core_instructions} | {r.global_loads} | {r.async_copies} | {r.tma_loads} |",
              flush=True)


if __name__ == "__main__":
    main()
