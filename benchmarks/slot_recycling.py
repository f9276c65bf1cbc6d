"""Page faults and time of cached runs by how the slot store gets its storage, each in a plain process.

    python benchmarks/slot_recycling.py [--schedule fora|taylorseer] [--steps 6] [--rounds 3]

A DiT-XL/2-shaped model (random weights, one image with CFG), FORA interval 2 or TaylorSeer interval 2
order 2, timed in interleaved rounds, each variant in a process of its own (harmonica.timing.
measure_processes; glibc's defaults, as in a user's process):

* uncached;
* cached: the slot store as shipped (one block of storage for the run's peak of live slots, recycled);
* cached, a block per slot: recycled, but each slot its own allocation (as before the store took blocks);
* cached, no recycling: every store allocates fresh storage (as before the store recycled it).

Prints seconds, minor page faults and CPU seconds of each variant's fastest round.
"""

from __future__ import annotations

import argparse
import json
import sys

VARIANTS = ("uncached", "cached", "cached, a block per slot", "cached, no recycling")


def schedule_for(args):
    import harmonica as hc
    from harmonica.timing import DIT_SHAPES

    blocks = DIT_SHAPES["dit-xl"]["num_layers"]
    if args.schedule == "fora":
        return hc.Schedule.fora(args.steps, blocks, interval=2)
    return hc.Schedule.taylorseer(args.steps, blocks, interval=2, order=2)


def serve(args) -> None:
    """One variant's process: build it, then time it on request."""
    import torch
    from diffusers import DDIMScheduler

    import harmonica as hc
    from harmonica.cache.slots import SlotStore
    from harmonica.sampling import sample
    from harmonica.timing import random_dit, serve_runs

    torch.set_num_threads(args.threads)
    model = random_dit("dit-xl")
    if args.serve != "uncached":
        runtime = hc.enable_cache(model, schedule_for(args))
        if args.serve != "cached":
            runtime.slots.block_slots = 1
        if args.serve == "cached, no recycling":
            plain_free = SlotStore.free
            SlotStore.free = lambda store, key, *, recycle=True: plain_free(store, key, recycle=False)
    labels = torch.tensor([207])
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def run():
        sample(model, DDIMScheduler(), latents, num_inference_steps=args.steps, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, 1000)}, guidance_scale=1.5, progress=False)

    serve_runs(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=("fora", "taylorseer"), default="fora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serve", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)

    import harmonica as hc
    from harmonica.timing import measure_processes, random_dit

    common = [sys.executable, __file__, "--schedule", args.schedule, "--steps", str(args.steps),
              "--threads", str(args.threads)]
    timings = measure_processes({v: [*common, "--serve", v] for v in VARIANTS}, repeats=args.rounds)
    cost = hc.model_cost(random_dit("dit-xl", device="meta"), batch=2)
    result = {name: {"seconds": t.seconds, "page_faults": t.page_faults, "cpu_seconds": t.cpu_seconds,
                     "speedup": timings["uncached"].seconds / t.seconds} for name, t in timings.items()}
    result["theoretical_speedup"] = schedule_for(args).theoretical_speedup(cost)
    result["threads"] = args.threads
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
