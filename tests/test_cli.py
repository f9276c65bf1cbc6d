"""The `harmonica` command line, driven in subprocesses exactly as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import harmonica as hc


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harmonica", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("command", ["demo", "train", "sample", "evaluate", "plot", "bench"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: harmonica " + command in result.stdout


def test_evaluate_help_is_the_comparison_options():
    result = run("evaluate", "--help")
    assert result.returncode == 0 and "--samples" in result.stdout


def test_plot_writes_a_real_png(tmp_path):
    router = hc.Router.init(12, 8, generator=torch.Generator().manual_seed(0))
    router.save(tmp_path / "router.safetensors")
    result = run("plot", str(tmp_path / "router.safetensors"), "--out", str(tmp_path / "router.png"))
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(tmp_path / "router.png")
    assert image.shape[0] > 300 and image.shape[1] > 600  # a figure, not an empty file
    hc.Schedule.fora(12, 8).save(tmp_path / "fora.safetensors")
    assert run("plot", str(tmp_path / "fora.safetensors"), "--out", str(tmp_path / "fora.png")).returncode == 0


def test_bad_command_lines_exit_nonzero_with_one_line(tmp_path):
    assert_one_line_error(run("plot", str(tmp_path / "missing.safetensors"), "--out", "x.png"), 2,
                          "schedule/router file not found")
    assert_one_line_error(run("sample", "--scheduler", "heun"), 2, "invalid choice: 'heun'")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(run("plot", str(tmp_path / "junk.safetensors"), "--out", "x.png"), 2,
                          "is neither a harmonica router nor a schedule")
    assert_one_line_error(run("train", "--model", str(tmp_path / "nowhere"), "--out", "r.safetensors"), 2,
                          "no such directory")


def test_schedule_for_another_model_is_refused(tmp_path):
    hc.Schedule.fora(20, 5).save(tmp_path / "five_blocks.safetensors")
    result = run("sample", "--schedule", str(tmp_path / "five_blocks.safetensors"), "--num-images", "2",
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "incompatible schedule")
    hc.Schedule.fora(10, 5).save(tmp_path / "ten_steps.safetensors")
    result = run("sample", "--schedule", str(tmp_path / "ten_steps.safetensors"), "--steps", "20", "--num-images", "2",
                 "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "--steps 20 does not match --schedule")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_an_unwritable_output_is_refused_by_the_executable_before_training(tmp_path):
    # tests/test_frontdoor.py covers every option in-process; this is the real process end to end.
    result = run("train", "--out", "/proc/harmonica/r.safetensors", "--iterations", "1")
    assert_one_line_error(result, 2, "--out /proc/harmonica/r.safetensors cannot be written")
    assert result.stdout == ""


def test_demo_end_to_end(tmp_path):
    result = run("demo", "--num-images", "20", "--out", str(tmp_path), "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["cache_usage"] < 1
    assert summary["theoretical_speedup"] > 1
    assert summary["cached"]["psnr_vs_uncached_db"] > 10  # cached images stay close to the uncached ones
    # the fewer-steps row runs as many steps as the cached run's FLOPs buy: at least as fast, one more would not be
    steps = summary["fewer_steps"]["steps"]
    assert steps * summary["theoretical_speedup"] <= 20 < (steps + 1) * summary["theoretical_speedup"]
    assert summary["fewer_steps"]["psnr_vs_uncached_db"] > 10
    lines = result.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines[:3]] == ["uncached,", "cached", "fewer"]
    assert "measured" in lines[1] and "measured" in lines[2]
    for png in ("samples.png", "schedule.png"):
        assert matplotlib.image.imread(tmp_path / png).shape[0] > 100


def test_evaluate_end_to_end(tmp_path):
    result = run("evaluate", "--samples", "20", "--timing-repeats", "1", "--no-delta-dit", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "table.json").read_text())
    methods = [row["method"] for row in table["rows"]]
    assert methods[0].startswith("uncached") and any("fora" in m.lower() for m in methods)
    assert (tmp_path / "table.md").read_text().count("|") > 20


def test_bench_end_to_end_on_the_testbed(tmp_path):
    router = hc.testbed.load_router("harmonica", "ddim", 20)
    router.save(tmp_path / "router.safetensors")
    out = tmp_path / "bench.json"
    result = run("bench", "--shape", "testbed", "--schedule", str(tmp_path / "router.safetensors"), "--threshold",
                 "0.4", "--batch", "2", "--rounds", "2", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    # The router at --threshold: the theoretical speedup is that schedule's.
    schedule = router.to_schedule(0.4)
    theoretical = schedule.theoretical_speedup(hc.model_cost(hc.testbed.load().transformer, batch=4))
    assert numbers["theoretical_speedup"] == pytest.approx(theoretical) and numbers["steps"] == 20
    assert numbers["measured_speedup"] == pytest.approx(numbers["uncached_s"] / numbers["cached_s"])
    assert numbers["threads"] == 1 and numbers["page_faults_cached"] >= 0
