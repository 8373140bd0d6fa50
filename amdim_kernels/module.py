"""``NCELoss``: nce_loss as a torch.nn module, for models that hold their losses as modules."""
from __future__ import annotations

import torch
from torch import nn

from .api import nce_loss
from .registry import BACKENDS
from .validation import check_options


class NCELoss(nn.Module):
    """AMDIM's NCE loss and its score regulariser, as ``nce_loss`` computes them.

    The options are fixed at construction and checked there (the same errors as
    ``nce_loss``'s); ``forward(src, trg, pos_idx=None)`` returns ``(loss, reg)``, float32:
    ``loss`` the mean over the N*L positives (or the (N, L) losses with
    ``reduction="none"``), ``reg`` a scalar; train on ``loss + reg``.

        criterion = NCELoss(tclip=20.0)
        loss, reg = criterion(src, trg)          # src (N, D), trg (M, L, D)
        (loss + reg).backward()
    """

    def __init__(self, *, tclip: float | None = 20.0, reg_weight: float = 0.05, scale: float | None = None,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.tclip, self.reg_weight, self.scale = check_options(tclip, reg_weight, scale, reduction)
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.reduction, self.backend = reduction, backend

    def forward(self, src: torch.Tensor, trg: torch.Tensor,
                pos_idx: torch.Tensor | range | tuple[range, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return nce_loss(src, trg, pos_idx, tclip=self.tclip, reg_weight=self.reg_weight, scale=self.scale,
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tclip={self.tclip}, reg_weight={self.reg_weight}, scale={self.scale}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
