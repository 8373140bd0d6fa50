"""Try Triton tile configurations on the GPU target shapes; print times per config and a
per-kernel profile of the default one.

    python -m benchmarks.tune_triton [--dtypes bfloat16 float32] [--profile]

Each candidate is checked against the default config's loss before it is timed.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from triton.testing import do_bench

from amdim_kernels import nce_loss
from amdim_kernels import settings
from amdim_kernels.backend_settings import TRITON_SCORES
from amdim_kernels.triton_nce.config import TileConfig

from . import arguments, problems

UNCAPPED = (128, 128, 64, 8, 3)
DEFAULT = UNCAPPED + (128,)  # the forward's unmasked launch and the G kernel capped at 128 registers
# (strategy, chunk parts, forward tiles, backward (G kernel) tiles, operand loads), each tiles
# (block_n, block_j, block_k, num_warps, num_stages[, register cap as in TileConfig]).
# The cap lets two programs share an SM; the (128, 256) forward tiles read 25% less per
# FLOP than (128, 128) and fit in registers without spills in the plain launch; TMA operands
# (the default from sm_90 on) take fewer registers and instructions than pointers (python -m
# benchmarks.triton_resources --loads tma pointers). Every forward candidate's masked launch
# scores 64 columns at a time (`forward_tiles`), the width at which its copy of the
# positives fits without spills.
CANDIDATES = [
    ("fused", 8, DEFAULT, DEFAULT, "tma"),
    ("fused", 8, DEFAULT, DEFAULT, "pointers"),
    ("fused", 8, UNCAPPED, UNCAPPED, "tma"),
    ("fused", 8, UNCAPPED, UNCAPPED, "pointers"),
    ("fused", 8, UNCAPPED, DEFAULT, "tma"),
    ("fused", 8, DEFAULT, UNCAPPED, "tma"),
    ("fused", 16, DEFAULT, DEFAULT, "tma"),
    # fewer, larger backward chunks: at N = 128 the default's 3 chunks give 131 G programs
    # each (one per SM, though two fit under the cap); 2 chunks give 196, 1 gives 392
    ("fused", 2, DEFAULT, DEFAULT, "tma"),
    ("fused", 1, DEFAULT, DEFAULT, "tma"),
    ("fused", 8, DEFAULT + (32,), DEFAULT, "tma"),  # the masked launch 32 columns wide
    ("fused", 8, (128, 256, 64, 8, 3), DEFAULT, "tma"),
    ("fused", 8, (128, 256, 64, 8, 4), DEFAULT, "tma"),
    ("fused", 8, (64, 256, 64, 4, 3), DEFAULT, "tma"),
    ("fused", 8, DEFAULT, (128, 64, 64, 4, 4), "tma"),
    ("fused", 16, (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), "tma"),
    ("gemm", 8, (64, 128, 64, 4, 1), (64, 128, 64, 4, 1), "pointers"),
    ("gemm", 8, (128, 128, 64, 8, 1), (128, 128, 64, 8, 1), "pointers"),
]
FP32_CANDIDATES = [
    ("fused", 8, (64, 128, 32, 8, 3), (64, 128, 32, 8, 3), "tma"),
    ("fused", 8, (64, 128, 32, 8, 3), (64, 128, 32, 8, 3), "pointers"),
    ("fused", 8, (128, 64, 32, 4, 3), (128, 64, 32, 4, 3), "tma"),
    ("gemm", 8, (64, 128, 64, 4, 1), (64, 128, 64, 4, 1), "pointers"),
]


def forward_tiles(tiles: tuple) -> TileConfig:
    """A forward candidate's TileConfig, its masked launch 64 columns wide (or narrower)."""
    cfg = TileConfig(*tiles)
    return dataclasses.replace(cfg, masked_block_j=cfg.masked_block_j or min(64, cfg.block_j))


def fwd_bwd(src, trg, pos_idx):
    loss, reg = nce_loss(src, trg, pos_idx, backend="triton")
    return torch.autograd.grad(loss + reg, (src, trg))


def main(argv=None):
    ap = arguments.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-strategy", default=None, choices=TRITON_SCORES)
    args = ap.parse_args(argv)
    arguments.require_gpu(ap, "benchmarks.tune_triton")
    shapes = [problems.SINGLE_GPU, problems.ONE_GPU_SHARE]
    print("| problem | dtype | strategy/chunk parts, fwd tiles, grad tiles (BN, BJ, BK, warps, stages), loads "
          "| fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for p in shapes:
            src0, trg0, pos_idx = p.inputs(dtype, "cuda")
            src, trg = src0.clone().requires_grad_(), trg0.clone().requires_grad_()
            with torch.no_grad():
                want = nce_loss(src0, trg0, pos_idx, backend="triton")[0]
            for strategy, parts, fwd_tiles, grad_tiles, loads in (
                CANDIDATES if dtype != torch.float32 else FP32_CANDIDATES
            ):
                label = f"{strategy}/{parts}, {fwd_tiles}, {grad_tiles}, {loads}"
                tiles = dict(fwd=forward_tiles(fwd_tiles), grad=TileConfig(*grad_tiles))
                try:
                    with settings(triton_scores=strategy, triton_chunks=parts, triton_tiles=tiles, triton_loads=loads):
                        with torch.no_grad():
                            got = nce_loss(src0, trg0, pos_idx, backend="triton")[0]
                            assert torch.allclose(got, want, rtol=1e-4), (got.item(), want.item())
                            f_ms = do_bench(lambda: nce_loss(src0, trg0, pos_idx, backend="triton"), return_mode="median")
                        fb_ms = do_bench(lambda: fwd_bwd(src, trg, pos_idx), return_mode="median")
                    print(f"| {p.name} | {dname} | {label} | {f_ms:.3f} | {fb_ms:.3f} | "
                          f"{p.flops(False) / f_ms / 1e9:.0f} | {(p.flops(False) + p.flops(True)) / fb_ms / 1e9:.0f} |", flush=True)
                except Exception as e:  # a config that does not compile (shared memory) is a row
                    print(f"| {p.name} | {dname} | {label} | {type(e).__name__}: {str(e)[:80]} | | | |", flush=True)
            if args.profile and p in (problems.SINGLE_GPU, problems.ONE_GPU_SHARE):
                from torch.profiler import ProfilerActivity, profile

                with settings(triton_scores=args.profile_strategy):
                    fwd_bwd(src, trg, pos_idx)
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            fwd_bwd(src, trg, pos_idx)
                        torch.cuda.synchronize()
                print(f"\nprofile, 5 x fwd+bwd, {p.name}, {dname}, {args.profile_strategy or 'default'} strategy, default config")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    main()
