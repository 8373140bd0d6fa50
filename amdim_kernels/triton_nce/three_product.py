"""Backend "triton"'s three-product schedule (schedule.py, three_product.py): per block of
source rows, cuBLAS makes the block's float32 scores once, B x M*L (the workspace); the
forward's kernels and the G kernel both read them (the "gemm" strategy's path, which already
reads cuBLAS score chunks), and G's two products follow on cuBLAS: three products of the
problem's size in all, where the four-product schedule's backward makes the scores again.

Made only of parts that run in the four-product schedule: forward.forward, grad_rows'
factor kernel and grad_tiles' G kernel, each given the block's scores, the float32
products of operands.py and, for d trg in one block, a product in the inputs' dtype (as the
four-product backward's d trg). float16 is left to the four-product schedule: its G is stored
times a power of two found from all rows' factors (grad_rows.gradient_scale), which a block
does not have. Not chosen by "auto" until timed on a GPU: settings(schedule="three-product")
takes it.
"""
from __future__ import annotations

import torch

from ..autocast_off import autocast_off
from ..reductions import reduce_losses
from ..three_product import gradient_dtypes
from .config import CallOptions
from .forward import forward as forward_stage
from .forward import totals
from .grad_rows import gradient_factors
from .grad_tiles import gradient_chunks
from .operands import addmm_f32_, features_contiguous, mm_f32, on_device_of


def forward_with_gradients(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, need_src, need_trg,
                           strategy, loads, _chunks, fwd_tiles, grad_tiles) -> tuple:
    """three_product.py's fwd: loss (N, L), pos (N, L, raw a as the Triton backward takes
    it), neg_lse (N,), sq (N,), the group means (K,), reg (), and the gradients of the mean
    loss over all N*L positives plus reg (empty where not needed), of the dtypes of
    three_product.gradient_dtypes: d src in the inputs' dtype from each block's float32 sum
    over the chunks; d trg in it too with one block, else summed over the blocks in float32."""
    # one chunk of all the columns (settings' triton_chunks does not apply): the budget holds
    # the block's G over every column beside its scores (schedule.row_bytes), and each of G's
    # two products is then one product of the block's full size, not eight smaller ones
    options = CallOptions.from_op_args("gemm", loads, 1, fwd_tiles, grad_tiles)
    n, d = src.shape
    m, l, _ = trg.shape
    f32 = dict(device=src.device, dtype=torch.float32)
    with on_device_of(src), autocast_off(src.device):
        columns = features_contiguous(trg).reshape(m * l, d)  # a view, or one copy of trg
        loss, a_pos = torch.empty(n, l, **f32), torch.empty(n, l, **f32)
        neg_lse, sq = torch.empty(n, **f32), torch.empty(n, **f32)
        dsrc_dtype, dtrg_dtype = gradient_dtypes(src, block_rows, gpu_backend=True)
        one_block = block_rows >= n
        dsrc = torch.empty(n if need_src else 0, d, device=src.device, dtype=dsrc_dtype)
        dtrg = torch.empty(m * l if need_trg else 0, d, device=src.device, dtype=dtrg_dtype)
        dsrc_block = torch.empty(min(n, block_rows) if need_src else 0, d, **f32)  # a block's sum
        ones = torch.ones((), **f32)
        for i0 in range(0, n, block_rows):
            i1 = min(n, i0 + block_rows)
            rows = i1 - i0
            src_block, pos_block = src[i0:i1], pos_idx[i0:i1]
            scores = mm_f32(features_contiguous(src_block), columns.t())  # unscaled, as chunk_scores's

            def scores_of(c0: int, c: int) -> torch.Tensor:
                return scores[:, c0:c0 + c]

            stats = forward_stage(src_block, trg, pos_block, tclip, scale, reg_weight, options, scores_of)
            loss[i0:i1], a_pos[i0:i1], neg_lse[i0:i1], sq[i0:i1] = stats.loss, stats.a_pos, stats.neg_lse, stats.sq
            if not (need_src or need_trg):
                continue
            # the objective's upstream: 1/(N*L) on each positive's loss, reg_weight/(N*M*L) on each a^2
            g_pos, r, reg_coef = gradient_factors(stats.a_pos, stats.neg_lse, ones.expand(rows, l), 1.0 / (n * l),
                                                  ones.expand(rows), reg_weight / (n * m * l), tclip, scale)
            for m0, m1, g, features in gradient_chunks(src_block, trg, pos_block, stats.neg_lse, r, g_pos, reg_coef,
                                                       tclip, scale, options, None, scores_of):
                if need_src:
                    addmm_f32_(dsrc_block[:rows], g, features, beta=0.0 if m0 == 0 else 1.0)
                if need_trg and one_block:  # one product in the inputs' dtype, as backward.py's
                    torch.mm(g.t(), src_block, out=dtrg[m0 * l:m1 * l])
                elif need_trg:  # blocks added in order, in float32
                    addmm_f32_(dtrg[m0 * l:m1 * l], g.t(), src_block, beta=0.0 if i0 == 0 else 1.0)
            if need_src:
                dsrc[i0:i1] = dsrc_block[:rows]
            del scores
        means = reduce_losses(loss, "group_means", tuple(group_rows))
        _, reg = totals(loss, sq, m, reg_weight)  # as the four-product forward makes it
    return loss, a_pos, neg_lse, sq, means, reg, dsrc, dtrg.view(-1, l, d)
