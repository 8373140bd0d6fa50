"""The backward's per-row stage of the Triton backend: the factor and scale kernels and their
launchers (the gradients in docs/loss.md; notation in score_tiles.py and grad_tiles.py).

The factor kernel forms R (N,) and G at the positives, scale * (gpos * ds/da + reg_coef *
a) (N, L), where reg_coef[i] * a is the regulariser's gradient (reg_coef is twice the
upstream gradient of row i's sum of a^2): the positives are N*L entries of G, so their
whole value is made once, here, from the positives' raw scores a the forward saved.

float16 G is written times a power of two 2^k (the scale kernel, one program, between the
factor kernel and the tile kernels): G's entries run from about 1/N of the upstream
gradient down past float16's range, and a loss scaler's upstream gradient of 2^16 could
overflow it. 2^k is found on the device from a bound on |G| (from R, G at the positives,
and |a| <= sqrt(sq)), so no sync; backward.py multiplies the products back by 2^-k, exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..shared_constants import SCALE_LOG2_TARGET, SCALE_MAX_EXP
from .config import cdiv, clip_args, location_block
from .score_tiles import clip_pieces, soft_clip


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


def factors_blocks(l: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_L) of the backward's factor kernel: tiles of at most 64 locations and
    1024 elements (16 rows at L = 49), so that N = 128 still gives 8 programs."""
    block_l = location_block(l)
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
        **clip_args(tclip), BLOCK_N=block_n, BLOCK_L=block_l,
    )
    return g_pos, r, reg_coef


def gradient_scale(src: torch.Tensor, g_pos: torch.Tensor, r: torch.Tensor, reg_coef: torch.Tensor,
                   sq: torch.Tensor, scale: float, need_trg: bool) -> torch.Tensor:
    """(2^k, 2^-k) float32 on the device: the power of two a float16 G is stored times, so
    that G and (with need_trg) G^T @ src fit float16 (nce_grad_scale_kernel). No host sync:
    the products are scaled back on the device. With features of unit size a negative's
    typical entry is then about 2^15 / (M*L * N) (2^-10 at N = M = 1024, L = 49), inside
    float16's normal range (from 2^-14), and what flushes to zero lies under 2^-39 of the
    bound."""
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
