"""`backend="cpp"` and `backend="cuda"`: the op library amdim_kernels._C from csrc/.

The ops are defined once in C++ (`amdim_kernels::nce_fwd`, `amdim_kernels::nce_bwd`) with CPU
and CUDA kernels; registration.py gives them fake implementations and an autograd formula:

    nce_fwd(src, trg, pos_idx, tclip, scale, reg_weight)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), mean (), reg ()
"""
from __future__ import annotations

import torch

from . import _C  # loading it registers the C++ ops
from .registration import fwd_call, loss_and_reg, register
from .validation import Problem

_ops = torch.ops.amdim_kernels
BUILT_FOR: tuple[str, ...] = tuple(_C.BUILT_FOR)  # the devices the extension has kernels for


def kernel_image_error(device_index: int) -> str:
    """Why CUDA device `device_index` cannot load the extension's CUDA kernels ("" when it
    can): built for other architectures (TORCH_CUDA_ARCH_LIST) with no PTX it could compile."""
    return _C.kernel_image_error(device_index) if "cuda" in BUILT_FOR else "the extension has no CUDA kernels"

register("amdim_kernels::nce_fwd", "amdim_kernels::nce_bwd", _ops.nce_bwd)


def _fwd_below_autograd(*args):
    """The fwd op called below autograd, straight into its CPU or CUDA kernel: the eager
    path skips torch.library's Python wrapper around it (argument defaults filled, a
    redispatch)."""
    with torch._C._AutoDispatchBelowAutograd():
        return _ops.nce_fwd.default(*args)


_fwd = fwd_call(_ops.nce_fwd, _fwd_below_autograd, _ops.nce_bwd)


def nce_loss_compiled(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    return loss_and_reg(_fwd(p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight), p)
