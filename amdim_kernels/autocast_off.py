"""Autocast switched off around a computation that chooses its own precision."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the calls inside, where it is on for `device`'s type: nce_loss takes
    the features as they come and computes in float32, and autocast would round a float32
    product to its 16-bit dtype. A no-op elsewhere (devices without autocast, such as meta,
    included)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
