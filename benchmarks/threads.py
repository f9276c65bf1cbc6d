"""How many torch threads the testbed commands should use: one training iteration and one sampling
batch of the testbed, timed with each thread count, the counts interleaved round by round.

    OMP_NUM_THREADS=1 python benchmarks/threads.py --rounds 5 --threads 1 2

Prints one line per (round, thread count, job) and the median and best per (thread count, job). The
training iteration is the CLI's default (batch 8, DDIM 20 steps, guidance 3), timed between the
callbacks of iterations 1 and 2 so that set-up and the IEPO refresh of iteration 0 are not counted.
The numbers behind the `--threads` default of the command line (README, "Command line").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def training_iteration(bed) -> float:
    from harmonica.testbed import DEFAULT_GUIDANCE
    from harmonica.train import ClassConditioning, TrainConfig, train_router

    stamps = []
    config = TrainConfig(num_steps=20, conditioning=ClassConditioning(len(bed.class_names), bed.null_class),
                         guidance_scale=DEFAULT_GUIDANCE, batch_size=8, iterations=2, iepo_refresh=1000,
                         progress=False)
    train_router(bed.transformer, bed.make_scheduler("ddim"), config,
                 callback=lambda info: stamps.append(time.perf_counter()))
    return stamps[1] - stamps[0]


def sampling_batch(bed, images: int) -> float:
    from harmonica.testbed import generate

    start = time.perf_counter()
    generate(bed, torch.arange(images) % 10, num_inference_steps=20, batch_size=images)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, nargs="+", default=[20, 250], help="sampling batch sizes")
    args = p.parse_args()

    import harmonica.testbed as tb

    bed = tb.load()
    jobs = {"train iteration (batch 8)": lambda: training_iteration(bed)}
    for n in args.images:
        jobs[f"sample {n} images"] = lambda n=n: sampling_batch(bed, n)
    for threads in args.threads:  # warm-up: thread pools and allocator, not timed
        torch.set_num_threads(threads)
        sampling_batch(bed, 2)
    times: dict[tuple[int, str], list[float]] = {}
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    for r in range(args.rounds):
        for name, job in jobs.items():
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds = job()
                times.setdefault((threads, name), []).append(seconds)
                print(f"round {r}: {threads} thread(s), {name}: {seconds:.3f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    for (threads, name), values in times.items():
        print(f"{name}, {threads} thread(s): median {statistics.median(values):.3f} s, best {min(values):.3f} s, "
              f"worst {max(values):.3f} s over {len(values)} rounds")


if __name__ == "__main__":
    main()
