"""harmonica.timing: best-of-N interleaved timing and the allocator setting it relies on."""

from __future__ import annotations

import ctypes.util
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from harmonica.timing import DIT_SHAPES, best_times, measure_processes, random_dit, serve_runs

# Allocates, touches and frees a 64 MB tensor, with glibc's defaults ("default") or after
# keep_freed_memory() ("keep"), and prints the minor page faults of one more such round. 64 MB is
# above glibc's largest mmap threshold (32 MB), so by default every such allocation is fresh memory
# from the kernel and faults once per 4 KB page.
_FAULTS_OF_A_REALLOCATION = textwrap.dedent("""
    import resource, sys, torch
    from harmonica.timing import keep_freed_memory

    def touch_and_free():
        torch.ones(16 * 2**20)  # 64 MB, filled (every page touched), then freed

    touch_and_free()
    if sys.argv[1] == "keep":
        keep_freed_memory()
        for _ in range(3):  # the heap grows to hold the block (faulting once or twice), then keeps it
            touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_and_free()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(setting: str) -> int:
    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REALLOCATION, setting], capture_output=True,
                            text=True, check=True)
    return int(result.stdout.strip())


_LIBC = ctypes.util.find_library("c")


@pytest.mark.skipif(_LIBC is None or not hasattr(ctypes.CDLL(_LIBC), "mallopt"), reason="not glibc")
def test_keep_freed_memory_makes_large_reallocations_reuse_warm_pages():
    pages = 64 * 2**20 // 4096
    assert _faults("default") >= pages // 2  # glibc's default: the block comes back from the kernel, cold
    assert _faults("keep") < pages // 20  # reused: (almost) no page is faulted again


def test_best_times_interleaves_rounds_and_keeps_the_fastest():
    calls = []
    times = best_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=True)
    assert calls == ["a", "b"] * 4  # one untimed warm-up round, then three interleaved rounds
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())
    with pytest.raises(ValueError, match="repeats"):
        best_times({"a": lambda: None}, repeats=0)


# A process timed by measure_processes: each run appends "<name> <pid>" to a log file shared by all of them.
_SERVED = textwrap.dedent("""
    import os, sys
    from harmonica.timing import serve_runs

    name, log = sys.argv[1], sys.argv[2]
    if name == "broken":
        sys.exit(3)

    def run():
        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()}\\n")

    serve_runs(run)
""")


def test_measure_processes_times_each_run_in_its_own_process_in_interleaved_rounds(tmp_path):
    log = tmp_path / "runs.txt"
    commands = {name: [sys.executable, "-c", _SERVED, name, str(log)] for name in ("a", "b")}
    timings = measure_processes(commands, repeats=3)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for name, _ in lines[:2]) == ["a", "b"]  # one warm-up run each, started together
    assert [name for name, _ in lines[2:]] == ["a", "b"] * 3  # then the interleaved timed rounds
    pids = {name: {pid for n, pid in lines if n == name} for name in ("a", "b")}
    assert all(len(p) == 1 for p in pids.values()) and pids["a"] != pids["b"]  # one process per run, kept
    assert set(timings) == {"a", "b"}
    for timing in timings.values():
        assert 0 <= timing.seconds < 5 and timing.page_faults >= 0 and 0 <= timing.cpu_seconds < 5


def test_measure_processes_names_the_process_that_died_and_ends_every_process(tmp_path, monkeypatch):
    started = []
    popen = subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recorded)
    commands = {name: [sys.executable, "-c", _SERVED, name, str(tmp_path / "runs.txt")] for name in ("a", "broken")}
    with pytest.raises(RuntimeError, match="'broken' exited with code 3"):
        measure_processes(commands, repeats=1)
    assert [p.returncode for p in started] == [0, 3]  # the healthy one ended at the end of its input
    assert all(p.stdin.closed and p.stdout.closed for p in started)  # the dead one's pipes too
    with pytest.raises(ValueError, match="repeats"):
        measure_processes(commands, repeats=0)


def test_serve_runs_warms_up_then_times_one_run_per_request():
    calls = []
    replies = io.StringIO()
    serve_runs(lambda: calls.append(1), requests=io.StringIO("run\nrun\n"), replies=replies)
    lines = replies.getvalue().splitlines()
    assert len(calls) == 3  # the untimed warm-up and one run per request
    assert lines[0] == "harmonica-timing: ready" and len(lines) == 3
    for line in lines[1:]:
        timing = json.loads(line.removeprefix("harmonica-timing: "))
        assert set(timing) == {"seconds", "page_faults", "cpu_seconds"} and 0 <= timing["seconds"] < 1


def test_random_dit_builds_the_named_shapes_and_bench_offers_them():
    from harmonica.cli import build_parser

    xl = random_dit("dit-xl", device="meta")
    assert (len(xl.transformer_blocks), xl.inner_dim, xl.config.sample_size, xl.config.patch_size) == (28, 1152, 32, 2)
    assert not xl.training and not any(p.requires_grad for p in xl.parameters())
    small = random_dit("dit-b", num_layers=2)
    assert (len(small.transformer_blocks), small.inner_dim) == (2, 768)
    assert torch.equal(random_dit("dit-b", num_layers=2).pos_embed.proj.weight, small.pos_embed.proj.weight)  # seeded
    with pytest.raises(ValueError, match="unknown shape 'dit-h'; choose one of dit-xl, dit-b"):
        random_dit("dit-h")
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    shape = next(a for a in bench._actions if a.dest == "shape")
    assert list(shape.choices) == [*DIT_SHAPES, "testbed"]
