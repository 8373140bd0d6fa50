"""Which schedule a call runs with, and the rows of its blocks: backend "cpp" under "auto"
and when set; backends "triton" and "cuda" only where settings(schedule="three-product") sets
it (their three-product schedules are not yet timed on a GPU).

    four-product   the forward makes the scores tile by tile and keeps per-row statistics;
                   the backward makes them again, then d src and d trg (four products).
    three-product  the forward keeps a block of source rows' scores whole, which gives their
                   statistics exactly, and makes the block's G and both gradients at once
                   (three products); the backward only scales them by the upstream gradient.

The three-product forward makes the gradients of one objective, the mean loss over all N*L
positives plus reg (autograd formula in three_product.py); it needs a reduced loss and gradients,
and holds one row block's float32 scores, B x M*L, at a time (on a GPU also the block's G in
the inputs' dtype): B is what fits the workspace budget. Beside the block it holds, on the
CPU, one B x D float32 scratch per thread for d src's partials (8 x B x D where a group of
tiles spans fewer than D columns) and, from the forward to the backward, both gradients
(three_product.gradient_dtypes: float32 on the CPU; on a GPU in the inputs' dtype, but d trg
in float32 where there are several blocks). "auto" takes it wherever the call
allows it and a useful block fits; it is the faster schedule on the CPU
(benchmarks.cpu_floor). On a GPU, where trg's features are not contiguous (the trainer's
feature maps), the schedule also holds one copy of trg. The GPU backends refuse float16
inputs: their four-product backward stores its G times a power of two found from every row's
factors, which a block does not have.
"""
from __future__ import annotations

import torch

from .backend_settings import Settings
from .indices import capturing
from .shared_constants import CUDA_COLS_PER_BLOCK, GRID_Y_MAX
from .validation import Problem

FOUR_PRODUCT = 0  # choose()'s answer for the four-product schedule
# The smallest row block "auto" takes (or all N rows, where fewer): a product with fewer rows
# reads the targets once for too little work.
MIN_BLOCK_ROWS = 32
# The default budget: half the whole score matrix, which stays far from the eager reference's
# memory (it holds five or more N x M*L temporaries at once), and at least 4 MiB, which any
# machine has. Fewer, larger blocks are faster: each block reads every target and reads and
# writes all of d trg once, its product of rank B (benchmarks.cpu_floor).
# Capped at 256 MiB: past it blocks of hundreds of rows already make products of high rank.
DEFAULT_WORKSPACE_FLOOR = 4 << 20
DEFAULT_WORKSPACE_CAP = 256 << 20
# The GPU backends' default: one block of all N rows, up to 1 GiB. On a GPU each further block
# reads and writes all of d trg once more (float32, M*L x D: 411 MB at AMDIM's single-GPU
# size, N = M = 1024, L = 49, D = 2048, where the eager reference holds five or more float32
# N x M*L matrices of 205 MB), at a cost near a product's.
DEFAULT_GPU_WORKSPACE_CAP = 1 << 30

# The backends whose three-product schedule keeps the block's G beside its scores, in the
# inputs' dtype, and takes no float16 (the GPU backends: Triton's under the interpreter too)
G_BESIDE_SCORES = ("triton", "cuda")
# cuda's three-product epilogue launches take all M*L columns at once, in at most GRID_Y_MAX
# blocks of CUDA_COLS_PER_BLOCK columns along the grid's y
CUDA_MAX_COLUMNS = GRID_Y_MAX * CUDA_COLS_PER_BLOCK


def default_workspace_bytes(p: Problem, backend: str) -> int:
    """Settings.workspace_bytes's default: for cpp half the score matrix, N*M*L*4 / 2,
    within [4 MiB, 256 MiB]; for the GPU backends one block of all N rows (row_bytes each),
    within [4 MiB, 1 GiB]."""
    if backend in G_BESIDE_SCORES:
        return min(DEFAULT_GPU_WORKSPACE_CAP, max(DEFAULT_WORKSPACE_FLOOR, p.n * row_bytes(p, backend)))
    return min(DEFAULT_WORKSPACE_CAP, max(DEFAULT_WORKSPACE_FLOOR, 2 * p.n * p.m * p.l))


def row_bytes(p: Problem, backend: str) -> int:
    """Workspace bytes per row of a block: its float32 scores, and for the GPU backends its
    G in the inputs' dtype as well (cpp overwrites the scores with G)."""
    per_column = 4 + (p.src.element_size() if backend in G_BESIDE_SCORES else 0)
    return per_column * p.m * p.l


def block_rows(p: Problem, settings: Settings, backend: str = "cpp") -> int:
    """Rows per block: the fewest blocks that fit the workspace budget (row_bytes each row),
    made even (so that no block is a small remainder: each block reads every target and
    adds to all of d trg once), or 0 where one row does not fit."""
    budget = settings.workspace_bytes or default_workspace_bytes(p, backend)
    fit = min(p.n, budget // row_bytes(p, backend))
    if fit < 1:
        return 0
    blocks = -(-p.n // fit)
    return -(-p.n // blocks)


def choose(p: Problem, settings: Settings, backend: str = "cpp") -> int:
    """The three-product schedule's block rows for this call on `backend`, or FOUR_PRODUCT.
    "auto" takes it on cpp only (the GPU backends' is not yet timed on a GPU). A call that
    needs no gradient runs four-product under any setting (its forward is the same); a forced
    "three-product" that a call needing gradients cannot take is a ValueError."""
    if settings.schedule == "four-product" or (settings.schedule == "auto" and backend in G_BESIDE_SCORES):
        return FOUR_PRODUCT
    needs_grad = torch.is_grad_enabled() and (p.src.requires_grad or p.trg.requires_grad)
    if not needs_grad:
        return FOUR_PRODUCT
    rows = block_rows(p, settings, backend)
    # the backward reads the upstream's values on the host: not inside a compiled graph or a
    # CUDA graph being captured
    traced = torch.compiler.is_compiling() or capturing(p.src)
    if settings.schedule == "auto":
        takes = p.reduction != "none" and not traced
        return rows if takes and rows >= min(p.n, MIN_BLOCK_ROWS) else FOUR_PRODUCT
    forced = "settings(schedule='three-product')"
    if p.reduction == "none":
        raise ValueError(f"{forced} needs a reduced loss (reduction 'mean' or 'group_means'), got reduction='none'")
    if traced:
        raise ValueError(f"{forced} runs in eager mode only (not under torch.compile or CUDA graph capture); "
                         "use 'auto' or 'four-product' there")
    if backend == "cuda" and p.m * p.l > CUDA_MAX_COLUMNS:
        raise ValueError(f"{forced} on backend 'cuda' takes at most {CUDA_MAX_COLUMNS} target columns M*L "
                         f"(its epilogue kernels' grid), got {p.m * p.l}; use 'four-product' there")
    if backend in G_BESIDE_SCORES and p.src.dtype == torch.float16:
        raise ValueError(f"{forced} on backend {backend!r} takes float32 and bfloat16 inputs, got float16 (its "
                         "G's scale needs every row's factors); use 'four-product' there")
    if rows < 1:
        raise ValueError(f"{forced}: workspace_bytes = {settings.workspace_bytes} holds no row of the block "
                         f"(one row is {row_bytes(p, backend)} bytes: M*L float32 scores"
                         + (" and their G" if backend in G_BESIDE_SCORES else "") + ")")
    return rows
