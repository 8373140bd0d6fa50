"""Online linear and MLP classifiers on the detached global feature r1, trained alongside the
encoder (the official Evaluator): no gradient reaches the encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tanh_clip(x: torch.Tensor, clip: float = 10.0) -> torch.Tensor:
    return clip * torch.tanh(x / clip)


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on tanh-clipped logits plus 1e-3 * mean(logits^2); label -1 is ignored
    (STL-10's unlabeled images)."""
    return F.cross_entropy(tanh_clip(logits), labels, ignore_index=-1) + 1e-3 * logits.square().mean()


class Evaluator(nn.Module):
    def __init__(self, n_rkhs: int, n_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(n_rkhs, 1024, bias=False), nn.BatchNorm1d(1024), nn.ReLU(inplace=True),
            nn.Dropout(0.2), nn.Linear(1024, n_classes),
        )
        self.linear = nn.Linear(n_rkhs, n_classes)

    def forward(self, r1: torch.Tensor, n_views: int | None = None):
        """(linear logits, MLP logits) of r1, detached; with n_views, r1 holds that many views'
        batches one after the other, each classified in its own pass (the MLP's BatchNorm
        sees one view's batch), and one (linear, MLP) pair per view is returned."""
        if n_views is not None:
            return tuple(self(view) for view in r1.chunk(n_views))
        r1 = r1.detach().float()
        return self.linear(r1), self.mlp(r1)

    def loss(self, r1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lin, mlp = self(r1)
        return classifier_loss(lin, labels) + classifier_loss(mlp, labels)
