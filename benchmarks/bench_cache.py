"""End-to-end latency: cached vs uncached sampling of a DiT-XL/2-shaped model (random weights).

28 blocks, width 1152, 256 tokens (32x32 latents, patch 2), batch 2 at the transformer (one image with
CFG), DDIM. Reports the measured speedup next to the schedule's theoretical (FLOP-count) speedup and
their ratio. Each timed cached round is preceded by an uncached round (pytest-benchmark's setup), so
load from other processes hits both alike; the fastest round of each is compared.
Runs on the GPU when there is one (benchmarks/_device.py).
Run: ``pytest benchmarks/bench_cache.py --benchmark-only -s`` (HARMONICA_BENCH_THREADS=1 on a busy machine).
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import harmonica as hc
from _device import DEVICE, synchronized
from harmonica.sampling import sample
from harmonica.timing import cached

STEPS = 4
ROUNDS = 3
XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


@pytest.fixture(scope="module")
def dit_xl():
    torch.manual_seed(0)
    return DiTTransformer2DModel(**XL).eval().requires_grad_(False).to(DEVICE)


@synchronized
def sampling_run(model, schedule):
    labels = torch.tensor([207], device=DEVICE)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with cached(model, schedule):
        sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, 1000)}, guidance_scale=1.5, progress=False)


SCHEDULES = {
    "fora2": lambda: hc.Schedule.fora(STEPS, 28, interval=2),
    "delta_dit": lambda: hc.Schedule.delta_dit(STEPS, 28),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_cached_vs_uncached_sampling(benchmark, dit_xl, name):
    schedule = SCHEDULES[name]()
    uncached_times = []

    def uncached_round():
        start = time.perf_counter()
        sampling_run(dit_xl, None)
        uncached_times.append(time.perf_counter() - start)

    sampling_run(dit_xl, schedule)  # warm-up
    benchmark.pedantic(sampling_run, args=(dit_xl, schedule), setup=uncached_round, rounds=ROUNDS, iterations=1)
    uncached, cached_s = min(uncached_times), benchmark.stats.stats.min
    theoretical = schedule.theoretical_speedup(hc.model_cost(dit_xl, batch=2))
    measured = uncached / cached_s
    benchmark.extra_info.update(uncached_s=uncached, cached_s=cached_s, measured_speedup=measured,
                                theoretical_speedup=theoretical, fraction_of_theoretical=measured / theoretical,
                                cache_usage=schedule.cache_usage)
    print(f"\n{name}: CUR {schedule.cache_usage:.0%}  uncached {uncached:.2f} s  cached {cached_s:.2f} s  "
          f"speedup {measured:.3f}x  theoretical {theoretical:.3f}x  ratio {measured / theoretical:.1%}")
