"""`backend="triton"`: the autograd Function around the fused kernels.

Saved for backward: the inputs and O(N*L) statistics. The backward recomputes score tiles
chunk by chunk (a chunk is whole images, about 1/8 of the columns) into G = scale * dL/da,
then d src += G @ trg_chunk and d trg_chunk = G^T @ src run on cuBLAS with float32
accumulation. Deterministic: no atomics anywhere, partials merged in a fixed order.
"""
from __future__ import annotations

import torch

from ..validation import Problem
from . import launch


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 keeps float32's range; fp16 would flush the smallest gradients (about
    # 1/(N*L*M*L)) to zero, so fp16 inputs get a float32 G and float32 products.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


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
        sig = torch.sigmoid(neg_lse[:, None] - pos)  # 1 - exp(pos) / Z
        gpos = (-w * sig).contiguous()
        r = (w * sig).sum(1)
        reg_coef = torch.zeros((), **f32) if grad_reg is None else grad_reg.float() * (2 * reg_weight / (n * m * l))

        d = src.shape[1]
        dsrc = torch.zeros(n, d, **f32) if need_src else None
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
        return (
            dsrc.to(src.dtype) if need_src else None,
            dtrg,
            None, None, None, None, None,
        )


def nce_loss_triton(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    return _NCELossTriton.apply(p.src, p.trg, p.pos_idx, p.tclip, p.reg_weight, p.scale, p.reduction)
