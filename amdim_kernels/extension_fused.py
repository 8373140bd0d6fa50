"""Backend "cpp"'s three-product schedule (schedule.py): the op `amdim_kernels::nce_fwd_grad`
(csrc/nce_cpu_fused.cpp) and its autograd formula.

    nce_fwd_grad(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows,
                 need_src, need_trg)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), means (K,), reg (), dsrc, dtrg

`means` holds one mean loss per group of consecutive source rows (group_rows: their counts);
`dsrc` and `dtrg` are the float32 gradients of the objective  sum_k (n_k / N) means[k] + reg,
which is the mean loss over all N*L positives plus reg. The gradients are linear in the
upstream gradients, so an upstream that weights each means[k] by c * n_k / N and reg by c
(reg's weight is free where reg_weight is 0) gets c times the stored gradients: the
backward checks this on the host (the CPU tensors' values, no device sync) and scales them.
nce_loss(reduction="mean") added to its reg, and AMDIM's objective (multiscale.py), are such
upstreams. Any other upstream, or any second backward through the same graph (the first
releases the stored gradients), gets the four-product backward (the C++ nce_bwd op) from the
saved statistics: exact either way.
"""
from __future__ import annotations

import torch

from . import op_contract
from .validation import Problem

_ops = torch.ops.amdim_kernels
# The upstream matches the stored objective when its weights agree to this relative
# difference: 8 float32 ulps, far below the error of the float32 gradients themselves.
MATCH_RTOL = 2.0 ** -20


def _fake_fwd_grad(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, need_src, need_trg):
    n, l = src.shape[0], trg.shape[1]
    f32 = dict(dtype=torch.float32, device=src.device)
    return (src.new_empty(n, l, **f32), src.new_empty(n, l, **f32), src.new_empty(n, **f32),
            src.new_empty(n, **f32), src.new_empty(len(group_rows), **f32), src.new_empty((), **f32),
            src.new_empty(n if need_src else 0, src.shape[1], **f32),
            trg.new_empty((trg.shape[0] if need_trg else 0,) + tuple(trg.shape[1:]), **f32))


def register() -> None:
    """The op's fake implementation (once the extension has defined the op)."""
    torch.library.register_fake("amdim_kernels::nce_fwd_grad")(_fake_fwd_grad)


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


def _per_positive_upstream(grad_means, group_rows: tuple[int, ...], l: int, like: torch.Tensor) -> torch.Tensor:
    """The (N, L) upstream gradient of the per-positive losses that the group means' upstream
    gives: grad_means[k] / (n_k * L) on each of group k's rows."""
    n = sum(group_rows)
    if grad_means is None:
        return like.new_zeros(()).expand(n, l)
    rows = torch.tensor(group_rows, device=grad_means.device)
    return (grad_means.float() / (rows * l)).repeat_interleave(rows, output_size=n).unsqueeze(1).expand(n, l)


class ThreeProductLoss(torch.autograd.Function):
    """nce_fwd_grad in eager mode, below autograd, with the formula described above."""

    @staticmethod
    def forward(ctx, src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, cuda_scores):
        need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch._C._AutoDispatchBelowAutograd():
            loss, pos, neg_lse, sq, means, reg, dsrc, dtrg = _ops.nce_fwd_grad.default(
                src, trg, pos_idx, tclip, scale, reg_weight, list(group_rows), block_rows, need_src, need_trg)
        ctx.save_for_backward(src, trg, pos_idx, pos, neg_lse, sq)
        ctx.stored = dsrc, dtrg
        ctx.options = tclip, scale, reg_weight, tuple(group_rows), cuda_scores
        ctx.mark_non_differentiable(loss, pos, neg_lse, sq)
        ctx.set_materialize_grads(False)
        return loss, pos, neg_lse, sq, means, reg

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_neg_lse, _grad_sq, grad_means, grad_reg):
        src, trg, pos_idx, pos, neg_lse, sq = ctx.saved_tensors
        tclip, scale, reg_weight, group_rows, cuda_scores = ctx.options
        need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # released whichever way this backward goes: handed out once (autograd may then take
        # them as .grad), and not held by the graph after a recomputed backward
        stored, ctx.stored = ctx.stored, None
        c = stored_scale(grad_loss, grad_means, grad_reg, group_rows, reg_weight)
        if c is not None and stored is not None:
            dsrc, dtrg = (g if c == 1.0 else g.mul_(c) for g in stored)
            dsrc, dtrg = dsrc.to(src.dtype), dtrg.to(trg.dtype)
        else:
            n, l = pos.shape
            w = _per_positive_upstream(grad_means, group_rows, l, pos)
            if grad_loss is not None:
                w = w + grad_loss.float()
            grad_reg = grad_reg if grad_reg is not None else pos.new_zeros(())
            with torch.no_grad():
                dsrc, dtrg = _ops.nce_bwd(src, trg, pos_idx, pos, neg_lse, sq, w, 1.0, grad_reg.float().expand(n),
                                          reg_weight / (n * trg.shape[0] * l), tclip, scale, cuda_scores,
                                          need_src, need_trg)
        if torch.is_grad_enabled():  # backward(create_graph=True)
            dsrc, dtrg = op_contract.first_order_only(dsrc, dtrg, src, trg)
        return (dsrc if need_src else None), (dtrg if need_trg else None), *([None] * 7)


def nce_loss_three_product(p: Problem, block_rows: int, cuda_scores: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reg) of a validated problem with reduction "mean" or "group_means"."""
    groups = p.groups if p.reduction == "group_means" else (p.n,)
    _, _, _, _, means, reg = ThreeProductLoss.apply(p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight, groups,
                                                    block_rows, cuda_scores)
    return (means if p.reduction == "group_means" else means.view(())), reg
