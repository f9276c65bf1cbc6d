"""Train the testbed networks (the DiT and the FID classifier) on Fashion-MNIST.

One command reproduces the bundled assets (see assets/MODEL_CARD.md for the exact numbers)::

    python -m harmonica.testbed.train --what all --export

Runs are resumable: rerunning the same command continues from ``<run-dir>/<net>/ckpt.safetensors``
(model, EMA, optimizer, RNG state and iteration), and the result is the same as an uninterrupted run
because the data order is a pure function of (seed, epoch) and the noise RNG state is checkpointed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import load_tensors

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_RUN_DIR = Path("runs/testbed")


class _Log:
    """Appends timestamped lines to the run's log file and mirrors them through tqdm."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.file.write(line + "\n")
        tqdm.write(line, file=sys.stderr)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    # Derived from (seed, epoch) alone, so a resumed run visits the data in the same order.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    return _epoch_order(seed, epoch, n)[pos * batch_size:(pos + 1) * batch_size]


# ----------------------------------------------------------------------------------------------- DiT

def train_dit(args) -> Path:
    from .model import DIT_CONFIG, NULL_CLASS, SCHEDULER_CONFIG, build_dit, ema_copy

    out = Path(args.run_dir) / "dit"
    path = out / "ckpt.safetensors"
    log = _Log(out / "train.log")
    torch.manual_seed(args.seed)
    model = build_dit()
    # Training runs in eval mode on purpose: diffusers gives every block its own LabelEmbedding, and in
    # train mode each would drop labels independently (one block sees "null" while the next sees the
    # class). Labels are dropped once, below, for the whole network. The model has no dropout/BN, so
    # eval mode changes nothing else.
    model.eval()
    ema = ema_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    step, wall, running = 0, 0.0, None
    if path.exists():
        tensors, meta = ckpt.load(path)
        model.load_state_dict(ckpt.unprefixed(tensors, "model."))
        ema.load_state_dict(ckpt.unprefixed(tensors, "ema."))
        ckpt.unpack_optimizer(optimizer, tensors, meta["optimizer"])
        noise_gen.set_state(tensors["rng.noise"])
        step, wall, running = meta["step"], meta["wall_seconds"], meta.get("running_loss")
        if meta["args"]["seed"] != args.seed or meta["args"]["batch_size"] != args.batch_size:
            raise ValueError(f"{path} was trained with seed/batch {meta['args']['seed']}/"
                             f"{meta['args']['batch_size']}; resume with the same values or a new --run-dir")
        log(f"resumed DiT from {path} at step {step} ({wall / 60:.1f} min so far)")
    else:
        log(f"new DiT run: config {json.dumps(DIT_CONFIG)}; args {json.dumps(vars(args))}")

    images, labels = load_tensors("train")
    n = images.shape[0]
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"],
                           SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]

    def save():
        opt_tensors, opt_meta = ckpt.pack_optimizer(optimizer)
        tensors = {**ckpt.prefixed(model.state_dict(), "model."), **ckpt.prefixed(ema.state_dict(), "ema."),
                   **opt_tensors, "rng.noise": noise_gen.get_state()}
        ckpt.atomic_save(tensors, {"step": step, "wall_seconds": wall, "args": vars(args), "running_loss": running,
                                   "optimizer": opt_meta, "dit_config": DIT_CONFIG}, path)

    last_save = time.time()
    bar = tqdm(total=args.dit_steps, initial=step, desc="DiT", mininterval=10, dynamic_ncols=True)
    while step < args.dit_steps:
        t0 = time.time()
        idx = _batch_indices(args.seed, step, n, args.batch_size)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=noise_gen) < args.class_dropout] = NULL_CLASS
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=noise_gen)
        eps = torch.randn(x0.shape, generator=noise_gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        # Warm-up of the EMA decay: with only a few thousand steps, a fixed 0.999 would keep a large
        # share of the random initialisation in the averaged weights for the first ~1000 steps.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        step += 1
        wall += time.time() - t0
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.log_every == 0 or step == args.dit_steps:
            log(f"step {step} loss {running:.5f} grad_norm {grad_norm.item():.3f} lr {lr:.2e} "
                f"wall {wall / 60:.1f} min")
        if time.time() - last_save > args.ckpt_minutes * 60 or step == args.dit_steps:
            save()
            last_save = time.time()
    bar.close()
    if not path.exists():
        save()
    return path


def export_dit(run_dir: Path, assets_dir: Path = ASSETS_DIR) -> Path:
    """Write the EMA weights (fp16, diffusers ``save_pretrained`` layout) and the DDPM scheduler config
    into ``assets_dir/dit``; returns that directory."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from .model import SCHEDULER_CONFIG

    tensors, meta = ckpt.load(Path(run_dir) / "dit" / "ckpt.safetensors")
    model = DiTTransformer2DModel(**meta["dit_config"])
    model.load_state_dict(ckpt.unprefixed(tensors, "ema."))
    target = Path(assets_dir) / "dit"
    model.to(torch.float16).save_pretrained(target, safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(target / "scheduler")
    info = {"step": meta["step"], "wall_seconds": meta["wall_seconds"], "args": meta["args"]}
    (target / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return target


# ----------------------------------------------------------------------------------------- classifier

def _accuracy(model, images, labels, batch_size=1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / images.shape[0]


def train_classifier(args) -> Path:
    from .classifier import FMNISTClassifier

    out = Path(args.run_dir) / "classifier"
    path = out / "ckpt.safetensors"
    log = _Log(out / "train.log")
    torch.manual_seed(args.seed)
    model = FMNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.cls_lr, weight_decay=5e-4)
    aug_gen = torch.Generator().manual_seed(args.seed + 2)
    images, labels = load_tensors("train")
    test_images, test_labels = load_tensors("test")
    n = images.shape[0]
    total = args.cls_epochs * (n // args.cls_batch_size)
    step, wall = 0, 0.0
    if path.exists():
        tensors, meta = ckpt.load(path)
        model.load_state_dict(ckpt.unprefixed(tensors, "model."))
        ckpt.unpack_optimizer(optimizer, tensors, meta["optimizer"])
        aug_gen.set_state(tensors["rng.aug"])
        torch.set_rng_state(tensors["rng.torch"])
        step, wall = meta["step"], meta["wall_seconds"]
        log(f"resumed classifier from {path} at step {step}")
    else:
        log(f"new classifier run: args {json.dumps(vars(args))}")

    def save(extra=None):
        opt_tensors, opt_meta = ckpt.pack_optimizer(optimizer)
        tensors = {**ckpt.prefixed(model.state_dict(), "model."), **opt_tensors,
                   "rng.aug": aug_gen.get_state(), "rng.torch": torch.get_rng_state()}
        ckpt.atomic_save(tensors, {"step": step, "wall_seconds": wall, "args": vars(args),
                                   "optimizer": opt_meta, **(extra or {})}, path)

    bar = tqdm(total=total, initial=step, desc="classifier", mininterval=10, dynamic_ncols=True)
    model.train()
    per_epoch = n // args.cls_batch_size
    while step < total:
        t0 = time.time()
        idx = _batch_indices(args.seed + 7, step, n, args.cls_batch_size)
        x, y = images[idx], labels[idx]
        # Random shifts of up to 2 px: the generated images are never pixel-aligned copies of the data,
        # and the features should not be brittle to that.
        shift = torch.randint(-2, 3, (2,), generator=aug_gen).tolist()
        x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), shifts=shift, dims=(2, 3))[..., 2:-2, 2:-2]
        lr = 0.5 * args.cls_lr * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        wall += time.time() - t0
        bar.update(1)
        if step % per_epoch == 0:
            acc = _accuracy(model, test_images, test_labels)
            model.train()
            log(f"epoch {step // per_epoch} loss {loss.item():.4f} test_acc {acc:.4f} wall {wall / 60:.1f} min")
            save({"test_accuracy": acc})
    bar.close()
    if not path.exists():
        save()
    return path


def export_classifier(run_dir: Path, assets_dir: Path = ASSETS_DIR) -> Path:
    """Write the classifier weights and the FID reference statistics of the 10k test images."""
    from safetensors.torch import save_file
    from .classifier import FMNISTClassifier
    from ..evaluate import feature_statistics

    tensors, meta = ckpt.load(Path(run_dir) / "classifier" / "ckpt.safetensors")
    model = FMNISTClassifier()
    model.load_state_dict(ckpt.unprefixed(tensors, "model."))
    model.eval()
    test_images, test_labels = load_tensors("test")
    acc = _accuracy(model, test_images, test_labels)
    with torch.no_grad():
        feats = torch.cat([model.features(test_images[i:i + 1000]) for i in range(0, 10000, 1000)])
    mu, sigma = feature_statistics(feats)
    target = Path(assets_dir)
    target.mkdir(parents=True, exist_ok=True)
    meta_out = {"test_accuracy": f"{acc:.4f}", "step": str(meta["step"]),
                "wall_seconds": f"{meta['wall_seconds']:.0f}"}
    # The classifier is small (~0.2M parameters); fp32 keeps the reference statistics and the features
    # of generated images computed with exactly the same weights the statistics came from.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(target / "classifier.safetensors"), metadata=meta_out)
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)},
              str(target / "fid_stats_test.safetensors"),
              metadata={"source": "Fashion-MNIST t10k, 10000 images", "features": "classifier penultimate"})
    return target


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("dit", "classifier", "all"), default="all")
    p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", action="store_true",
                   help="after training, write the weights into harmonica/testbed/assets/")
    p.add_argument("--export-only", action="store_true", help="skip training, export existing checkpoints")
    g = p.add_argument_group("DiT")
    g.add_argument("--dit-steps", type=int, default=3200)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--class-dropout", type=float, default=0.1)
    g.add_argument("--ckpt-minutes", type=float, default=3.0)
    g.add_argument("--log-every", type=int, default=50)
    g = p.add_argument_group("classifier")
    g.add_argument("--cls-epochs", type=int, default=4)
    g.add_argument("--cls-batch-size", type=int, default=128)
    g.add_argument("--cls-lr", type=float, default=2e-3)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("export", "export_only")})
    if args.what in ("classifier", "all"):
        if not args.export_only:
            train_classifier(train_args)
        if args.export or args.export_only:
            print(f"classifier exported to {export_classifier(run_dir)}")
    if args.what in ("dit", "all"):
        if not args.export_only:
            train_dit(train_args)
        if args.export or args.export_only:
            print(f"DiT exported to {export_dit(run_dir)}")


if __name__ == "__main__":
    main()
