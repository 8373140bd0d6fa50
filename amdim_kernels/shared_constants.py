"""Constants, and the chunking rule, that the Triton kernels (here, in Python) and the C++/CUDA
kernels (csrc/nce_shared.h) share. The extension exposes its own values
(``amdim_kernels._C.SHARED_CONSTANTS``, ``amdim_kernels._C.images_per_chunk``), and
tests/test_shared_constants.py checks that the two agree."""
from __future__ import annotations

# The backward (and a forward that stages scores or copies features) works on chunks of
# whole images, about 1/CHUNK_PARTS of the columns each: more chunks mean less memory and
# more launches.
CHUNK_PARTS = 8
# ... but a chunk's buffers need not be smaller than this: fewer, larger chunks cost no GPU
# time, only memory, and each chunk costs host time (a launch and two cuBLAS products) that
# AMDIM's small per-GPU problems wait on.
MIN_CHUNK_BYTES = 8 << 20
# CUDA's cap on a grid's second axis, which counts a chunk's column tiles: a chunk holds at
# most this many (8.4M columns at 128 a tile; reached only where M*L passes 67M with small N).
GRID_Y_MAX = 65535
# Columns one block of the CUDA epilogue kernels reduces: the cuda three-product schedule's
# launches over all M*L columns take at most GRID_Y_MAX of them.
CUDA_COLS_PER_BLOCK = 2048
# The largest tclip whose constant shift the tile kernels take: exp(s - tclip) >= exp(-80)
# stays a normal float32. A larger tclip takes a running maximum instead.
MAX_SHIFT_TCLIP = 40.0
# float16 G is stored times 2^k so that |G| and |G^T @ src| stay within 2^SCALE_LOG2_TARGET
# (float16's largest finite value is 65504); k is clamped to +-SCALE_MAX_EXP.
SCALE_LOG2_TARGET = 15
SCALE_MAX_EXP = 100


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers."""
    return -(-a // b)


def images_per_chunk(m: int, l: int, bytes_per_column: int, fill_columns: int, cols_per_tile: int,
                     floor_bytes: int = MIN_CHUNK_BYTES, parts: int = CHUNK_PARTS) -> int:
    """Images per chunk of M images of L locations: about 1/parts of them, but no more
    chunks than it takes to keep each chunk's buffers (bytes_per_column) within
    floor_bytes, at least fill_columns columns (what fills the GPU), and no more than
    GRID_Y_MAX tiles of cols_per_tile columns; then evened out over the chunks that makes,
    so that the last is not a sliver (200 images in chunks of 100 and 100, not 173 and 27)."""
    parts = min(parts, max(1, cdiv(m * l * bytes_per_column, max(floor_bytes, 1))))
    images = min(m, max(cdiv(m, parts), cdiv(fill_columns, l)), max(1, GRID_Y_MAX * cols_per_tile // l))
    return cdiv(m, cdiv(m, images))
