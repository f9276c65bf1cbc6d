"""What each candidate testbed shape (``model.ARCHITECTURES``) costs, measured::

    python -m harmonica.testbed.sizing --device cpu  --threads 1     # sampling cost users pay
    python -m harmonica.testbed.sizing --device cuda --train-batch 512

For every shape: parameters, fp16 file size, the time of sampling ``--images`` images (DDIM 20 steps
with CFG, one batch, as the demo does) and of one training step (the training script's
``DiffusionStep`` plus the EMA update) at each ``--train-batch``; on CUDA both eager and as a CUDA
graph. Weights are random: the cost of a forward does not depend on them. CPU times are process CPU
time (see ``_best_seconds``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .model import ARCHITECTURES, SCHEDULER_CONFIG, architecture_config, build_dit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device, repeats: int) -> float:
    """Fastest of ``repeats`` runs after a warm-up (allocator, kernels, thread pool). On the CPU the
    clock is the process's CPU time: on a machine shared with other jobs that counts the work of the
    run and not the time it waited for a core (with one thread it equals the uncontended wall time)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        best = min(best, clock() - t0)
    return best


def _train_step_seconds(config: dict, device: torch.device, batch: int, cuda_graph: bool, repeats: int) -> float:
    """Seconds per training step (the training script's own step, plus its EMA update), averaged over
    runs of 20 steps, fastest run kept."""
    from .train import DiffusionStep, make_optimizer

    torch.manual_seed(0)
    model = build_dit(config).to(device).eval()
    step = DiffusionStep(model, make_optimizer(model, 1e-4, device, cuda_graph),
                         torch.linspace(0.9999, 0.0001, 1000, device=device), 1.0, cuda_graph=cuda_graph)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    x0 = torch.randn(batch, 1, config["sample_size"], config["sample_size"], device=device)
    y = torch.randint(0, 11, (batch,), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    eps = torch.randn_like(x0)
    n = 20 if device.type == "cuda" else 2

    def steps():
        for _ in range(n):
            step(x0, y, t, eps)
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1e-3)

    step(x0, y, t, eps)  # the optimizer state exists from here, so a graph is captured in the warm-up
    seconds = _best_seconds(steps, device, repeats) / n
    if cuda_graph and step.graph is None:
        print(f"  {step.mode}", flush=True)
    return seconds


def measure(name: str, device: torch.device, images: int, train_batches: list[int], repeats: int) -> dict:
    from ..sampling import make_scheduler, sample

    config = architecture_config(name)
    torch.manual_seed(0)
    model = build_dit(config).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    row = {"architecture": name, "blocks": config["num_layers"],
           "width": config["num_attention_heads"] * config["attention_head_dim"],
           "tokens": (config["sample_size"] // config["patch_size"]) ** 2,
           "params_m": round(params / 1e6, 3), "fp16_mb": round(2 * params / 2 ** 20, 2)}

    labels = (torch.arange(images) % 10).to(device)

    def sampling():
        with torch.no_grad():
            latents = torch.randn(images, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
            sample(model, make_scheduler("ddim", SCHEDULER_CONFIG), latents, num_inference_steps=20,
                   cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, 10)},
                   guidance_scale=3.0, progress=False)

    if images:
        row[f"sample_{images}_s"] = round(_best_seconds(sampling, device, repeats), 3)

    for batch in train_batches:
        for graph in ((False, True) if device.type == "cuda" else (False,)):
            row[f"train_step_b{batch}{'_graph' if graph else ''}_ms"] = round(
                1e3 * _train_step_seconds(config, device, batch, graph, repeats), 2)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.sizing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--images", type=int, default=100, help="images per sampling run (0: skip)")
    p.add_argument("--train-batch", default="64", help="comma-separated training-step batches (0: skip); on "
                   "CUDA each is timed eager and as a CUDA graph")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, the fastest kept")
    p.add_argument("--architectures", default=",".join(ARCHITECTURES))
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # as in training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = [int(b) for b in args.train_batch.split(",") if int(b) > 0]
    rows = []
    for name in args.architectures.split(","):
        rows.append(measure(name, device, args.images, batches, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                              "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
