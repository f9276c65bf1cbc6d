"""The comparison table: uncached vs fewer steps vs FORA (vs Delta-DiT) vs learned routers, on the testbed.

    python -m harmonica.compare --samples 1000 --out runs/compare          # bundled routers, DDIM 20
    python -m harmonica.compare --samples 1000 --router harmonica=r.safetensors --router l2c=l.safetensors

Every row samples the same labels from the same noise (harmonica.testbed.generate with one seed), so
PSNR compares each image with its own uncached counterpart. Measured speedup is wall-clock on this
machine: each row samples the same timing batch as the uncached row, the rows interleaved over several
rounds within the one run, and the fastest round of each row is kept (the least disturbed by other
processes on a shared CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from .apply import model_cost
from .schedule import Router, Schedule
from .timing import best_times, cached, cached_copy

__all__ = ["Row", "ComparisonTable", "add_arguments", "compare", "main", "run"]

COLUMNS = ("method", "steps", "fid_fmnist", "accuracy", "strict_accuracy", "precision", "recall", "psnr", "ssim",
           "cur", "theoretical_speedup", "measured_speedup", "seconds")


@dataclasses.dataclass
class Row:
    method: str
    steps: int
    schedule: Optional[Schedule]  # None = uncached
    fid_fmnist: float = math.nan
    accuracy: float = math.nan
    strict_accuracy: float = math.nan  # the classifier trained without augmentation or label smoothing
    precision: float = math.nan
    recall: float = math.nan
    psnr: Optional[float] = None  # None for the uncached reference itself
    ssim: Optional[float] = None
    cur: float = 0.0
    theoretical_speedup: float = 1.0
    measured_speedup: float = math.nan
    seconds: float = math.inf  # fastest timing round of this row

    def to_json(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}


@dataclasses.dataclass
class ComparisonTable:
    rows: list[Row]
    settings: dict

    def to_json(self) -> dict:
        return {"settings": self.settings, "rows": [r.to_json() for r in self.rows]}

    def markdown(self) -> str:
        s = self.settings
        head = (f"Testbed DiT, {s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']}, "
                f"{s['num_samples']} samples (seed {s['seed']}); measured speedup on batch {s['timing_samples']}, "
                f"best of {s['timing_repeats']} interleaved rounds.\n\n")
        lines = ["| method | steps | FID-FMNIST | accuracy | strict accuracy | precision | recall | PSNR vs uncached (dB) "
                 "| SSIM | CUR % | theoretical speedup | measured speedup |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            psnr = "-" if r.psnr is None else f"{r.psnr:.2f}"
            ssim = "-" if r.ssim is None else f"{r.ssim:.4f}"
            cur = "-" if r.schedule is None else f"{100 * r.cur:.2f}"
            lines.append(f"| {r.method} | {r.steps} | {r.fid_fmnist:.3f} | {100 * r.accuracy:.1f}% | "
                         f"{100 * r.strict_accuracy:.1f}% | {r.precision:.3f} | {r.recall:.3f} | {psnr} | {ssim} | "
                         f"{cur} | {r.theoretical_speedup:.3f} | {r.measured_speedup:.3f} |")
        return head + "\n".join(lines) + "\n"


def _time_row(bed, labels, row: Row, model, *, seed: int, guidance: float, sampler: str, batch_size: int):
    from .testbed import generate

    generate(bed, labels, seed=seed, num_inference_steps=row.steps, guidance_scale=guidance, sampler=sampler,
             batch_size=batch_size, transformer=model)


def _generate(bed, labels, row: Row, *, seed: int, guidance: float, sampler: str, batch_size: int):
    from .testbed import generate

    with cached(bed.transformer, row.schedule):
        return generate(bed, labels, seed=seed, num_inference_steps=row.steps, guidance_scale=guidance,
                        sampler=sampler, batch_size=batch_size)


def compare(
    bed=None,
    *,
    routers: Optional[dict[str, Router]] = None,
    num_samples: int = 1000,
    steps: Optional[int] = None,
    sampler: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 250,
    fewer_steps: Optional[int] = None,
    match: Optional[str] = None,
    delta_dit: bool = True,
    timing_samples: Optional[int] = None,
    timing_repeats: int = 3,
    classifier=None,
    strict_classifier=None,
    reference=None,
    progress: bool = False,
) -> ComparisonTable:
    """Build the comparison table on ``bed`` (default: the bundled testbed).

    routers: name -> Router (each sampled with its metadata threshold). The "fewer steps" row uses
    ``fewer_steps`` steps, or ceil(T / theoretical speedup of the ``match`` row) (default: the
    "harmonica" router, else the first router, else FORA), so it is never faster in theory than the
    row it is matched with. Every row's quality columns come from :func:`harmonica.evaluate.quality`
    (PSNR/SSIM against the uncached row's images). ``classifier``/``strict_classifier``/``reference``
    override the bundled FID classifier, strict classifier and test-set statistics (tests use small
    random ones).
    """
    from . import evaluate
    from . import testbed as tb

    bed = bed if bed is not None else tb.load()
    steps = steps or tb.DEFAULT_STEPS
    sampler = sampler or tb.DEFAULT_SAMPLER
    guidance = tb.DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    routers = dict(routers or {})
    blocks = len(bed.transformer.transformer_blocks)
    timing_samples = timing_samples or min(batch_size, num_samples)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    cost = model_cost(bed.transformer, batch=2 * timing_samples)

    rows = [Row(f"uncached (DDIM {steps})" if sampler == "ddim" else f"uncached ({sampler} {steps})", steps, None)]
    cached = [Row("FORA (interval 2)", steps, Schedule.fora(steps, blocks, 2))]
    if delta_dit:
        cached.append(Row("Delta-DiT", steps, Schedule.delta_dit(steps, blocks)))
    for name, router in routers.items():
        if router.num_steps != steps:
            raise ValueError(f"router {name!r} has {router.num_steps} steps but the table samples {steps}; "
                             f"pass steps={router.num_steps} or a router trained for {steps} steps")
        cached.append(Row(name, steps, router.to_schedule()))
    for row in cached:
        row.cur = row.schedule.cache_usage
        row.theoretical_speedup = row.schedule.theoretical_speedup(cost)
    if fewer_steps is None:
        key = match or ("harmonica" if "harmonica" in routers else next(iter(routers), "FORA (interval 2)"))
        target = next((r for r in cached if r.method == key), None)
        if target is None:
            raise ValueError(f"match={key!r} is not a row; choose one of {[r.method for r in cached]}")
        fewer_steps = max(1, math.ceil(steps / target.theoretical_speedup))
    fewer = Row(f"fewer steps ({fewer_steps})", fewer_steps, None, theoretical_speedup=steps / fewer_steps)
    rows = rows + [fewer] + cached

    labels = torch.arange(num_samples) % len(bed.class_names)
    kw = dict(seed=seed, guidance=guidance, sampler=sampler, batch_size=batch_size)
    judges = dict(classifier=classifier, strict_classifier=strict_classifier, fid_statistics=reference)
    uncached = None
    for row in rows:
        images = _generate(bed, labels, row, **kw)
        q = evaluate.quality(images, labels, reference=uncached, **judges)
        uncached = images if uncached is None else uncached
        for key in ("fid_fmnist", "accuracy", "strict_accuracy", "precision", "recall", "psnr", "ssim"):
            if key in q:
                setattr(row, key, q[key])
        if progress:
            print(f"{row.method}: FID {row.fid_fmnist:.3f}, strict accuracy {row.strict_accuracy:.3f}", flush=True)

    timing_labels = labels[:timing_samples]
    timing_kw = dict(kw, batch_size=timing_samples)
    # Each cached row times its own copy of the model, enabled once, as a user's process runs it.
    seconds = best_times({row.method: functools.partial(_time_row, bed, timing_labels, row,
                                                        cached_copy(bed.transformer, row.schedule), **timing_kw)
                          for row in rows}, repeats=timing_repeats, warmup=False)
    for row in rows:
        row.seconds = seconds[row.method]
        row.measured_speedup = rows[0].seconds / row.seconds

    settings = {"num_samples": num_samples, "steps": steps, "sampler": sampler, "guidance_scale": guidance,
                "seed": seed, "timing_samples": timing_samples, "timing_repeats": timing_repeats,
                "torch_threads": torch.get_num_threads(),
                "routers": {name: {k: r.metadata.get(k) for k in ("method", "threshold", "achieved_cur",
                                                                   "theoretical_speedup", "wall_time_s")}
                            for name, r in routers.items()}}
    return ComparisonTable(rows, settings)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The comparison's options, shared by ``python -m harmonica.compare`` and ``harmonica evaluate``
    (which checks their values and files before any work)."""
    p.add_argument("--samples", type=int, default=1000, help="images per row (>= 2, for FID)")
    p.add_argument("--steps", type=int, default=None, help="default: the testbed's (20)")
    p.add_argument("--guidance", type=float, default=None, help="default: the testbed's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--timing-samples", type=int, default=None, help="default: min(--batch-size, --samples)")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--fewer-steps", type=int, default=None,
                   help="steps of the 'fewer steps' row (default: matched to the harmonica row's speedup)")
    p.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                   help="a router file; default: the bundled harmonica and l2c routers for the settings")
    p.add_argument("--no-delta-dit", action="store_true")
    p.add_argument("--dit-dir", default=None, help="an exported testbed DiT directory (default: the bundled one)")
    p.add_argument("--out", default=None, help="directory for table.md and table.json")


def run(args: argparse.Namespace, *, progress: bool = True) -> ComparisonTable:
    """The comparison for parsed :func:`add_arguments` options."""
    from .formats import write_text
    from .testbed import DEFAULT_SAMPLER, DEFAULT_STEPS
    from .testbed.routers import available, load_router, load_router_specs, load_testbed

    steps = args.steps or DEFAULT_STEPS
    routers = load_router_specs(args.router)
    if not args.router:
        for method in ("l2c", "harmonica"):
            if (method, DEFAULT_SAMPLER, steps) in available():
                routers[method] = load_router(method, DEFAULT_SAMPLER, steps)
    bed = load_testbed(args.dit_dir)
    table = compare(bed, routers=routers, num_samples=args.samples, steps=steps, guidance_scale=args.guidance,
                    seed=args.seed, batch_size=args.batch_size, fewer_steps=args.fewer_steps,
                    delta_dit=not args.no_delta_dit, timing_samples=args.timing_samples,
                    timing_repeats=args.timing_repeats, progress=progress)
    text = table.markdown()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "table.md", text, "--out")
        write_text(out / "table.json", json.dumps(table.to_json(), indent=2, allow_nan=True) + "\n", "--out")
    return table


def main(argv=None) -> int:
    """``python -m harmonica.compare ARGS`` is ``harmonica evaluate ARGS``: the same options, their values and
    files checked the same way before any work. Returns the exit status."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
