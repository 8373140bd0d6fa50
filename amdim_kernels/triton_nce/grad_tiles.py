"""The backward's tile stage of the Triton backend: the G kernel and its launcher
`gradient_chunks` (the loss and its gradients in docs/loss.md; notation in score_tiles.py).

With sig[i, l] = sigmoid(neg_lse[i] - pos[i, l]) = 1 - exp(pos)/Z and w[i, l] the upstream
gradient of loss[i, l], the gradients with respect to the clipped scores are

    dL/ds at a positive (i, (p_i, l)) = -w[i, l] * sig[i, l]                  (gpos)
    dL/ds at a negative (i, j)        = R[i] * exp(s[i, j] - neg_lse[i]),  R[i] = sum_l w * sig

(exp(s - neg_lse) <= 1 for every negative, so neither form can overflow). grad_rows.py forms
R and G at the positives. The tile kernel, one launch per chunk of columns, recomputes a
tile of scores and writes G = scale * d(loss + reg)/da for it taking every column as a
negative (no masks, no gather: the forward's unmasked path), then overwrites the few
positives that lie in the tile with their values; backward.py turns G into d src and d trg
with two matrix products. (Overwriting an entry is exact; the forward cannot do the same,
since taking the positives back out of a row's sum would cancel catastrophically when they
dominate it, as they do in a trained model.) G is written in the inputs' dtype, for
tensor-core products; float16 G times the power of two of grad_rows.gradient_scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import CallOptions, cdiv, chunk_columns, chunk_floor_bytes, chunk_ranges, column_bytes, next_power_of_2, \
    num_sms, register_cap, tile_config
from .operands import chunk_images, chunk_operands, chunk_scores, features_contiguous, src_descriptor, tile_constants
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


def positives_block(l: int) -> int:
    """BLOCK_L of the G kernel's overwrite of the positives: 16 locations of the block's
    rows at a time (8 values a thread at 128 rows and 256 threads)."""
    return min(16, next_power_of_2(l))


def gradient_chunks(src, trg, pos_idx, neg_lse, r, g_pos, reg_coef, tclip, scale, options: CallOptions, g_scale=None,
                    scores_of=None):
    """Yield (first image, last image + 1, G, features) for consecutive chunks of whole
    images, where G (N, C) = scale * d(loss + reg)/da on the chunk's C columns, in the
    inputs' dtype and times g_scale[0] where that is given (float16, grad_rows.gradient_scale), and
    features (C, D) are the chunk's target features (chunk_images: a view or a copy), for
    the caller's products. G's buffer is reused. With the "gemm" strategy, scores_of(c0, c)
    gives the chunk's float32 scores where the caller has them (the three-product schedule),
    else cuBLAS makes them here."""
    n, d = src.shape
    m, l, _ = trg.shape
    cfg = tile_config(src.dtype, d, options.grad_tiles)
    from_scores = options.strategy == "gemm"
    c_max = chunk_columns(n, m, l, cfg, num_sms(src.device), column_bytes(n, trg, from_scores, backward=True),
                          chunk_floor_bytes(src.device), options.chunks)
    g_buf = torch.empty(n, c_max, device=src.device, dtype=src.dtype)
    src = features_contiguous(src)
    src_desc = src_descriptor(src, cfg, from_scores, options.loads)
    fixed = dict(tile_constants(src, cfg, from_scores, tclip, scale), BLOCK_L=positives_block(l),
                 **register_cap(cfg))
    row_blocks = cdiv(n, cfg.block_n)
    for c0, c in chunk_ranges(m, l, c_max):
        g = g_buf[:, :c]
        images = chunk_images(trg, c0, c)
        operands, own = chunk_operands(src, src_desc, images, cfg)
        if from_scores:
            scores = scores_of(c0, c) if scores_of is not None else chunk_scores(src, images)
        else:
            scores = g  # unused placeholder
        nce_grad_tile_kernel[(row_blocks, cdiv(c, cfg.block_j))](
            *operands, pos_idx, neg_lse, r, g_pos, reg_coef, g, g.stride(0), g if g_scale is None else g_scale,
            scores, scores.stride(0), col_begin=c0, C=c, SCALED=g_scale is not None, **own, **fixed,
        )
        del scores, operands
        yield c0 // l, (c0 + c) // l, g, images.reshape(c, d)
