"""Median times and peak extra memory of a callable, on the GPU or the CPU."""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, warm-up excluded; CUDA events on a GPU."""
    if device == "cpu":
        _malloc_mode(precise_rss=False)
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


# glibc's malloc decides whether a freed CPU tensor goes back to the OS, which matters both
# ways on the CPU: timings must see the allocator as a long-running process does, and the
# peak-RSS reading must see every large allocation of the call.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None


def _malloc_mode(precise_rss: bool) -> None:
    """precise_rss: blocks over 64 KiB are mapped and unmapped one by one, so each one
    raises the resident set (and its peak) when allocated and lowers it when freed; the free
    memory the heap holds is handed back first (malloc_trim), so that a block reused from it
    faults its pages in again and counts too. Else
    glibc's steady state in a loop: its dynamic threshold settles at the largest freed block,
    at most 32 MiB, and freed heap memory stays for reuse (a fixed small threshold would make
    every large temporary fault its pages in again, slowing eager PyTorch the most)."""
    if _libc is None:
        return
    mmap_threshold = 64 * 1024 if precise_rss else 32 * 2**20
    _libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    _libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)
    if precise_rss:
        _libc.malloc_trim(0)


_malloc_mode(precise_rss=False)


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
    _malloc_mode(precise_rss=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        base = _rss_kib("VmRSS")
        fn()
        return 1024 * max(0, _rss_kib("VmHWM") - base)
    finally:
        _malloc_mode(precise_rss=False)
