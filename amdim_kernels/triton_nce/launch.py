"""Block sizes, grids, chunks and score strategies for the Triton kernels, and their launches.

Two ways to get a tile of raw scores, chosen per call (`score_strategy`):
- "fused": the kernels compute it with a K-loop of tl.dot; nothing of the score matrix
  ever reaches memory.
- "gemm": cuBLAS computes the unscaled scores of one chunk of whole images, (N x C) in
  float32, and the same kernels read their tiles from it. A chunk is about 1/8 of the
  columns (or up to 8 MiB where that is more), so memory stays O(N * M*L / 8); the
  products run at cuBLAS speed.

Two ways for the fused K-loop to load its operands (`operand_loads`): "tma", tensor
descriptors served by the copy engine of sm_90 and newer GPUs, where the operands meet its
alignment rules (`tma_ready`); else "pointers", per-thread addresses and cp.async.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backends import triton_interpreting
from .backward_kernels import nce_grad_factors_kernel, nce_grad_scale_kernel, nce_grad_tile_kernel
from .forward_kernels import nce_fwd_kernel, nce_merge_kernel, nce_totals_kernel

STRATEGIES = ("fused", "gemm")
# None: the measured default per dtype (`score_strategy`); benchmarks and tests may pin one.
strategy: str | None = None
LOADS = ("tma", "pointers")
# None: the default of the device (`operand_loads`); benchmarks and tests may pin one.
loads: str | None = None
# A backward chunk (and a "gemm" forward chunk) is about 1/CHUNK_PARTS of the columns. More
# chunks mean less memory and more launches: on an H100 (bf16, N=M=1024, L=49, D=2048)
# 8 chunks ran fwd+bwd in 2.9 ms with a 23 MiB workspace (1.5% of eager), 16 chunks in
# 3.6 ms with 14.7 MiB (0.93%); see benchmarks/RESULTS.md.
CHUNK_PARTS = 8
# ... but a chunk's buffers need not be smaller than this: fewer, larger chunks cost no GPU
# time, only memory, and each chunk costs host time (a launch and two cuBLAS products) that
# AMDIM's per-GPU problems wait on (benchmarks/RESULTS.md). With it, one GPU's share (N =
# 128 of B = 1024, bf16) takes 2 chunks where it took 3, CIFAR (N = M = 200) and ImageNet
# on 4 GPUs 1 where they took 2; the single-GPU problem keeps its 8. csrc/nce_cuda.cpp's
# images_per_chunk applies the same rule.
MIN_CHUNK_BYTES = 8 << 20
# CUDA's cap on a grid's second axis. The G kernel's grid is (row blocks, column tiles of its
# chunk), so a chunk holds at most this many column tiles (8.4M columns at 128 a tile;
# reached only where M*L passes 67M with small N). csrc/nce_cuda.cpp's images_per_chunk
# applies the same cap.
GRID_Y_MAX = 65535
# The largest tclip whose constant shift the tile kernels take (exp(s - tclip) >= exp(-80), a
# normal float32); a larger one takes the running maximum. csrc/nce_math.h's kMaxShiftTclip.
MAX_SHIFT_TCLIP = 40.0
# Locations a step of the forward's copy of the positives (forward_kernels._store_positives):
# the product's N, so at least tl.dot's 16; more spills at (128, 64) tiles on sm_90.
SELECT_LOCATIONS = 16


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_j: int
    block_k: int
    num_warps: int
    num_stages: int
    # ptxas register cap of the forward's unmasked launch, or of the G kernel (None: ptxas
    # decides); 128 with 256 threads lets two programs share an SM
    plain_max_registers: int | None = None
    # the forward's masked launch scores its tiles this many columns at a time (a divisor of
    # block_j; None: block_j): narrower tiles leave the registers that copying the positives
    # out of them takes (forward_kernels._store_positives)
    masked_block_j: int | None = None

    def __post_init__(self):
        if self.masked_block_j is not None and self.block_j % self.masked_block_j:
            raise ValueError(f"masked_block_j must divide block_j = {self.block_j}, got {self.masked_block_j}")

    @property
    def masked(self) -> TileConfig:
        """The tiles of the forward's masked launch."""
        return dataclasses.replace(self, block_j=self.masked_block_j or self.block_j)


# kernel -> TileConfig pinned by a benchmark (`pinned(tiles=...)`); empty: the defaults
pinned_tiles: dict[str, TileConfig] = {}


def tile_config(dtype: torch.dtype, d: int, kernel: str) -> TileConfig:
    """Tiles of the forward's score loop ("fwd") or of the backward's G kernel ("grad").

    16-bit on an H100: (128, 128, 64), 8 warps, 3 stages was the fastest measured for both
    (benchmarks/RESULTS.md, before the kernels took their current form). Compiled offline
    for sm_90 (`python -m benchmarks.triton_resources`), the forward's unmasked launch and
    the G kernel fit 128 registers without spills with TMA operands (through pointers,
    Triton 3.6's G kernel spills 24 bytes outside its K-loop), so they are capped there:
    two programs per SM. On an H100 (2026-11-22, `python -m benchmarks.tune_triton`) it was
    as fast as any candidate within the run-to-run spread of the host-bound timings, so it
    stays; (128, 256) forward tiles measured 0.75 against 0.84 ms at N = M = 1024 but
    slower at N = 128, inside that spread.
    """
    if kernel in pinned_tiles:
        return pinned_tiles[kernel]
    if triton_interpreting():
        # the interpreter pays per program and per loop step: few, large tiles (the masked
        # ones scored in halves, as on a GPU)
        return TileConfig(32, 64, min(64, max(16, next_power_of_2(d))), 4, 1, masked_block_j=32)
    if dtype == torch.float32:
        return TileConfig(64, 128, 32, 8, 3, masked_block_j=64)
    # 96 KiB of shared memory and at most 128 registers a thread: two programs per SM. The
    # masked launch copies the positives out: at (128, 64) that fits 255 registers without
    # spills, at (128, 128) it spills (benchmarks/RESULTS.md, 2026-11-23; float32 likewise at
    # (64, 64) against (64, 128))
    return TileConfig(128, 128, 64, 8, 3, plain_max_registers=128, masked_block_j=64)


@contextlib.contextmanager
def pinned(score: str | None = None, chunks: int | None = None, tiles: dict | None = None,
           operands: str | None = None):
    """Pin the score strategy, the chunk count, kernel tiles ({"fwd": TileConfig,
    "grad": ...}) and/or the K-loop's operand loads ("tma" or "pointers") for the calls made
    inside (benchmarks, tests); the previous settings come back on exit. The strategy is
    recorded by each forward for its backward, so only the forward needs to run inside to
    pin it; chunks, "grad" tiles and loads apply to backwards run inside."""
    global strategy, CHUNK_PARTS, pinned_tiles, loads
    old = strategy, CHUNK_PARTS, pinned_tiles, loads
    strategy = score if score is not None else strategy
    CHUNK_PARTS = chunks if chunks is not None else CHUNK_PARTS
    pinned_tiles = {**pinned_tiles, **(tiles or {})}
    loads = operands if operands is not None else loads
    try:
        yield
    finally:
        strategy, CHUNK_PARTS, pinned_tiles, loads = old


def score_strategy(dtype: torch.dtype) -> str:
    """The strategy a call uses: the pinned one, else the faster one measured for the dtype.

    On an H100, 16-bit inputs: "fused" (tl.dot on the tensor cores, 2.4-2.9 ms fwd+bwd vs
    3.6-5.6 for "gemm" at N=M=1024, L=49, D=2048). float32: "gemm" (cuBLAS SGEMM/TF32;
    Triton's IEEE float32 dot is 2-3x slower there). See benchmarks/RESULTS.md.
    """
    if strategy is not None:
        return strategy
    return "gemm" if dtype == torch.float32 else "fused"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers. triton.cdiv is a constexpr function whose wrapper costs
    about 2.5 us a call on the host, and the chunk loops call this per chunk."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for host integers (as triton.next_power_of_2, without
    its wrapper's cost)."""
    return 1 << max(n - 1, 0).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: a few splits and chunks exercise the merge without slowing CI


def on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """x's CUDA device made current for the calls inside, where it is not already: Triton
    launches on the current device (torch ops and cuBLAS follow their tensors), so inputs
    on cuda:1 with cuda:0 current would hand it pointers of the wrong device."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls on CUDA use TF32, as cuBLAS reads it. torch 2.9+
    has a newer setting (torch.backends.fp32_precision and .cuda.matmul.fp32_precision,
    "tf32" or "ieee", the matmul one inheriting the global one), and once it has set TF32,
    reading the legacy allow_tf32 raises. So: the newer one where it is set, else the
    legacy one."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the two APIs were mixed and torch refuses to say: full float32
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's dot precision for float32 follows torch's TF32 switch, as cuBLAS does."""
    if dtype == torch.float32 and not triton_interpreting() and tf32_allowed():
        return "tf32"
    return "ieee"


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (cuBLAS's float32 output for 16-bit inputs)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_ADDMM_TO_F32 = "dtype_out" in torch.ops.aten.addmm.overloads()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """acc = beta * acc + a @ b for a float32 acc, accumulated in float32, with no temporary
    where cuBLAS can write float32 from 16-bit inputs (aten::addmm.dtype_out). beta = 0
    ignores what acc held (NaN included), as BLAS does."""
    if a.dtype == b.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and a.dtype == b.dtype and _ADDMM_TO_F32:
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    elif beta == 0:
        acc.copy_(mm_f32(a, b))
    else:
        acc += mm_f32(a, b)


def source_args(src: torch.Tensor) -> dict:
    """The kernels' size and stride arguments of the sources (N, D): N, D, stride_s*."""
    (n, d), (stride_sn, stride_sd) = src.shape, src.stride()
    return dict(N=n, D=d, stride_sn=stride_sn, stride_sd=stride_sd)


def target_args(trg: torch.Tensor) -> dict:
    """The kernels' size and stride arguments of targets (M, L, D) (all of them, or a
    chunk's images): L, stride_t*."""
    stride_tm, stride_tl, stride_td = trg.stride()
    return dict(L=trg.shape[1], stride_tm=stride_tm, stride_tl=stride_tl, stride_td=stride_td)


def operand_loads(device: torch.device) -> str:
    """How the fused K-loop loads src and trg: the pinned way, else "tma" on GPUs of compute
    capability 9.0 and newer (the copy engine that tensor descriptors drive), "pointers"
    before them and on the interpreter."""
    if loads is not None:
        return loads
    if device.type == "cuda" and not triton_interpreting() and torch.cuda.get_device_capability(device) >= (9, 0):
        return "tma"
    return "pointers"


def tma_ready(x: torch.Tensor) -> bool:
    """Whether a (rows, features) operand meets the copy engine's rules: features
    contiguous, base address and row stride multiples of 16 bytes (D a multiple of 8 in
    16-bit, of 4 in float32). Rows of stride 0 (an expanded tensor: every row the same
    memory) take pointers, which read them as they are, rather than a tensor map whose
    driver rules do not promise to accept them."""
    return (x.stride(1) == 1 and x.stride(0) > 0 and x.data_ptr() % 16 == 0
            and x.stride(0) * x.element_size() % 16 == 0)


def _src_descriptor(src: torch.Tensor, cfg: TileConfig,
                    from_scores: bool) -> Callable[[], TensorDescriptor] | None:
    """src (N, D) as a TMA descriptor in (BLOCK_N, BLOCK_K) boxes, shared by the chunks of
    one call and built when the first of them takes it: a cached maker, where the fused
    K-loop takes TMA operands (operand_loads) and src is tma_ready; else None: pointers."""
    if from_scores or operand_loads(src.device) != "tma" or not tma_ready(src):
        return None
    box = [cfg.block_n, cfg.block_k]
    return functools.cache(lambda: TensorDescriptor(src, list(src.shape), list(src.stride()), box))


def _clip_args(tclip: float | None) -> dict:
    """The kernels' clip arguments: tclip (0 when unused) and the CLIP switch."""
    return dict(tclip=0.0 if tclip is None else tclip, CLIP=tclip is not None)


def _tile_clip_args(tclip: float | None) -> dict:
    """The tile kernels' clip arguments: _clip_args and the SHIFT_TCLIP switch (the constant
    shift tclip up to MAX_SHIFT_TCLIP, else a running maximum)."""
    return dict(_clip_args(tclip), SHIFT_TCLIP=tclip is not None and tclip <= MAX_SHIFT_TCLIP)


def _tile_constants(src: torch.Tensor, cfg: TileConfig, from_scores: bool, tclip: float | None,
                    scale: float) -> dict:
    """The tile kernels' keyword arguments that all chunks of a call share (the sources'
    shape and strides, tiles, precision, scale, clip and shift), made once per call: on
    small problems the chunk loop's host time is what the GPU waits on."""
    d = src.shape[1]
    return dict(
        source_args(src),
        BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(src.dtype),
        UPCAST=triton_interpreting(),  # 16-bit dots in float32 (a no-op for float32 tiles)
        FROM_SCORES=from_scores, EVEN_K=d % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, scale=scale, **_tile_clip_args(tclip),
    )


def _chunk_operands(src: torch.Tensor, src_desc: Callable[[], TensorDescriptor] | None, images: torch.Tensor,
                    cfg: TileConfig) -> tuple[tuple, dict]:
    """The tile kernels' (src, trg) operands for the sources (N, D) and a chunk's images
    (C / L, L, D), features contiguous in both, and the chunk's own keyword arguments (L,
    its strides, TMA).

    The operands are the tensors themselves, or with TMA two tensor descriptors: src_desc
    (_src_descriptor) and the chunk as (C, D) in (BLOCK_J, BLOCK_K) boxes. TMA needs
    src_desc, the chunk's locations evenly spaced (a (C, D) view) and tma_ready;
    otherwise the kernels take pointers."""
    d = src.shape[1]
    m, l, _ = images.shape
    flat = images.view(m * l, d) if m == 1 or images.stride(0) == l * images.stride(1) else None
    tma = src_desc is not None and flat is not None and tma_ready(flat)
    if tma:
        box = [cfg.block_j, cfg.block_k]
        operands = (src_desc(), TensorDescriptor(flat, list(flat.shape), list(flat.stride()), box))
    else:
        operands = (src, images)
    return operands, dict(target_args(images), TMA=tma)


def _register_cap(cfg: TileConfig) -> dict:
    """The maxnreg option of the forward's unmasked launch or of the G kernel, where the
    config caps it."""
    if cfg.plain_max_registers is None or triton_interpreting():
        return {}
    return dict(maxnreg=cfg.plain_max_registers)


def chunk_floor_bytes(device: torch.device) -> int:
    """The smallest chunk worth its host time: MIN_CHUNK_BYTES, but 0 on the interpreter,
    whose small test problems should still be cut into chunks (as _num_sms, so that CI runs
    the chunk loops)."""
    return 0 if triton_interpreting() else MIN_CHUNK_BYTES


def chunk_columns(n: int, m: int, l: int, cfg: TileConfig, sms: int, bytes_per_column: int,
                  floor_bytes: int) -> int:
    """Columns per chunk: whole images, about 1/CHUNK_PARTS of all columns, but no more
    chunks than it takes to keep each chunk's buffers (bytes_per_column) within
    floor_bytes, and enough columns that one chunk's grid of (row block x column tile)
    programs gives every SM a program, but no more than GRID_Y_MAX column tiles; then evened
    out over the chunks that makes, so that the last is not a sliver (e.g. 200 images in
    chunks of 100 and 100 rather than 173 and 27: the same launches, a smaller buffer, no
    launch that leaves most SMs idle)."""
    parts = min(CHUNK_PARTS, max(1, cdiv(m * l * bytes_per_column, max(floor_bytes, 1))))
    fill = cdiv(sms, cdiv(n, cfg.block_n)) * cfg.block_j
    images = min(m, max(cdiv(m, parts), cdiv(fill, l)), max(1, GRID_Y_MAX * cfg.block_j // l))
    return cdiv(m, cdiv(m, images)) * l


def column_bytes(n: int, trg: torch.Tensor, from_scores: bool, backward: bool = False) -> int:
    """Bytes a chunk holds per column: cuBLAS's float32 scores (N per column) with the
    "gemm" strategy, a copy of the chunk's features (D per column) where trg's are not
    contiguous, and in the backward G itself (N per column, in the features' dtype)."""
    d, elem = trg.shape[2], trg.element_size()
    per_column = 4 * n if from_scores else 0
    if trg.stride(2) != 1:
        per_column += d * elem
    if backward:
        per_column += n * elem
    return per_column


def _chunks(m: int, l: int, c_max: int) -> Iterator[tuple[int, int]]:
    """(first column, number of columns) of consecutive chunks of whole images."""
    for c0 in range(0, m * l, c_max):
        yield c0, min(c_max, m * l - c0)


def features_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last (feature) dimension: itself, or a copy.

    The score loops read rows of features: with unit stride a tile's loads are 16-byte
    asynchronous copies. The trainer's feature-map targets ((M, D, H, W) seen as
    (M, H*W, D)) have stride L along D instead; read in place, every element would be its
    own 2-byte load through registers (32 per thread and K step at the default tiles,
    compiled for sm_90), outside the copy pipeline. csrc/nce_cuda.cpp copies the same way.
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_images(trg: torch.Tensor, c0: int, c: int) -> torch.Tensor:
    """The images of the chunk of columns [c0, c0 + c), (c / L, L, D), features contiguous:
    a view of trg, or a copy of just those images."""
    l = trg.shape[1]
    return features_contiguous(trg[c0 // l:(c0 + c) // l])


def _chunk_scores(src, images: torch.Tensor) -> torch.Tensor:
    """Unscaled float32 dot products of every source with the chunk's columns, (N, c)."""
    return mm_f32(src, images.reshape(-1, images.shape[2]).t())  # images: chunk_images()


@dataclass
class ForwardStats:
    loss: torch.Tensor  # (N, L) per-positive loss
    a_pos: torch.Tensor  # (N, L) raw positive scores (the backward forms the clip from them)
    neg_lse: torch.Tensor  # (N,) log-sum-exp of each row's negatives
    sq: torch.Tensor  # (N,) sum over the row of a^2
    mean: torch.Tensor  # () the mean of loss
    reg: torch.Tensor  # () reg_weight * mean(a^2)


def _split(cols: int, row_blocks: int, cfg: TileConfig, sms: int) -> tuple[int, int]:
    """(splits, columns per split) of a column range: about 4 programs per SM even when N is
    one row block; columns per split a multiple of BLOCK_J so that no tile straddles two."""
    tiles = cdiv(cols, cfg.block_j)
    splits = min(tiles, max(1, cdiv(4 * sms, row_blocks)))
    per_split = cdiv(tiles, splits) * cfg.block_j
    return cdiv(cols, per_split), per_split


def _location_block(l: int) -> int:
    """BLOCK_L of the per-row kernels (merge, backward factors): at most 64 locations a step."""
    return min(64, next_power_of_2(l))


def forward(src, trg, pos_idx, tclip: float | None, scale: float, reg_weight: float, strategy: str) -> ForwardStats:
    n, d = src.shape
    m, l, _ = trg.shape
    cfg = tile_config(src.dtype, d, "fwd")
    sms = _num_sms(src.device)
    f32 = dict(device=src.device, dtype=torch.float32)
    from_scores = strategy == "gemm"
    # one chunk of all the columns, unless cuBLAS's scores or a copy of trg (features not
    # contiguous) must be staged: then chunks of about 1/CHUNK_PARTS of them
    chunked = from_scores or trg.stride(2) != 1
    src = features_contiguous(src)
    c_max = m * l
    if chunked:
        c_max = chunk_columns(n, m, l, cfg, sms, column_bytes(n, trg, from_scores), chunk_floor_bytes(src.device))
    chunks = list(_chunks(m, l, c_max))
    row_blocks = cdiv(n, cfg.block_n)
    splits = [_split(c, row_blocks, cfg, sms) for _, c in chunks]

    # each chunk's tiles go to two launches (nce_fwd_kernel): the unmasked tiles, then the
    # rest, which also store the positives' raw scores in a_pos; each launch writes a slot
    # of partials per split
    total = 2 * sum(s for s, _ in splits)
    part_sum = torch.empty(total, n, **f32)
    part_max = torch.empty(total, n, **f32)
    part_sq = torch.empty(total, n, **f32)
    a_pos = torch.empty(n, l, **f32)
    src_desc = _src_descriptor(src, cfg, from_scores)
    fixed = dict(_tile_constants(src, cfg, from_scores, tclip, scale), BLOCK_L=SELECT_LOCATIONS, PLAIN_J=cfg.block_j)
    masked_cfg = cfg.masked
    launches = ((False, cfg, dict(fixed, **_register_cap(cfg))),
                (True, masked_cfg, dict(fixed, BLOCK_J=masked_cfg.block_j)))
    split_base = 0
    for (c0, c), (n_splits, per_split) in zip(chunks, splits):
        images = chunk_images(trg, c0, c)
        scores = _chunk_scores(src, images) if from_scores else part_sum  # part_sum: unused placeholder
        for masked, tiles, constants in launches:
            operands, own = _chunk_operands(src, src_desc, images, tiles)
            nce_fwd_kernel[(row_blocks, n_splits)](
                *operands, pos_idx, part_sum, part_max, part_sq, a_pos,
                scores, scores.stride(0), c0, c0 + c, split_base,
                cols_per_split=per_split, MASKED=masked, **own, **constants,
            )
            split_base += n_splits
        del images, scores, operands

    loss = torch.empty(n, l, **f32)
    neg_lse = torch.empty(n, **f32)
    sq = torch.empty(n, **f32)
    nce_merge_kernel[(n,)](
        part_sum, part_max, part_sq, a_pos, loss, neg_lse, sq, n, l, SPLITS=total, **_clip_args(tclip),
        BLOCK_S=32, BLOCK_L=_location_block(l),
    )
    mean = torch.empty((), **f32)
    reg = torch.empty((), **f32)
    nce_totals_kernel[(1,)](loss, sq, mean, reg, n * l, n, 1.0 / (n * l), reg_weight / (n * m * l), BLOCK=1024)
    return ForwardStats(loss, a_pos, neg_lse, sq, mean, reg)


def factors_blocks(l: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_L) of the backward's factor kernel: tiles of at most 64 locations and
    1024 elements (16 rows at L = 49), so that N = 128 still gives 8 programs."""
    block_l = _location_block(l)
    return max(1, 1024 // block_l), block_l


def gradient_factors(a_pos: torch.Tensor, neg_lse: torch.Tensor, grad_loss: torch.Tensor, loss_weight: float,
                     grad_sq: torch.Tensor, sq_weight: float, tclip: float | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G at the positives (N, L), R (N,), reg_coef (N,)) of the backward: scale * (gpos *
    ds/da + reg_coef * a), R = sum_l w * sig and reg_coef = 2 * sq_weight * grad_sq, with
    gpos = -w * sig, sig = sigmoid(neg_lse - pos), pos the clipped a_pos and w =
    loss_weight * grad_loss the upstream gradient of the per-positive loss. grad_loss (N, L)
    and grad_sq (N,) may have any strides: a broadcast scalar is read in place."""
    n, l = a_pos.shape
    g_pos = torch.empty_like(a_pos)
    r = torch.empty_like(neg_lse)
    reg_coef = torch.empty_like(neg_lse)
    block_n, block_l = factors_blocks(l)
    nce_grad_factors_kernel[(cdiv(n, block_n),)](
        a_pos, grad_loss, grad_loss.stride(0), grad_loss.stride(1), neg_lse, grad_sq, grad_sq.stride(0),
        g_pos, r, reg_coef, n, l, scale=scale, loss_weight=loss_weight, sq_weight=sq_weight,
        **_clip_args(tclip), BLOCK_N=block_n, BLOCK_L=block_l,
    )
    return g_pos, r, reg_coef


# float16 G is scaled so that |G| and |G^T @ src| stay within 2^15 (float16's largest
# finite value is 65504). A negative's typical entry is then about 2^15 / (M*L * N) for
# features of unit size (2^-10 at N = M = 1024, L = 49), inside float16's normal range
# (from 2^-14), and what flushes to zero lies under 2^-39 of the bound. 2^k is clamped to
# 2^+-100, well inside float32's range.
SCALE_LOG2_TARGET = 15
SCALE_MAX_EXP = 100


def gradient_scale(src: torch.Tensor, g_pos: torch.Tensor, r: torch.Tensor, reg_coef: torch.Tensor,
                   sq: torch.Tensor, scale: float, need_trg: bool) -> torch.Tensor:
    """(2^k, 2^-k) float32 on the device: the power of two a float16 G is stored times, so
    that G and (with need_trg) G^T @ src fit float16 (kernels.nce_grad_scale_kernel). No
    host sync: the products are scaled back on the device."""
    n, l = g_pos.shape
    d = src.shape[1]
    # d trg = G^T @ src grows |G| by at most max_d sum_i |src[i, d]|
    col_l1 = torch.linalg.vector_norm(src, 1, dim=0, dtype=torch.float32) if need_trg else r
    out = torch.empty(2, device=src.device, dtype=torch.float32)
    block_n, block_l = factors_blocks(l)
    nce_grad_scale_kernel[(1,)](
        g_pos, r, reg_coef, sq, col_l1, out, n, l, d, scale,
        LOG2_TARGET=SCALE_LOG2_TARGET, MAX_EXP=SCALE_MAX_EXP, COLS=need_trg,
        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=1024,
    )
    return out


def positives_block(l: int) -> int:
    """BLOCK_L of the G kernel's overwrite of the positives: 16 locations of the block's
    rows at a time (8 values a thread at 128 rows and 256 threads)."""
    return min(16, next_power_of_2(l))


def gradient_chunks(src, trg, pos_idx, neg_lse, r, g_pos, reg_coef, tclip, scale, strategy, g_scale=None):
    """Yield (first image, last image + 1, G, features) for consecutive chunks of whole
    images, where G (N, C) = scale * d(loss + reg)/da on the chunk's C columns, in the
    inputs' dtype and times g_scale[0] where that is given (float16, `gradient_scale`), and
    features (C, D) are the chunk's target features (chunk_images: a view or a copy), for
    the caller's products. G's buffer is reused."""
    n, d = src.shape
    m, l, _ = trg.shape
    cfg = tile_config(src.dtype, d, "grad")
    from_scores = strategy == "gemm"
    c_max = chunk_columns(n, m, l, cfg, _num_sms(src.device), column_bytes(n, trg, from_scores, backward=True),
                          chunk_floor_bytes(src.device))
    g_buf = torch.empty(n, c_max, device=src.device, dtype=src.dtype)
    src = features_contiguous(src)
    src_desc = _src_descriptor(src, cfg, from_scores)
    fixed = dict(_tile_constants(src, cfg, from_scores, tclip, scale), BLOCK_L=positives_block(l),
                 **_register_cap(cfg))
    row_blocks = cdiv(n, cfg.block_n)
    for c0, c in _chunks(m, l, c_max):
        g = g_buf[:, :c]
        images = chunk_images(trg, c0, c)
        operands, own = _chunk_operands(src, src_desc, images, cfg)
        scores = _chunk_scores(src, images) if from_scores else g  # g: unused placeholder
        nce_grad_tile_kernel[(row_blocks, cdiv(c, cfg.block_j))](
            *operands, pos_idx, neg_lse, r, g_pos, reg_coef, g, g.stride(0), g if g_scale is None else g_scale,
            scores, scores.stride(0), col_begin=c0, C=c, SCALED=g_scale is not None, **own, **fixed,
        )
        del scores, operands
        yield c0 // l, (c0 + c) // l, g, images.reshape(c, d)
