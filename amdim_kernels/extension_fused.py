"""Backends "cpp" and "cuda"'s three-product schedule (schedule.py): the op
`amdim_kernels::nce_fwd_grad` (csrc/nce_cpu_fused.cpp, csrc/nce_cuda_fused.cpp), its fake
implementation, and the call through three_product.py's autograd formula, whose recomputing
backward is the nce_bwd op.

    nce_fwd_grad(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows,
                 need_src, need_trg)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), means (K,), reg (), dsrc, dtrg

`means` holds one mean loss per group of consecutive source rows (group_rows: their counts);
`dsrc` and `dtrg` are the gradients of  sum_k (n_k / N) means[k] + reg, each element rounded
once from float32: float32 on the CPU; on a GPU in the inputs' dtype where one product makes
it (three_product.gradient_dtypes).
"""
from __future__ import annotations

import torch

from .three_product import ThreeProductLoss, gradient_dtypes, loss_and_reg, objective_groups
from .validation import Problem

_ops = torch.ops.amdim_kernels


def _fake_fwd_grad(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, need_src, need_trg):
    n, l = src.shape[0], trg.shape[1]
    f32 = dict(dtype=torch.float32, device=src.device)
    dsrc_dtype, dtrg_dtype = gradient_dtypes(src, block_rows, src.device.type == "cuda")
    return (src.new_empty(n, l, **f32), src.new_empty(n, l, **f32), src.new_empty(n, **f32),
            src.new_empty(n, **f32), src.new_empty(len(group_rows), **f32), src.new_empty((), **f32),
            src.new_empty(n if need_src else 0, src.shape[1], dtype=dsrc_dtype),
            trg.new_empty((trg.shape[0] if need_trg else 0,) + tuple(trg.shape[1:]), dtype=dtrg_dtype))


def register() -> None:
    """The op's fake implementation (once the extension has defined the op)."""
    torch.library.register_fake("amdim_kernels::nce_fwd_grad")(_fake_fwd_grad)


def _fwd(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows, need_src, need_trg, cuda_scores):
    """three_product.py's fwd: the op, called below autograd (cuda_scores is for the bwd)."""
    with torch._C._AutoDispatchBelowAutograd():
        return _ops.nce_fwd_grad.default(src, trg, pos_idx, tclip, scale, reg_weight, group_rows, block_rows,
                                         need_src, need_trg)


def nce_loss_three_product(p: Problem, block_rows: int, cuda_scores: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reg) of a validated problem with reduction "mean" or "group_means"."""
    outputs = ThreeProductLoss.apply(_fwd, _ops.nce_bwd, p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight,
                                     objective_groups(p), block_rows, (cuda_scores,))
    return loss_and_reg(outputs[4], outputs[5], p.reduction)
