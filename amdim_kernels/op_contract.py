"""The contract of the registered loss ops: their fake (meta) implementations and their
autograd formula.

Two op pairs share it: the C++ op library's (`amdim_kernels::nce_fwd/nce_bwd`,
backends "cpp" and "cuda") and the Triton backend's (`amdim_kernels::triton_nce_fwd/bwd`,
which torch.compile sees):

    fwd(src, trg, pos_idx, tclip, scale, reg_weight, *extra)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), mean (), reg ()
    bwd(src, trg, pos_idx, pos, neg_lse, sq, grad_loss, loss_weight, grad_sq, sq_weight,
        tclip, scale, *extra, need_src, need_trg)
        -> dsrc (N, D) or (0, D), dtrg (M, L, D) or (0, L, D)

`extra` are the backend's settings for the call (backend_settings.py), which the backward takes as
the forward did: the CUDA score path for the C++ ops, the score strategy, operand loads,
chunks and tiles for Triton's. `loss` (the per-positive losses), `mean` (their mean)
and `reg` (reg_weight times the mean of a^2 over all N*M*L scores) are differentiable: the
op makes nce_loss's outputs itself, so no torch op (and no GPU launch) forms them from the
statistics, forward or backward. `pos`, `neg_lse` and `sq` (each row's sum of raw scores
squared) are saved statistics; `pos` holds the positives' scores as the pair's bwd reads
them: soft-clipped for the C++ ops, raw for Triton's (whose backward forms the clip again,
and needs the raw score for the regulariser's gradient at the positives).

bwd gives the gradients of loss_weight * sum(grad_loss * loss) + sq_weight * sum(grad_sq *
sq). grad_loss (N, L) and grad_sq (N,) may have any strides, a stride of 0 included: the
autograd formula hands it the mean's and reg's upstream gradients as broadcast views with
their factors 1/(N*L) and reg_weight/(N*M*L), which the kernels apply as they read them. bwd
reads `sq` only for float16 inputs on a GPU: it bounds each row's |a|, and so the range of
the float16 G (triton_nce/grad_rows.py's gradient_scale, csrc's launch_nce_grad_scale). With a
fake implementation torch.compile traces each op as one opaque call, without a graph break.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .reductions import reduce_losses
from .validation import Problem


def _fake_fwd(src, trg, pos_idx, *options):
    n, l = src.shape[0], trg.shape[1]
    f32 = dict(dtype=torch.float32, device=src.device)
    return (src.new_empty(n, l, **f32), src.new_empty(n, l, **f32), src.new_empty(n, **f32), src.new_empty(n, **f32),
            src.new_empty((), **f32), src.new_empty((), **f32))


def _fake_bwd(src, trg, pos_idx, pos, neg_lse, sq, grad_loss, loss_weight, grad_sq, sq_weight, *options_and_needs):
    need_src, need_trg = options_and_needs[-2:]
    dsrc = src.new_empty(src.shape if need_src else (0, src.shape[1]))
    dtrg = trg.new_empty(trg.shape if need_trg else (0,) + tuple(trg.shape[1:]))
    return dsrc, dtrg


def _upstream(grad_loss, grad_mean, n: int, l: int, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(grad, weight) with weight * grad the upstream gradient of the (N, L) losses, from that
    of `loss` and that of `mean`: a view and no launch in the two cases nce_loss makes (one
    of them, as `reduction` picks)."""
    if grad_mean is None:
        return (grad_loss if grad_loss is not None else like.new_zeros(())).float().expand(n, l), 1.0
    if grad_loss is None:
        return grad_mean.float().expand(n, l), 1.0 / (n * l)
    return grad_loss.float() + grad_mean.float() / (n * l), 1.0


class _FirstOrderOnly(torch.autograd.Function):
    """The fused gradients under backward(create_graph=True): the same values, tied to the
    inputs, so that differentiating them again raises here rather than silently giving a
    second derivative without nce_loss's part (a gradient penalty on other terms of the same
    graph still works)."""

    @staticmethod
    def forward(ctx, dsrc, dtrg, src, trg):
        return dsrc.view_as(dsrc), dtrg.view_as(dtrg)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "nce_loss's fused backends (cpp, cuda, triton) give first derivatives only: the "
            "gradient of its gradient (double backward) needs backend='reference'"
        )


def first_order_only(dsrc: torch.Tensor, dtrg: torch.Tensor, src: torch.Tensor,
                     trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused gradients as backward(create_graph=True) returns them (_FirstOrderOnly)."""
    return _FirstOrderOnly.apply(dsrc, dtrg, src, trg)


def setup_context(ctx, inputs, output) -> None:
    """What a fwd op's backward needs, saved on ctx (torch.library's setup_context)."""
    src, trg, pos_idx, tclip, scale, reg_weight, *extra = inputs
    _, pos, neg_lse, sq, _, _ = output
    ctx.save_for_backward(src, trg, pos_idx, pos, neg_lse, sq)
    ctx.options = tclip, scale, *extra
    ctx.reg_weight = reg_weight
    ctx.mark_non_differentiable(pos, neg_lse, sq)
    # the statistics never get a gradient, and loss, mean or reg may get none: without
    # this autograd would fill a zero tensor for each (a launch each on a GPU)
    ctx.set_materialize_grads(False)


def backward(bwd: Callable, ctx, grad_loss, _grad_pos, _grad_neg_lse, _grad_sq, grad_mean, grad_reg) -> tuple:
    """The gradients of a fwd op's inputs, computed by its bwd op `bwd` from what
    setup_context saved and the upstream gradients of loss, mean and reg."""
    src, trg, pos_idx, pos, neg_lse, sq = ctx.saved_tensors
    n, l = pos.shape
    need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    w, w_weight = _upstream(grad_loss, grad_mean, n, l, pos)
    grad_reg = grad_reg if grad_reg is not None else pos.new_zeros(())
    sq_weight = ctx.reg_weight / (n * trg.shape[0] * l)
    with torch.no_grad():  # the kernels' gradients are not differentiable themselves
        dsrc, dtrg = bwd(src, trg, pos_idx, pos, neg_lse, sq, w, w_weight, grad_reg.float().expand(n),
                         sq_weight, *ctx.options, need_src, need_trg)
    if torch.is_grad_enabled():  # backward(create_graph=True)
        dsrc, dtrg = first_order_only(dsrc, dtrg, src, trg)
    return (dsrc if need_src else None), (dtrg if need_trg else None), None, *([None] * (len(ctx.options) + 1))


def register(fwd_name: str, bwd_name: str, bwd: Callable) -> None:
    """Fake implementations for both ops, and fwd's autograd formula through `bwd`: what
    torch.compile traces, each op as one opaque call. In eager mode each backend calls its
    fwd through a torch.autograd.Function of its own built from setup_context and backward:
    where a Function defines setup_context itself, every apply binds its arguments through
    inspect.signature (about 30 us of host time per call on a 2-core x86 CPU), so those
    Functions take ctx in forward instead."""
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    torch.library.register_autograd(fwd_name, functools.partial(backward, bwd), setup_context=setup_context)


def loss_and_reg(outputs, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """nce_loss's (loss, reg) from a fwd op's outputs: no launch for "mean" and "none"."""
    loss, _, _, _, mean, reg = outputs
    if p.reduction == "group_means":
        return reduce_losses(loss, "group_means", p.groups), reg
    return (mean if p.reduction == "mean" else loss), reg
