"""Wall-clock comparisons that stay meaningful on a shared, noisy machine."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from .apply import disable_cache, enable_cache
from .schedule import Schedule


def best_times(runs: Mapping[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict[str, float]:
    """The fastest wall time of each run.

    The runs are interleaved round by round, so load from other processes hits all of them alike,
    and the fastest round of each is kept: it is the one least disturbed. A warm-up round (allocator,
    thread pool) is not timed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
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
