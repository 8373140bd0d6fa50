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
with clipping up to tclip = 40, SHIFT_TCLIP, the constant tclip: s < tclip so exp(s -
tclip) <= 1 never overflows, and s > -tclip keeps it a normal float32).
A tile that holds none of its rows' own images and lies wholly inside the chunk (most
tiles, when pos_idx is a run of images as in the trainer) needs no mask at all; such tiles
and the others go to two launches of the kernel, each compiled with its path only, which
keeps the unmasked one small (128 registers on sm_90). The unmasked tiles store nothing
per element; the masked ones also copy out the positives' raw scores a (N, L) that lie in
them (_store_positives), so no pass reads the own images a second time. The K-loop's
operands come through TMA tensor descriptors where the GPU and their alignment allow
(launch.operand_loads), else through pointers (_score_tile). The merge kernel, one program
per row, folds the row's partials in slot order (deterministic) and gives

    neg_lse[i] = log sum_{j negative} exp(s[i, j])
    loss[i, l] = -nce[i, l] = log(exp(pos) + exp(neg_lse)) - pos = softplus(neg_lse - pos)

and `nce_totals_kernel`, one program, the two scalars nce_loss returns: the mean of the
losses and reg = reg_weight * mean(a^2).

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


@triton.jit
def _tanh(x):
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
def _soft_clip(a, tclip, CLIP: tl.constexpr):
    """s = tclip * tanh(a / tclip), or s = a without clipping (csrc/nce_math.h's soft_clip).

    a * (1 / tclip): one multiply per score where a float32 division costs a reciprocal and
    a range check; the reciprocal's rounding (<= 1 ulp) is below the score's own error.
    """
    if CLIP:
        return tclip * _tanh(a * (1.0 / tclip))
    else:
        return a


@triton.jit
def _clip_pieces(a, tclip):
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
def _own_images(p, row_ok):
    """Lowest and highest own image p_i of the block's rows (the images they exclude)."""
    lo = tl.min(tl.where(row_ok, p, 2147483647), axis=0)
    hi = tl.max(tl.where(row_ok, p, -1), axis=0)
    return lo, hi


@triton.jit
def _holds_own_images(c0, c1, L, p_lo, p_hi):
    """Whether the columns [c0, c1) may hold one of the block's own images (p_lo..p_hi)."""
    return ((c1 - 1) // L >= p_lo) & (c0 // L <= p_hi)


@triton.jit
def _plain_tile(c0, c1, chunk_end, L, p_lo, p_hi):
    """Whether the tile's columns [c0, c1) all lie in the chunk and belong to none of the
    block's own images (p_lo..p_hi): every score in it is then a negative of its row.
    In the trainer pos_idx is a run of images (rank * N + arange), so this is most tiles."""
    return (c1 <= chunk_end) & ~_holds_own_images(c0, c1, L, p_lo, p_hi)


@triton.jit
def _score_tile(
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
    a = _score_tile(
        src, trg, scores_ptr, stride_scores, chunk_begin, chunk_end,
        row0, j0, N, L, D,
        stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
        BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K, TMA,
    )
    sq += tl.sum(a * a, axis=1)  # padded rows/columns score 0 and add nothing
    if SHIFT_TCLIP:
        log2_gap, _ = _clip_pieces(a, tclip)
        x = tl.exp2(log2_gap)  # exp(s - tclip)
    else:
        x = _soft_clip(a, tclip, CLIP)  # s
    if MASKED:
        # the row's own image is excluded from the negatives (its positives are stored)
        cols = j0 + tl.arange(0, BLOCK_J)
        img = cols // L
        is_neg = (img[None, :] != p[:, None]) & (cols < chunk_end)[None, :]
        neg_sum, shift = _add_negatives(x, is_neg, neg_sum, shift, SHIFT_TCLIP, True)
        if _holds_own_images(j0, tl.minimum(j0 + BLOCK_J, chunk_end), L, p_lo, p_hi):
            _store_positives(a, row0, p, j0, chunk_end, N, L, a_pos_ptr, BLOCK_N, BLOCK_J, BLOCK_L, UPCAST)
    else:
        # no masks (padded rows score too, but their partials are never stored)
        neg_sum, shift = _add_negatives(x, x, neg_sum, shift, SHIFT_TCLIP, False)
    return sq, neg_sum, shift


@triton.jit
def nce_fwd_kernel(
    src, trg,  # pointers, or with TMA tensor descriptors (_score_tile)
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
    p_lo, p_hi = _own_images(p, row_ok)

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

    # The row's losses from its positives pos = soft_clip(a), BLOCK_L locations at a time
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        off = i.to(tl.int64) * L + ls
        pos = _soft_clip(tl.load(a_pos_ptr + off, mask=l_ok, other=0.0), tclip, CLIP)
        x = neg_lse - pos
        # stable softplus; x = -inf gives 0
        loss = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        # A non-finite score must give NaN, but tanh maps +-inf to +-tclip; the row's sum of
        # a^2 is finite exactly when all its scores are, and 0 * inf = NaN.
        loss += 0.0 * sq_row
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
    tl.store(reg_ptr, tl.sum(acc, axis=0) * reg_c)


@triton.jit
def _g_tile(a, r, bias, reg_coef, scale, tclip, CLIP: tl.constexpr, SHIFT_TCLIP: tl.constexpr):
    """G = scale * d(loss + reg)/da on a tile of raw scores a (module docstring), every
    score taken as a negative: dL/ds = R[i] exp(s - neg_lse[i]), times ds/da, plus the
    regulariser's reg_coef[i] * a. bias[i] = (shift - neg_lse[i]) log2 e, shift = tclip
    (SHIFT_TCLIP) or 0. At a positive this is not its value (it may even overflow): the
    caller overwrites those.
    """
    if SHIFT_TCLIP:
        log2_gap, ds_da = _clip_pieces(a, tclip)  # log2 exp(s - tclip), 1 - (s/tclip)^2
    elif CLIP:  # a tclip past MAX_SHIFT_TCLIP: from s itself, as s - tclip would lose s to rounding
        s = _soft_clip(a, tclip, CLIP)
        log2_gap = s * 1.4426950408889634
        u = s * (1.0 / tclip)
        ds_da = 1.0 - u * u  # as the reference's autograd forms it
    else:
        log2_gap = a * 1.4426950408889634
        ds_da = 1.0
    # log2 exp(s - neg_lse) <= 0 at every negative: exp2 of it never overflows there
    dl_ds = r[:, None] * tl.exp2(log2_gap + bias[:, None])
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
        w_sig = w * tl.sigmoid(neg_lse[:, None] - _soft_clip(a, tclip, CLIP))
        if CLIP:
            _, ds_da = _clip_pieces(a, tclip)
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
    |d trg[j, d]| <= max|G| * col_l1[d]. A NaN anywhere gives a NaN scale (NaN in, NaN out);
    k is clamped to +-MAX_EXP (a zero gradient gives 2^MAX_EXP, harmlessly)."""
    bound = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # tl.max drops NaN; this sum keeps every term, so a NaN (or inf) in it shows
    seen = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
        reg_coef = tl.load(reg_coef_ptr + rows, mask=row_ok, other=0.0)
        sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
        row = scale * (tl.abs(r) + tl.abs(reg_coef) * tl.sqrt(sq))
        seen += row
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            ok = row_ok[:, None] & (ls < L)[None, :]
            g = tl.abs(tl.load(g_pos_ptr + rows.to(tl.int64)[:, None] * L + ls[None, :], mask=ok, other=0.0))
            row = tl.maximum(row, tl.max(g, axis=1))
            seen += tl.sum(g, axis=1)
        bound = tl.maximum(bound, row)
    growth = 1.0
    if COLS:
        col_max = tl.zeros((BLOCK_D,), dtype=tl.float32)
        col_seen = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c = tl.load(col_l1_ptr + cols, mask=cols < D, other=0.0)
            col_max = tl.maximum(col_max, c)
            col_seen += c
        growth = tl.maximum(tl.max(col_max, axis=0), 1.0)
        seen += tl.sum(col_seen, axis=0)
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
    nan = tl.sum(seen, axis=0) != tl.sum(seen, axis=0)
    tl.store(out_ptr, tl.where(nan, float("nan"), g_scale))
    tl.store(out_ptr + 1, tl.where(nan, float("nan"), inverse))


@triton.jit
def nce_grad_tile_kernel(
    src, trg,  # pointers, or with TMA tensor descriptors (_score_tile)
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
    tiles that may hold an own image (_holds_own_images), after the tile and its registers
    are done with."""
    row0 = tl.program_id(0) * BLOCK_N
    c0 = col_begin + tl.program_id(1) * BLOCK_J  # the tile's first column
    chunk_end = col_begin + C
    rows = row0 + tl.arange(0, BLOCK_N)
    local = c0 - col_begin + tl.arange(0, BLOCK_J)  # columns inside the chunk
    row_ok = rows < N
    a = _score_tile(
        src, trg, scores_ptr, stride_scores, col_begin, chunk_end,
        row0, c0, N, L, D,
        stride_sn, stride_sd, stride_tm, stride_tl, stride_td, scale,
        BLOCK_N, BLOCK_J, BLOCK_K, DOT_PRECISION, UPCAST, FROM_SCORES, EVEN_K, TMA,
    )
    neg_lse = tl.load(neg_lse_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    # log2 exp(s - neg_lse) = log2 exp(s - shift) + bias[i], shift = tclip (SHIFT_TCLIP) or 0
    bias = ((tclip if SHIFT_TCLIP else 0.0) - neg_lse) * 1.4426950408889634
    reg_coef = tl.load(reg_coef_ptr + rows, mask=row_ok, other=0.0)
    g = _g_tile(a, r, bias, reg_coef, scale, tclip, CLIP, SHIFT_TCLIP)
    if SCALED:  # float16 G: times a power of two that keeps it in range
        g = g * tl.load(g_scale_ptr)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gn  # G's rows, at the chunk's column 0
    tl.store(g_rows + local[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < C)[None, :])

    # The positives in this tile: column p_i * L + l of row i, for the block's rows
    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)
    p_lo, p_hi = _own_images(p, row_ok)
    tile_end = tl.minimum(c0 + BLOCK_J, chunk_end)
    if _holds_own_images(c0, tile_end, L, p_lo, p_hi):
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
