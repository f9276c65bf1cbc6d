"""Measure the bundled testbed: the numbers in assets/MODEL_CARD.md come from this command::

    python -m harmonica.testbed.report                       # 1,000 samples at the defaults
    python -m harmonica.testbed.report --sweep 1,1.5,2,3,4   # plus a guidance sweep

For each setting it generates ``--num-samples`` images (an equal number per class, seed 0, DDIM 20
steps unless told otherwise) and reports every measure of :func:`harmonica.evaluate.quality`:
FID-FMNIST against the 10k test images, the accuracy of both classifiers against the conditioning
labels (also as a fraction of each classifier's own test accuracy), and precision/recall (k = 3)
against as many test images. Two references at the same sample count frame the numbers: real
training images (what a perfect generator would reach at this N) and the untrained DiT (same
config, freshly initialised).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, NUM_CLASSES, Testbed, generate, load
from .. import evaluate as ev


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def measure(images: torch.Tensor, labels: torch.Tensor) -> dict:
    return ev.quality(images, labels)


def real_data_reference(n: int, seed: int = 0) -> dict:
    from .data import load_tensors

    images, labels = load_tensors("train")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return measure(images[idx], labels[idx])


def untrained_reference(bed: Testbed, labels: torch.Tensor, args) -> dict:
    from .model import DIT_CONFIG, build_dit

    torch.manual_seed(args.seed)
    config = {k: bed.transformer.config[k] for k in DIT_CONFIG}  # the loaded model's shape
    fresh = build_dit(config).eval().requires_grad_(False)
    images = generate(bed, labels, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      sampler=args.sampler, transformer=fresh)
    return measure(images, labels)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sweep", default="", help="comma-separated guidance scales to measure as well")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-references", action="store_true", help="skip the real-data and untrained rows")
    p.add_argument("--out", default="runs/testbed/report.json")
    p.add_argument("--save-grid", default="", help="write a PNG grid of the first 100 default samples")
    p.add_argument("--dit-dir", default=None, help="an exported testbed DiT directory (default: the bundled one)")
    args = p.parse_args(argv)

    bed = load(dit_dir=args.dit_dir)
    labels = balanced_labels(args.num_samples)
    rows = {}
    scales = [args.guidance] + [float(s) for s in args.sweep.split(",") if s and float(s) != args.guidance]
    for g in scales:
        t0 = time.time()
        images = generate(bed, labels, seed=args.seed, num_inference_steps=args.steps, guidance_scale=g,
                          sampler=args.sampler, progress=True)
        rows[f"trained, guidance {g:g}"] = {**measure(images, labels), "seconds": round(time.time() - t0, 1)}
        print(f"guidance {g:g}: {rows[f'trained, guidance {g:g}']}", flush=True)
        if g == args.guidance and args.save_grid:
            _save_grid(images[:100], args.save_grid)
    if not args.no_references:
        rows[f"untrained DiT, guidance {args.guidance:g}"] = untrained_reference(bed, labels, args)
        rows["real training images"] = real_data_reference(args.num_samples, args.seed)

    result = {"num_samples": args.num_samples, "sampler": args.sampler, "steps": args.steps,
              "seed": args.seed, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.num_samples} samples, {args.sampler} {args.steps} steps, seed {args.seed}\n")
    print(markdown(rows))
    return result


def markdown(rows: dict) -> str:
    lines = ["| model | FID-FMNIST | accuracy (/ test acc.) | strict accuracy (/ test acc.) | precision | recall |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['fid_fmnist']:.2f} | {r['accuracy']:.3f} ({r['accuracy_rel']:.3f}) | "
                     f"{r['strict_accuracy']:.3f} ({r['strict_accuracy_rel']:.3f}) | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} |")
    return "\n".join(lines)


def _save_grid(images: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = NUM_CLASSES
    rows = (n + cols - 1) // cols
    canvas = torch.ones(rows * 29, cols * 29)
    for i in range(n):
        # balanced_labels puts class i % 10 at position i, so each column is one class.
        r, c = divmod(i, cols)
        canvas[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = (images[i, 0] + 1) / 2
    plt.imsave(path, canvas.numpy(), cmap="gray", vmin=0, vmax=1)


if __name__ == "__main__":
    main()
