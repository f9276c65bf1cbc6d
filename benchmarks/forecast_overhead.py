"""What forecasting costs end to end, against reuse: FORA (interval 2) and TaylorSeer (interval 2,
orders 1 and 2) on a DiT-XL/2-shaped model with fewer blocks, timed in the same interleaved rounds,
then a torch.profiler table of one TaylorSeer order-2 run (how much of it the fused ops take).

    OMP_NUM_THREADS=1 python benchmarks/forecast_overhead.py [--blocks 6] [--steps 6] [--profile]

Random weights: the DiT-XL/2 block (width 1152, 256 tokens, batch 2 with CFG), ``--blocks`` of them.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler

import harmonica as hc
from harmonica.sampling import sample
from harmonica.timing import cached_copy, measure, random_dit


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    model = random_dit("dit-xl", num_layers=args.blocks)
    steps, blocks = args.steps, args.blocks
    schedules = {"uncached": None, "FORA N=2": hc.Schedule.fora(steps, blocks, 2),
                 "TaylorSeer N=2 o1": hc.Schedule.taylorseer(steps, blocks, 2, 1),
                 "TaylorSeer N=2 o2": hc.Schedule.taylorseer(steps, blocks, 2, 2)}
    models = {name: model if s is None else cached_copy(model, s) for name, s in schedules.items()}
    latents, labels = torch.randn(1, 4, 32, 32), torch.tensor([3])

    def run(name):
        return lambda: sample(models[name], DDIMScheduler(), latents, num_inference_steps=steps,
                              cond={"class_labels": labels}, uncond={"class_labels": torch.tensor([1000])},
                              guidance_scale=1.5, progress=False)

    times = measure({name: run(name) for name in schedules}, repeats=args.rounds, warmup=True)
    cost = hc.model_cost(model, batch=2)
    base = times["uncached"].seconds
    print("| schedule | seconds | measured speedup | theoretical | measured / theoretical |\n|---|---|---|---|---|")
    for name, schedule in schedules.items():
        theoretical = 1.0 if schedule is None else schedule.theoretical_speedup(cost)
        measured = base / times[name].seconds
        print(f"| {name} | {times[name].seconds:.3f} | {measured:.3f}x | {theoretical:.3f}x | {measured / theoretical:.1%} |")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run("TaylorSeer N=2 o2")()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
