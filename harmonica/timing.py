"""Wall-clock comparisons that stay meaningful on a shared, noisy machine, in a process set up as a
user's is: no allocator tuning, the cache enabled once and kept for every run.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

from torch import nn

from .apply import disable_cache, enable_cache
from .schedule import Schedule


def keep_freed_memory() -> None:
    """Make glibc malloc keep and reuse freed memory for the rest of the process, as jemalloc does.

    An optional tuning for CPU serving, never applied by harmonica's own timings. By default glibc
    hands blocks above a moving threshold (at most 32 MB) back to the kernel when they are freed, so
    every such allocation page-faults fresh memory: on the testbed (200 images) an uncached run took
    18 s instead of 11 s until that threshold had moved. harmonica's cache slots do not depend on
    it (their storage is recycled), but a model's activations do. No effect where the C library is
    not glibc.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GB come from the heap
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # the largest C int mallopt takes: the heap never shrinks


def best_times(runs: Mapping[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict[str, float]:
    """The fastest wall time of each run.

    The runs are interleaved round by round, so load from other processes hits all of them alike,
    and the fastest round of each is kept: it is the one least disturbed. A warm-up round (allocator,
    thread pool, slot storage) is not timed.
    """
    return {name: timing.seconds for name, timing in measure(runs, repeats, warmup).items()}


@dataclass
class RunTiming:
    seconds: float  # wall time of the fastest round
    page_faults: int  # minor page faults of that round (getrusage): fresh memory touched by the run
    cpu_seconds: float = float("inf")  # the least CPU time (user + system, this process) of any round


def measure(runs: Mapping[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict[str, RunTiming]:
    """:func:`best_times` with the page faults of each run's fastest round and its least CPU time.

    On a machine shared with other jobs, wall time includes the waits for a core; the CPU time of a
    one-thread run does not (it still includes page faults, which the kernel bills to the process),
    so it is the steadier estimate of what the run takes on a machine of its own."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        for run in runs.values():
            run()
    best: dict[str, RunTiming] = {name: RunTiming(float("inf"), 0) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, start = time.process_time(), time.perf_counter()
            run()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            timing = best[name]
            if seconds < timing.seconds:
                timing.seconds = seconds
                timing.page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            timing.cpu_seconds = min(timing.cpu_seconds, cpu)
    return best


def cached_copy(model: nn.Module, schedule: Optional[Schedule]) -> nn.Module:
    """``model`` itself when ``schedule`` is None, else a deep copy with the cache enabled once.

    Timings compare copies side by side instead of enabling and disabling one model around each
    run: a user enables the cache once, and its slot storage stays warm from run to run.
    """
    if schedule is None:
        return model
    twin = copy.deepcopy(model)
    enable_cache(twin, schedule)
    return twin


@contextmanager
def cached(model, schedule: Schedule | None) -> Iterator[None]:
    """``model`` follows ``schedule`` inside the block (``None``: uncached), and is restored after."""
    if schedule is None:
        yield
        return
    enable_cache(model, schedule)
    try:
        yield
    finally:
        disable_cache(model)
