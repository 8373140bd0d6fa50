"""Median times and peak extra memory of a callable, on the GPU or the CPU."""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch


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


def _fix_malloc_threshold() -> None:
    # glibc raises its mmap threshold after large frees and then keeps freed blocks resident,
    # which would hide a later allocation from the peak-RSS reading. Fix it at 64 KiB.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


_fix_malloc_threshold()  # before any large CPU tensor of the benchmarks exists


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory fn() allocates beyond what is live when it starts (outputs included).

    GPU: torch.cuda.max_memory_allocated. CPU: peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over the resident set at the start.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = _rss_kib("VmRSS")
    fn()
    return 1024 * max(0, _rss_kib("VmHWM") - base)
