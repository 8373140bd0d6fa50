"""The index tensors of ranges (pos_idx None or a Python range), made once per device.

Every call with pos_idx None (arange(N)) or a range (a rank's range(rank * N, rank * N + N))
needs the indices as an int64 tensor on the inputs' device. Made afresh, that is one kernel
launch per call, and AMDIM's training step makes six calls on host-bound per-GPU problems.
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

_kept: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}
_kept_elements = 0


def capturing(x: torch.Tensor) -> bool:
    """Whether x is a CUDA tensor and the current stream is capturing a CUDA graph
    (torch.cuda.graph), where a device-to-host read is an error and kernels do not run."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _may_keep(like: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or type(like) is not torch.Tensor or capturing(like))


def range_indices(r: range, like: torch.Tensor) -> torch.Tensor:
    """The int64 tensor of r's values on like's device: a kept one, or a fresh one (kept
    where the rules allow)."""
    global _kept_elements
    device = like.device
    if not _may_keep(like):
        return torch.arange(r.start, r.stop, r.step, device=device)
    key = (device, r.start, r.stop, r.step)
    kept = _kept.get(key)
    if kept is not None:
        return kept
    with torch.inference_mode(False):
        indices = torch.arange(r.start, r.stop, r.step, device=device)
    if _kept_elements + len(r) <= CACHE_ELEMENTS:
        if indices.is_cuda:
            torch.cuda.current_stream(device).synchronize()
        _kept[key] = indices
        _kept_elements += len(r)
    return indices
