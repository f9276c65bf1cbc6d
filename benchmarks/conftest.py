"""pytest-benchmark setup for the harmonica benchmarks (not part of the test run).

Benchmark files are named bench_*.py, which the default pytest collection ignores, so a plain
`pytest` never runs them; they are collected only when benchmarks/ is named on the command line
(`pytest benchmarks/ --benchmark-only`). At the end a table compares each fused op with the eager
composition it replaces and with a plain copy measured in the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _device import describe

from harmonica.timing import keep_freed_memory

BENCHMARK_DIR = Path(__file__).parent.resolve()


def pytest_configure(config):
    # HARMONICA_BENCH_THREADS pins the intra-op thread count for fused and eager alike. On a
    # shared machine a second thread waits for a busy core, which adds noise to every ratio.
    threads = os.environ.get("HARMONICA_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    # Freed memory is reused, not page-faulted afresh by every out-of-place op (harmonica.timing);
    # HARMONICA_BENCH_MALLOC=system keeps glibc's defaults.
    if os.environ.get("HARMONICA_BENCH_MALLOC", "reuse") == "reuse":
        keep_freed_memory()


def _requested_paths(config) -> list[Path]:
    return [Path(str(arg).split("::")[0]).resolve() for arg in config.args]


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    requested = _requested_paths(parent.config)
    if file_path.resolve() in requested:
        return None  # named on the command line: pytest collects it itself
    if any(path == BENCHMARK_DIR or BENCHMARK_DIR in path.parents for path in requested):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    ops, copies = {}, {}
    for bench in session.benchmarks:
        if not bench.stats or not bench.group or "/" not in bench.group:
            continue
        kind, case = bench.group.split("/", 1)  # the case name itself may hold a "/" (DiT-XL/2)
        if kind == "copy":
            copies[case] = bench
        elif "paired_speedup" in bench.extra_info:
            case, slot_state = case.rsplit("/", 1)
            ops[(kind, case, slot_state)] = bench
    if not ops:
        return
    # The paired speedup (median over rounds of eager / fused, each eager call right before its fused
    # call) is the headline; medians and minima of each side are shown too, for the hot-slot run. The
    # last column is the paired speedup when the slot is cold, as in a model (bench_ops.SLOT_STATES).
    lines = [
        "| op | shape | dtype | eager ms (median) | fused ms (median) | speedup (paired) | speedup (min/min) "
        "| fused GB/s (min) | copy GB/s (min) | fused / copy | speedup, cold slot (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, case, _), fused in sorted((key, bench) for key, bench in ops.items() if key[2] == "hot"):
        info = fused.extra_info
        shape, dtype = case.rsplit("-", 1)
        fused_gbs = info["bytes"] / fused.stats.min / 1e9
        copy = copies.get(case)
        copy_gbs = copy.extra_info["bytes"] / copy.stats.min / 1e9 if copy else float("nan")
        cold = ops.get((op, case, "cold"))
        cold_speedup = f"{cold.extra_info['paired_speedup']:.2f}x" if cold else "-"
        lines.append(
            f"| {op} | {shape} | {dtype} | {info['eager_median_s'] * 1e3:.2f} | {fused.stats.median * 1e3:.2f} | "
            f"{info['paired_speedup']:.2f}x | {info['eager_min_s'] / fused.stats.min:.2f}x | {fused_gbs:.1f} | "
            f"{copy_gbs:.1f} | {fused_gbs / copy_gbs:.2f} | {cold_speedup} |"
        )
    terminalreporter.write_sep("=", f"harmonica fused ops vs eager ({describe()}, same run)")
    for line in lines:
        terminalreporter.write_line(line)
