"""`backend="triton"`: the fused Triton kernels as one differentiable loss.

Saved for backward: the inputs and O(N*L) statistics. The backward recomputes score tiles
chunk by chunk (a chunk is whole images, about 1/8 of the columns) into G = scale * dL/da,
then d src += G @ trg_chunk and d trg_chunk = G^T @ src run on cuBLAS with float32
accumulation. Deterministic: no atomics anywhere, partials merged in a fixed order.

Two thin wrappers share that work. In eager mode, a torch.autograd.Function: the lighter
call (about 5 us of host time where a registered op takes about 30, measured on this
project's CPU). Under torch.compile, the registered ops amdim_kernels::triton_nce_fwd and
triton_nce_bwd (registration.py), which the compiler traces as opaque calls; it would break
the graph on the Function's Python.
"""
from __future__ import annotations

import torch

from ..registration import loss_and_reg, register
from ..validation import Problem
from . import launch


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 keeps float32's range; fp16 would flush the smallest gradients (about
    # 1/(N*L*M*L)) to zero, so fp16 inputs get a float32 G and float32 products.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def backward_grads(src, trg, pos_idx, pos, neg_lse, w, reg_coef, tclip, scale, strategy, need_src, need_trg):
    """(d src, d trg), None where not needed, of sum(w * loss) + reg, for the upstream weight
    w (N, L) of each positive's loss and reg's derivative d(reg)/da[i, j] = reg_coef[i] *
    a[i, j] (reg_coef (N,), or one value broadcast with stride 0)."""
    n, l = pos.shape
    m, _, d = trg.shape
    sig = torch.sigmoid(neg_lse[:, None] - pos)  # 1 - exp(pos) / Z
    gpos = (-w * sig).contiguous()
    r = (w * sig).sum(1)
    dsrc = torch.zeros(n, d, device=src.device, dtype=torch.float32) if need_src else None
    dtrg = torch.empty(m, l, d, device=trg.device, dtype=trg.dtype) if need_trg else None
    g_dtype = _grad_dtype(src.dtype)
    src_g = src.to(g_dtype)
    for m0, m1, g in launch.gradient_chunks(
        src, trg, pos_idx, neg_lse, r, gpos, reg_coef, tclip, scale, g_dtype, strategy
    ):
        if need_src:
            launch.addmm_f32_(dsrc, g, trg[m0:m1].reshape(-1, d).to(g_dtype))
        if need_trg:
            chunk = dtrg[m0:m1].view(-1, d)
            if g_dtype == trg.dtype:
                torch.mm(g.t(), src_g, out=chunk)  # cuBLAS accumulates in float32
            else:
                chunk.copy_(g.t() @ src_g)
    return (dsrc.to(src.dtype) if need_src else None), dtrg


class _NCELossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, trg, pos_idx, tclip, reg_weight, scale, reduction):
        strategy = launch.score_strategy(src.dtype)
        stats = launch.forward(src, trg, pos_idx, tclip, scale, strategy)
        n, l = stats.loss.shape
        j = trg.shape[0] * trg.shape[1]
        loss = stats.loss.mean() if reduction == "mean" else stats.loss
        reg = stats.sq.sum() * (reg_weight / (n * j))
        ctx.save_for_backward(src, trg, pos_idx, stats.pos, stats.neg_lse)
        ctx.args = (tclip, reg_weight, scale, reduction, strategy)
        return loss, reg

    @staticmethod
    def backward(ctx, grad_loss, grad_reg):
        src, trg, pos_idx, pos, neg_lse = ctx.saved_tensors
        tclip, reg_weight, scale, reduction, strategy = ctx.args
        need_src, need_trg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_src or need_trg):
            return (None,) * 7
        n, l = pos.shape
        m = trg.shape[0]
        f32 = dict(device=src.device, dtype=torch.float32)
        # upstream weight of each positive's loss: w[i, l]
        if grad_loss is None:
            w = torch.zeros(n, l, **f32)
        elif reduction == "mean":
            w = (grad_loss.float() / (n * l)).expand(n, l)
        else:
            w = grad_loss.float()
        # reg = reg_weight * mean(a^2): one coefficient for every row
        reg_coef = torch.zeros(1, **f32) if grad_reg is None else (grad_reg.float() * (2 * reg_weight / (n * m * l)))
        dsrc, dtrg = backward_grads(src, trg, pos_idx, pos, neg_lse, w, reg_coef.reshape(1).expand(n), tclip,
                                    scale, strategy, need_src, need_trg)
        return dsrc, dtrg, None, None, None, None, None


@torch.library.custom_op("amdim_kernels::triton_nce_fwd", mutates_args=())
def _fwd_op(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor, tclip: float | None, scale: float,
            strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = launch.forward(src, trg, pos_idx, tclip, scale, strategy)
    return stats.loss, stats.pos, stats.neg_lse, stats.sq


@torch.library.custom_op("amdim_kernels::triton_nce_bwd", mutates_args=())
def _bwd_op(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor, pos: torch.Tensor, neg_lse: torch.Tensor,
            grad_loss: torch.Tensor, grad_sq: torch.Tensor, tclip: float | None, scale: float, strategy: str,
            need_src: bool, need_trg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # sq[i] = sum_j a[i, j]^2, so d(sum_i grad_sq[i] * sq[i]) / da[i, j] = 2 * grad_sq[i] * a[i, j]
    dsrc, dtrg = backward_grads(src, trg, pos_idx, pos, neg_lse, grad_loss, 2 * grad_sq, tclip, scale, strategy,
                                need_src, need_trg)
    d = src.shape[1]
    return (dsrc if need_src else src.new_empty(0, d)), (dtrg if need_trg else trg.new_empty((0,) + trg.shape[1:]))


register("amdim_kernels::triton_nce_fwd", "amdim_kernels::triton_nce_bwd", _bwd_op)


def nce_loss_triton(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        strategy = launch.score_strategy(p.src.dtype)
        return loss_and_reg(_fwd_op(p.src, p.trg, p.pos_idx, p.tclip, p.scale, strategy), p)
    return _NCELossTriton.apply(p.src, p.trg, p.pos_idx, p.tclip, p.reg_weight, p.scale, p.reduction)
