"""BatchNorm warm-up before testing, as the official code's _warmup_batchnorm: the running
statistics are recomputed on test batches in train mode, without gradients and without any
update of the weights, and the modules are then tested in eval mode. Training normalises with
batch statistics, so the running averages it leaves lag behind the weights; the warm-up gives
eval mode statistics of the current weights."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

# The official test accuracy warms up on this many test batches.
WARMUP_BATCHES = 50


def batchnorms(*modules: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d, 2d, SyncBatchNorm) inside `modules`, in module order."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def warm_up_batchnorm(modules: Iterable[nn.Module], batches: Iterable, forward: Callable) -> None:
    """Recompute the running statistics of every BatchNorm in `modules` from `forward(batch)`
    over `batches`, then leave `modules` in eval mode.

    Each BatchNorm's running mean and variance become the plain average of its batch
    statistics over the batches (momentum None: a cumulative average), so the result depends
    on the batches only, not on the statistics training left. Only the BatchNorms run in
    train mode: dropout stays off, so the warm-up draws nothing from any RNG and is the same
    wherever it runs."""
    modules = list(modules)
    norms = batchnorms(*modules)
    momenta = [bn.momentum for bn in norms]
    for module in modules:
        module.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
            bn.eval()


@torch.no_grad()
def accuracy_after_warm_up(modules: Iterable[nn.Module], classify: Callable, warm_up_batches: Iterable,
                           test_batches: Iterable) -> dict[str, float]:
    """The official test: warm_up_batchnorm(modules) on `warm_up_batches` (images), then the
    accuracy of the linear and the MLP logits `classify(x)` gives on `test_batches` ((images,
    labels)), as test_acc_linear and test_acc_mlp. Leaves `modules` in eval mode."""
    warm_up_batchnorm(modules, warm_up_batches, classify)
    correct, seen = [0, 0], 0
    for x, y in test_batches:
        for k, logits in enumerate(classify(x)):
            correct[k] += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return {"test_acc_linear": correct[0] / max(1, seen), "test_acc_mlp": correct[1] / max(1, seen)}


@contextlib.contextmanager
def batchnorm_statistics_kept(*modules: nn.Module):
    """Restore every BatchNorm buffer of `modules` (running mean, variance, batch count) on
    exit, and the modules' train/eval modes: a test inside leaves the training run's state
    bitwise as it found it."""
    norms = batchnorms(*modules)
    saved = [[buf.clone() for buf in bn.buffers(recurse=False)] for bn in norms]
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, buffers in zip(norms, saved):
                for buf, value in zip(bn.buffers(recurse=False), buffers):
                    buf.copy_(value)
        for m, training in modes:
            m.training = training
