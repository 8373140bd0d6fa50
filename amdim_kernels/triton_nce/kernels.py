"""Triton kernels of the fused NCE loss (SPEC.md section 1).

Notation. Column j of the score matrix is target location (m, l) = (j // L, j % L) of
image m; J = M*L columns in all. Row i's positives are the L columns of image p_i =
pos_idx[i]; every other column is a negative of row i.

    a[i, j] = scale * <src[i], trg[m, l]>          raw score (float32 accumulation)
    s[i, j] = tclip * tanh(a / tclip)              soft-clipped score (s = a without clip)

Forward (`nce_fwd_kernel`, then `nce_merge_kernel`): programs tile the rows, and the columns
are split across programs so that a few hundred programs fill the GPU even when N is ~128.
Each program streams its columns tile by tile and keeps three per-row partials: the sum of
a^2, and the sum of exp(s - shift) over the negatives with its shift (a running maximum, or
the constant tclip with clipping: s < tclip so exp(s - tclip) <= 1 never overflows). Each
positive column lies in exactly one tile, so the positive scores are stored without atomics.
The merge kernel folds the partials of each row in split order (deterministic) into

    neg_lse[i] = log sum_{j negative} exp(s[i, j])
    loss[i, l] = -nce[i, l] = log(exp(pos) + exp(neg_lse)) - pos = softplus(neg_lse - pos)

Backward (`nce_grad_tile_kernel`): with sig[i, l] = sigmoid(neg_lse[i] - pos[i, l]) =
1 - exp(pos)/Z and w[i, l] the upstream gradient of loss[i, l], SPEC's gradients become

    dL/ds at a positive (i, (p_i, l)) = -w[i, l] * sig[i, l]                  (gpos)
    dL/ds at a negative (i, j)        = R[i] * exp(s[i, j] - neg_lse[i]),  R[i] = sum_l w * sig

(exp(s - neg_lse) <= 1 for every negative, so neither form can overflow). The kernel
recomputes a tile of scores and writes G = scale * d(loss + reg)/da for a chunk of columns;
the caller turns G into d src and d trg with two matrix products.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh from one exp: t = exp(-2|x|) lies in [0, 1], so nothing overflows;
    # +-inf gives +-1 and NaN stays NaN. Absolute error ~1 ulp of 1.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _soft_clip(a, tclip, CLIP: tl.constexpr):
    """s = tclip * tanh(a / tclip), or s = a without clipping (csrc/nce_math.h's soft_clip)."""
    if CLIP:
        return tclip * _tanh(a / tclip)
    else:
        return a


@triton.jit
def _score_tile(
    src_ptr, trg_ptr, scores_ptr, stride_scores, chunk_begin, chunk_end,
    rows, cols, N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr,
):
    """a = scale * src[rows] @ trg_flat[cols]^T as a (BLOCK_N, BLOCK_J) float32 tile.

    FROM_SCORES: the unscaled dot products of this chunk's columns were already computed
    (by cuBLAS) into scores[:, j - chunk_begin]; just read the tile. Otherwise compute it
    with a K-loop of tl.dot. Rows >= N and columns >= chunk_end score exactly 0 either way.
    """
    row_ok = (rows < N)[:, None]
    col_ok = (cols < chunk_end)[:, None]
    if FROM_SCORES:
        off = rows.to(tl.int64)[:, None] * stride_scores + (cols - chunk_begin)[None, :]
        acc = tl.load(scores_ptr + off, mask=row_ok & (cols < chunk_end)[None, :], other=0.0)
    else:
        # int64 offsets: m * stride_tm passes 2^31 once M*L*D does.
        img = cols // L
        loc = cols - img * L
        src_rows = src_ptr + rows.to(tl.int64)[:, None] * stride_sn
        trg_cols = trg_ptr + (img.to(tl.int64) * stride_tm + loc.to(tl.int64) * stride_tl)[:, None]
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
            if UPCAST:  # the CPU interpreter's dot is wrong on 16-bit tiles
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc * scale


@triton.jit
def nce_fwd_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,
    pos_ptr,  # (N, L) float32 out: clipped positive scores
    part_sum_ptr, part_max_ptr, part_sq_ptr,  # (SPLITS, N) float32 out: per-split row partials
    scores_ptr, stride_scores,  # FROM_SCORES: (N, chunk) float32 unscaled dot products
    chunk_begin, chunk_end, split_base,  # this launch's columns, and its first split's index
    N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    cols_per_split,  # a multiple of BLOCK_J, so no tile straddles two splits
    scale, tclip,
    CLIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)

    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if CLIP:
        shift = tl.zeros((BLOCK_N,), dtype=tl.float32) + tclip
    else:
        shift = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)

    col_begin = chunk_begin + split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, chunk_end)
    for j0 in range(col_begin, col_end, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        a = _score_tile(
            src_ptr, trg_ptr, scores_ptr, stride_scores, chunk_begin, chunk_end,
            rows, cols, N, L, D,
            stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
            BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K,
        )
        sq += tl.sum(a * a, axis=1)  # padded rows/columns score 0 and add nothing
        s = _soft_clip(a, tclip, CLIP)

        img = cols // L
        is_pos = (img[None, :] == p[:, None]) & row_ok[:, None] & (cols < chunk_end)[None, :]
        is_neg = (cols < chunk_end)[None, :] & (img[None, :] != p[:, None])

        if CLIP:
            neg_sum += tl.sum(tl.where(is_neg, tl.exp(s - tclip), 0.0), axis=1)
        else:
            # online log-sum-exp: rescale the running sum to the new maximum
            tile_max = tl.max(tl.where(is_neg, s, float("-inf")), axis=1)
            new_shift = tl.maximum(shift, tile_max)
            # both -inf (no negative seen yet): keep 0 instead of exp(nan)
            safe = tl.where(new_shift == float("-inf"), 0.0, new_shift)
            neg_sum = neg_sum * tl.exp(shift - safe) + tl.sum(
                tl.where(is_neg, tl.exp(s - safe[:, None]), 0.0), axis=1
            )
            shift = new_shift

        # positive (i, (p_i, l)) goes to pos[i, l], l = j - p_i * L
        pos_off = rows.to(tl.int64)[:, None] * L + (cols - img * L)[None, :]
        tl.store(pos_ptr + pos_off, s, mask=is_pos)

    out = (split_base + split).to(tl.int64) * N + rows
    tl.store(part_sum_ptr + out, neg_sum, mask=row_ok)
    tl.store(part_max_ptr + out, shift, mask=row_ok)
    tl.store(part_sq_ptr + out, sq, mask=row_ok)


@triton.jit
def nce_merge_kernel(
    pos_ptr, part_sum_ptr, part_max_ptr, part_sq_ptr,
    loss_ptr,  # (N, L) float32 out: per-positive loss softplus(neg_lse - pos)
    neg_lse_ptr, sq_ptr,  # (N,) float32 out
    N, L, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    shift = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # BLOCK_S splits at a time, always in the same order and the same reduction tree:
    # the result does not depend on how the forward's programs were scheduled.
    for s0 in range(0, SPLITS, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = (splits < SPLITS)[:, None] & row_ok[None, :]
        off = splits.to(tl.int64)[:, None] * N + rows[None, :]
        part_sum = tl.load(part_sum_ptr + off, mask=ok, other=0.0)
        part_max = tl.load(part_max_ptr + off, mask=ok, other=float("-inf"))
        sq += tl.sum(tl.load(part_sq_ptr + off, mask=ok, other=0.0), axis=0)
        new_shift = tl.maximum(shift, tl.max(part_max, axis=0))
        safe = tl.where(new_shift == float("-inf"), 0.0, new_shift)  # no exp(-inf - -inf)
        neg_sum = neg_sum * tl.exp(shift - safe) + tl.sum(part_sum * tl.exp(part_max - safe[None, :]), axis=0)
        shift = new_shift
    # log(0) = -inf when the row has no negatives (M == 1): its loss is then exactly 0
    neg_lse = shift + tl.log(neg_sum)

    ls = tl.arange(0, BLOCK_L)
    tile_ok = row_ok[:, None] & (ls < L)[None, :]
    off = rows.to(tl.int64)[:, None] * L + ls[None, :]
    pos = tl.load(pos_ptr + off, mask=tile_ok, other=0.0)
    x = neg_lse[:, None] - pos
    # stable softplus; x = -inf gives 0
    loss = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    # A non-finite score must give NaN, but tanh maps +-inf to +-tclip; the row's sum of
    # a^2 is finite exactly when all its scores are, and 0 * inf = NaN.
    loss += 0.0 * sq[:, None]
    tl.store(loss_ptr + off, loss, mask=tile_ok)
    tl.store(neg_lse_ptr + rows, neg_lse, mask=row_ok)
    tl.store(sq_ptr + rows, sq, mask=row_ok)


@triton.jit
def nce_grad_tile_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,
    neg_lse_ptr, r_ptr,  # (N,) float32: log-sum-exp of the negatives, R[i] = sum_l w * sig
    gpos_ptr,  # (N, L) float32: dL/ds at the positives, -w * sig
    reg_coef_ptr,  # (N,) float32: d(reg)/da = reg_coef[i] * a
    g_ptr, stride_gn,  # (N, C) out, G's dtype: scale * d(loss + reg)/da for this chunk
    scores_ptr, stride_scores,  # FROM_SCORES: (N, C) float32 unscaled dot products
    N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    col_begin, C,  # this chunk's columns: [col_begin, col_begin + C)
    scale, tclip,
    CLIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # column inside the chunk
    cols = col_begin + local
    row_ok = rows < N
    col_ok = local < C

    a = _score_tile(
        src_ptr, trg_ptr, scores_ptr, stride_scores, col_begin, col_begin + C,
        rows, cols, N, L, D,
        stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
        BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K,
    )
    s = _soft_clip(a, tclip, CLIP)

    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)
    neg_lse = tl.load(neg_lse_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    img = cols // L
    valid = row_ok[:, None] & col_ok[None, :]
    is_pos = valid & (img[None, :] == p[:, None])
    is_neg = valid & (img[None, :] != p[:, None])

    gpos = tl.load(
        gpos_ptr + rows.to(tl.int64)[:, None] * L + (cols - img * L)[None, :], mask=is_pos, other=0.0
    )
    # where() before the product: exp(s - neg_lse) is inf where neg_lse = -inf (no negatives)
    dl_ds = tl.where(is_neg, r[:, None] * tl.exp(tl.where(is_neg, s - neg_lse[:, None], 0.0)), gpos)
    if CLIP:
        dl_da = dl_ds * (1.0 - (s / tclip) * (s / tclip))  # d tanh-clip / da = 1 - (s/tclip)^2
    else:
        dl_da = dl_ds
    reg_coef = tl.load(reg_coef_ptr + rows, mask=row_ok, other=0.0)
    g = scale * (dl_da + reg_coef[:, None] * a)
    g_off = rows.to(tl.int64)[:, None] * stride_gn + local[None, :]
    tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=valid)
