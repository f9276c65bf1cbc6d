"""Wall-clock comparisons that stay meaningful on a shared, noisy machine, in a process set up as a
user's is: no allocator tuning, the cache enabled once and kept for every run.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, TextIO

from torch import nn

from .apply import disable_cache, enable_cache
from .schedule import Schedule


# The DiT shapes latency is measured on (`harmonica bench --shape`, benchmarks/): DiTTransformer2DModel
# settings beyond random_dit's fixed ones.
DIT_SHAPES = {"dit-xl": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
              "dit-b": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, sample_size=32)}


def random_dit(shape: str, *, device="cpu", **config) -> nn.Module:
    """A DiT of a :data:`DIT_SHAPES` shape (patch 2, 4 latent channels with learned sigma, 1000 classes)
    with random weights (seed 0), in eval mode without gradients, built on ``device`` ("meta": the
    structure alone, e.g. for the FLOP count). ``config`` overrides settings (``num_layers=2`` for a
    smoke run)."""
    import torch
    from diffusers import DiTTransformer2DModel

    if shape not in DIT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(DIT_SHAPES)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = DiTTransformer2DModel(**{**dict(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000),
                                         **DIT_SHAPES[shape], **config})
    return model.eval().requires_grad_(False)


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
    _check_repeats(repeats)
    if warmup:
        for run in runs.values():
            run()
    best = {name: _Best() for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name].add(time_run(run))
    return {name: b.timing for name, b in best.items()}


def time_run(run: Callable[[], object]) -> RunTiming:
    """Wall time, minor page faults and CPU time of one call of ``run``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, start = time.process_time(), time.perf_counter()
    run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return RunTiming(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, cpu)


class _Best:
    """The fastest round (with its page faults) and the least CPU time of the rounds seen so far."""

    def __init__(self):
        self.timing = RunTiming(float("inf"), 0)

    def add(self, timing: RunTiming) -> None:
        cpu = min(self.timing.cpu_seconds, timing.cpu_seconds)
        if timing.seconds < self.timing.seconds:
            self.timing = RunTiming(timing.seconds, timing.page_faults)
        self.timing.cpu_seconds = cpu


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


# ---------------------------------------------------------------------------------- one process per run
# Two models timed in one process share its allocator: on glibc the freed activations of one change
# when the other's are handed back to the kernel, so a cached DiT-XL/2 run interleaved with an
# uncached one page-faulted 490k-780k times per run, and 310k-460k in a process of its own (which is
# how a user runs it). measure_processes() gives every run its own process and keeps the rounds
# interleaved; serve_runs() is the other end, run by each of those processes.

_READY, _TIMING = "harmonica-timing: ready", "harmonica-timing: "


def serve_runs(run: Callable[[], object], requests: TextIO | None = None, replies: TextIO | None = None) -> None:
    """Time ``run`` once per line read from ``requests`` (stdin), replying on ``replies`` (stdout), after
    one untimed warm-up run: the end of :func:`measure_processes` that runs in each measured process."""
    requests, replies = requests or sys.stdin, replies or sys.stdout
    run()
    print(_READY, file=replies, flush=True)
    for _ in requests:
        print(_TIMING + json.dumps(asdict(time_run(run))), file=replies, flush=True)


def measure_processes(commands: Mapping[str, Sequence[str]], repeats: int = 3) -> dict[str, RunTiming]:
    """:func:`measure` with each run in a process of its own: ``commands[name]`` starts a process that
    calls :func:`serve_runs`. The processes start (and warm up) together; then each round asks every
    one of them for one timed run in turn, so they are interleaved as in :func:`measure`."""
    _check_repeats(repeats)
    processes = {name: subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for name, command in commands.items()}
    try:
        for name, process in processes.items():
            _reply(name, process, _READY)
        best = {name: _Best() for name in processes}
        for _ in range(repeats):
            for name, process in processes.items():
                process.stdin.write("run\n")
                process.stdin.flush()
                best[name].add(RunTiming(**json.loads(_reply(name, process, _TIMING))))
        return {name: b.timing for name, b in best.items()}
    finally:
        for process in processes.values():
            process.stdin.close()  # serve_runs returns at the end of its input (flushed: nothing left to send)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


def _reply(name: str, process: subprocess.Popen, prefix: str) -> str:
    """The rest of the next line from ``process`` that starts with ``prefix`` (other output is passed on)."""
    for line in process.stdout:
        if line.startswith(prefix):
            return line[len(prefix):]
        sys.stdout.write(line)
    code = process.wait()
    raise RuntimeError(f"the timed process for {name!r} exited with code {code} before replying (its error, if any, "
                       f"is printed above)")


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
