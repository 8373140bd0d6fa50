"""The official final evaluation of a pretrained encoder (amdim-public's `--classifiers`):
the encoder frozen, a fresh linear and a fresh MLP classifier (the online Evaluator's, newly
initialised) trained on r1 of the training images under the training augmentation (the
first of each image's two views), with the pretraining's Adam settings and the dataset's
classifier schedule (CIFAR, STL-10: 120 epochs, x0.2 at epochs 80 and 110; ImageNet: 30,
at 15 and 25). After every epoch both are tested as the online classifiers are: BatchNorm
warm-up on the first test batches, then eval mode.

As in the official code, the frozen encoder runs in train mode under no_grad while the
classifiers train (its BatchNorms normalise over the batch; nothing reaches its weights).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .data import SeededAugmentation
from .evaluator import Evaluator
from .model import AMDIM
from .warmup import WARMUP_BATCHES, accuracy_after_warm_up


@dataclass(frozen=True)
class Schedule:
    epochs: int
    milestones: tuple[int, ...]  # MultiStepLR epochs, gamma 0.2
    lr: float = 2e-4
    batch_size: int = 200


def test_accuracy(model: AMDIM, evaluator: Evaluator, test_set: Dataset, device: torch.device,
                  memory_format=torch.contiguous_format, batch_size: int = 256, workers: int = 2) -> dict[str, float]:
    """The classifiers' test accuracy on r1 after the official BatchNorm warm-up (encoder
    and MLP) on the first test batches; leaves the encoder and the classifiers in eval mode."""
    loader = DataLoader(test_set, batch_size=batch_size, num_workers=workers)

    def on_device(batches: Iterable):
        for x, y in batches:
            yield x.to(device).contiguous(memory_format=memory_format), y.to(device)

    return accuracy_after_warm_up((model.encoder, evaluator), lambda x: evaluator(model.global_feature(x)),
                                  (x for x, _ in on_device(itertools.islice(loader, WARMUP_BATCHES))),
                                  on_device(loader))


def train_classifiers(model: AMDIM, train_set: Dataset, test_set: Dataset, n_classes: int, schedule: Schedule,
                      device: torch.device, *, seed: int = 1, workers: int = 2,
                      memory_format=torch.contiguous_format,
                      report: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train fresh linear and MLP classifiers on the frozen `model`'s r1 and return the last
    epoch's test accuracy. `train_set` yields ((view 1, view 2), label) with label -1 for
    unlabeled images, which are left out; `report(epoch, accuracy)` is called after each
    epoch's test."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    evaluator = Evaluator(model.n_rkhs, n_classes).to(device)
    optimizer = torch.optim.Adam(evaluator.parameters(), lr=schedule.lr, betas=(0.8, 0.999), weight_decay=1e-5,
                                 eps=1e-8)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.milestones), gamma=0.2)
    accuracy: dict[str, float] = {}
    for epoch in range(schedule.epochs):
        model.train()
        evaluator.train()
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        images = Subset(SeededAugmentation(train_set, seed, epoch), order.tolist())
        loader = DataLoader(images, batch_size=schedule.batch_size, drop_last=True, num_workers=workers)
        for (view1, _), labels in loader:
            x = view1.to(device).contiguous(memory_format=memory_format)
            with torch.no_grad():
                r1 = model.global_feature(x)
            loss = evaluator.loss(r1, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        accuracy = test_accuracy(model, evaluator, test_set, device, memory_format, workers=workers)
        if report is not None:
            report(epoch, accuracy)
    return accuracy
