"""The index tensors of ranges (pos_idx None, a Python range or a tuple of ranges), made once
per device.

Every call with pos_idx None (arange(N)), a range (a rank's range(rank * N, rank * N + N)) or
a tuple of ranges (several groups of sources against the same targets, concatenated) needs
the indices as an int64 tensor on the inputs' device. Made afresh, that is one kernel
launch per call, and AMDIM's training step makes four calls on host-bound per-GPU problems.
So they are kept, under four rules:
- never evicted: a CUDA graph captured with one holds its address (past CACHE_ELEMENTS
  indices in all, ranges get fresh tensors instead);
- not used while compiling (the compiled graph makes its own) or for inputs that are not
  plain tensors (fake tensors, subclasses), and not added while a CUDA graph is being
  captured (its kernels have not run yet);
- made outside inference mode, so that autograd can save them in later calls;
- on a GPU, the stream that made one is synchronised once before it is kept, so that calls
  on other streams never read it unwritten.
"""
from __future__ import annotations

import torch

CACHE_ELEMENTS = 1 << 20  # 8 MiB of int64 indices over all devices and ranges



def capturing(x: torch.Tensor) -> bool:
    """Whether x is a CUDA tensor and the current stream is capturing a CUDA graph
    (torch.cuda.graph), where a device-to-host read is an error and kernels do not run."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _may_keep(like: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or type(like) is not torch.Tensor or capturing(like))


def _arange(ranges: tuple[range, ...], device: torch.device) -> torch.Tensor:
    # kernels only, no copy from the host: safe while a CUDA graph is being captured
    parts = [torch.arange(r.start, r.stop, r.step, device=device) for r in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class IndexCache:
    """The kept index tensors, by device and ranges, up to `capacity` indices in all."""

    def __init__(self, capacity: int = CACHE_ELEMENTS):
        self.capacity = capacity
        self.tensors: dict[tuple[torch.device, tuple[tuple[int, int, int], ...]], torch.Tensor] = {}
        self.elements = 0

    def indices(self, ranges: tuple[range, ...], like: torch.Tensor) -> torch.Tensor:
        """The int64 tensor of the ranges' values on like's device: a kept one, or a fresh
        one (kept where the rules allow)."""
        device = like.device
        if not _may_keep(like):
            return _arange(ranges, device)
        key = (device, tuple((r.start, r.stop, r.step) for r in ranges))
        kept = self.tensors.get(key)
        if kept is not None:
            return kept
        with torch.inference_mode(False):
            indices = _arange(ranges, device)
        size = indices.numel()
        if self.elements + size <= self.capacity:
            if indices.is_cuda:
                torch.cuda.current_stream(device).synchronize()
            self.tensors[key] = indices
            self.elements += size
        return indices


# the process's one cache, used by every nce_loss call
KEPT = IndexCache()


def range_indices(ranges: range | tuple[range, ...], like: torch.Tensor) -> torch.Tensor:
    """The int64 tensor of the values of a range, or of several ranges one after another, on
    like's device: a kept one, or a fresh one (kept where the rules allow)."""
    return KEPT.indices((ranges,) if isinstance(ranges, range) else tuple(ranges), like)
