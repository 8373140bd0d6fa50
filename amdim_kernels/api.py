"""The public entry point: ``nce_loss``."""
from __future__ import annotations

import torch

from . import registry
from .backend_settings import current_settings
from .validation import validate


def _under_torch_func() -> bool:
    """True inside a torch.func transform (grad, vjp, vmap, ...); False in a compiled graph,
    whose tracing need not see the check."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def nce_loss(
    src: torch.Tensor,
    trg: torch.Tensor,
    pos_idx: torch.Tensor | range | tuple[range, ...] | None = None,
    *,
    tclip: float | None = 20.0,
    reg_weight: float = 0.05,
    scale: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """AMDIM's NCE loss of sources against targets, and its score regulariser.

    Args:
        src: (N, D) antecedent features, one row per source.
        trg: (M, L, D) consequent features, M images x L locations, any strides.
        pos_idx: (N,) integers in [0, M): the image whose L locations are the positives of
            each source. Defaults to ``arange(N)``, which requires N == M. A tensor's range
            is checked with one read back from its device per call (on the device instead
            under torch.compile or CUDA graph capture); a Python ``range`` of N indices
            (e.g. ``range(rank * N, rank * N + N)``) is checked on the host, with no sync;
            so is a tuple of ranges, their indices one after another (e.g. two groups of
            B sources that share the targets, ``(range(B), range(B))``: one call where two
            would read trg twice). The index tensors of None and of ranges are made once
            per device and kept.
        tclip: soft clipping ``tclip * tanh(a / tclip)`` of the scores; None disables it.
            Must lie in float32's normal range (the kernels clip in float32).
        reg_weight: weight of the regulariser ``reg_weight * mean(a**2)``.
        scale: multiplies every dot product; None means ``1 / sqrt(D)``.
        reduction: "mean" returns the mean over the N*L positives; "group_means" one mean
            per range of a tuple of ranges (shape (K,); (1,) for any other pos_idx); "none"
            the (N, L) per-positive losses.
        backend: "auto", "reference", "triton", "cuda" or "cpp" (see ``available_backends``).
            How the fused backends compute is set by ``amdim_kernels.settings`` (read once
            per call; the backward follows its forward's).

    Returns:
        ``(loss, reg)``: float32 tensors; the trainer adds them. ``loss`` is a scalar, (K,)
        with ``reduction="group_means"``, or (N, L) with ``reduction="none"``; ``reg`` is
        always a scalar.

    Differentiate with torch.autograd: the fused backends give first derivatives, and
    refuse torch.func transforms (grad, vjp, vmap); ``backend="reference"`` supports both.
    """
    problem = validate(src, trg, pos_idx, tclip, reg_weight, scale, reduction)
    name = registry.resolve(backend, src.device)
    if name != "reference" and _under_torch_func():
        # their autograd Functions are not functorch-aware: torch.func.grad would fail
        # inside the backward, vmap at the first kernel, each with torch's own message
        raise RuntimeError(
            f"backend {name!r} does not support torch.func transforms (grad, vjp, vmap, ...): take "
            "gradients with torch.autograd (loss.backward(), torch.autograd.grad), or use backend='reference'"
        )
    return registry.implementation(name)(problem, current_settings())
