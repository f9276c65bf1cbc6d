"""Wall-clock comparisons that stay meaningful on a shared, noisy machine."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from .apply import disable_cache, enable_cache
from .schedule import Schedule


def keep_freed_memory() -> None:
    """Make glibc malloc keep and reuse freed memory for the rest of the process, as jemalloc does.

    By default glibc hands blocks above a moving threshold (at most 32 MB) back to the kernel when
    they are freed, so every such allocation page-faults fresh memory. How often that happens depends
    on the allocation history, not on the model: on the testbed (200 images) every uncached run
    page-faulted 6.6 million times (11 s of its 18 s in the kernel) until the first cached run had
    shifted the threshold, after which uncached took 11 s with no faults. Timing that state would
    credit the cache with the allocator's cost. With fixed thresholds both sides reuse warm memory.
    No effect where the C library is not glibc.
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
    thread pool) is not timed. Freed memory is kept for reuse from here on (``keep_freed_memory``),
    so no run pays page faults that another run's allocations happened to avoid.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    keep_freed_memory()
    if warmup:
        for run in runs.values():
            run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


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
