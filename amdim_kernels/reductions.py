"""nce_loss's reductions of the (N, L) per-positive losses, for the backends that form them
from those losses (the three-product schedule of backend "cpp" forms each group's mean in
its kernel)."""
from __future__ import annotations

import torch


def reduce_losses(per_positive: torch.Tensor, reduction: str, groups: tuple[int, ...]) -> torch.Tensor:
    """"mean": the mean over all N*L positives; "group_means": (K,), the mean over each group
    of consecutive rows (`groups`: their counts); "none": the losses themselves."""
    if reduction == "mean":
        return per_positive.mean()
    if reduction == "group_means":
        if len(set(groups)) == 1:  # equal groups: one launch
            return per_positive.reshape(len(groups), -1).mean(1)
        return torch.stack([part.mean() for part in per_positive.split(list(groups))])
    return per_positive
