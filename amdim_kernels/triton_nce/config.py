"""How the Triton backend cuts a call into launches: tile configurations, chunks of columns,
splits, and each call's settings as the ops carry them from the forward to the backward.

Two ways to get a tile of raw scores (Settings.triton_scores):
- "fused": the kernels compute it with a K-loop of tl.dot; nothing of the score matrix
  ever reaches memory.
- "gemm": cuBLAS computes the unscaled scores of one chunk of whole images, (N x C) in
  float32, and the same kernels read their tiles from it. A chunk is about 1/8 of the
  columns (or up to 8 MiB where that is more), so memory stays O(N * M*L / 8); the
  products run at cuBLAS speed.

Two ways for the fused K-loop to load its operands (Settings.triton_loads): "tma", tensor
descriptors served by the copy engine of sm_90 and newer GPUs, where the operands meet its
alignment rules (operands.tma_ready); else "pointers", per-thread addresses and cp.async.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import environment
from ..backend_settings import Settings, TileConfig
from ..shared_constants import CHUNK_PARTS, GRID_Y_MAX, MAX_SHIFT_TCLIP, MIN_CHUNK_BYTES, cdiv, images_per_chunk

# Locations a step of the forward's copy of the positives (forward._store_positives): the
# product's N, so at least tl.dot's 16; more spills at (128, 64) tiles on sm_90.
SELECT_LOCATIONS = 16

__all__ = ["CHUNK_PARTS", "GRID_Y_MAX", "MAX_SHIFT_TCLIP", "MIN_CHUNK_BYTES", "SELECT_LOCATIONS", "TileConfig",
           "CallOptions", "tile_config", "default_score_strategy", "cdiv", "next_power_of_2", "num_sms",
           "tf32_allowed", "dot_precision", "operand_loads", "clip_args", "tile_clip_args", "register_cap",
           "chunk_floor_bytes", "chunk_columns", "column_bytes", "chunk_ranges", "split_columns", "location_block"]


def tile_config(dtype: torch.dtype, d: int, pinned: TileConfig | None = None) -> TileConfig:
    """Tiles of the forward's score loop or of the backward's G kernel: `pinned` where
    Settings.triton_tiles pins them, else the defaults below.

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
    if pinned is not None:
        return pinned
    if environment.TRITON_INTERPRET:
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


def default_score_strategy(dtype: torch.dtype) -> str:
    """The faster strategy measured for the dtype on an H100: "fused" for 16-bit inputs
    (tl.dot on the tensor cores, 2.4-2.9 ms fwd+bwd against 3.6-5.6 for "gemm" at N = M =
    1024, L = 49, D = 2048), "gemm" for float32 (cuBLAS SGEMM/TF32; Triton's IEEE float32
    dot is 2-3x slower there). See benchmarks/RESULTS.md."""
    return "gemm" if dtype == torch.float32 else "fused"


@dataclass(frozen=True)
class CallOptions:
    """One call's Triton settings (settings.Settings), resolved for its dtype. The ops take
    them as plain arguments (op_args), so that the backward runs as its forward did,
    under torch.compile too."""

    strategy: str  # "fused" or "gemm"
    loads: str | None  # "tma", "pointers", or None: operand_loads decides
    chunks: int
    fwd_tiles: TileConfig | None
    grad_tiles: TileConfig | None

    @staticmethod
    def of(settings: Settings, dtype: torch.dtype) -> CallOptions:
        tiles = settings.triton_tiles
        return CallOptions(settings.triton_scores or default_score_strategy(dtype), settings.triton_loads,
                           settings.triton_chunks, tiles.get("fwd"), tiles.get("grad"))

    def op_args(self) -> tuple[str, str, int, list[int], list[int]]:
        """(strategy, loads or "", chunks, fwd tiles, grad tiles), each tile config seven ints
        or [] for the default."""
        return (self.strategy, self.loads or "", self.chunks, self.fwd_tiles.as_list() if self.fwd_tiles else [],
                self.grad_tiles.as_list() if self.grad_tiles else [])

    @staticmethod
    def from_op_args(strategy: str, loads: str, chunks: int, fwd_tiles: Sequence[int],
                     grad_tiles: Sequence[int]) -> CallOptions:
        return _from_op_args(strategy, loads, chunks, tuple(fwd_tiles), tuple(grad_tiles))


@functools.lru_cache(maxsize=64)
def _from_op_args(strategy: str, loads: str, chunks: int, fwd_tiles: tuple, grad_tiles: tuple) -> CallOptions:
    # cached: a call's host time is what small problems wait on, and calls repeat their options
    return CallOptions(strategy, loads or None, chunks, TileConfig.from_list(fwd_tiles) if fwd_tiles else None,
                       TileConfig.from_list(grad_tiles) if grad_tiles else None)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for host integers (as triton.next_power_of_2, without
    its wrapper's cost)."""
    return 1 << max(n - 1, 0).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: a few splits and chunks exercise the merge without slowing CI


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
    if dtype == torch.float32 and not environment.TRITON_INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def operand_loads(device: torch.device, pinned: str | None = None) -> str:
    """How the fused K-loop loads src and trg: `pinned` (Settings.triton_loads), else "tma" on GPUs of compute
    capability 9.0 and newer (the copy engine that tensor descriptors drive), "pointers"
    before them and on the interpreter."""
    if pinned is not None:
        return pinned
    if device.type == "cuda" and not environment.TRITON_INTERPRET and torch.cuda.get_device_capability(device) >= (9, 0):
        return "tma"
    return "pointers"


def clip_args(tclip: float | None) -> dict:
    """The kernels' clip arguments: tclip (0 when unused) and the CLIP switch."""
    return dict(tclip=0.0 if tclip is None else tclip, CLIP=tclip is not None)


def tile_clip_args(tclip: float | None) -> dict:
    """The tile kernels' clip arguments: clip_args and the SHIFT_TCLIP switch (the constant
    shift tclip up to MAX_SHIFT_TCLIP, else a running maximum)."""
    return dict(clip_args(tclip), SHIFT_TCLIP=tclip is not None and tclip <= MAX_SHIFT_TCLIP)


def register_cap(cfg: TileConfig) -> dict:
    """The maxnreg option of the forward's unmasked launch or of the G kernel, where the
    config caps it."""
    if cfg.plain_max_registers is None or environment.TRITON_INTERPRET:
        return {}
    return dict(maxnreg=cfg.plain_max_registers)


def chunk_floor_bytes(device: torch.device) -> int:
    """The smallest chunk worth its host time: MIN_CHUNK_BYTES, but 0 on the interpreter,
    whose small test problems should still be cut into chunks (as num_sms, so that CI runs
    the chunk loops)."""
    return 0 if environment.TRITON_INTERPRET else MIN_CHUNK_BYTES


def chunk_columns(n: int, m: int, l: int, cfg: TileConfig, sms: int, bytes_per_column: int,
                  floor_bytes: int, parts: int = CHUNK_PARTS) -> int:
    """Columns per chunk, whole images: shared_constants.images_per_chunk (the rule the CUDA
    backend applies too) with enough columns that one chunk's grid of (row block x column
    tile) programs gives every SM a program."""
    fill = cdiv(sms, cdiv(n, cfg.block_n)) * cfg.block_j
    return images_per_chunk(m, l, bytes_per_column, fill, cfg.block_j, floor_bytes, parts) * l


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


def chunk_ranges(m: int, l: int, c_max: int) -> Iterator[tuple[int, int]]:
    """(first column, number of columns) of consecutive chunks of whole images."""
    for c0 in range(0, m * l, c_max):
        yield c0, min(c_max, m * l - c0)


def split_columns(cols: int, row_blocks: int, cfg: TileConfig, sms: int) -> tuple[int, int]:
    """(splits, columns per split) of a column range: about 4 programs per SM even when N is
    one row block; columns per split a multiple of BLOCK_J so that no tile straddles two."""
    tiles = cdiv(cols, cfg.block_j)
    splits = min(tiles, max(1, cdiv(4 * sms, row_blocks)))
    per_split = cdiv(tiles, splits) * cfg.block_j
    return cdiv(cols, per_split), per_split


def location_block(l: int) -> int:
    """BLOCK_L of the per-row kernels (merge, backward factors): at most 64 locations a step."""
    return min(64, next_power_of_2(l))
