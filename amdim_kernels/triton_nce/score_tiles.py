"""What the forward and backward Triton kernels of the fused NCE loss share (the loss
in docs/loss.md): a tile of raw scores, the soft clip, and which tiles hold a row block's own
images.

Notation. Column j of the score matrix is target location (m, l) = (j // L, j % L) of
image m; J = M*L columns in all. Row i's positives are the L columns of image p_i =
pos_idx[i]; every other column is a negative of row i.

    a[i, j] = scale * <src[i], trg[m, l]>          raw score (float32 accumulation)
    s[i, j] = tclip * tanh(a / tclip)              soft-clipped score (s = a without clip)

A tile of raw scores comes from `score_tile`: a K-loop of tl.dot whose operands come
through TMA tensor descriptors where the GPU and their alignment allow
(config.operand_loads), else through pointers; or, with the "gemm" score strategy, read
from the chunk of scores cuBLAS computed. Row i's own image p_i holds its positives, which
the forward leaves out of the negatives and the backward overwrites in G: `own_images` and
`holds_own_images` tell which tiles may hold one.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # |x| >= 1/4: tanh from one exp, t = exp(-2|x|) in [0, 1], so nothing overflows; +-inf
    # gives +-1 and NaN stays NaN. Absolute error ~1 ulp of 1, so under 4e-7 relative here.
    # |x| < 1/4, where 1 - t would cancel (a large tclip's s = tclip tanh(a / tclip) would
    # lose all of a): the odd Taylor series to x^9, within 1e-8 relative (the next term is
    # 1382/155925 x^11).
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    y = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    y = tl.where(ax < 0.25, series, y)
    return tl.where(x < 0, -y, y)


@triton.jit
def soft_clip(a, tclip, CLIP: tl.constexpr):
    """s = tclip * tanh(a / tclip), or s = a without clipping (csrc/nce_math.h's soft_clip).

    a * (1 / tclip): one multiply per score where a float32 division costs a reciprocal and
    a range check; the reciprocal's rounding (<= 1 ulp) is below the score's own error.
    """
    if CLIP:
        return tclip * tanh(a * (1.0 / tclip))
    else:
        return a


@triton.jit
def clip_pieces(a, tclip):
    """The soft clip's pieces straight from the raw score a, without forming s.

    With t = exp(-2|a|/tclip) in [0, 1] and d = 1/(1 + t), tanh(|a|/tclip) = (1 - t) d, so

        s - tclip            = -2 tclip q d,  q = t where a >= 0, else 1
        ds/da = 1 - (s/tclip)^2 = 4 t d^2

    Returns (log2 exp(s - tclip) <= 0, ds/da). No cancellation in s - tclip (s formed first
    and then shifted would lose ~tclip ulps near saturation); +-inf give s = +-tclip and
    ds/da = 0, NaN stays NaN. Two MUFU operations (exp2, reciprocal) per score.
    (1.4426950408889634 = log2 e, here and below, is written out: the interpreter mis-wraps
    a constexpr global multiplied by a tensor.)
    """
    t = tl.exp2(tl.abs(a) * (-2.0 * 1.4426950408889634 / tclip))
    d = 1.0 / (1.0 + t)
    q = tl.where(a >= 0, t, 1.0)
    return (-2.0 * 1.4426950408889634 * tclip) * (q * d), 4.0 * t * d * d


@triton.jit
def own_images(p, row_ok):
    """Lowest and highest own image p_i of the block's rows (the images they exclude)."""
    lo = tl.min(tl.where(row_ok, p, 2147483647), axis=0)
    hi = tl.max(tl.where(row_ok, p, -1), axis=0)
    return lo, hi


@triton.jit
def holds_own_images(c0, c1, L, p_lo, p_hi):
    """Whether the columns [c0, c1) may hold one of the block's own images (p_lo..p_hi)."""
    return ((c1 - 1) // L >= p_lo) & (c0 // L <= p_hi)


@triton.jit
def score_tile(
    src, trg, scores_ptr, stride_scores, chunk_begin, chunk_end,
    row0, j0, N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):
    """a = scale * src[rows] @ trg_flat[cols]^T as a (BLOCK_N, BLOCK_J) float32 tile, for
    rows [row0, row0 + BLOCK_N) and columns [j0, j0 + BLOCK_J).

    trg points at the chunk's first image (chunks are whole images: chunk_begin is a
    multiple of L), so column j is location (j - chunk_begin) % L of the chunk's image
    (j - chunk_begin) // L. Three ways to the tile:
    - FROM_SCORES: the unscaled dot products of this chunk's columns were already computed
      (by cuBLAS) into scores[:, j - chunk_begin]; just read the tile.
    - TMA: src and trg are tensor descriptors of the (N, D) sources and the chunk's
      (C, D) target features. Each K step asks the copy engine for two boxes, rows
      [row0, +BLOCK_N) and features [k0, +BLOCK_K) of src, local columns [j0 - chunk_begin,
      +BLOCK_J) of trg; it writes them to shared memory and fills whatever lies past N, C
      or D with zeros. No per-thread addresses, no masks.
    - Otherwise src and trg are pointers: the same K-loop with computed addresses and masks.
    Rows >= N and columns >= chunk_end score exactly 0 every way.
    """
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = j0 + tl.arange(0, BLOCK_J)
    local = cols - chunk_begin
    if FROM_SCORES:
        off = rows.to(tl.int64)[:, None] * stride_scores + local[None, :]
        ok = (rows < N)[:, None] & (cols < chunk_end)[None, :]
        acc = tl.load(scores_ptr + off, mask=ok, other=0.0)
    elif TMA:
        acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = src.load([row0, k0])
            b = trg.load([j0 - chunk_begin, k0])
            if UPCAST:  # the CPU interpreter's dot is wrong on 16-bit tiles
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    else:
        row_ok = (rows < N)[:, None]
        col_ok = (cols < chunk_end)[:, None]
        # int64 offsets: m * stride_tm passes 2^31 once M*L*D does.
        img = local // L
        loc = local - img * L
        src_rows = src + rows.to(tl.int64)[:, None] * stride_sn
        trg_cols = trg + (img.to(tl.int64) * stride_tm + loc.to(tl.int64) * stride_tl)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:  # D % BLOCK_K == 0: only the row/column masks
                a_mask = row_ok
                b_mask = col_ok
            else:
                a_mask = row_ok & (k < D)[None, :]
                b_mask = col_ok & (k < D)[None, :]
            a = tl.load(src_rows + k.to(tl.int64)[None, :] * stride_sd, mask=a_mask, other=0.0)
            b = tl.load(trg_cols + k.to(tl.int64)[None, :] * stride_td, mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc * scale
