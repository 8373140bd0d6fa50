"""The AMDIM NCE loss in plain PyTorch, exactly as docs/loss.md#definition writes it.

This is the ground truth every fused backend is tested against. It materialises the
(N, M*L) score matrix and about a dozen temporaries of that size, which is precisely
what the fused kernels avoid.
"""
from __future__ import annotations

import torch

from .autocast_off import autocast_off
from .reductions import reduce_losses


def nce_loss_reference(
    src: torch.Tensor,
    trg: torch.Tensor,
    pos_idx: torch.Tensor,
    tclip: float | None,
    reg_weight: float,
    scale: float,
    reduction: str,
    groups: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss on validated inputs (see ``amdim_kernels.nce_loss`` for the API);
    `groups`: the rows of each group for reduction "group_means" (None: one group of N).

    Computes in float32 (or float64 when given float64, which gradcheck uses) after the
    dot product, whatever the input dtype, and under autocast too: autocast would round the
    scores to its 16-bit dtype and keep the rest there. The features come as they are.
    """
    with autocast_off(src.device):
        return _nce_loss(src, trg, pos_idx, tclip, reg_weight, scale, reduction, groups or (src.shape[0],))


def _nce_loss(src, trg, pos_idx, tclip, reg_weight, scale, reduction, groups):
    n, _ = src.shape
    m, l, _ = trg.shape
    compute = torch.promote_types(src.dtype, torch.float32)
    rows = torch.arange(n, device=src.device)

    # a[i, m, l] = scale * <src[i], trg[m, l]>   (N, M, L)
    a = scale * torch.einsum("nd,mld->nml", src.to(compute), trg.to(compute))

    # A non-finite score (from a NaN or Inf in an input, or a dot product past the float32
    # range) poisons its row: its L losses, reg, and every entry of the row's gradient are
    # NaN, although tanh maps +-inf to a finite +-tclip. The poison is 0 for a finite row
    # and NaN for the others, a constant: adding poison * (the row's sum of a) changes no
    # finite row's value (0 * a = 0 for every finite a, where 0 * a^2 could overflow) or
    # gradient, and gives each poisoned row's scores a NaN gradient.
    poison = torch.where(torch.isfinite(a).flatten(1).all(1, keepdim=True), 0.0, float("nan")).to(compute)  # (N, 1)

    # reg = reg_weight * mean(a^2) over all N*M*L entries, before clipping; exactly 0 (or the
    # poison) for reg_weight 0, where 0 * mean(a^2) would be NaN once a^2 overflows
    reg = (reg_weight * a.square().mean() if reg_weight else a.new_zeros(())) + poison.sum()

    # s = tclip * tanh(a / tclip)
    s = a if tclip is None else tclip * torch.tanh(a / tclip)

    # positives of row i: the L columns of image pos_idx[i]; negatives: every other image
    pos = s[rows, pos_idx]  # (N, L)
    is_pos_image = torch.zeros(n, m, dtype=torch.bool, device=src.device)
    is_pos_image[rows, pos_idx] = True
    neg = s.masked_fill(is_pos_image[:, :, None], float("-inf")).flatten(1)
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (N, 1); -inf when M == 1

    # nce[i, l] = s_pos - log(exp(s_pos) + sum_neg exp(s))
    nce = pos - torch.logaddexp(pos, neg_lse)
    per_positive = -nce + (poison * a.flatten(1)).sum(1, keepdim=True)

    return reduce_losses(per_positive, reduction, groups), reg
