"""`backend="cpp"` and `backend="cuda"`: the op library amdim_kernels._C from csrc/.

The ops are defined once in C++ (`amdim_kernels::nce_fwd`, `amdim_kernels::nce_bwd`) with CPU
and CUDA kernels. Here they get a fake (meta) implementation, so that torch.compile traces
them as single opaque calls without a graph break, and an autograd formula:

    nce_fwd(src, trg, pos_idx, tclip, scale) -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,)

`loss` and `sq` (each row's sum of raw scores squared, whose total gives the regulariser)
are differentiable; `pos` and `neg_lse` are saved statistics.
"""
from __future__ import annotations

import torch

from . import _C  # loading it registers the C++ ops
from .validation import Problem

_ops = torch.ops.amdim_kernels
BUILT_FOR: tuple[str, ...] = tuple(_C.BUILT_FOR)  # the devices the extension has kernels for


@torch.library.register_fake("amdim_kernels::nce_fwd")
def _nce_fwd_fake(src, trg, pos_idx, tclip, scale):
    n, l = src.shape[0], trg.shape[1]
    f32 = dict(dtype=torch.float32, device=src.device)
    return src.new_empty(n, l, **f32), src.new_empty(n, l, **f32), src.new_empty(n, **f32), src.new_empty(n, **f32)


@torch.library.register_fake("amdim_kernels::nce_bwd")
def _nce_bwd_fake(src, trg, pos_idx, pos, neg_lse, grad_loss, grad_sq, tclip, scale, need_src, need_trg):
    dsrc = src.new_empty(src.shape if need_src else (0, src.shape[1]))
    dtrg = trg.new_empty(trg.shape if need_trg else (0,) + tuple(trg.shape[1:]))
    return dsrc, dtrg


def _setup_context(ctx, inputs, output):
    src, trg, pos_idx, tclip, scale = inputs
    _, pos, neg_lse, _ = output
    ctx.save_for_backward(src, trg, pos_idx, pos, neg_lse)
    ctx.tclip, ctx.scale = tclip, scale
    ctx.mark_non_differentiable(pos, neg_lse)


def _backward(ctx, grad_loss, _grad_pos, _grad_neg_lse, grad_sq):
    src, trg, pos_idx, pos, neg_lse = ctx.saved_tensors
    need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = torch.zeros_like(pos)
    if grad_sq is None:
        grad_sq = torch.zeros_like(neg_lse)
    dsrc, dtrg = _ops.nce_bwd(
        src, trg, pos_idx, pos, neg_lse, grad_loss.float().contiguous(), grad_sq.float().contiguous(),
        ctx.tclip, ctx.scale, need_src, need_trg,
    )
    return (dsrc if need_src else None), (dtrg if need_trg else None), None, None, None


torch.library.register_autograd("amdim_kernels::nce_fwd", _backward, setup_context=_setup_context)


def nce_loss_compiled(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    loss, _, _, sq = _ops.nce_fwd(p.src, p.trg, p.pos_idx, p.tclip, p.scale)
    j = p.m * p.l
    reg = sq.sum() * (p.reg_weight / (p.n * j))
    return (loss.mean() if p.reduction == "mean" else loss), reg
