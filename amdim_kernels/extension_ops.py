"""`backend="cpp"` and `backend="cuda"`: the C++/CUDA op library amdim_kernels._C, built from
csrc/.

The ops are defined once in C++ (`amdim_kernels::nce_fwd`, `amdim_kernels::nce_bwd`) with CPU
and CUDA kernels; op_contract.py gives them their fake implementations and autograd formula:

    nce_fwd(src, trg, pos_idx, tclip, scale, reg_weight, cuda_scores)
        -> loss (N, L), pos (N, L), neg_lse (N,), sq (N,), mean (), reg ()

`cuda_scores` (Settings.cuda_scores) is how the CUDA kernels make the scores of 16-bit
inputs; the CPU kernels ignore it. A call that needs gradients of a reduced loss takes the
three-product schedule where schedule.py chooses it (extension_fused.py): on the CPU under
"auto", on a GPU where settings(schedule="three-product") sets it.
"""
from __future__ import annotations

import torch

from . import extension_fused, extension_loader, op_contract, schedule
from .backend_settings import Settings
from .validation import Problem

_ops = torch.ops.amdim_kernels


def kernel_image_error(device_index: int) -> str:
    """Why CUDA device `device_index` cannot load the extension's CUDA kernels ("" when it
    can): built for other architectures (TORCH_CUDA_ARCH_LIST) with no PTX it could compile."""
    state = extension_loader.STATE
    if state is None or "cuda" not in state.built_for:
        return "the extension has no CUDA kernels"
    return state.module.kernel_image_error(device_index)


op_contract.register("amdim_kernels::nce_fwd", "amdim_kernels::nce_bwd", _ops.nce_bwd)
extension_fused.register()


class _EagerLoss(torch.autograd.Function):
    """The fwd op in eager mode, called below autograd straight into its CPU or CUDA kernel
    (skipping torch.library's Python wrapper: argument defaults filled, a redispatch), with
    the op contract's autograd formula."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            outputs = _ops.nce_fwd.default(*args)
        op_contract.setup_context(ctx, args, outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return op_contract.backward(_ops.nce_bwd, ctx, *grads)


def nce_loss_extension(p: Problem, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reg) of a validated problem on the extension's kernels: under torch.compile
    the registered op itself, which the compiler traces as one opaque call (a Function's
    Python would break the graph); in eager mode the lighter Function above. The schedule
    that schedule.choose picks (settings.schedule, settings.workspace_bytes): on the CPU under
    "auto" too, on a GPU only where settings(schedule="three-product") asks for it."""
    rows = schedule.choose(p, settings, "cpp" if p.src.device.type == "cpu" else "cuda")
    if rows != schedule.FOUR_PRODUCT:
        return extension_fused.nce_loss_three_product(p, rows, settings.cuda_scores)
    args = (p.src, p.trg, p.pos_idx, p.tclip, p.scale, p.reg_weight, settings.cuda_scores)
    outputs = _ops.nce_fwd(*args) if torch.compiler.is_compiling() else _EagerLoss.apply(*args)
    return op_contract.loss_and_reg(outputs, p)
