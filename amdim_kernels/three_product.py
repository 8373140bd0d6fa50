"""The three-product schedule's autograd formula, for any backend whose forward also makes
the gradients (schedule.py): cpp's C++ op (extension_fused.py) and Triton's driver
(triton_nce/three_product.py).

The forward makes the gradients of one objective, sum_k (n_k / N) means[k] + reg, which is
the mean loss over all N*L positives plus reg. The gradients are linear in the upstream
gradients, so an upstream that weights each means[k] by c * n_k / N and reg by c (reg's
weight is free where reg_weight is 0) gets c times the stored gradients: the backward checks
this on the host and scales them. nce_loss(reduction="mean") added to its reg, and AMDIM's
objective (multiscale.py), are such upstreams. Any other upstream, or any second backward
through the same graph (the first releases the stored gradients), gets the backend's
four-product backward from the saved statistics: exact either way. On a GPU the check reads
the upstream scalars back (one sync per backward).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import op_contract
from .validation import Problem

# The upstream matches the stored objective when its weights agree to this relative
# difference: 8 float32 ulps, far below the error of the float32 gradients themselves.
MATCH_RTOL = 2.0 ** -20


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= MATCH_RTOL * max(abs(a), abs(b))


def stored_scale(grad_loss, grad_means, grad_reg, group_rows: tuple[int, ...], reg_weight: float) -> float | None:
    """c such that the upstream gradients (of the per-positive losses, the group means and
    reg; None where an output got none) make c times the stored gradients, or None where
    they do not."""
    if grad_loss is not None:
        return None
    n = sum(group_rows)
    weights = grad_means.tolist() if grad_means is not None else [0.0] * len(group_rows)
    per_row = [w * n / rows for w, rows in zip(weights, group_rows)]
    c = per_row[0]
    if not all(_close(x, c) for x in per_row):
        return None
    if reg_weight != 0.0 and not _close(float(grad_reg) if grad_reg is not None else 0.0, c):
        return None
    return c


def gradient_dtypes(src: torch.Tensor, block_rows: int, gpu_backend: bool) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of the stored d src and d trg: cpp keeps both in float32 (its d src sums
    the groups' partials); a GPU backend stores d src in the inputs' dtype (rounded from its
    float32 sum a block) and d trg too where one block holds every row (one product, as the
    four-product backward's d trg; else float32, the blocks' sum)."""
    if not gpu_backend:
        return torch.float32, torch.float32
    return src.dtype, (src.dtype if block_rows >= src.shape[0] else torch.float32)


def per_positive_upstream(grad_means, group_rows: tuple[int, ...], l: int, like: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """The (N, L) upstream gradient of the per-positive losses that the group means' upstream
    gives: grad_means[k] / (n_k * L) on each of group k's rows."""
    n = sum(group_rows)
    if grad_means is None:
        return like.new_zeros(()).expand(n, l)
    rows = torch.tensor(group_rows, device=grad_means.device)
    return (grad_means.float() / (rows * l)).repeat_interleave(rows, output_size=n).unsqueeze(1).expand(n, l)


# fwd(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, need_src, need_trg, *extra)
#   -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), means (K,), reg (), dsrc, dtrg
#   (dsrc and dtrg of gradient_dtypes)
# bwd: op_contract.py's bwd, with `pos` as this backend's fwd saves it
Forward = Callable[..., tuple]
Backward = Callable[..., tuple]


class ThreeProductLoss(torch.autograd.Function):
    """A three-product forward in eager mode, with the formula above."""

    @staticmethod
    def forward(ctx, fwd: Forward, bwd: Backward, src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows,
                extra: tuple):
        need_src, need_trg = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        loss, pos, neg_lse, sq, means, reg, dsrc, dtrg = fwd(src, trg, pos_idx, tclip, scale, reg_weight,
                                                             list(group_rows), block_rows, need_src, need_trg, *extra)
        ctx.save_for_backward(src, trg, pos_idx, pos, neg_lse, sq)
        ctx.stored = dsrc, dtrg
        ctx.options = bwd, tclip, scale, reg_weight, tuple(group_rows), extra
        ctx.mark_non_differentiable(loss, pos, neg_lse, sq)
        ctx.set_materialize_grads(False)
        return loss, pos, neg_lse, sq, means, reg

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg_lse, _grad_sq, grad_means, grad_reg):
        src, trg, pos_idx, pos, neg_lse, sq = ctx.saved_tensors
        bwd, tclip, scale, reg_weight, group_rows, extra = ctx.options
        need_src, need_trg = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        # released whichever way this backward goes: handed out once (autograd may then take
        # them as .grad), and not held by the graph after a recomputed backward
        stored, ctx.stored = ctx.stored, None
        c = stored_scale(grad_loss, grad_means, grad_reg, group_rows, reg_weight)
        if c is not None and stored is not None:
            # a 16-bit stored gradient times c != 1 is rounded twice (at most one unit in its
            # last place; a power of two, a loss scaler's, is exact)
            dsrc, dtrg = (g if c == 1.0 else g.mul_(c) for g in stored)
            dsrc, dtrg = dsrc.to(src.dtype), dtrg.to(trg.dtype)
        else:
            n, l = pos.shape
            w = per_positive_upstream(grad_means, group_rows, l, pos)
            if grad_loss is not None:
                w = w + grad_loss.float()
            grad_reg = grad_reg if grad_reg is not None else pos.new_zeros(())
            with torch.no_grad():
                dsrc, dtrg = bwd(src, trg, pos_idx, pos, neg_lse, sq, w, 1.0, grad_reg.float().expand(n),
                                 reg_weight / (n * trg.shape[0] * l), tclip, scale, *extra, need_src, need_trg)
        if torch.is_grad_enabled():  # backward(create_graph=True)
            dsrc, dtrg = op_contract.first_order_only(dsrc, dtrg, src, trg)
        return None, None, (dsrc if need_src else None), (dtrg if need_trg else None), *([None] * 7)


def objective_groups(p: Problem) -> tuple[int, ...]:
    """The row counts of the groups whose means the forward returns, for a validated problem
    p: each range of a tuple for reduction "group_means", else all N rows as one group."""
    return p.groups if p.reduction == "group_means" else (p.n,)


def loss_and_reg(means: torch.Tensor, reg: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """nce_loss's (loss, reg) from the schedule's outputs: the group means, or their one
    mean as a scalar."""
    return (means if reduction == "group_means" else means.view(())), reg
