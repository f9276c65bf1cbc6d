"""Train the testbed networks (the DiT and the two classifiers) on Fashion-MNIST.

    python -m harmonica.testbed.train --what classifier --export          # FID-FMNIST classifier
    python -m harmonica.testbed.train --what strict-classifier --export   # the strict judge
    python -m harmonica.testbed.train --what dit --device cuda --cuda-graph --eval-seconds 15 \
        --time-budget 170 --out runs/gpu                                  # the DiT (recipe: MODEL_CARD.md)
    python -m harmonica.testbed.train --what dit --export-only --export-from runs/gpu/dit_L8-d128-p4.safetensors

The DiT recipe is the same on CPU and GPU (``--device``); assets/MODEL_CARD.md gives the exact
command that produced the bundled weights, its cost on either, and the held-out curves.

Runs are resumable: rerunning the same command continues from ``<run-dir>/<net>/ckpt.safetensors``
(model, EMA, best EMA, optimizer, RNG state and iteration), and the result is the same as an
uninterrupted run because the data order is a pure function of (seed, epoch) and the noise RNG state
is checkpointed (on the CPU; CUDA reductions are not bit-reproducible).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import load_tensors
from .model import ARCHITECTURES, DEFAULT_ARCHITECTURE

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


class _EpochOrder:
    """The data order: a permutation per epoch derived from (seed, epoch) alone, so a resumed run visits
    the data in the same order. The current epoch's permutation is kept (drawing 60k indices per step
    costs more than a GPU training step)."""

    def __init__(self, seed: int, n: int, device: torch.device | str = "cpu"):
        self.seed, self.n, self.device, self._epoch, self._perm = seed, n, device, None, None

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.n // batch_size)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).to(self.device)
        return self._perm[pos * batch_size:(pos + 1) * batch_size]


# ----------------------------------------------------------------------------------------------- DiT

class DiffusionStep:
    """One optimiser step of the DiT on the eps-prediction loss: noise ``x0`` to ``x_t``, forward,
    MSE against ``eps``, backward, gradient clipping, AdamW. Returns ``(loss, grad_norm)`` as device
    tensors (reading them is the caller's choice of when to sync).

    ``cuda_graph=True`` captures the whole step as one CUDA graph at the first call and replays it
    afterwards: the testbed DiT is so small that an eager step on the GPU is bound by launching its
    ~2,000 kernels from Python, not by the GPU. The optimizer must then be fused AdamW with
    ``capturable=True`` and a tensor learning rate (``make_optimizer``). Before the graph is used its
    first step is checked against an eager step from the same state on the same batch; if they
    disagree (or capture fails) the step stays eager and ``self.mode`` says why.
    """

    def __init__(self, model, optimizer, alphas_cumprod: torch.Tensor, grad_clip: float, *, cuda_graph: bool = False):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.alphas_cumprod = alphas_cumprod
        self.params = list(model.parameters())
        self.want_graph = cuda_graph
        self.graph = None
        self.mode = "eager"

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # in place: a captured graph reads this tensor
            else:
                group["lr"] = lr

    def _eager(self, x0, y, t, eps):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(self.model(xt, timestep=t, class_labels=y).sample, eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach(), grad_norm

    def __call__(self, x0, y, t, eps):
        if self.want_graph and self.graph is None and self.optimizer.state:
            self._capture(x0, y, t, eps)  # needs the optimizer state, i.e. one eager step first
            return self._result
        if self.graph is None:
            return self._eager(x0, y, t, eps)
        for static, value in zip(self.inputs, (x0, y, t, eps)):
            static.copy_(value)
        self.graph.replay()
        return self.outputs

    def _state(self) -> list[torch.Tensor]:
        tensors = list(self.params)
        for slots in self.optimizer.state.values():
            tensors += [v for v in slots.values() if torch.is_tensor(v)]
        return tensors

    def _capture(self, x0, y, t, eps) -> None:
        state = self._state()
        snapshot = [v.clone() for v in state]
        self._eager(x0, y, t, eps)  # the eager step whose parameters the captured one must reproduce
        eager_params = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for v, saved in zip(state, snapshot):
                v.copy_(saved)
        try:
            self.inputs = [v.clone() for v in (x0, y, t, eps)]
            # The documented whole-network pattern: warm the step up on a side stream (cuBLAS
            # workspaces, autograd buffers), then capture with the gradients unset so that backward
            # allocates them inside the graph's memory pool.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for v, saved in zip(state, snapshot):
                    v.copy_(saved)
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = self._eager(*self.inputs)
            graph.replay()
            torch.cuda.synchronize()
            num = sum((p.detach() - e).pow(2).sum() for p, e in zip(self.params, eager_params))
            den = sum((e - s).pow(2).sum() for e, s in zip(eager_params, snapshot[:len(self.params)]))
            mismatch = (num / den.clamp(min=1e-30)).sqrt().item()
            # TF32 products and atomics in the backward differ run to run: allow 1% of the update.
            if not mismatch < 1e-2:
                raise RuntimeError(f"graph step differs from the eager step by {mismatch:.2e} of the update")
            self.graph, self.mode = graph, f"cuda graph (first step matches eager to {mismatch:.1e} of the update)"
            self._result = self.outputs
        except Exception as error:  # any capture failure: train eagerly rather than not at all
            with torch.no_grad():
                for v, saved in zip(state, snapshot):
                    v.copy_(saved)
            self.want_graph, self.graph = False, None
            self.mode = f"eager (CUDA graph not used: {type(error).__name__}: {error})"
            self._result = self._eager(x0, y, t, eps)


def make_optimizer(model, lr: float, device: torch.device, cuda_graph: bool = False) -> torch.optim.Optimizer:
    """AdamW as the testbed recipe has it (betas 0.9/0.999, no weight decay). On CUDA the fused kernel
    (one launch for the whole update); for a CUDA graph also capturable, with the learning rate a
    device tensor so that the warm-up schedule reaches the captured step. The CPU keeps the default
    implementation, so that CPU runs stay bit-identical across resumes."""
    if device.type != "cuda":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    if cuda_graph:
        return torch.optim.AdamW(model.parameters(), lr=torch.tensor(lr, device=device), weight_decay=0.0,
                                 betas=(0.9, 0.999), fused=True, capturable=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999), fused=True)


def train_dit(args) -> Path:
    """Train the testbed DiT; returns the checkpoint path.

    Stops at ``--dit-steps`` or, with ``--time-budget``, when that many seconds of this invocation
    (evaluations included) have passed. With ``--eval-every`` the EMA weights are evaluated on held-out
    data at that interval (``_HeldOut``), the best by FID-FMNIST is kept next to the last (checkpoint
    keys ``best.*``), and everything measured goes to ``curves.json``. With ``--out`` the EMA weights
    (best and last, fp16) and the curves are also written there after every evaluation, so a run that
    is killed still leaves its best weights.
    """
    from .model import NULL_CLASS, SCHEDULER_CONFIG, architecture_config, build_dit, ema_copy

    started = time.time()
    device = torch.device(args.device)
    if device.type == "cuda":
        # TF32 matmuls and convolutions: the fp32 weights and optimizer are kept, only the products
        # round their inputs to 10-bit mantissas.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.run_dir) / "dit"
    path = out / "ckpt.safetensors"
    curves_path = out / "curves.json"
    log = _Log(out / "train.log")
    config = architecture_config(args.arch)
    torch.manual_seed(args.seed)
    model = build_dit(config).to(device)
    # Training runs in eval mode on purpose: diffusers gives every block its own LabelEmbedding, and in
    # train mode each would drop labels independently (one block sees "null" while the next sees the
    # class). Labels are dropped once, below, for the whole network. The model has no dropout/BN, so
    # eval mode changes nothing else.
    model.eval()
    ema = ema_copy(model)
    best = None  # EMA state at the best evaluation, on the CPU
    cuda_graph = args.cuda_graph and device.type == "cuda"
    optimizer = make_optimizer(model, args.lr, device, cuda_graph)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    step, wall = 0, 0.0
    curves = {"config": config, "args": vars(args), "device": _device_name(device), "torch": torch.__version__,
              "train": [], "evals": []}
    if path.exists():
        tensors, meta = ckpt.load(path)
        if meta["args"]["seed"] != args.seed or meta["args"]["batch_size"] != args.batch_size \
                or meta["dit_config"] != config:
            raise ValueError(f"{path} was trained with seed/batch {meta['args']['seed']}/{meta['args']['batch_size']} "
                             f"and config {meta['dit_config']}; resume with the same values or a new --run-dir")
        model.load_state_dict(ckpt.unprefixed(tensors, "model."))
        ema.load_state_dict(ckpt.unprefixed(tensors, "ema."))
        best = ckpt.unprefixed(tensors, "best.") or None
        ckpt.unpack_optimizer(optimizer, tensors, meta["optimizer"])
        if cuda_graph:  # the checkpoint stores the learning rate as a number
            for group in optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], device=device)
        noise_gen.set_state(tensors["rng.noise"])
        step, wall = meta["step"], meta["wall_seconds"]
        if curves_path.exists():
            curves["train"], curves["evals"] = (json.loads(curves_path.read_text())[k] for k in ("train", "evals"))
        log(f"resumed DiT from {path} at step {step} ({wall / 60:.1f} min so far)")
    else:
        if args.init_from:
            _initialise_from(model, ema, args.init_from, config)
        log(f"new DiT run on {curves['device']}: config {json.dumps(config)}; args {json.dumps(vars(args))}")

    images, labels = (t.to(device) for t in load_tensors("train"))
    order = _EpochOrder(args.seed, images.shape[0], device)
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"],
                           SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    train_step = DiffusionStep(model, optimizer, alphas_cumprod, args.grad_clip, cuda_graph=cuda_graph)
    held_out = _HeldOut(args, device) if args.eval_every or args.eval_seconds else None
    last_eval_wall = wall

    def save():
        opt_tensors, opt_meta = ckpt.pack_optimizer(optimizer)
        tensors = {**ckpt.prefixed(model.state_dict(), "model."), **ckpt.prefixed(ema.state_dict(), "ema."),
                   **ckpt.prefixed(best or {}, "best."), **opt_tensors, "rng.noise": noise_gen.get_state()}
        ckpt.atomic_save(tensors, {"step": step, "wall_seconds": wall, "args": vars(args),
                                   "optimizer": opt_meta, "dit_config": config}, path)

    def evaluate():
        nonlocal best
        row = {"step": step, "train_wall_s": round(wall, 1), **held_out(ema)}
        improved = not curves["evals"] or row["fid_fmnist"] < min(e["fid_fmnist"] for e in curves["evals"])
        row["best"] = improved
        curves["evals"].append(row)
        if improved:
            best = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
        log("eval " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        _write_json(curves_path, curves)
        if args.out:
            _write_outputs(Path(args.out), args.arch, config, curves, best, ema.state_dict())

    def out_of_time() -> bool:
        return bool(args.time_budget) and time.time() - started > args.time_budget

    last_save, loss_sum, logged_at = time.time(), torch.zeros((), device=device), step
    bar = tqdm(total=args.dit_steps, initial=step, desc="DiT", mininterval=10, dynamic_ncols=True)
    while step < args.dit_steps and not out_of_time():
        t0 = time.time()
        idx = order.batch(step, args.batch_size)
        x0, y = images[idx], labels[idx]
        # torch.where rather than masked assignment: no device-to-host sync on the GPU.
        drop = torch.rand(y.shape, generator=noise_gen, device=device) < args.class_dropout
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=noise_gen, device=device)
        eps = torch.randn(x0.shape, generator=noise_gen, device=device)
        lr = learning_rate(args, step)
        train_step.set_lr(lr)
        loss, grad_norm = train_step(x0, y, t, eps)
        if step == (1 if cuda_graph else 0):  # a graph is captured at the second step
            log(f"training step: {train_step.mode}")
        # Warm-up of the EMA decay: a fixed decay would keep a large share of the random
        # initialisation in the averaged weights for the first ~1/(1 - decay) steps.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            loss_sum += loss
        step += 1
        wall += time.time() - t0
        bar.update(1)
        if step % args.log_every == 0 or step == args.dit_steps:
            mean_loss = loss_sum.item() / (step - logged_at)  # the only per-interval host sync
            loss_sum.zero_()
            logged_at = step
            curves["train"].append({"step": step, "loss": round(mean_loss, 6), "grad_norm": round(grad_norm.item(), 4),
                                    "lr": lr, "train_wall_s": round(wall, 2)})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            log(f"step {step} loss {mean_loss:.5f} grad_norm {grad_norm.item():.3f} lr {lr:.2e} "
                f"wall {wall / 60:.1f} min ({step / max(wall, 1e-9):.1f} steps/s)")
        if held_out is not None and ((args.eval_every and step % args.eval_every == 0)
                                     or (args.eval_seconds and wall - last_eval_wall >= args.eval_seconds)):
            evaluate()
            last_eval_wall = wall
        if time.time() - last_save > args.ckpt_minutes * 60:
            save()
            last_save = time.time()
    bar.close()
    if held_out is not None and (not curves["evals"] or curves["evals"][-1]["step"] != step):
        evaluate()
    save()
    if held_out is not None and args.final_guidance:
        curves["guidance_sweep"] = {"weights": "best" if best is not None else "last",
                                    "rows": _guidance_sweep(args, device, config, best or ema.state_dict(), log)}
        _write_json(curves_path, curves)
        if args.out:
            _write_outputs(Path(args.out), args.arch, config, curves, best, ema.state_dict())
    log(f"DiT stopped at step {step} after {time.time() - started:.0f} s ({wall:.0f} s in training steps)")
    return path


def learning_rate(args, step: int) -> float:
    """Linear warm-up over ``--warmup`` steps, constant, and with ``--cooldown-steps`` a linear decay to
    zero that starts at ``--cooldown-from`` (a warmup-stable-decay schedule: the cool-down can be
    appended to a finished constant-rate run by resuming it with these two flags)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.cooldown_steps:
        lr *= min(1.0, max(0.0, 1.0 - (step - args.cooldown_from) / args.cooldown_steps))
    return lr


def _initialise_from(model, ema, directory: str, config: dict) -> None:
    """Start model and EMA from an exported testbed DiT (e.g. the previous bundled weights, to continue
    their training with this run's recipe; the optimizer starts fresh, behind the lr warm-up)."""
    from diffusers import DiTTransformer2DModel

    source = DiTTransformer2DModel.from_pretrained(directory, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    mismatched = {k: (source.config[k], v) for k, v in config.items() if source.config[k] != v}
    if mismatched:
        raise ValueError(f"--init-from {directory} has another shape than --arch: {mismatched} (theirs, ours)")
    state = source.state_dict()
    with torch.no_grad():
        model.load_state_dict(state)
        ema.load_state_dict(state)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


class _HeldOut:
    """Held-out measures of the EMA model, all on data the DiT never trained on or from fixed noise:

    * ``test_loss``: the denoising MSE on the first ``--eval-loss-images`` Fashion-MNIST test images,
      each with a fixed timestep and noise (the same for every evaluation);
    * sample quality of ``--eval-samples`` samples (DDIM 20 steps, guidance ``--eval-guidance``, labels
      0..9 cycled, seed 0: the model card's protocol): :func:`harmonica.evaluate.quality`.
    """

    def __init__(self, args, device: torch.device):
        from .model import SCHEDULER_CONFIG

        self.args, self.device = args, device
        n = args.eval_loss_images
        images, labels = load_tensors("test")
        gen = torch.Generator().manual_seed(1234)
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (n,), generator=gen)
        eps = torch.randn(images[:n].shape, generator=gen)
        betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"],
                               SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64)
        a = torch.cumprod(1.0 - betas, 0).float()[t].view(-1, 1, 1, 1)
        self.loss_batch = [tensor.to(device) for tensor in (a.sqrt() * images[:n] + (1 - a).sqrt() * eps, t, labels[:n], eps)]
        self.sample_labels = torch.arange(args.eval_samples) % 10
        self.strict = _strict_classifier_available()

    @torch.no_grad()
    def __call__(self, ema) -> dict:
        from .. import evaluate as ev

        t0 = time.time()
        xt, t, y, eps = self.loss_batch
        sq = sum(F.mse_loss(ema(xt[i:i + 1000], timestep=t[i:i + 1000], class_labels=y[i:i + 1000]).sample,
                            eps[i:i + 1000], reduction="sum") for i in range(0, xt.shape[0], 1000))
        row = {"test_loss": round(sq.item() / eps.numel(), 6)}
        images = _sample(ema, self.sample_labels, self.args.eval_guidance)
        row.update({k: round(v, 5) for k, v in ev.quality(images, self.sample_labels, strict=self.strict,
                                                                 device=self.device).items()})
        row["eval_s"] = round(time.time() - t0, 1)
        return row


def _strict_classifier_available() -> bool:
    # The strict classifier may not exist yet when the DiT is trained before it.
    from .classifier import RECIPES

    return (ASSETS_DIR / RECIPES["strict"].file).exists()


def _sample(transformer, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    """Testbed samples from an in-memory DiT, with exactly the noise and settings of ``testbed.generate``."""
    from . import CLASS_NAMES, Testbed, generate
    from .model import NULL_CLASS, SCHEDULER_CONFIG

    bed = Testbed(transformer=transformer, scheduler_config=dict(SCHEDULER_CONFIG), class_names=CLASS_NAMES,
                  null_class=NULL_CLASS, image_size=transformer.config.sample_size,
                  in_channels=transformer.config.in_channels)
    return generate(bed, labels, seed=0, guidance_scale=guidance)


def _guidance_sweep(args, device, config, state, log) -> dict:
    """Sample quality of the selected weights at each ``--final-guidance`` scale (same samples and
    noise as the evaluations), to choose the default guidance."""
    from .. import evaluate as ev
    from .model import build_dit

    model = build_dit(config)
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    labels = torch.arange(args.eval_samples) % 10
    sweep = {}
    for g in (float(v) for v in args.final_guidance.split(",")):
        images = _sample(model, labels, g)
        quality = ev.quality(images, labels, strict=_strict_classifier_available(), device=device)
        sweep[f"{g:g}"] = {k: round(v, 5) for k, v in quality.items()}
        log(f"guidance {g:g}: {sweep[f'{g:g}']}")
    return sweep


def _write_outputs(out: Path, arch: str, config: dict, curves: dict, best, last) -> None:
    """``dit_<arch>.safetensors`` (EMA weights ``best.*`` and ``last.*``, fp16, metadata: the config and
    the best evaluation) and ``dit_<arch>_curves.json``: small enough to come back from a remote run."""
    best = best if best is not None else last
    tensors = {**ckpt.prefixed({k: v.half() for k, v in best.items()}, "best."),
               **ckpt.prefixed({k: v.half() for k, v in last.items()}, "last.")}
    best_eval = min(curves["evals"], key=lambda e: e["fid_fmnist"]) if curves["evals"] else None
    ckpt.atomic_save(tensors, {"dit_config": config, "best_eval": best_eval, "last_step": curves["evals"][-1]["step"]
                               if curves["evals"] else None}, out / f"dit_{arch}.safetensors")
    _write_json(out / f"dit_{arch}_curves.json", curves)


def load_exported_weights(path: str | os.PathLike, which: str = "best") -> tuple[dict, dict, dict]:
    """(state_dict, dit_config, metadata) from a ``dit_<arch>.safetensors`` written with ``--out``."""
    tensors, meta = ckpt.load(path)
    state = ckpt.unprefixed(tensors, f"{which}.")
    if not state:
        raise ValueError(f"{path} holds no {which!r} weights")
    return state, meta["dit_config"], meta


def export_dit(source: str | os.PathLike, assets_dir: Path = ASSETS_DIR, which: str = "best") -> Path:
    """Write EMA weights (fp16, diffusers ``save_pretrained`` layout), the DDPM scheduler config and
    ``training.json`` into ``assets_dir/dit``; returns that directory.

    ``source``: a run directory (its ``dit/ckpt.safetensors``) or a ``dit_<arch>.safetensors`` written
    with ``--out``; ``which``: the "best" evaluated EMA weights or the "last" ones (a run without
    evaluations has only the last: its EMA).
    """
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from .model import SCHEDULER_CONFIG

    source = Path(source)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if source.is_dir():
        tensors, meta = ckpt.load(source / "dit" / "ckpt.safetensors")
        state = ckpt.unprefixed(tensors, "best." if which == "best" else "ema.") or ckpt.unprefixed(tensors, "ema.")
        curves_path = source / "dit" / "curves.json"
        curves = json.loads(curves_path.read_text()) if curves_path.exists() else {}
        info = {"step": meta["step"], "wall_seconds": meta["wall_seconds"], "args": meta["args"]}
        config = meta["dit_config"]
    else:
        state, config, meta = load_exported_weights(source, which)
        curves = json.loads(source.with_name(source.stem + "_curves.json").read_text())
        info = {"args": curves["args"], "device": curves["device"], "torch": curves["torch"]}
    evals = curves.get("evals", [])
    chosen = min(evals, key=lambda e: e["fid_fmnist"]) if evals and which == "best" else (evals[-1] if evals else None)
    if chosen is not None:
        info.update(step=chosen["step"], train_wall_seconds=chosen["train_wall_s"], held_out=chosen)
    info["weights"] = which
    model = DiTTransformer2DModel(**config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    target = Path(assets_dir) / "dit"
    model.to(torch.float16).save_pretrained(target, safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(target / "scheduler")
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


def train_classifier(args, recipe_name: str = "fid") -> Path:
    """Train one of the bundled classifiers (``classifier.RECIPES``); resumable like the DiT."""
    from .classifier import RECIPES, build_classifier

    recipe = RECIPES[recipe_name]
    seed = args.seed + recipe.seed_offset
    epochs = args.cls_epochs or recipe.epochs
    out = Path(args.run_dir) / _classifier_run_name(recipe_name)
    path = out / "ckpt.safetensors"
    log = _Log(out / "train.log")
    torch.manual_seed(seed)
    model = build_classifier(recipe_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.cls_lr, weight_decay=5e-4)
    aug_gen = torch.Generator().manual_seed(seed + 2)
    images, labels = load_tensors("train")
    test_images, test_labels = load_tensors("test")
    n = images.shape[0]
    total = epochs * (n // args.cls_batch_size)
    step, wall = 0, 0.0
    if path.exists():
        tensors, meta = ckpt.load(path)
        model.load_state_dict(ckpt.unprefixed(tensors, "model."))
        ckpt.unpack_optimizer(optimizer, tensors, meta["optimizer"])
        aug_gen.set_state(tensors["rng.aug"])
        torch.set_rng_state(tensors["rng.torch"])
        step, wall = meta["step"], meta["wall_seconds"]
        log(f"resumed classifier {recipe_name!r} from {path} at step {step}")
    else:
        log(f"new classifier run {recipe}: args {json.dumps(vars(args))}")

    def save(extra=None):
        opt_tensors, opt_meta = ckpt.pack_optimizer(optimizer)
        tensors = {**ckpt.prefixed(model.state_dict(), "model."), **opt_tensors,
                   "rng.aug": aug_gen.get_state(), "rng.torch": torch.get_rng_state()}
        ckpt.atomic_save(tensors, {"step": step, "wall_seconds": wall, "args": vars(args), "recipe": recipe_name,
                                   "epochs": epochs, "optimizer": opt_meta, **(extra or {})}, path)

    order = _EpochOrder(seed + 7, n)
    bar = tqdm(total=total, initial=step, desc=f"classifier ({recipe_name})", mininterval=10, dynamic_ncols=True)
    model.train()
    per_epoch = n // args.cls_batch_size
    s = recipe.max_shift
    while step < total:
        t0 = time.time()
        idx = order.batch(step, args.cls_batch_size)
        x, y = images[idx], labels[idx]
        if s:
            # Random shifts: the generated images are never pixel-aligned copies of the data, and the
            # FID features should not be brittle to that.
            shift = torch.randint(-s, s + 1, (2,), generator=aug_gen).tolist()
            x = torch.roll(F.pad(x, (s, s, s, s), value=-1.0), shifts=shift, dims=(2, 3))[..., s:-s, s:-s]
        lr = 0.5 * args.cls_lr * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
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


def _classifier_run_name(recipe_name: str) -> str:
    # The FID classifier keeps the folder name it had before there were two.
    return "classifier" if recipe_name == "fid" else f"classifier_{recipe_name}"


def export_classifier(run_dir: Path, assets_dir: Path = ASSETS_DIR, recipe_name: str = "fid") -> Path:
    """Write a classifier's weights (with its test accuracy in the metadata) into ``assets_dir``; for the
    FID classifier also the FID reference statistics of the 10k test images."""
    from safetensors.torch import save_file
    from .classifier import RECIPES, build_classifier
    from ..evaluate import feature_statistics

    recipe = RECIPES[recipe_name]
    tensors, meta = ckpt.load(Path(run_dir) / _classifier_run_name(recipe_name) / "ckpt.safetensors")
    model = build_classifier(recipe_name)
    model.load_state_dict(ckpt.unprefixed(tensors, "model."))
    model.eval()
    test_images, test_labels = load_tensors("test")
    acc = _accuracy(model, test_images, test_labels)
    target = Path(assets_dir)
    target.mkdir(parents=True, exist_ok=True)
    meta_out = {"test_accuracy": f"{acc:.4f}", "step": str(meta["step"]),
                "wall_seconds": f"{meta['wall_seconds']:.0f}", "recipe": json.dumps(recipe.__dict__)}
    # The classifiers are small (~0.2M parameters); fp32 keeps the reference statistics and the features
    # of generated images computed with exactly the same weights the statistics came from.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / recipe.file),
              metadata=meta_out)
    if recipe_name == "fid":
        with torch.no_grad():
            feats = torch.cat([model.features(test_images[i:i + 1000]) for i in range(0, 10000, 1000)])
        mu, sigma = feature_statistics(feats)
        save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)},
                  str(target / "fid_stats_test.safetensors"),
                  metadata={"source": "Fashion-MNIST t10k, 10000 images", "features": "classifier penultimate"})
    return target


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("dit", "classifier", "strict-classifier", "all"), default="all",
                   help="classifier: the FID-FMNIST one; strict-classifier: the one trained without "
                        "augmentation or label smoothing; all: the three")
    p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", action="store_true",
                   help="after training, write the weights into harmonica/testbed/assets/")
    p.add_argument("--export-only", action="store_true", help="skip training, export existing checkpoints")
    g = p.add_argument_group("DiT")
    g.add_argument("--arch", default=DEFAULT_ARCHITECTURE, choices=tuple(ARCHITECTURES),
                   help="testbed shape (model.ARCHITECTURES; costs: python -m harmonica.testbed.sizing)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (same recipe; on CUDA matmuls use TF32)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: replay each training step as one captured CUDA graph (checked against an eager "
                        "step first; falls back to eager)")
    g.add_argument("--dit-steps", type=int, default=100_000, help="stop after this many optimiser steps")
    g.add_argument("--init-from", default=None,
                   help="a new run starts from this exported DiT's weights (model and EMA) instead of DiT's init")
    g.add_argument("--time-budget", type=float, default=0.0,
                   help="also stop after this many seconds of this invocation, evaluations included (0: none)")
    g.add_argument("--batch-size", type=int, default=512)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=1000)
    g.add_argument("--cooldown-from", type=int, default=0, help="step at which the learning rate starts to decay")
    g.add_argument("--cooldown-steps", type=int, default=0, help="linear decay to zero over this many steps (0: none)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.9995)
    g.add_argument("--class-dropout", type=float, default=0.1)
    g.add_argument("--ckpt-minutes", type=float, default=3.0)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate the EMA weights on held-out data every this many steps and keep the best "
                        "by FID-FMNIST (0: never)")
    g.add_argument("--eval-seconds", type=float, default=0.0,
                   help="also evaluate whenever this many seconds of training steps have passed since the last")
    g.add_argument("--eval-samples", type=int, default=1000, help="samples per evaluation")
    g.add_argument("--eval-loss-images", type=int, default=10_000, help="test images for the held-out loss")
    g.add_argument("--eval-guidance", type=float, default=3.0, help="guidance of the evaluation samples")
    g.add_argument("--final-guidance", default="",
                   help="comma-separated guidance scales to evaluate the selected weights at, after training")
    g.add_argument("--out", default=None,
                   help="also write dit_<arch>.safetensors (EMA best and last, fp16) and its curves JSON here")
    g.add_argument("--export-from", default=None,
                   help="with --export-only: a dit_<arch>.safetensors written with --out (default: the run's "
                        "checkpoint)")
    g.add_argument("--which", choices=("best", "last"), default="best", help="EMA weights to export")
    g = p.add_argument_group("classifier")
    g.add_argument("--cls-epochs", type=int, default=None, help="default: the recipe's (FID 4, strict 8)")
    g.add_argument("--cls-batch-size", type=int, default=128)
    g.add_argument("--cls-lr", type=float, default=2e-3)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                       if k not in ("export", "export_only", "export_from", "which")})
    for what, recipe in (("classifier", "fid"), ("strict-classifier", "strict")):
        if args.what in (what, "all"):
            if not args.export_only:
                train_classifier(train_args, recipe)
            if args.export or args.export_only:
                print(f"classifier {recipe!r} exported to {export_classifier(run_dir, recipe_name=recipe)}")
    if args.what in ("dit", "all"):
        if not args.export_only:
            train_dit(train_args)
        if args.export or args.export_only:
            print(f"DiT exported to {export_dit(args.export_from or run_dir, which=args.which)}")


if __name__ == "__main__":
    main()
