"""Page faults and time of cached runs with and without slot recycling, in one plain process.

    python benchmarks/slot_recycling.py [--steps 6] [--rounds 3]

A DiT-XL/2-shaped model (random weights, one image with CFG), FORA interval 2, three copies timed in
interleaved rounds: uncached, cached, and cached with recycling switched off (every slot store
allocates fresh storage, as harmonica did before the slot store recycled it). Prints seconds and minor
page faults (getrusage) of each copy's fastest round. No allocator tuning: glibc's defaults, as in a
user's process.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import harmonica as hc
from harmonica.cache.slots import SlotStore
from harmonica.sampling import sample
from harmonica.timing import cached_copy, measure

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**XL).eval().requires_grad_(False)
    schedule = hc.Schedule.fora(args.steps, 28, interval=2)
    models = {"uncached": model, "cached": cached_copy(model, schedule),
              "cached, no recycling": cached_copy(model, schedule)}
    no_recycling = hc.get_cache_state(models["cached, no recycling"]).slots
    plain_free = SlotStore.free

    def free_without_recycling(store, key, *, recycle=True):
        plain_free(store, key, recycle=recycle and store is not no_recycling)

    SlotStore.free = free_without_recycling
    labels = torch.tensor([207])
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(name):
        sample(models[name], DDIMScheduler(), latents, num_inference_steps=args.steps, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, 1000)}, guidance_scale=1.5, progress=False)

    timings = measure({name: (lambda name=name: run(name)) for name in models}, repeats=args.rounds)
    theoretical = schedule.theoretical_speedup(hc.model_cost(model, batch=2))
    result = {name: {"seconds": t.seconds, "page_faults": t.page_faults,
                     "speedup": timings["uncached"].seconds / t.seconds} for name, t in timings.items()}
    result["theoretical_speedup"] = theoretical
    result["slot_allocations"] = {name: hc.get_cache_state(m).slots.allocations for name, m in models.items()
                                  if name != "uncached"}
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
