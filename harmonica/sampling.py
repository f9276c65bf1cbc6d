"""The package's one sampling loop.

Everything that denoises - evaluation, the demo, router training (SDT *is* this loop with a training
model function), the benchmarks - goes through :func:`denoise`, so a schedule's step index means the
same thing everywhere: the index of the model evaluation within one run, 0 = first (noisiest).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

__all__ = ["SCHEDULERS", "make_scheduler", "scheduler_name", "guided", "denoise", "sample"]


def _scheduler_classes() -> dict[str, tuple[type, dict[str, Any]]]:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return {
        "ddim": (DDIMScheduler, {}),
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "ddpm": (DDPMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
    }


SCHEDULERS = ("ddim", "dpmsolver++", "ddpm", "euler")


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A diffusers scheduler by short name, built from a (training) scheduler config."""
    classes = _scheduler_classes()
    if name not in classes:
        raise ValueError(f"scheduler={name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = classes[name]
    return cls.from_config(dict(config), **overrides)


def scheduler_name(scheduler) -> str:
    """The short name of a scheduler instance (recorded in schedule metadata), or its class name."""
    for name, (cls, overrides) in _scheduler_classes().items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__


def _concat(a: Any, b: Any) -> Any:
    """Stack the conditional and unconditional model arguments into one batch (nested dicts too)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: _concat(a[k], b[k]) for k in a}
    if a is None and b is None:
        return None
    raise TypeError(f"cannot batch conditioning values of type {type(a).__name__} and {type(b).__name__}")


def guided(
    transformer: torch.nn.Module,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    *,
    raw: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A model function ``(x, t, step) -> eps`` with classifier-free guidance.

    The conditional and unconditional halves run as ONE batch, as in the diffusers pipelines, so a
    cached block sees the full batch and both halves share the schedule row. Learned-sigma channels
    (DiT's out_channels = 2 * in_channels) are dropped: samplers here use the fixed variance.

    ``raw=True`` makes the function return ``(eps, batched)``, where ``batched`` is the model's own
    output for the whole batch (both CFG halves, learned-sigma channels dropped) before guidance
    mixes them: router training compares teacher and student on it.
    """
    use_cfg = uncond is not None and guidance_scale != 1.0
    kwargs = _concat(dict(cond), dict(uncond)) if use_cfg else dict(cond)

    def model_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        model_in = torch.cat([x, x]) if use_cfg else x
        timestep = torch.as_tensor(t, device=x.device).expand(model_in.shape[0])
        out = transformer(model_in, timestep=timestep, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        batched = out
        if use_cfg:
            eps_cond, eps_uncond = out.chunk(2)
            out = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return (out, batched) if raw else out

    return model_fn


def denoise(
    model_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the scheduler from pure noise ``latents`` (unit variance) to x_0.

    ``model_fn(x, t, step)`` returns the noise prediction used to advance; ``step`` is the model
    evaluation index. Cached transformers follow the run through the scheduler's ``set_timesteps``
    and ``step`` calls (see :meth:`harmonica.cache.CacheRuntime.driven_by`), exactly as inside a
    diffusers pipeline.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    for step, t in enumerate(tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False)):
        eps = model_fn(scheduler.scale_model_input(x, t), t, step)
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
    return x


def sample(
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample x_0 from ``latents`` with ``transformer`` (cached or not) and classifier-free guidance.

    ``cond``/``uncond`` are the transformer's keyword arguments for the two halves, e.g.
    ``{"class_labels": labels}`` for DiT or ``{"encoder_hidden_states": e, "encoder_attention_mask": m,
    "added_cond_kwargs": {...}}`` for PixArt.
    """
    from .apply import get_cache_state

    runtime = get_cache_state(transformer)
    with torch.no_grad(), (runtime.driven_by(scheduler) if runtime is not None else nullcontext()):
        return denoise(
            guided(transformer, cond, uncond, guidance_scale),
            scheduler,
            latents,
            num_inference_steps=num_inference_steps,
            generator=generator,
            progress=progress,
        )
