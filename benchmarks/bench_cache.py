"""End-to-end latency: cached vs uncached sampling, measured as a user's process runs it.

Each case runs ``harmonica bench`` in a fresh, plain Python process (no allocator tuning, torch's default
threads unless HARMONICA_BENCH_THREADS is set, the cache enabled once and kept for every round) and
records its numbers: measured speedup (best of interleaved rounds), theoretical (FLOP-count) speedup,
their ratio, and the minor page faults of each run.

* dit-xl: a DiT-XL/2-shaped model (28 blocks, width 1152, 256 tokens, random weights), one image with
  CFG (batch 2 at the transformer), 6 DDIM steps, FORA interval 2.
* dit-xl-taylorseer: the same model and steps, TaylorSeer interval 2 order 2 (forecasts from up to
  three computes: the extra reads of the difference slots are what this case measures).
* testbed: the bundled testbed DiT with its bundled HarmoniCa router, DDIM 20, 100 images.

Run: ``pytest benchmarks/bench_cache.py --benchmark-only -s``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files

import pytest


ROUTER = files("harmonica.testbed") / "assets" / "routers" / "harmonica_ddim_20.safetensors"
CASES = {
    "dit-xl": ["--shape", "dit-xl", "--steps", "6", "--batch", "1", "--rounds", "3"],
    "dit-xl-taylorseer": ["--shape", "dit-xl", "--schedule", "taylorseer:2:2", "--steps", "6", "--batch", "1",
                          "--rounds", "3"],
    "testbed": ["--shape", "testbed", "--schedule", str(ROUTER), "--steps", "20", "--batch", "100", "--rounds", "3"],
}


@pytest.mark.parametrize("case", CASES)
def test_cached_vs_uncached_sampling_plain_process(benchmark, case, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "harmonica", "bench", *CASES[case], "--json", str(out)]
    threads = os.environ.get("HARMONICA_BENCH_THREADS")
    if threads:
        command += ["--threads", threads]
    benchmark.pedantic(subprocess.run, args=(command,), kwargs={"check": True}, rounds=1, iterations=1)
    result = json.loads(out.read_text())
    benchmark.extra_info.update(result)
    print(f"\n{case}: CUR {result['cache_usage']:.0%}  uncached {result['uncached_s']:.2f} s  cached "
          f"{result['cached_s']:.2f} s  speedup {result['measured_speedup']:.3f}x  theoretical "
          f"{result['theoretical_speedup']:.3f}x  ratio {result['measured_over_theoretical']:.1%}  by CPU time "
          f"{result['measured_speedup_cpu']:.3f}x ({result['measured_speedup_cpu'] / result['theoretical_speedup']:.1%})  "
          f"page faults {result['page_faults_uncached']} / {result['page_faults_cached']}")
