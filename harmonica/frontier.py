"""The quality-vs-speed frontier on the testbed: every way of sampling faster, from the same noise, judged alike.

    harmonica evaluate --frontier --steps 50 --out runs/frontier/ddim_50         # = python -m harmonica.frontier
    harmonica evaluate --frontier --steps 20 --out runs/frontier/ddim_20
    python -m harmonica.frontier --plot runs/frontier/ddim_50 runs/frontier/ddim_20 --png frontier.png

Rows, at T steps of one sampler: uncached T; fewer steps K (every K from T/4 to 0.6 T, then about every
T/10 up to T); FORA (reuse every skipped unit, intervals 2-4); TaylorSeer (forecast orders 1 and 2,
intervals 2-5); every bundled router for the sampler and T (HarmoniCa with reuse or forecasting, L2C),
each at the threshold it was trained to; and the DDIM-200 reference itself, for its FID.

Every row samples labels ``i % 10`` from the noise of :func:`harmonica.testbed.generate` for each seed
(seeds far enough apart that their noise is disjoint). Per row and seed: everything
:func:`harmonica.evaluate.quality` measures (FID-FMNIST, both classifiers' accuracy, precision / recall)
and, per image, PSNR and MSE against the DDIM-200 solution from the same noise and label (the fidelity
measure: on the testbed FID and accuracy are U-shaped in the step count, so they can reward drifting
away from the ODE solution; the distance to DDIM-200 cannot) and PSNR against the uncached T-step run.
Speed: theoretical (:meth:`Schedule.theoretical_speedup`, forecast work included; T/K for K steps)
and measured: wall clock of one batch per row, every row with its own copy of the model, its cache
enabled once (:func:`harmonica.timing.cached_copy`), rows interleaved round by round in a plain
process (:func:`harmonica.timing.measure`); the best round of each row gives the speedup, the
per-round ratios to the uncached run of the same round its spread.

Results accumulate in ``OUT/frontier.json`` after every (row, seed), so an interrupted run resumes
where it stopped and a re-run computes only what is missing; ``--retime`` re-measures the speeds alone
(e.g. once the forecast kernels change). Reference images (DDIM-200, uncached T) are kept under
``--cache-dir``, keyed by the DiT's weights, and shared between runs at different T.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .schedule import Router, Schedule

__all__ = ["FrontierRow", "Frontier", "fewer_steps_counts", "default_rows", "frontier", "load", "plot", "add_arguments", "run", "main"]

REFERENCE_STEPS = 200
# Quality keys of a row, and whether more is better; psnr_ref / mse_ref are against the DDIM-200 solution.
MEASURES = {"fid_fmnist": False, "accuracy": True, "strict_accuracy": True, "precision": True, "recall": True,
            "psnr_ref": True}
PSNR_CAP = 1e3  # identical images: PSNR is infinite; capped as in the comparison table


@dataclasses.dataclass
class FrontierRow:
    """One way of sampling: ``steps`` model evaluations under ``schedule`` (None = uncached)."""

    name: str
    family: str  # the curve the row belongs to
    steps: int
    schedule: Optional[Schedule] = None


def fewer_steps_counts(steps: int) -> list[int]:
    """Step counts of the fewer-steps rows, T first: every count from T/4 to T/2 (where cached rows land and
    the quality-vs-steps curve is steep), and above T/2 the counts of speedups 1.1, 1.25, 1.4, 1.6 and 1.8."""
    counts = set(range(max(1, math.ceil(steps / 4)), math.ceil(steps / 2) + 1))
    counts.update(max(1, round(steps / s)) for s in (1.0, 1.1, 1.25, 1.4, 1.6, 1.8))
    return sorted(counts, reverse=True)


def _family(name: str, router: Router) -> str:
    """The curve of a router row: its training method and order, so routers trained alike at several
    speeds form one curve; a router that records no method (e.g. ``Router.from_schedule``) is a point
    of its own, named as its row."""
    method = router.metadata.get("method")
    if method is None:
        return name
    method = {"harmonica": "HarmoniCa", "l2c": "L2C"}.get(method, method)
    order = router.forecast_order
    return f"{method} reuse" if order == 0 else f"{method} forecast o{order}"


def default_rows(num_blocks: int, steps: int, *, routers: Optional[dict[str, "Router | Schedule"]] = None,
                 fora: Sequence[int] = (2, 3, 4), taylorseer: Sequence[int] = (2, 3, 4, 5),
                 orders: Sequence[int] = (1, 2), fewer: Optional[Sequence[int]] = None,
                 reference_steps: int = REFERENCE_STEPS) -> list[FrontierRow]:
    """The frontier's rows for a ``num_blocks``-block model at ``steps`` steps (see the module docstring);
    ``routers``: more rows by name, routers (at their own threshold) or schedules (each a point of its own)."""
    rows = [FrontierRow(f"uncached ({steps})", "uncached", steps)]
    if reference_steps != steps:
        rows.append(FrontierRow(f"reference ({reference_steps})", "reference", reference_steps))
    counts = fewer_steps_counts(steps) if fewer is None else sorted(set(fewer), reverse=True)
    rows += [FrontierRow(f"fewer steps ({k})", "fewer steps", k) for k in counts if k != steps]
    rows += [FrontierRow(f"FORA N={n}", "FORA", steps, Schedule.fora(steps, num_blocks, n)) for n in fora if n < steps]
    for order in orders:
        rows += [FrontierRow(f"TaylorSeer o{order} N={n}", f"TaylorSeer o{order}", steps,
                             Schedule.taylorseer(steps, num_blocks, n, order)) for n in taylorseer if n < steps]
    for name, plan in (routers or {}).items():
        if plan.num_steps != steps:
            raise ValueError(f"router {name!r} has {plan.num_steps} steps but the frontier samples {steps}")
        if isinstance(plan, Schedule):
            rows.append(FrontierRow(name, name, steps, plan))
        else:
            rows.append(FrontierRow(name, _family(name, plan), steps, plan.to_schedule()))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    return rows


def _fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights: results and cached images belong to one set of weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


@dataclasses.dataclass
class Frontier:
    """The frontier of one sampler at one T: settings, rows and per-(row, seed) results (the JSON state)."""

    settings: dict
    rows: list[dict]  # name, family, steps, cur, theoretical_speedup, quality {seed: {...}}, timing

    # -- aggregates ----------------------------------------------------------------------------
    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r['name'] for r in self.rows]}")

    @property
    def uncached(self) -> dict:
        return next(r for r in self.rows if r["family"] == "uncached")

    def seeds(self, row: dict, key: str = "fid_fmnist") -> list[str]:
        """The seeds of this table (``settings["seeds"]``) on which ``row`` measured ``key``."""
        return [str(s) for s in self.settings["seeds"] if key in row["quality"].get(str(s), {})]

    def value(self, row: dict, key: str) -> tuple[float, float]:
        """Mean and standard deviation over the table's seeds that measured ``key`` (each seed's noise shifts
        every row's FID alike, so rows are compared on the same seeds: see ``complete``)."""
        return _mean_sd([row["quality"][s][key] for s in self.seeds(row, key)])

    def complete(self, row: dict) -> bool:
        """Whether ``row`` has every seed of the table (the reference row: every reference seed)."""
        wanted = self.settings["reference_seeds"] if row["family"] == "reference" else self.settings["seeds"]
        return all(str(s) in row["quality"] for s in wanted)

    def paired(self, a: dict, b: dict, key: str) -> tuple[float, float, int]:
        """Mean and sd over shared seeds of a[key] - b[key] (same noise: far less noisy than either), and n."""
        seeds = sorted(set(self.seeds(a, key)) & set(self.seeds(b, key)))
        mean, sd = _mean_sd([a["quality"][s][key] - b["quality"][s][key] for s in seeds])
        return mean, sd, len(seeds)

    @staticmethod
    def speed(row: dict) -> float:
        """Measured speedup when timed, else theoretical."""
        timing = row.get("timing")
        return timing["speedup"] if timing else row["theoretical_speedup"]

    def verdicts(self) -> list[dict]:
        """For every cached row: FID against uncached T, and each measure against every fewer-steps row at
        equal or higher measured speed (paired over seeds). ``margin`` > 0 means the cached row is better
        (lower FID, higher everything else) than the best of those rows; ``beats_all`` that it is for every one."""
        base = self.uncached
        fewer = [r for r in self.rows if r["family"] in ("fewer steps", "uncached")]
        out = []
        for row in self.rows:
            if row["family"] in ("uncached", "fewer steps", "reference"):
                continue
            speed = self.speed(row)
            rivals = [f for f in fewer if self.speed(f) >= speed]
            entry = {"name": row["name"], "family": row["family"], "speed": speed,
                     "rivals": [f["name"] for f in rivals], "fid_vs_uncached": None, "measures": {}}
            d, sd, n = self.paired(row, base, "fid_fmnist")
            if n:
                entry["fid_vs_uncached"] = {"diff": d, "sd": sd, "ratio": 1 + d / self.value(base, "fid_fmnist")[0]}
            for key, higher in MEASURES.items():
                worst = None
                for f in rivals:
                    diff, sd, n = self.paired(row, f, key)
                    if not n:
                        continue
                    margin = diff if higher else -diff
                    if worst is None or margin < worst["margin"]:
                        worst = {"margin": margin, "sd": sd, "seeds": n, "against": f["name"]}
                if worst is not None:
                    worst["beats_all"] = worst["margin"] > 0
                    entry["measures"][key] = worst
            out.append(entry)
        return out

    # -- output --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"settings": self.settings, "rows": self.rows, "verdicts": self.verdicts()}

    def markdown(self) -> str:
        s = self.settings
        seeds = ", ".join(map(str, s["seeds"]))
        head = (f"Testbed DiT (weights {s['model']}), {s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']}, "
                f"{s['num_samples']} samples per seed (seeds {seeds}; labels i % 10; the same noise for every row). "
                f"Quality: mean over seeds (FID: +- sd over seeds); PSNR / MSE vs the DDIM-{s['reference_steps']} "
                f"solution from the same noise on seed(s) {', '.join(map(str, s['reference_seeds']))}. Measured "
                f"speedup: batch {s['timing_samples']}, best of {s.get('timing_rounds', '-')} interleaved rounds "
                f"(range of the per-round ratios), {s.get('torch_threads', '-')} thread(s).\n\n")
        lines = ["| row | steps | CUR % | theoretical x | measured x (range) | FID-FMNIST | accuracy % | strict acc. % | "
                 "precision | recall | PSNR vs DDIM-200 (dB) | MSE vs DDIM-200 (1e-3) | PSNR vs uncached T (dB) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def num(row, key, fmt, scale=1.0):
            mean, _ = self.value(row, key)
            return "-" if math.isnan(mean) else format(mean * scale, fmt)

        for r in self.rows:
            t = r.get("timing")
            measured = "-" if not t else f"{t['speedup']:.2f} ({min(t['round_speedups']):.2f}-{max(t['round_speedups']):.2f})"
            fid, sd = self.value(r, "fid_fmnist")
            fid_text = "-" if math.isnan(fid) else f"{fid:.3f}" + ("" if math.isnan(sd) else f" +- {sd:.3f}")
            psnr_same = "same" if self.value(r, "psnr_uncached")[0] == PSNR_CAP else num(r, "psnr_uncached", ".2f")
            mark = "" if self.complete(r) else f" (seeds {len(self.seeds(r))}/{len(s['seeds'])})"
            lines.append(
                f"| {r['name']}{mark} | {r['steps']} | {format(100 * r['cur'], '.1f') if r['cached'] else '-'} | "
                f"{r['theoretical_speedup']:.2f} | {measured} | {fid_text} | {num(r, 'accuracy', '.2f', 100)} | "
                f"{num(r, 'strict_accuracy', '.2f', 100)} | {num(r, 'precision', '.3f')} | {num(r, 'recall', '.3f')} | "
                f"{num(r, 'psnr_ref', '.2f')} | {num(r, 'mse_ref', '.3f', 1e3)} | {psnr_same} |")
        return head + "\n".join(lines) + "\n\n" + self.verdict_markdown()

    def verdict_markdown(self) -> str:
        names = {"fid_fmnist": "FID", "accuracy": "acc.", "strict_accuracy": "strict acc.", "precision": "precision",
                 "recall": "recall", "psnr_ref": "PSNR vs DDIM-200"}
        lines = ["Against fewer steps at equal or higher measured speed (paired over seeds; margin > 0: the row is "
                 "better than the best such fewer-steps row, named; 'yes' = better than every one):", "",
                 "| row | speed | FID vs uncached T | " + " | ".join(names.values()) + " |",
                 "|---|---|---|" + "---|" * len(names)]
        for v in self.verdicts():
            fid = v["fid_vs_uncached"]
            cells = [v["name"], f"{v['speed']:.2f}", "-" if fid is None else f"{100 * (fid['ratio'] - 1):+.1f}%"]
            for key in names:
                m = v["measures"].get(key)
                if m is None:
                    cells.append("-" if v["rivals"] else "no rival")
                    continue
                scale = 100 if "accuracy" in key else 1
                sd = "" if math.isnan(m["sd"]) else f" +- {scale * m['sd']:.3g}"
                against = m["against"].replace("fewer steps ", "").replace("uncached ", "T")
                cells.append(f"{'yes' if m['beats_all'] else 'no'} {scale * m['margin']:+.3g}{sd} {against}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out: Path) -> None:
        from .formats import write_text

        out.mkdir(parents=True, exist_ok=True)
        # atomic: an interrupted run leaves the previous state
        write_text(out / "frontier.json", json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n", "--out")
        write_text(out / "table.md", self.markdown(), "--out")


def load(out) -> Frontier:
    doc = json.loads((Path(out) / "frontier.json").read_text())
    return Frontier(doc["settings"], doc["rows"])


def _seed_list(seeds: Sequence[int], num_samples: int, batch_size: int) -> list[int]:
    # generate() seeds batch k with seed + k: seeds closer than the number of batches would share noise.
    batches = math.ceil(num_samples / batch_size)
    ordered = sorted(seeds)
    if len(set(ordered)) != len(ordered) or any(b - a < batches for a, b in zip(ordered, ordered[1:])):
        raise ValueError(f"seeds {list(seeds)} must be at least {batches} apart ({num_samples} samples in batches of "
                         f"{batch_size} use seeds s .. s + {batches - 1}), so that their noise is disjoint")
    return list(seeds)


def frontier(
    bed,
    rows: Sequence[FrontierRow],
    *,
    steps: int,
    sampler: str = "ddim",
    guidance_scale: Optional[float] = None,
    num_samples: int = 1000,
    seeds: Sequence[int] = (0,),
    reference_steps: int = REFERENCE_STEPS,
    reference_seeds: Optional[int] = 1,
    batch_size: int = 250,
    timing_samples: int = 100,
    timing_rounds: int = 3,
    time_rows: bool = True,
    retime: bool = False,
    out=None,
    cache_dir=None,
    judge: Optional[Callable[..., dict]] = None,
    progress: bool = False,
) -> Frontier:
    """Measure ``rows`` on ``bed`` (see the module docstring) and return the :class:`Frontier`.

    ``reference_seeds``: on how many of the seeds (the first ones) the DDIM-``reference_steps`` images
    are generated, for PSNR / MSE and the reference row (None = all). ``judge(images, labels)``: the
    quality measures (default :func:`harmonica.evaluate.quality`). ``out``: where the state is saved
    after every (row, seed) and resumed from (rows of earlier calls are kept; a row whose schedule
    changed is measured afresh); ``cache_dir``: where reference images are kept (default ``out/images``).
    Timing runs before any quality work, in the process as the user set it up (no allocator tuning).
    """
    from . import evaluate
    from . import timing
    from .apply import model_cost
    from .testbed import DEFAULT_GUIDANCE, generate

    guidance = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    seeds = _seed_list(seeds, num_samples, batch_size)
    n_ref = len(seeds) if reference_seeds is None else min(reference_seeds, len(seeds))
    judge = judge or evaluate.quality
    uncached = [r for r in rows if r.family == "uncached"]
    if len(uncached) != 1 or uncached[0].steps != steps or uncached[0].schedule is not None:
        raise ValueError(f"rows need exactly one uncached row of {steps} steps (the speed and PSNR reference)")
    if n_ref == 0:
        rows = [r for r in rows if r.family != "reference"]
    for row in rows:
        if row.schedule is not None:
            row.schedule.check_compatible(num_steps=row.steps, num_blocks=len(bed.transformer.transformer_blocks))
    settings = {"model": _fingerprint(bed.transformer), "sampler": sampler, "steps": steps, "guidance_scale": guidance,
                "num_samples": num_samples, "batch_size": batch_size, "seeds": seeds, "reference_steps": reference_steps,
                "reference_seeds": seeds[:n_ref], "timing_samples": timing_samples}
    out = Path(out) if out is not None else None
    cache = Path(cache_dir) if cache_dir is not None else (out / "images" if out is not None else None)
    state = _resume(out, settings)
    state.settings.update(seeds=seeds, reference_seeds=seeds[:n_ref])  # this call's: what the table averages over
    cost = model_cost(bed.transformer, batch=2 * timing_samples)
    results = {r["name"]: r for r in state.rows}
    for row in rows:
        plan = _plan_hash(row.schedule)
        entry = results.get(row.name)
        if entry is None or entry.get("plan") != plan or entry.get("steps") != row.steps:
            entry = results[row.name] = {"quality": {}, "timing": None}  # new, or its schedule changed
        entry.update(name=row.name, family=row.family, steps=row.steps, plan=plan, cached=row.schedule is not None,
                     method=None if row.schedule is None else row.schedule.metadata.get("method"),
                     cur=0.0 if row.schedule is None else row.schedule.cache_usage,
                     max_order=0 if row.schedule is None else row.schedule.max_order,
                     theoretical_speedup=(steps / row.steps if row.schedule is None
                                          else row.schedule.theoretical_speedup(cost)))
    names = [r.name for r in rows]
    state.rows = [results[n] for n in names] + [r for n, r in results.items() if n not in names]
    save = (lambda: state.save(out)) if out is not None else (lambda: None)

    kw = dict(guidance_scale=guidance, batch_size=batch_size)
    # All rows are timed in one interleaved session or none is: ratios timed at other times, under another
    # load, are not comparable, so a new row re-times the rest too.
    if time_rows and (retime or any(results[r.name]["timing"] is None for r in rows if r.family != "reference")):
        _time(bed, rows, results, generate, dict(guidance_scale=guidance, sampler=sampler), timing_samples,
              timing_rounds, progress)
        state.settings.update(timing_rounds=timing_rounds, torch_threads=torch.get_num_threads())
        save()

    labels = torch.arange(num_samples) % len(bed.class_names)

    def seeds_of(row):  # the reference row only where the reference images are made anyway
        return seeds[:n_ref] if row.family == "reference" else seeds

    todo = [(row, seed) for row in rows for seed in seeds_of(row) if str(seed) not in results[row.name]["quality"]]
    bar = _bar(len(todo), progress, "frontier quality")
    for seed in seeds:
        pending = [row for row in rows if seed in seeds_of(row) and str(seed) not in results[row.name]["quality"]]
        if not pending:
            continue

        def uncached_images(steps_, sampler_, seed=seed):
            return _cached_images(cache, settings, f"{sampler_}{steps_}", seed, lambda: generate(
                bed, labels, seed=seed, num_inference_steps=steps_, sampler=sampler_, **kw))

        # The fidelity reference is the DDIM solution whatever the sampler: it is the ODE's, not a sampler's.
        reference = uncached_images(reference_steps, "ddim") if seed in seeds[:n_ref] else None
        base = uncached_images(steps, sampler)
        for row in pending:
            if row.family == "reference":
                images = reference
            elif row.schedule is None:
                images = base if row.steps == steps else generate(bed, labels, seed=seed, num_inference_steps=row.steps,
                                                                   sampler=sampler, **kw)
            else:
                with timing.cached(bed.transformer, row.schedule):
                    images = generate(bed, labels, seed=seed, num_inference_steps=row.steps, sampler=sampler, **kw)
            quality = dict(judge(images, labels))
            quality["psnr_uncached"] = float(evaluate.psnr(images, base).clamp(max=PSNR_CAP).mean())
            if reference is not None:
                per_image = evaluate.psnr(images, reference).clamp(max=PSNR_CAP)
                quality["psnr_ref"] = float(per_image.mean())
                quality["mse_ref"] = float((10 ** (-per_image / 10)).mean())  # on [0, 1] pixels, as the PSNR
            results[row.name]["quality"][str(seed)] = quality
            save()
            bar.update(1)
            bar.set_postfix_str(f"{row.name} seed {seed}: FID {quality['fid_fmnist']:.3f}")
    bar.close()
    save()
    state.rows = [results[n] for n in names]  # the returned table: this call's rows
    return state


def _plan_hash(schedule: Optional[Schedule]) -> Optional[str]:
    if schedule is None:
        return None
    digest = hashlib.sha256(schedule.mask.numpy().tobytes() + schedule.orders.numpy().tobytes())
    digest.update(json.dumps(schedule.coords).encode())
    return digest.hexdigest()[:12]


def _bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


def _resume(out: Optional[Path], settings: dict) -> Frontier:
    path = out / "frontier.json" if out is not None else None
    if path is None or not path.exists():
        return Frontier(dict(settings), [])
    state = load(out)
    # Results are per seed, so a call may measure other seeds (e.g. a first seed of every row, then more).
    changed = {k: (state.settings.get(k), v) for k, v in settings.items()
               if state.settings.get(k) != v and k not in ("seeds", "reference_seeds")}
    if changed:
        raise ValueError(f"{path} holds a frontier with other settings ({changed}: saved, now); use another --out "
                         f"or the same settings")
    return state


def _cached_images(cache: Optional[Path], settings: dict, name: str, seed: int, make) -> torch.Tensor:
    """Images of an uncached run, kept under ``cache`` for reuse (DDIM-200 is the most expensive row)."""
    if cache is None:
        return make()
    from safetensors.torch import load_file, save

    from .formats import write_bytes

    key = (f"{settings['model']}_{name}_g{settings['guidance_scale']}_n{settings['num_samples']}"
           f"_b{settings['batch_size']}_s{seed}.safetensors")
    path = cache / key
    if path.exists():
        return load_file(str(path))["images"]
    images = make()
    write_bytes(path, save({"images": images.contiguous()}), "--cache-dir image file")
    return images


def _time(bed, rows, results, generate, kw, timing_samples: int, rounds: int, progress: bool) -> None:
    from .timing import cached_copy, measure

    labels = torch.arange(timing_samples) % len(bed.class_names)
    timed = [r for r in rows if r.family != "reference"]  # the reference is a quality anchor, not a contender
    runs = {r.name: functools.partial(generate, bed, labels, seed=0, batch_size=timing_samples, num_inference_steps=r.steps,
                                      transformer=cached_copy(bed.transformer, r.schedule), **kw) for r in timed}
    base = next(r.name for r in rows if r.family == "uncached")
    # One measure() call per round (the first with an untimed warm-up round), so every round is kept.
    per_round = []
    bar = _bar(rounds, progress, "frontier timing rounds")
    for i in range(rounds):
        per_round.append({name: t.seconds for name, t in measure(runs, repeats=1, warmup=i == 0).items()})
        bar.update(1)
    bar.close()
    best_base = min(r[base] for r in per_round)
    for row in timed:
        seconds = [r[row.name] for r in per_round]
        results[row.name]["timing"] = {"seconds": seconds, "speedup": best_base / min(seconds),
                                       "round_speedups": [r[base] / r[row.name] for r in per_round]}


# ---------------------------------------------------------------------------------------------- plot
def plot(frontiers: Sequence[Frontier], path, title: Optional[str] = None) -> Path:
    """Quality vs speed, one curve per family: FID-FMNIST, strict accuracy and PSNR vs DDIM-200 (one row
    of panels per frontier). The x axis is the measured speedup (theoretical where a row was not timed)."""
    from .viz import _pyplot, save_figure

    plt = _pyplot()
    panels = (("fid_fmnist", "FID-FMNIST (lower is better)", 1.0), ("strict_accuracy", "strict accuracy %", 100.0),
              ("psnr_ref", "PSNR vs DDIM-200 (dB)", 1.0))
    fig, axes = plt.subplots(len(frontiers), len(panels), figsize=(5.2 * len(panels), 4.2 * len(frontiers)),
                             squeeze=False)
    styles = {"uncached": ("k", "*"), "fewer steps": ("k", "o"), "FORA": ("tab:gray", "s"),
              "TaylorSeer o1": ("tab:olive", "^"), "TaylorSeer o2": ("tab:green", "v")}
    palette = iter(["tab:red", "tab:blue", "tab:purple", "tab:orange", "tab:cyan", "tab:brown", "tab:pink"] * 3)
    for i, fr in enumerate(frontiers):
        families = {}
        for r in fr.rows:
            if r["family"] == "uncached":  # the first point of the fewer-steps curve, and a star of its own
                families.setdefault("fewer steps", []).append(r)
            if r["family"] != "reference":
                families.setdefault(r["family"], []).append(r)
        timed = all(r.get("timing") for rows in families.values() for r in rows)
        for j, (key, label, scale) in enumerate(panels):
            ax = axes[i][j]
            for family, rows in families.items():
                colour, marker = styles.get(family) or styles.setdefault(family, (next(palette), "D"))
                pts = sorted((fr.speed(r), *fr.value(r, key), r["steps"]) for r in rows)
                pts = [p for p in pts if not math.isnan(p[1])]
                if not pts:
                    continue
                xs, ys, sds, counts = zip(*pts)
                ys, sds = [y * scale for y in ys], [0.0 if math.isnan(s) else s * scale for s in sds]
                ax.errorbar(xs, ys, yerr=sds if any(sds) else None, color=colour, marker=marker,
                            ms=11 if family == "uncached" else 5, lw=1.2, capsize=2, label=family,
                            ls="-" if len(xs) > 1 else "none", zorder=3 if family == "uncached" else 2)
                if family == "fewer steps":  # the step count next to each point
                    for k, x, y in zip(counts, xs, ys):
                        ax.annotate(str(k), (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
            if key != "psnr_ref":
                for r in fr.rows:
                    if r["family"] == "uncached":
                        ax.axhline(fr.value(r, key)[0] * scale, color="k", lw=0.6, ls=":")
            ax.set_xlabel(("measured" if timed else "theoretical (some rows untimed)") + " speedup vs uncached T")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            s = fr.settings
            ax.set_title(f"{s['sampler']} T={s['steps']}, {s['num_samples']} samples x {len(s['seeds'])} seeds",
                         fontsize=9)
        axes[i][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The frontier's options, shared by ``python -m harmonica.frontier`` and ``harmonica evaluate
    --frontier`` (which checks their values and files before any work)."""
    p.add_argument("--steps", type=int, default=None, help="T (default: the testbed's, 20)")
    p.add_argument("--scheduler", default=None, help="diffusers sampler (default: the testbed's, ddim)")
    p.add_argument("--guidance", type=float, default=None, help="default: the testbed's")
    p.add_argument("--samples", type=int, default=1000, help="samples per seed")
    p.add_argument("--seeds", type=_int_list, default=[0, 10000, 20000], help="comma-separated (default 0,10000,20000)")
    p.add_argument("--reference-seeds", type=int, default=1,
                   help="on how many seeds to generate the DDIM-200 reference for PSNR / MSE (default 1; 0 = none)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--fewer-steps", type=_int_list, default=None, help="step counts (default: see the docstring)")
    p.add_argument("--fora", type=_int_list, default=[2, 3, 4], help="FORA intervals")
    p.add_argument("--taylorseer", type=_int_list, default=[2, 3, 4, 5], help="TaylorSeer intervals")
    p.add_argument("--orders", type=_int_list, default=[1, 2], help="TaylorSeer orders")
    p.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                   help="a router or schedule file (default: every bundled router for the sampler and T)")
    p.add_argument("--only", default=None, help="comma-separated row-name prefixes to keep (the uncached row always)")
    p.add_argument("--timing-samples", type=int, default=100)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--no-timing", action="store_true", help="quality only (rows keep any speeds already measured)")
    p.add_argument("--retime", action="store_true", help="measure the speeds again (only the speeds, if quality is done)")
    p.add_argument("--dit-dir", default=None, help="an exported testbed DiT directory (default: the bundled one)")
    p.add_argument("--out", default=None, help="directory for frontier.json, table.md and frontier.png (resumed from)")
    p.add_argument("--cache-dir", default=None, help="reference images (default: OUT/images)")
    p.add_argument("--plot", nargs="+", default=None, metavar="DIR", help="only draw the frontiers saved in DIRs")
    p.add_argument("--png", default=None, help="with --plot: the PNG to write")


def run(args: argparse.Namespace, *, progress: bool = True) -> Frontier | None:
    """The frontier (or, with ``--plot``, only its drawing) for parsed :func:`add_arguments` options."""
    if args.plot:
        frontiers = [load(d) for d in args.plot]
        png = args.png or str(Path(args.plot[0]) / "frontier.png")
        print(f"wrote {plot(frontiers, png)}")
        return None
    from .testbed import DEFAULT_SAMPLER, DEFAULT_STEPS
    from .testbed.routers import available, load_router, load_router_specs, load_testbed

    steps = args.steps or DEFAULT_STEPS
    sampler = args.scheduler or DEFAULT_SAMPLER
    routers = load_router_specs(args.router)
    if not args.router:
        routers = {m: load_router(m, s, n) for m, s, n in available() if (s, n) == (sampler, steps)}
    bed = load_testbed(args.dit_dir)
    rows = default_rows(len(bed.transformer.transformer_blocks), steps, routers=routers, fora=args.fora,
                        taylorseer=args.taylorseer, orders=args.orders, fewer=args.fewer_steps)
    if args.only:
        prefixes = [p.strip() for p in args.only.split(",") if p.strip()]
        rows = [r for r in rows if r.family == "uncached" or any(r.name.startswith(x) for x in prefixes)]
    result = frontier(bed, rows, steps=steps, sampler=sampler, guidance_scale=args.guidance, num_samples=args.samples,
                      seeds=args.seeds, reference_seeds=args.reference_seeds, batch_size=args.batch_size,
                      timing_samples=args.timing_samples, timing_rounds=args.timing_rounds,
                      time_rows=not args.no_timing, retime=args.retime, out=args.out,
                      cache_dir=args.cache_dir, progress=progress)
    print(result.markdown())
    if args.out:
        print(f"wrote {Path(args.out) / 'table.md'}, {Path(args.out) / 'frontier.json'}, "
              f"{plot([result], Path(args.out) / 'frontier.png')}")
    return result


def main(argv=None) -> int:
    """``python -m harmonica.frontier ARGS`` is ``harmonica evaluate --frontier ARGS``: the same options,
    their values and files checked the same way before any work. Returns the exit status."""
    from .cli import main as cli_main

    return cli_main(["frontier", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
