"""`backend="cpp"` and `backend="cuda"`: the op library amdim_kernels._C from csrc/.

The ops are defined once in C++ (`amdim_kernels::nce_fwd`, `amdim_kernels::nce_bwd`) with CPU
and CUDA kernels; registration.py gives them fake implementations and an autograd formula:

    nce_fwd(src, trg, pos_idx, tclip, scale, reg_weight)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), mean (), reg ()
"""
from __future__ import annotations

import torch

from . import _C  # loading it registers the C++ ops
from .registration import autograd_formula, loss_and_reg, register
from .validation import Problem

_ops = torch.ops.amdim_kernels
BUILT_FOR: tuple[str, ...] = tuple(_C.BUILT_FOR)  # the devices the extension has kernels for

register("amdim_kernels::nce_fwd", "amdim_kernels::nce_bwd", _ops.nce_bwd)
_setup_context, _backward = autograd_formula(_ops.nce_bwd)


class _NCELossCompiled(torch.autograd.Function):
    """The eager path: the registered autograd formula, applied without torch.library's
    Python wrapper around the op (argument defaults filled, a redispatch), the fwd op called
    below autograd straight into its CPU or CUDA kernel. forward takes ctx itself: a
    separate setup_context would make every apply bind its arguments through
    inspect.signature."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            outputs = _ops.nce_fwd.default(*args)
        _setup_context(ctx, args, outputs)
        return outputs

    backward = staticmethod(_backward)


def nce_loss_compiled(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    args = (p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight)
    # torch.compile traces the registered op (a Function's Python would break the graph)
    outputs = _ops.nce_fwd(*args) if torch.compiler.is_compiling() else _NCELossCompiled.apply(*args)
    return loss_and_reg(outputs, p)
