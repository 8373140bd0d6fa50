"""The backward Triton kernels of the fused NCE loss (SPEC.md section 1; notation in
score_tiles.py).

Backward (`nce_grad_factors_kernel`, then `nce_grad_tile_kernel` per chunk): with
sig[i, l] = sigmoid(neg_lse[i] - pos[i, l]) = 1 - exp(pos)/Z and w[i, l] the upstream
gradient of loss[i, l], SPEC's gradients become

    dL/ds at a positive (i, (p_i, l)) = -w[i, l] * sig[i, l]                  (gpos)
    dL/ds at a negative (i, j)        = R[i] * exp(s[i, j] - neg_lse[i]),  R[i] = sum_l w * sig

(exp(s - neg_lse) <= 1 for every negative, so neither form can overflow). The forward
saves the positives' raw scores a (N, L) for this. The factor kernel forms R and G at the
positives, scale * (gpos * ds/da + reg_coef * a) (N, L), where reg_coef[i] * a is the
regulariser's gradient (reg_coef is twice the upstream gradient of row i's sum of a^2): the
positives are N*L entries of G, so their whole value is made once, here. The tile kernel,
one launch per chunk of columns, recomputes a tile of scores and writes G = scale * d(loss
+ reg)/da for it taking every column as a negative (no masks, no gather: the forward's
unmasked path), then overwrites the few positives that lie in the tile with their values;
the caller turns G into d src and d trg with two matrix products. (Overwriting an entry is
exact; the forward cannot do the same, since taking the positives back out of a row's sum
would cancel catastrophically when they dominate it, as they do in a trained model.)

G is written in the inputs' dtype, for tensor-core products. float16 G is written times a
power of two 2^k (`nce_grad_scale_kernel`, one program, between the factor kernel and the
tile kernels): G's entries run from about 1/N of the upstream gradient down past float16's
range, and a loss scaler's upstream gradient of 2^16 could overflow it. 2^k is found on the
device from a bound on |G| (from R, G at the positives, and |a| <= sqrt(sq)), so no sync;
the caller multiplies the products back by 2^-k, exactly.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .score_tiles import clip_pieces, holds_own_images, own_images, score_tile, soft_clip


@triton.jit
def _g_tile(a, r, neg_lse, reg_coef, scale, tclip, CLIP: tl.constexpr, SHIFT_TCLIP: tl.constexpr):
    """G = scale * d(loss + reg)/da on a tile of raw scores a (module docstring), every
    score taken as a negative: dL/ds = R[i] exp(s - neg_lse[i]), times ds/da, plus the
    regulariser's reg_coef[i] * a. At a positive this is not its value (it may even
    overflow): the caller overwrites those.
    """
    if SHIFT_TCLIP:
        log2_gap, ds_da = clip_pieces(a, tclip)  # log2 exp(s - tclip), 1 - (s/tclip)^2
        # |s|, tclip <= 40: the bias (tclip - neg_lse) log2 e adds no rounding that matters
        log2_e = log2_gap + ((tclip - neg_lse) * 1.4426950408889634)[:, None]
    else:
        if CLIP:  # a tclip past MAX_SHIFT_TCLIP: from s itself, as s - tclip would lose s to rounding
            s = soft_clip(a, tclip, CLIP)
            u = s * (1.0 / tclip)
            ds_da = 1.0 - u * u  # as the reference's autograd forms it
        else:
            s = a
            ds_da = 1.0
        # s - neg_lse first: s and neg_lse may be large (thousands without clipping), and
        # s log2 e - neg_lse log2 e would round each term to their size before cancelling
        log2_e = (s - neg_lse[:, None]) * 1.4426950408889634
    # log2 exp(s - neg_lse) <= 0 at every negative: exp2 of it never overflows there
    dl_ds = r[:, None] * tl.exp2(log2_e)
    return scale * (dl_ds * ds_da + reg_coef[:, None] * a)


@triton.jit
def nce_grad_factors_kernel(
    a_pos_ptr,  # (N, L) float32: the positives' raw scores
    grad_loss_ptr, stride_wn, stride_wl,  # (N, L) float32, any strides (0: one value for all)
    neg_lse_ptr,  # (N,) float32: the negatives' log-sum-exp
    grad_sq_ptr, stride_sq,  # (N,) float32, any stride
    g_pos_ptr,  # (N, L) float32 out: G at the positives, scale * (gpos * ds/da + reg_coef * a)
    r_ptr,  # (N,) float32 out: R[i] = sum_l w * sig
    reg_coef_ptr,  # (N,) float32 out: d(reg)/da = reg_coef[i] * a, reg_coef = 2 sq_weight grad_sq
    N, L, scale, tclip, loss_weight, sq_weight,
    CLIP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """The backward's per-row factors (module docstring), sig = sigmoid(neg_lse - pos),
    in one launch; sigmoid(-inf) = 0 where a row has no negatives. pos is formed from a
    as the merge kernel formed it. The upstream gradients come as the autograd formula
    holds them: w = loss_weight * grad_loss (the mean's 1/(N*L) over one value broadcast
    with stride 0, or reduction "none"'s (N, L)), and the gradient of each row's sum of a^2
    sq_weight * grad_sq (reg's reg_weight/(N*M*L) over one value): no launch forms them."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    neg_lse = tl.load(neg_lse_ptr + rows, mask=row_ok, other=0.0)
    reg_coef = 2.0 * sq_weight * tl.load(grad_sq_ptr + rows * stride_sq, mask=row_ok, other=0.0)
    r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        ok = row_ok[:, None] & (ls < L)[None, :]
        off = rows.to(tl.int64)[:, None] * L + ls[None, :]
        a = tl.load(a_pos_ptr + off, mask=ok, other=0.0)
        w_off = rows.to(tl.int64)[:, None] * stride_wn + ls[None, :] * stride_wl
        w = loss_weight * tl.load(grad_loss_ptr + w_off, mask=ok, other=0.0)
        w_sig = w * tl.sigmoid(neg_lse[:, None] - soft_clip(a, tclip, CLIP))
        if CLIP:
            _, ds_da = clip_pieces(a, tclip)
        else:
            ds_da = 1.0
        tl.store(g_pos_ptr + off, scale * (-w_sig * ds_da + reg_coef[:, None] * a), mask=ok)
        r += tl.sum(w_sig, axis=1)
    tl.store(r_ptr + rows, r, mask=row_ok)
    tl.store(reg_coef_ptr + rows, reg_coef, mask=row_ok)


@triton.jit
def nce_grad_scale_kernel(
    g_pos_ptr,  # (N, L) float32: G at the positives (nce_grad_factors_kernel)
    r_ptr, reg_coef_ptr, sq_ptr,  # (N,) float32: R[i], reg_coef[i] (factor kernel), sq[i] = sum_j a^2
    col_l1_ptr,  # (D,) float32: sum_i |src[i, d]|, d trg's growth over G (read if COLS)
    out_ptr,  # (2,) float32 out: 2^k and 2^-k
    N, L, D, scale,
    LOG2_TARGET: tl.constexpr, MAX_EXP: tl.constexpr, COLS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The power of two 2^k that float16 G is stored scaled by (one program): the largest
    with bound * 2^k <= 2^LOG2_TARGET, where bound bounds |G| and, with COLS, |d trg| / |G|
    too, so neither G nor the product G^T @ src can leave float16's range.

    |G| at a positive is g_pos; at a negative it is at most scale * (|R[i]| + |reg_coef[i]|
    sqrt(sq[i])), since exp(s - neg_lse) <= 1, 0 <= ds/da <= 1 and |a[i, j]| <= sqrt(sq[i]).
    |d trg[j, d]| <= max|G| * col_l1[d]. A row whose bound is not finite is left out: a NaN
    row is a poisoned one (a non-finite score, nce_merge_kernel), whose G is NaN at any
    scale, and an infinite one has an infinite upstream gradient, which stays infinite;
    either would otherwise take every other row's G to NaN or to 0. k is clamped to
    +-MAX_EXP (a zero gradient gives 2^MAX_EXP, harmlessly)."""
    bound = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
        reg_coef = tl.load(reg_coef_ptr + rows, mask=row_ok, other=0.0)
        sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
        row = scale * (tl.abs(r) + tl.abs(reg_coef) * tl.sqrt(sq))
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            ok = row_ok[:, None] & (ls < L)[None, :]
            g = tl.abs(tl.load(g_pos_ptr + rows.to(tl.int64)[:, None] * L + ls[None, :], mask=ok, other=0.0))
            row = tl.maximum(row, tl.max(g, axis=1))  # a NaN in g comes with a NaN R[i]
        bound = tl.maximum(bound, tl.where(row < float("inf"), row, 0.0))  # NaN < inf is false
    growth = 1.0
    if COLS:
        # a non-finite column norm comes from a non-finite source, whose row is poisoned, and
        # then every column of d trg is NaN anyway: it must not rescale the other rows' G
        col_max = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c = tl.load(col_l1_ptr + cols, mask=cols < D, other=0.0)
            col_max = tl.maximum(col_max, tl.where(c < float("inf"), c, 0.0))
        growth = tl.maximum(tl.max(col_max, axis=0), 1.0)
    total = tl.max(bound, axis=0) * growth
    # k = LOG2_TARGET - ceil(log2(total)), read exactly off total's float32 bits: its
    # exponent, plus one unless the mantissa is 0 (0 and subnormals give k >= 141, inf
    # -113: both clamped), where an approximate log2 could be off by one at a power of two
    bits = total.to(tl.int32, bitcast=True)
    ceil_log2 = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    k = tl.minimum(tl.maximum(LOG2_TARGET - ceil_log2, -MAX_EXP), MAX_EXP)
    # 2^k and 2^-k built from their exponent bits: exact, where exp2 may be approximate
    g_scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
    tl.store(out_ptr, g_scale)
    tl.store(out_ptr + 1, inverse)


@triton.jit
def nce_grad_tile_kernel(
    src, trg,  # pointers, or with TMA tensor descriptors (score_tile)
    pos_idx_ptr,
    neg_lse_ptr, r_ptr,  # (N,) float32: log-sum-exp of the negatives, R[i] = sum_l w * sig
    g_pos_ptr,  # (N, L) float32: G at the positives (nce_grad_factors_kernel)
    reg_coef_ptr,  # (N,) float32: the regulariser's d/da = reg_coef[i] * a (nce_grad_factors_kernel)
    g_ptr, stride_gn,  # (N, C) out, G's dtype: scale * d(loss + reg)/da for this chunk
    g_scale_ptr,  # SCALED: float32, the power of two G is stored times (nce_grad_scale_kernel)
    scores_ptr, stride_scores,  # FROM_SCORES: (N, C) float32 unscaled dot products
    N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    col_begin, C,  # this chunk's columns: [col_begin, col_begin + C)
    scale, tclip,
    CLIP: tl.constexpr, SHIFT_TCLIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr,
):
    """One program per (row block, column tile) of the chunk, all in one launch: the tile
    is written as if it held negatives only (the forward's unmasked path, which fits 128
    registers on sm_90), then the positives that lie in it are overwritten with their
    values, BLOCK_L locations of the block's rows at a time. That second step runs only in
    tiles that may hold an own image (holds_own_images), after the tile and its registers
    are done with."""
    row0 = tl.program_id(0) * BLOCK_N
    c0 = col_begin + tl.program_id(1) * BLOCK_J  # the tile's first column
    chunk_end = col_begin + C
    rows = row0 + tl.arange(0, BLOCK_N)
    local = c0 - col_begin + tl.arange(0, BLOCK_J)  # columns inside the chunk
    row_ok = rows < N
    a = score_tile(
        src, trg, scores_ptr, stride_scores, col_begin, chunk_end,
        row0, c0, N, L, D,
        stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
        BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K, TMA,
    )
    neg_lse = tl.load(neg_lse_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    reg_coef = tl.load(reg_coef_ptr + rows, mask=row_ok, other=0.0)
    g = _g_tile(a, r, neg_lse, reg_coef, scale, tclip, CLIP, SHIFT_TCLIP)
    if SCALED:  # float16 G: times a power of two that keeps it in range
        g = g * tl.load(g_scale_ptr)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gn  # G's rows, at the chunk's column 0
    tl.store(g_rows + local[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < C)[None, :])

    # The positives in this tile: column p_i * L + l of row i, for the block's rows
    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)
    p_lo, p_hi = own_images(p, row_ok)
    tile_end = tl.minimum(c0 + BLOCK_J, chunk_end)
    if holds_own_images(c0, tile_end, L, p_lo, p_hi):
        # every thread's stores of the tile come before any thread's overwrite
        tl.debug_barrier()
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            cols = p[:, None] * L + ls[None, :]  # int64, as pos_idx is
            ok = row_ok[:, None] & (ls < L)[None, :] & (cols >= c0) & (cols < tile_end)
            g_pos = tl.load(g_pos_ptr + rows.to(tl.int64)[:, None] * L + ls[None, :], mask=ok, other=0.0)
            if SCALED:
                g_pos = g_pos * tl.load(g_scale_ptr)
            tl.store(g_rows + (cols - col_begin), g_pos.to(g_ptr.dtype.element_ty), mask=ok)
