"""Routers trained for the bundled testbed DiT, and the command that trains them.

    from harmonica.testbed.routers import load_router
    router = load_router("harmonica", "ddim", 20)
    hc.enable_cache(bed.transformer, router.to_schedule())  # at the threshold it was trained to

Every bundled router is a named recipe (:data:`RECIPES`: file stem -> training settings), trained with
checkpoints in ``--work-dir`` and resumed from them when interrupted; the settings land in the file's
metadata. Retrain one, or all of them for another DiT:

    python -m harmonica.testbed.routers --recipe harmonica_ddim_20
    python -m harmonica.testbed.routers --recipe all --dit-dir D --out-dir O [--work-dir runs/routers]

(``--method`` with ``--iterations`` trains a router outside the recipes.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


from ..schedule import Router, Schedule, load_plan
from . import ASSETS_DIR, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Testbed

ROUTERS_DIR = ASSETS_DIR / "routers"

__all__ = ["ROUTERS_DIR", "RECIPES", "BEST_ROUTERS", "available", "load_router", "load_router_specs", "router_path", "load_testbed", "train_recipe", "main"]


# The best bundled router for each (sampler, steps) by the frontier (RESULTS.md), a file stem's method
# part: what `harmonica demo` and `harmonica sample` use unless told otherwise.
BEST_ROUTERS = {("ddim", 20): "harmonica-o2-ts3", ("ddim", 50): "harmonica-o2-ts4"}


def router_path(method: str, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS) -> Path:
    return ROUTERS_DIR / f"{method}_{sampler}_{steps}.safetensors"


# Bundled routers: file stem -> train() arguments, the settings in each file's metadata. T=20: 80
# trajectories (1,520 updates); T=50: 32 (1,568 updates; IEPO once: at T=50 one refresh costs ~10 CPU-min).
_T20 = dict(sampler="ddim", steps=20, iterations=80, iepo_refresh=40)
_T50 = dict(sampler="ddim", steps=50, iterations=32, iepo_refresh=32)
RECIPES: dict[str, dict] = {
    # The reuse routers of the comparison table: HarmoniCa and L2C at the same target and update count.
    "harmonica_ddim_20": dict(_T20, method="harmonica", target_speedup=1.6, lr=0.01),
    "l2c_ddim_20": dict(_T20, method="l2c", target_speedup=1.6, lr=0.01, iterations=80 * 19),
    # Forecasting routers that start from TaylorSeer's schedule of interval N ("tsN", order 2) at its speed
    # (harmonica.train.start_from): they learn where to move its computes. IEPO every 10 iterations at T=20.
    "harmonica-o2-ts3_ddim_20": dict(_T20, method="harmonica", forecast_order=2, init_taylorseer=3, iepo_refresh=10),
    "l2c-o2-ts3_ddim_20": dict(_T20, method="l2c", forecast_order=2, init_taylorseer=3, lr=0.01, iterations=80 * 19),
    # Trained before history_grad existed (so without it); at T=50 no unit moved either way we tried.
    "harmonica-o2-ts4_ddim_50": dict(_T50, method="harmonica", forecast_order=2, init_taylorseer=4, history_grad=False),
}


def train_recipe(name: str, *, dit_dir: Optional[str] = None, out_dir: Optional[str] = None,
                 work_dir: str = "runs/routers", seed: int = 0) -> Router:
    """Train the router of recipe ``name`` (checkpoints and log in ``work_dir/name``; a checkpoint there is
    resumed) and write it to ``out_dir`` (default: the bundled asset path)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = dict(RECIPES[name])
    method = recipe.pop("method")
    work = Path(work_dir) / name
    work.mkdir(parents=True, exist_ok=True)
    resume = (work / "checkpoint.safetensors").exists()
    out = Path(out_dir) / f"{name}.safetensors" if out_dir else ROUTERS_DIR / f"{name}.safetensors"
    return train(method, **recipe, seed=seed, dit_dir=dit_dir, out=out, checkpoint_dir=str(work), resume=resume,
                 log_file=str(work / "log.jsonl"))


def available() -> list[tuple[str, str, int]]:
    """(method, sampler, steps) of every bundled router."""
    found = []
    for path in sorted(ROUTERS_DIR.glob("*.safetensors")):
        method, sampler, steps = path.stem.rsplit("_", 2)
        found.append((method, sampler, int(steps)))
    return found


def load_router(method: str, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS) -> Router:
    """The bundled router trained with ``method`` ("harmonica" or "l2c") for ``sampler`` at ``steps``."""
    path = router_path(method, sampler, steps)
    if not path.exists():
        have = ", ".join(f"({m!r}, {s!r}, {n})" for m, s, n in available()) or "none"
        raise FileNotFoundError(
            f"no bundled router for method={method!r}, sampler={sampler!r}, steps={steps}; bundled: {have}. "
            f"Train one with `python -m harmonica.testbed.routers --method {method} --sampler {sampler} "
            f"--steps {steps} --iterations 80`"
        )
    return Router.load(path)


def load_router_specs(specs) -> dict[str, "Router | Schedule"]:
    """Routers (or schedules: the frontier takes both) from ``--router NAME=PATH`` options, by NAME."""
    routers = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--router expects NAME=PATH, got {spec!r}")
        routers[name] = load_plan(path)
    return routers


def load_testbed(dit_dir: Optional[str] = None) -> Testbed:
    """The bundled testbed, or one whose DiT comes from another exported directory (e.g. a checkpoint of
    a training run exported with harmonica.testbed.train.export_dit)."""
    from . import load

    return load(dit_dir=dit_dir)


# Settings beyond TrainConfig's defaults that `harmonica train` on the testbed shares with train()'s
# defaults, so both train (and resume) the same run: every bundled router's starting beta, and the IEPO
# refresh of the demo's router (harmonica-o2-ts3; the reuse recipes above refresh every 40 trajectories).
RECIPE = {"beta": 1e-3, "iepo_refresh": 10}


def train(method: str, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, iterations: int,
          batch_size: int = 8, target_speedup: Optional[float] = None, beta: float = RECIPE["beta"],
          lr: Optional[float] = None, forecast_order: int = 0, threshold: Optional[float] = None,
          iepo_refresh: int = RECIPE["iepo_refresh"], iepo_variant: Optional[str] = None,
          init_taylorseer: Optional[int] = None, history_grad: Optional[bool] = None, seed: int = 0,
          dit_dir: Optional[str] = None, out: Optional[Path] = None,
          checkpoint_dir: Optional[str] = None, resume: bool = False, log_file: Optional[str] = None) -> Router:
    """``init_taylorseer=N``: start from TaylorSeer's schedule of interval N (order ``forecast_order``), as
    :func:`harmonica.train.start_from` sets up; the target speedup defaults to that schedule's, so the
    router learns where to spend the same compute."""
    from ..schedule import Schedule
    from ..train import ClassConditioning, TrainConfig, start_from, train_router
    from ..train.trainer import training_cost

    bed = load_testbed(dit_dir)
    settings = {k: v for k, v in dict(forecast_order=forecast_order, threshold=threshold,
                                      iepo_variant=iepo_variant).items() if v is not None}
    start = None
    if init_taylorseer is not None:
        start = Schedule.taylorseer(steps, len(bed.transformer.transformer_blocks), init_taylorseer, forecast_order)
        settings.update(start_from(start, threshold=settings.get("threshold", 0.5)))
    if history_grad is not None:
        settings["history_grad"] = history_grad
    if method == "l2c":
        from .data import load_tensors

        images, labels = load_tensors("train")
        settings.update(l2c_latents=images, l2c_choices=labels)
    config = TrainConfig(method=method, num_steps=steps, conditioning=ClassConditioning(len(bed.class_names), bed.null_class),
                         guidance_scale=DEFAULT_GUIDANCE, batch_size=batch_size, iterations=iterations,
                         beta=beta, lr=lr, target_speedup=target_speedup, iepo_refresh=iepo_refresh, seed=seed,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=5 if checkpoint_dir else 0,
                         resume=resume, log_file=log_file, **settings)
    if start is not None and target_speedup is None:  # the speed of the schedule it starts from
        config.target_speedup = start.theoretical_speedup(training_cost(bed.transformer, config))
    router = train_router(bed.transformer, bed.make_scheduler(sampler), config)
    # Which DiT weights the router was trained for (a router is only valid for those).
    from . import DIT_DIR

    info = Path(dit_dir or DIT_DIR) / "training.json"
    router.metadata["dit_training_step"] = json.loads(info.read_text())["step"] if info.exists() else None
    path = Path(out) if out is not None else router_path(method, sampler, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    router.save(path)
    return router


def main(argv=None) -> Router:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.routers",
                                description="Train a router for the testbed DiT")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME",
                   help=f"train a bundled router by recipe ('all' = every one not yet written): {', '.join(RECIPES)}")
    p.add_argument("--out-dir", default=None, help="--recipe: where the routers go (default: the bundled assets)")
    p.add_argument("--work-dir", default="runs/routers", help="--recipe: checkpoints and logs, resumed from")
    p.add_argument("--method", choices=("harmonica", "l2c"))
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--forecast-order", type=int, default=0, help="0 = reuse, m = forecast of order m")
    p.add_argument("--threshold", type=float, default=None,
                   help="training's threshold: a unit whose weight exceeds it refreshes its cache (default: TrainConfig's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, help="HarmoniCa: trajectories; L2C: updates")
    g.add_argument("--updates-like-harmonica", type=int, metavar="N",
                   help="L2C: as many updates as N HarmoniCa trajectories make (N * (steps - 1))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target-speedup", type=float, default=None)
    p.add_argument("--beta", type=float, default=1e-3, help="starting beta (adapted when a target is given)")
    p.add_argument("--lr", type=float, default=None, help="default: the reference (HarmoniCa 0.01, L2C 1e-3)")
    p.add_argument("--iepo-refresh", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dit-dir", default=None)
    p.add_argument("--out", default=None, help="router file (default: the bundled asset path)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--log-file", default=None)
    args = p.parse_args(argv)
    keys = ("method", "forecast_order", "threshold", "achieved_cur", "theoretical_speedup", "wall_time_s",
            "optimizer_updates")
    if args.recipe:
        names = list(RECIPES) if args.recipe == ["all"] else args.recipe
        router = None
        for name in names:
            target = Path(args.out_dir) / f"{name}.safetensors" if args.out_dir else ROUTERS_DIR / f"{name}.safetensors"
            if args.recipe == ["all"] and target.exists():
                continue  # 'all' fills in what is missing; name a recipe to retrain it
            router = train_recipe(name, dit_dir=args.dit_dir, out_dir=args.out_dir, work_dir=args.work_dir,
                                  seed=args.seed)
            print(json.dumps({"recipe": name, **{k: router.metadata[k] for k in keys}}), flush=True)
        return router
    if args.method is None or (args.iterations is None and args.updates_like_harmonica is None):
        p.error("give --recipe NAME, or --method with --iterations or --updates-like-harmonica")
    iterations = args.iterations or args.updates_like_harmonica * (args.steps - 1)
    router = train(args.method, sampler=args.sampler, steps=args.steps, iterations=iterations,
                   batch_size=args.batch_size, target_speedup=args.target_speedup, beta=args.beta, lr=args.lr,
                   forecast_order=args.forecast_order, threshold=args.threshold, iepo_refresh=args.iepo_refresh, seed=args.seed,
                   dit_dir=args.dit_dir, out=args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                   log_file=args.log_file)
    print(json.dumps({k: router.metadata[k] for k in keys}, indent=2))
    return router


if __name__ == "__main__":
    main()
