"""End-to-end latency: cached vs uncached sampling of a DiT-XL/2-shaped model (random weights).

28 blocks, width 1152, 256 tokens (32x32 latents, patch 2), batch 2 at the transformer (one image with
CFG), DDIM. Reports the measured speedup next to the schedule's theoretical (FLOP-count) speedup and
their ratio. Run: ``pytest benchmarks/bench_cache.py --benchmark-only -s`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import harmonica as hc
from harmonica.sampling import sample

STEPS = 10
XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


@pytest.fixture(scope="module")
def dit_xl():
    torch.manual_seed(0)
    return DiTTransformer2DModel(**XL).eval().requires_grad_(False)


def sampling_run(model):
    labels = torch.tensor([207])
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    return sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond={"class_labels": labels},
                  uncond={"class_labels": torch.full_like(labels, 1000)}, guidance_scale=1.5, progress=False)


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


SCHEDULES = {
    "fora2": lambda: hc.Schedule.fora(STEPS, 28, interval=2),
    "fora3": lambda: hc.Schedule.fora(STEPS, 28, interval=3),
    "delta_dit": lambda: hc.Schedule.delta_dit(STEPS, 28),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_cached_vs_uncached_sampling(benchmark, dit_xl, name):
    schedule = SCHEDULES[name]()
    sampling_run(dit_xl)  # warm-up (allocator, thread pool)
    uncached = best_of(lambda: sampling_run(dit_xl), rounds=2)
    hc.enable_cache(dit_xl, schedule)
    try:
        sampling_run(dit_xl)
        benchmark.pedantic(sampling_run, args=(dit_xl,), rounds=2, iterations=1)
        cached = benchmark.stats.stats.min
    finally:
        hc.disable_cache(dit_xl)
    theoretical = schedule.theoretical_speedup(hc.model_cost(dit_xl, batch=2))
    measured = uncached / cached
    benchmark.extra_info.update(uncached_s=uncached, cached_s=cached, measured_speedup=measured,
                                theoretical_speedup=theoretical, fraction_of_theoretical=measured / theoretical,
                                cache_usage=schedule.cache_usage)
    print(f"\n{name}: CUR {schedule.cache_usage:.0%}  uncached {uncached:.2f} s  cached {cached:.2f} s  "
          f"speedup {measured:.3f}x  theoretical {theoretical:.3f}x  ratio {measured / theoretical:.1%}")
