"""Routers trained for the bundled testbed DiT, and the command that trains them.

    from harmonica.testbed.routers import load_router
    router = load_router("harmonica", "ddim", 20)
    hc.enable_cache(bed.transformer, router.to_schedule())  # at the threshold it was trained to

Retrain (writes assets/routers/<method>_<sampler>_<steps>.safetensors; settings in the file's metadata):

    python -m harmonica.testbed.routers --method harmonica --iterations 80 --target-speedup 1.6
    python -m harmonica.testbed.routers --method l2c --updates-like-harmonica 80 --target-speedup 1.6 --lr 0.01
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..schedule import Router
from . import ASSETS_DIR, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Testbed

ROUTERS_DIR = ASSETS_DIR / "routers"

__all__ = ["ROUTERS_DIR", "available", "load_router", "router_path", "load_testbed", "main"]


def router_path(method: str, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS) -> Path:
    return ROUTERS_DIR / f"{method}_{sampler}_{steps}.safetensors"


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
            f"--steps {steps}`"
        )
    return Router.load(path)


def load_testbed(dit_dir: Optional[str] = None) -> Testbed:
    """The bundled testbed, or one whose DiT comes from another exported directory (e.g. a checkpoint of
    a training run exported with harmonica.testbed.train.export_dit)."""
    from . import load

    return load(dit_dir=dit_dir)


# The training settings of the testbed's routers beyond TrainConfig's defaults, shared with
# `harmonica train` on the testbed so that both train (and resume) the same run.
RECIPE = {"beta": 1e-3, "iepo_refresh": 10}


def train(method: str, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, iterations: int,
          batch_size: int = 8, target_speedup: Optional[float] = None, beta: float = RECIPE["beta"],
          lr: Optional[float] = None,
          iepo_refresh: int = RECIPE["iepo_refresh"], seed: int = 0, dit_dir: Optional[str] = None,
          out: Optional[Path] = None,
          checkpoint_dir: Optional[str] = None, resume: bool = False, log_file: Optional[str] = None) -> Router:
    from ..train import ClassConditioning, TrainConfig, train_router

    bed = load_testbed(dit_dir)
    extra = {}
    if method == "l2c":
        from .data import load_tensors

        images, labels = load_tensors("train")
        extra = {"l2c_latents": images, "l2c_choices": labels}
    config = TrainConfig(method=method, num_steps=steps, conditioning=ClassConditioning(len(bed.class_names), bed.null_class),
                         guidance_scale=DEFAULT_GUIDANCE, batch_size=batch_size, iterations=iterations,
                         beta=beta, lr=lr, target_speedup=target_speedup, iepo_refresh=iepo_refresh, seed=seed,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=5 if checkpoint_dir else 0,
                         resume=resume, log_file=log_file, **extra)
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
    p.add_argument("--method", choices=("harmonica", "l2c"), required=True)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    g = p.add_mutually_exclusive_group(required=True)
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
    iterations = args.iterations or args.updates_like_harmonica * (args.steps - 1)
    router = train(args.method, sampler=args.sampler, steps=args.steps, iterations=iterations,
                   batch_size=args.batch_size, target_speedup=args.target_speedup, beta=args.beta, lr=args.lr,
                   iepo_refresh=args.iepo_refresh, seed=args.seed, dit_dir=args.dit_dir,
                   out=args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume, log_file=args.log_file)
    meta = {k: router.metadata[k] for k in ("method", "threshold", "achieved_cur", "theoretical_speedup",
                                            "wall_time_s", "optimizer_updates")}
    print(json.dumps(meta, indent=2))
    return router


if __name__ == "__main__":
    main()
