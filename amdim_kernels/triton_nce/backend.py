"""`backend="triton"`: the fused Triton kernels as one differentiable loss.

Saved for backward: the inputs and O(N*L) statistics. The forward (forward.py) streams
score tiles into per-row partials and merges them; the backward (backward.py) recomputes
score tiles chunk by chunk into G = scale * dL/da and multiplies G out with cuBLAS.
Deterministic: no atomics anywhere, partials merged in a fixed order.

The ops follow op_contract.py, with the call's Triton settings (config.CallOptions) as their
extra arguments, and are called two ways. In eager mode through a torch.autograd.Function:
the lighter call (about 5 us of host time where a registered op takes about 30, on a 2-core
x86 CPU). Under torch.compile through the registered ops amdim_kernels::triton_nce_fwd and
triton_nce_bwd, which the compiler traces as opaque calls; it would break the graph on the
Function's Python.
"""
from __future__ import annotations

import torch

from .. import op_contract, schedule
from ..autocast_off import autocast_off
from ..backend_settings import Settings
from ..three_product import ThreeProductLoss, objective_groups
from ..three_product import loss_and_reg as three_product_outputs
from ..validation import Problem
from . import backward as backward_stage
from .config import CallOptions
from .forward import forward as forward_stage
from .operands import on_device_of
from .three_product import forward_with_gradients


def forward(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor, tclip: float | None, scale: float,
            reg_weight: float, strategy: str, loads: str, chunks: int, fwd_tiles: list[int], grad_tiles: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss (N, L), pos (N, L), neg_lse (N,), sq (N,), mean (), reg (): op_contract.py's fwd,
    with pos the positives' raw scores a (their clip is formed again from them, and the
    regulariser's gradient there needs a itself)."""
    options = CallOptions.from_op_args(strategy, loads, chunks, fwd_tiles, grad_tiles)
    with on_device_of(src), autocast_off(src.device):
        stats = forward_stage(src, trg, pos_idx, tclip, scale, reg_weight, options)
    return stats.loss, stats.a_pos, stats.neg_lse, stats.sq, stats.mean, stats.reg


def backward(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor, pos: torch.Tensor, neg_lse: torch.Tensor,
             sq: torch.Tensor, grad_loss: torch.Tensor, loss_weight: float, grad_sq: torch.Tensor, sq_weight: float,
             tclip: float | None, scale: float, strategy: str, loads: str, chunks: int, fwd_tiles: list[int],
             grad_tiles: list[int], need_src: bool, need_trg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d src and d trg of loss_weight * sum(grad_loss * loss) + sq_weight * sum(grad_sq * sq):
    op_contract.py's bwd."""
    options = CallOptions.from_op_args(strategy, loads, chunks, fwd_tiles, grad_tiles)
    with on_device_of(src), autocast_off(src.device):
        return backward_stage.backward(src, trg, pos_idx, pos, neg_lse, sq, grad_loss, loss_weight, grad_sq,
                                       sq_weight, tclip, scale, options, need_src, need_trg)


_fwd_op = torch.library.custom_op("amdim_kernels::triton_nce_fwd", forward, mutates_args=())
_bwd_op = torch.library.custom_op("amdim_kernels::triton_nce_bwd", backward, mutates_args=())
op_contract.register("amdim_kernels::triton_nce_fwd", "amdim_kernels::triton_nce_bwd", _bwd_op)


class _EagerLoss(torch.autograd.Function):
    """The forward in eager mode without the registered op's wrapper, with the op
    contract's autograd formula (its backward through the plain function: no dispatch)."""

    @staticmethod
    def forward(ctx, *args):
        outputs = forward(*args)
        op_contract.setup_context(ctx, args, outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return op_contract.backward(backward, ctx, *grads)


def nce_loss_triton(p: Problem, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reg) of a validated problem on the Triton kernels under the given settings:
    the three-product schedule where settings.schedule asks for it (three_product.py), else
    the four-product one."""
    op_args = CallOptions.of(settings, p.src.dtype).op_args()
    rows = schedule.choose(p, settings, "triton")
    if rows != schedule.FOUR_PRODUCT:
        outputs = ThreeProductLoss.apply(forward_with_gradients, backward, p.src, p.trg, p.pos_idx, p.tclip,
                                         p.scale, p.reg_weight, objective_groups(p), rows, op_args)
        return three_product_outputs(outputs[4], outputs[5], p.reduction)
    args = (p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight, *op_args)
    outputs = _fwd_op(*args) if torch.compiler.is_compiling() else _EagerLoss.apply(*args)
    return op_contract.loss_and_reg(outputs, p)
