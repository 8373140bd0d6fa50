"""The forward stage of the Triton backend: its kernels and their launcher `forward` (the
loss in docs/loss.md; notation in score_tiles.py).

Forward (`nce_fwd_kernel`, then `nce_merge_kernel`): programs tile the rows, and the columns
are split across programs so that a few hundred programs fill the GPU even when N is ~128.
Each program streams its columns tile by tile and keeps three per-row partials: the sum of
a^2, and the sum of exp(s - shift) over the negatives with its shift (a running maximum, or
with clipping up to tclip = 40, SHIFT_TCLIP, the constant tclip: s < tclip so exp(s -
tclip) <= 1 never overflows, and s > -tclip keeps it a normal float32).
A tile that holds none of its rows' own images and lies wholly inside the chunk (most
tiles, when pos_idx is a run of images as in the trainer) needs no mask at all; such tiles
and the others go to two launches of the kernel, each compiled with its path only, which
keeps the unmasked one small (128 registers on sm_90). The unmasked tiles store nothing
per element; the masked ones also copy out the positives' raw scores a (N, L) that lie in
them (_store_positives), so no pass reads the own images a second time. The merge kernel,
one program per row, folds the row's partials in slot order (deterministic) and gives

    neg_lse[i] = log sum_{j negative} exp(s[i, j])
    loss[i, l] = -nce[i, l] = log(exp(pos) + exp(neg_lse)) - pos = softplus(neg_lse - pos)

and `nce_totals_kernel`, one program, the two scalars nce_loss returns: the mean of the
losses and reg = reg_weight * mean(a^2).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import (SELECT_LOCATIONS, CallOptions, cdiv, chunk_columns, chunk_floor_bytes, chunk_ranges, clip_args,
                     column_bytes, location_block, num_sms, register_cap, split_columns, tile_config)
from .operands import chunk_images, chunk_operands, chunk_scores, features_contiguous, src_descriptor, tile_constants
from .score_tiles import clip_pieces, holds_own_images, own_images, score_tile, soft_clip


@triton.jit
def _add_negatives(x, is_neg, neg_sum, shift, SHIFT_TCLIP: tl.constexpr, MASKED: tl.constexpr):
    """Fold a tile's negatives into the row partials: neg_sum = sum exp(s - shift).

    SHIFT_TCLIP: x = exp(s - tclip) and the shift is the constant tclip (s < tclip, so
    x <= 1); otherwise x = s and an online log-sum-exp rescales the running sum to the
    new row maximum. MASKED: only where is_neg; otherwise every score of the tile is a
    negative.
    """
    if SHIFT_TCLIP:
        if MASKED:
            x = tl.where(is_neg, x, 0.0)
        return neg_sum + tl.sum(x, axis=1), shift
    else:
        if MASKED:
            x = tl.where(is_neg, x, float("-inf"))
        new_shift = tl.maximum(shift, tl.max(x, axis=1))
        # both -inf (no negative seen yet): keep 0 instead of exp(nan)
        safe = tl.where(new_shift == float("-inf"), 0.0, new_shift)
        neg_sum = neg_sum * tl.exp(shift - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
        return neg_sum, new_shift


@triton.jit
def _plain_tile(c0, c1, chunk_end, L, p_lo, p_hi):
    """Whether the tile's columns [c0, c1) all lie in the chunk and belong to none of the
    block's own images (p_lo..p_hi): every score in it is then a negative of its row.
    In the trainer pos_idx is a run of images (rank * N + arange), so this is most tiles."""
    return (c1 <= chunk_end) & ~holds_own_images(c0, c1, L, p_lo, p_hi)


@triton.jit
def _select_dot(part, e, acc, UPCAST: tl.constexpr):
    """acc + part @ e for a bfloat16 part of Y and the 0/1 matrix E (_store_positives)."""
    if UPCAST:  # the CPU interpreter's dot is wrong on 16-bit tiles; the part is exact in float32
        return tl.dot(part.to(tl.float32), e.to(tl.float32), acc)
    return tl.dot(part, e, acc)


@triton.jit
def _store_positives(a, row0, p, j0, chunk_end, N, L, a_pos_ptr,
                     BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr):
    """Copy the positives that lie in this tile, a[i, (p_i, l)], to a_pos[i, l].

    Stored element by element, the accumulator would leave its MMA layout, and that
    spills. So the positives come out as a product, as FlashAttention gets P out for P @ V:
    Y @ E, where Y is a at the row's own image's columns (0 elsewhere) and E[j, l] = 1
    where column j is location l of its image. Each (i, l) sums one term at most: the
    product only selects. Y goes in as three bfloat16 parts, hi + mid + lo (each the
    rounding of what the earlier parts left), which carry float32's 24 bits: the sum of the
    three products is Y's float32 value. BLOCK_L locations a step (16: no spills at
    (128, 64) tiles on sm_90, benchmarks/RESULTS.md). A positive lies in exactly one tile,
    so each is stored once. Offsets are int32 from the row block's first row (N*L < 2^31
    per block), which keeps the store's addresses out of 64-bit registers.
    """
    cols = j0 + tl.arange(0, BLOCK_J)
    img = cols // L
    loc = cols - img * L  # column j's location in its image
    own = img[None, :] == p.to(tl.int32)[:, None]  # (padded rows have p = -1: none)
    # where row i's positives begin, relative to the tile, kept within int32's range
    first = tl.minimum(tl.maximum(p.to(tl.int64) * L - j0, -BLOCK_J - L), BLOCK_J).to(tl.int32)
    width = tl.minimum(BLOCK_J, chunk_end - j0)  # the tile's columns inside the chunk
    local_rows = tl.arange(0, BLOCK_N)
    rows_ok = row0 + local_rows < N
    block_pos = a_pos_ptr + row0.to(tl.int64) * L
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        e = tl.where(loc[:, None] == ls[None, :], 1.0, 0.0).to(tl.bfloat16)
        y = tl.where(own, a, 0.0)
        part = y.to(tl.bfloat16)  # hi
        pos = _select_dot(part, e, tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32), UPCAST)
        y -= part.to(tl.float32)  # exact: what hi left of y
        part = y.to(tl.bfloat16)  # mid
        pos = _select_dot(part, e, pos, UPCAST)
        y -= part.to(tl.float32)
        pos = _select_dot(y.to(tl.bfloat16), e, pos, UPCAST)  # lo
        col = first[:, None] + ls[None, :]  # column of positive (i, l), relative to the tile
        here = rows_ok[:, None] & (ls < L)[None, :] & (col >= 0) & (col < width)
        tl.store(block_pos + (local_rows[:, None] * L + ls[None, :]), pos, mask=here)


@triton.jit
def _fold_tile(
    row0, j0, p, p_lo, p_hi, sq, neg_sum, shift, a_pos_ptr,
    src, trg, scores_ptr, stride_scores, chunk_begin, chunk_end,
    N, L, D, stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale, tclip,
    CLIP: tl.constexpr, SHIFT_TCLIP: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """Score the tile of columns [j0, j0 + BLOCK_J) and fold it into the row partials; a
    masked tile that holds own images also stores their positives (_store_positives)."""
    a = score_tile(
        src, trg, scores_ptr, stride_scores, chunk_begin, chunk_end,
        row0, j0, N, L, D,
        stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
        BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K, TMA,
    )
    # a * a, plus a - a: 0 for a finite score, NaN for a non-finite one, so that the row's sum
    # is NaN exactly when one of its scores is not finite (the merge's poison), and +inf only
    # where finite squares overflow; padded rows/columns score 0 and add nothing
    sq += tl.sum(a * a + (a - a), axis=1)
    if SHIFT_TCLIP:
        log2_gap, _ = clip_pieces(a, tclip)
        x = tl.exp2(log2_gap)  # exp(s - tclip)
    else:
        x = soft_clip(a, tclip, CLIP)  # s
    if MASKED:
        # the row's own image is excluded from the negatives (its positives are stored)
        cols = j0 + tl.arange(0, BLOCK_J)
        img = cols // L
        is_neg = (img[None, :] != p[:, None]) & (cols < chunk_end)[None, :]
        neg_sum, shift = _add_negatives(x, is_neg, neg_sum, shift, SHIFT_TCLIP, True)
        if holds_own_images(j0, tl.minimum(j0 + BLOCK_J, chunk_end), L, p_lo, p_hi):
            _store_positives(a, row0, p, j0, chunk_end, N, L, a_pos_ptr, BLOCK_N, BLOCK_J, BLOCK_L, UPCAST)
    else:
        # no masks (padded rows score too, but their partials are never stored)
        neg_sum, shift = _add_negatives(x, x, neg_sum, shift, SHIFT_TCLIP, False)
    return sq, neg_sum, shift


@triton.jit
def nce_fwd_kernel(
    src, trg,  # pointers, or with TMA tensor descriptors (score_tile)
    pos_idx_ptr,
    part_sum_ptr, part_max_ptr, part_sq_ptr,  # (SPLITS, N) float32 out: per-split row partials
    a_pos_ptr,  # (N, L) float32 out: the positives' raw scores (stored by the masked launch)
    scores_ptr, stride_scores,  # FROM_SCORES: (N, chunk) float32 unscaled dot products
    chunk_begin, chunk_end, split_base,  # this launch's columns, and its first split's index
    N, L, D,
    stride_sn, stride_sd, stride_tm, stride_tl, stride_td,
    cols_per_split,  # a multiple of BLOCK_J, so no tile straddles two splits
    scale, tclip,
    CLIP: tl.constexpr, SHIFT_TCLIP: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    PLAIN_J: tl.constexpr,  # the plain launch's BLOCK_J: tiles are sorted at this width
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FROM_SCORES: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):
    """Two launches share the chunk's tiles of PLAIN_J columns, each compiled with one path
    only (the two paths in one kernel need 200+ registers; the unmasked one alone fits in
    128, leaving room for a second program per SM whose products overlap this one's
    epilogue):
    MASKED = False: the plain tiles (_plain_tile) of the program's contiguous split;
    MASKED = True: every other tile, dealt out to the splits in turn, scored BLOCK_J
    columns at a time (PLAIN_J a multiple of BLOCK_J): narrower tiles leave the registers
    that copying the positives out takes."""
    row0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)

    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SHIFT_TCLIP:
        shift = tl.zeros((BLOCK_N,), dtype=tl.float32) + tclip
    else:
        shift = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    p_lo, p_hi = own_images(p, row_ok)

    n_tiles = tl.cdiv(chunk_end - chunk_begin, BLOCK_J)
    if MASKED:  # tiles split, split + splits, ...
        t_begin = split
        t_end = n_tiles
        t_step = tl.num_programs(1)
    else:  # the split's contiguous run of tiles
        t_begin = split * (cols_per_split // BLOCK_J)
        t_end = tl.minimum(t_begin + cols_per_split // BLOCK_J, n_tiles)
        t_step = 1
    for t in range(t_begin, t_end, t_step):
        j0 = chunk_begin + t * BLOCK_J
        sort0 = chunk_begin + (t * BLOCK_J // PLAIN_J) * PLAIN_J  # the PLAIN_J tile j0 lies in
        if _plain_tile(sort0, sort0 + PLAIN_J, chunk_end, L, p_lo, p_hi) != MASKED:
            sq, neg_sum, shift = _fold_tile(
                row0, j0, p, p_lo, p_hi, sq, neg_sum, shift, a_pos_ptr,
                src, trg, scores_ptr, stride_scores, chunk_begin, chunk_end,
                N, L, D, stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale, tclip,
                CLIP, SHIFT_TCLIP, MASKED, BLOCK_N, BLOCK_J, BLOCK_K, BLOCK_L, DOT_PRECISION, UPCAST, FROM_SCORES,
                EVEN_K, TMA,
            )

    out = (split_base + split).to(tl.int64) * N + rows
    tl.store(part_sum_ptr + out, neg_sum, mask=row_ok)
    tl.store(part_max_ptr + out, shift, mask=row_ok)
    tl.store(part_sq_ptr + out, sq, mask=row_ok)


@triton.jit
def nce_merge_kernel(
    part_sum_ptr, part_max_ptr, part_sq_ptr,  # (SPLITS, N) float32: the forward's partials
    a_pos_ptr,  # (N, L) float32: the positives' raw scores a (the masked launch's)
    loss_ptr,  # (N, L) float32 out: softplus(neg_lse - pos)
    neg_lse_ptr, sq_ptr,  # (N,) float32 out
    N, L, SPLITS, tclip,
    CLIP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    i = tl.program_id(0)  # one row per program

    # Fold the row's split partials. Lane b of the BLOCK_S-wide accumulators takes splits
    # b, b + BLOCK_S, ... in order, then the lanes are combined by one fixed reduction
    # tree: the result does not depend on how the forward's programs were scheduled.
    shift = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    neg_sum = tl.zeros((BLOCK_S,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = splits < SPLITS
        off = splits.to(tl.int64) * N + i
        part_max = tl.load(part_max_ptr + off, mask=ok, other=float("-inf"))
        sq += tl.load(part_sq_ptr + off, mask=ok, other=0.0)
        new_shift = tl.maximum(shift, part_max)
        safe = tl.where(new_shift == float("-inf"), 0.0, new_shift)  # no exp(-inf - -inf)
        neg_sum = neg_sum * tl.exp(shift - safe) + tl.load(part_sum_ptr + off, mask=ok, other=0.0) * tl.exp(
            part_max - safe
        )
        shift = new_shift
    row_max = tl.max(shift, axis=0)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    # log(0) = -inf when the row has no negatives (M == 1): its loss is then exactly 0
    neg_lse = row_max + tl.log(tl.sum(neg_sum * tl.exp(shift - safe_max), axis=0))
    sq_row = tl.sum(sq, axis=0)
    # A non-finite score (sq_row NaN, _fold_tile) must give NaN, but tanh maps +-inf to
    # +-tclip: a NaN neg_lse makes the row's L losses NaN and, in the backward, every entry
    # of its G, and nothing else (csrc/nce_math.h's row_lse)
    neg_lse = tl.where(sq_row != sq_row, float("nan"), neg_lse)

    # The row's losses from its positives pos = soft_clip(a), BLOCK_L locations at a time
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        off = i.to(tl.int64) * L + ls
        pos = soft_clip(tl.load(a_pos_ptr + off, mask=l_ok, other=0.0), tclip, CLIP)
        x = neg_lse - pos
        # stable softplus; x = -inf gives 0
        loss = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        tl.store(loss_ptr + off, loss, mask=l_ok)
    tl.store(neg_lse_ptr + i, neg_lse)
    tl.store(sq_ptr + i, sq_row)


@triton.jit
def nce_totals_kernel(
    loss_ptr,  # (N*L,) float32: the per-positive losses (nce_merge_kernel)
    sq_ptr,  # (N,) float32: each row's sum of a^2
    mean_ptr, reg_ptr,  # () float32 out: the mean loss, and reg = reg_c * sum_i sq[i]
    NL, N, inv_nl, reg_c,  # reg_c = reg_weight / (N*M*L)
    BLOCK: tl.constexpr,
):
    """nce_loss's two scalars in one program, where torch ops took three launches (mean,
    scale, sum). Lane b adds elements b, b + BLOCK, ... in order, then one fixed tree adds
    the lanes: deterministic."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, NL, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        acc += tl.load(loss_ptr + idx, mask=idx < NL, other=0.0)
    tl.store(mean_ptr, tl.sum(acc, axis=0) * inv_nl)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        acc += tl.load(sq_ptr + idx, mask=idx < N, other=0.0)
    # reg_c = 0 gives 0 where the sum of squares overflowed to +inf, NaN where it is NaN (a
    # poisoned row)
    sq_total = tl.sum(acc, axis=0)
    tl.store(reg_ptr, tl.where((reg_c == 0.0) & (sq_total == sq_total), 0.0, sq_total * reg_c))


@dataclass
class ForwardStats:
    loss: torch.Tensor  # (N, L) per-positive loss
    a_pos: torch.Tensor  # (N, L) raw positive scores (the backward forms the clip from them)
    neg_lse: torch.Tensor  # (N,) log-sum-exp of each row's negatives
    sq: torch.Tensor  # (N,) sum over the row of a^2
    mean: torch.Tensor  # () the mean of loss
    reg: torch.Tensor  # () reg_weight * mean(a^2)


def forward(src, trg, pos_idx, tclip: float | None, scale: float, reg_weight: float,
            options: CallOptions, scores_of: Callable[[int, int], torch.Tensor] | None = None) -> ForwardStats:
    """The forward's launches: the tile kernel per chunk (unmasked tiles, then the others),
    the merge, the totals. With the "gemm" strategy, scores_of(c0, c) gives the chunk's
    float32 scores where the caller has them (the three-product schedule), else cuBLAS makes
    them here."""
    n, d = src.shape
    m, l, _ = trg.shape
    cfg = tile_config(src.dtype, d, options.fwd_tiles)
    sms = num_sms(src.device)
    f32 = dict(device=src.device, dtype=torch.float32)
    from_scores = options.strategy == "gemm"
    # one chunk of all the columns, unless cuBLAS's scores or a copy of trg (features not
    # contiguous) must be staged: then chunks of about 1/options.chunks of them
    chunked = from_scores or trg.stride(2) != 1
    src = features_contiguous(src)
    c_max = m * l
    if chunked:
        c_max = chunk_columns(n, m, l, cfg, sms, column_bytes(n, trg, from_scores), chunk_floor_bytes(src.device),
                              options.chunks)
    chunks = list(chunk_ranges(m, l, c_max))
    row_blocks = cdiv(n, cfg.block_n)
    splits = [split_columns(c, row_blocks, cfg, sms) for _, c in chunks]

    # each chunk's tiles go to two launches (nce_fwd_kernel): the unmasked tiles, then the
    # rest, which also store the positives' raw scores in a_pos; each launch writes a slot
    # of partials per split
    total = 2 * sum(s for s, _ in splits)
    part_sum = torch.empty(total, n, **f32)
    part_max = torch.empty(total, n, **f32)
    part_sq = torch.empty(total, n, **f32)
    a_pos = torch.empty(n, l, **f32)
    src_desc = src_descriptor(src, cfg, from_scores, options.loads)
    fixed = dict(tile_constants(src, cfg, from_scores, tclip, scale), BLOCK_L=SELECT_LOCATIONS, PLAIN_J=cfg.block_j)
    masked_cfg = cfg.masked
    launches = ((False, cfg, dict(fixed, **register_cap(cfg))),
                (True, masked_cfg, dict(fixed, BLOCK_J=masked_cfg.block_j)))
    split_base = 0
    for (c0, c), (n_splits, per_split) in zip(chunks, splits):
        images = chunk_images(trg, c0, c)
        if from_scores:
            scores = scores_of(c0, c) if scores_of is not None else chunk_scores(src, images)
        else:
            scores = part_sum  # unused placeholder
        for masked, tiles, constants in launches:
            operands, own = chunk_operands(src, src_desc, images, tiles)
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
        part_sum, part_max, part_sq, a_pos, loss, neg_lse, sq, n, l, SPLITS=total, **clip_args(tclip),
        BLOCK_S=32, BLOCK_L=location_block(l),
    )
    mean, reg = totals(loss, sq, m, reg_weight)
    return ForwardStats(loss, a_pos, neg_lse, sq, mean, reg)


def totals(loss: torch.Tensor, sq: torch.Tensor, m: int, reg_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nce_loss's two scalars from the (N, L) losses and the rows' sums of a^2 (N,) against M
    images: the mean loss and reg = reg_weight * mean(a^2), in one launch (nce_totals_kernel)."""
    n, l = loss.shape
    mean, reg = loss.new_empty(()), loss.new_empty(())
    nce_totals_kernel[(1,)](loss, sq, mean, reg, n * l, n, 1.0 / (n * l), reg_weight / (n * m * l), BLOCK=1024)
    return mean, reg
