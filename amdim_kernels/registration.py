"""Fake (meta) and autograd implementations of the registered loss ops.

Two op pairs share one contract: the C++ op library's (`amdim_kernels::nce_fwd/nce_bwd`,
backends "cpp" and "cuda") and the Triton backend's (`amdim_kernels::triton_nce_fwd/bwd`,
which torch.compile sees):

    fwd(src, trg, pos_idx, *options) -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,)
    bwd(src, trg, pos_idx, pos, neg_lse, sq, grad_loss, grad_sq, *options, need_src, need_trg)
        -> dsrc (N, D) or (0, D), dtrg (M, L, D) or (0, L, D)

`options` are the kernel options (tclip, scale, and for Triton the score strategy). `loss`
and `sq` (each row's sum of raw scores squared, whose total gives the regulariser) are
differentiable; `pos` and `neg_lse` are saved statistics, `pos` the positives' scores as
the pair's bwd reads them: soft-clipped for the C++ ops, raw for Triton's (whose backward
forms the clip again, and needs the raw score for the regulariser's gradient at the
positives). bwd reads `sq` only for float16 inputs on a GPU: it bounds each row's |a|, and
so the range of the float16 G (triton_nce/launch.py's gradient_scale, csrc's
launch_nce_grad_scale). With a fake implementation torch.compile traces each op as one
opaque call, without a graph break.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .validation import Problem


def _fake_fwd(src, trg, pos_idx, *options):
    n, l = src.shape[0], trg.shape[1]
    f32 = dict(dtype=torch.float32, device=src.device)
    return src.new_empty(n, l, **f32), src.new_empty(n, l, **f32), src.new_empty(n, **f32), src.new_empty(n, **f32)


def _fake_bwd(src, trg, pos_idx, pos, neg_lse, sq, grad_loss, grad_sq, *options_and_needs):
    need_src, need_trg = options_and_needs[-2:]
    dsrc = src.new_empty(src.shape if need_src else (0, src.shape[1]))
    dtrg = trg.new_empty(trg.shape if need_trg else (0,) + tuple(trg.shape[1:]))
    return dsrc, dtrg


def autograd_formula(bwd: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) of a fwd op, its gradients computed by `bwd`; they serve
    torch.library.register_autograd and a torch.autograd.Function alike."""

    def setup_context(ctx, inputs, output):
        src, trg, pos_idx, *options = inputs
        _, pos, neg_lse, sq = output
        ctx.save_for_backward(src, trg, pos_idx, pos, neg_lse, sq)
        ctx.options = options
        ctx.mark_non_differentiable(pos, neg_lse)
        # pos and neg_lse never get a gradient, and loss or sq may get none: without this
        # autograd would fill a zero tensor for each (two launches per backward on a GPU)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_pos, _grad_neg_lse, grad_sq):
        src, trg, pos_idx, pos, neg_lse, sq = ctx.saved_tensors
        need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:
            grad_loss = torch.zeros_like(pos)
        if grad_sq is None:
            grad_sq = torch.zeros_like(neg_lse)
        dsrc, dtrg = bwd(src, trg, pos_idx, pos, neg_lse, sq, grad_loss.float().contiguous(),
                         grad_sq.float().contiguous(), *ctx.options, need_src, need_trg)
        return (dsrc if need_src else None), (dtrg if need_trg else None), None, *([None] * len(ctx.options))

    return setup_context, backward


def register(fwd_name: str, bwd_name: str, bwd: Callable) -> None:
    """Fake implementations for both ops, and fwd's autograd formula through `bwd`."""
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    setup_context, backward = autograd_formula(bwd)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def loss_and_reg(outputs, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """nce_loss's (loss, reg) from a fwd op's outputs."""
    loss, _, _, sq = outputs
    # scaled before the sum: its backward then hands the bwd op a contiguous (N,) gradient,
    # where sum-then-scale hands it an expanded scalar that must be copied to be contiguous
    reg = (sq * (p.reg_weight / (p.n * p.m * p.l))).sum()
    return (loss.mean() if p.reduction == "mean" else loss), reg
