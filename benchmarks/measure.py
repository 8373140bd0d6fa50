"""Median times and peak extra memory of a callable, on the GPU or the CPU."""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def median_ms(fn: Callable[[], object], device: str, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, warm-up excluded; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# glibc's malloc decides whether a freed CPU tensor goes back to the OS, and so whether the
# next allocation faults its pages in again: timings must see the allocator as a
# long-running process does. Its dynamic threshold would settle at the largest freed block,
# at most 32 MiB, and freed heap memory stays for reuse; these settings start it there (a
# small fixed threshold would make every large temporary fault its pages in again, slowing
# eager PyTorch the most).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _steady_state_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


_steady_state_malloc()


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory of the tensors fn() allocates beyond those live when it starts (its
    outputs included).

    GPU: torch.cuda.max_memory_allocated. CPU: the same count, from the profiler's record of
    every tensor allocation and free (profile_memory=True), summed in time order: what the
    call's tensors hold at their peak, the C++ ops' included, and nothing else. The resident
    set, read before (until session 14), also took in what the call does not own (MKL's
    buffers, pages the heap kept from an earlier call), so its reading depended on what ran
    before: cpp's workspace at N = M = 256, D = 256 read 2.4 MiB alone and 7-11 MiB after
    the reference, where this count gives 3.2 MiB either way.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # a "[memory]" event per allocation (bytes > 0) and free (bytes < 0), from the raw event
    # list: prof.events() (torch 2.14) keeps too few of them to follow the live bytes
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak
