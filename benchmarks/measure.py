"""Median times and peak extra memory of a callable, on the GPU or the CPU."""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

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
    call's tensors hold at their peak, the C++ ops' included, and nothing else. Not the resident
    set, which also takes in what the call does not own (MKL's buffers, pages the heap kept
    from an earlier call), so that its reading depends on what ran before.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


# A line of the profiler library's own log (kineto): "USDT:2026-12-05 15:34:11 21434:21434
# SyncActivityProfilerHandler.cpp:39] profiler_start", or on a machine without a GPU
# "ERROR:... DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35".
# And torch's note that a block freed during the count was allocated before it, "[W1205
# 16:32:28.836 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the
# profiling started, ...": the count leaves such blocks out by design.
_PROFILER_LOG = re.compile(rb"^([A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] |"
                           rb"\[W\d{4} [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size)")


@contextlib.contextmanager
def _without_profiler_log() -> Iterator[None]:
    """The process's stderr (file descriptor 2, where the C++ profiler logs) caught while the
    block runs, and written back without the profiler's own log lines: a benchmark's table
    then shows only what the tool means to say, and any other message still comes out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = b"".join(line for line in caught if not _PROFILER_LOG.match(line))
            if kept:
                os.write(2, kept)
