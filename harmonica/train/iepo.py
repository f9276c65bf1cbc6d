"""Image error proxy-guided objective (IEPO): how much caching at step t hurts the final image.

lambda_t weights step t's noise-prediction loss. It is refreshed every C iterations by gradient-free
generation from the current iteration's x_T (and conditioning), all-reduced over processes, and
treated as a constant.

Generation uses the router softly (the training blend, cache refreshed where w > threshold), as the
reference code does: with hard decisions most steps would give exactly zero difference early in
training, and the soft blend is what the loss trains.

* "paper":      lambda_t = E_batch ||x_0 - x_0^(t)||_F^2, x_0 generated with the current router and
                x_0^(t) with the same router but caching disabled at step t only (w_t := 1).
* "sensitivity": lambda_t = E_batch ||x_0^(t, compute) - x_0^(t, cache)||_F^2, every unit of step t
                forced to compute (w_t := 1) vs served from the cache (w_t := 0), the other steps as the
                router has them. "paper" measures only the change of un-caching step t, which is zero
                where the router already computes, so nothing keeps a computed step computed; this one
                is the step's weight whichever way the router decides it (use it with keep_threshold).
* "cumulative": the reference code's variant. R_i = generation with caching enabled (router
                weights) on steps >= i only and full compute before; R_T = no caching at all.
                lambda_i = E_batch ||R_i - R_{i+1}||_F^2, the extra image error of also caching at step i
                given that every later step caches.

Normalisation (ours): lambda is divided by its mean over steps 1..T-1, so the weights average 1 and
the scale of beta means the same as without IEPO (the raw squared errors depend on image size and
range). Step 0 never caches and gets weight 0. If every difference is zero, all weights are 1.
"""

from __future__ import annotations

import torch

from ..sampling import denoise, guided
from .context import Run
from .distributed import all_reduce_mean_
from .policies import SoftPolicy


@torch.no_grad()
def generate_soft(run: Run, x_T: torch.Tensor, cond, uncond, weights: torch.Tensor, iteration: int) -> torch.Tensor:
    """x_0 from x_T with the soft cache driven by ``weights`` (T, L, 2)."""
    soft = SoftPolicy(weights, run.config.threshold, order=run.config.forecast_order)
    with run.runtime.using(soft), run.runtime.driven_by(run.scheduler):
        return denoise(guided(run.transformer, cond, uncond, run.config.guidance_scale), run.scheduler, x_T,
                       num_inference_steps=run.num_steps, generator=run.sampler_generator(iteration),
                       progress=False)


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Frobenius distance, averaged over the batch."""
    return (a.float() - b.float()).pow(2).flatten(1).sum(1).mean()


def normalise(errors: torch.Tensor) -> torch.Tensor:
    lam = torch.zeros_like(errors)
    mean = errors[1:].mean()
    if bool(mean > 0):
        lam[1:] = errors[1:] / mean
    else:
        lam[1:] = 1.0
    return lam


@torch.no_grad()
def image_errors(run: Run, x_T: torch.Tensor, choices: torch.Tensor, iteration: int) -> torch.Tensor:
    """Un-normalised per-step image errors (T,) of this process's batch (see the module docstring)."""
    cond, uncond = run.conditioning(choices)
    base = run.router.weights().detach()
    T = run.num_steps
    errors = torch.zeros(T, device=run.device)

    def with_full(steps, weight: float = 1.0) -> torch.Tensor:
        w = base.clone()
        w[steps] = weight
        return generate_soft(run, x_T, cond, uncond, w, iteration)

    if run.config.iepo_variant == "paper":
        x0 = generate_soft(run, x_T, cond, uncond, base, iteration)
        for t in range(1, T):
            errors[t] = squared_error(x0, with_full(slice(t, t + 1)))
    elif run.config.iepo_variant == "sensitivity":
        for t in range(1, T):
            errors[t] = squared_error(with_full(slice(t, t + 1)), with_full(slice(t, t + 1), 0.0))
    else:
        later = with_full(slice(0, T))  # R_T: nothing cached
        for i in range(T - 1, 0, -1):
            current = with_full(slice(0, i))  # R_i: caching on steps >= i
            errors[i] = squared_error(current, later)
            later = current
    return errors


def refresh_lambda(run: Run, x_T: torch.Tensor, choices: torch.Tensor, iteration: int) -> torch.Tensor:
    errors = image_errors(run, x_T, choices, iteration)
    all_reduce_mean_(errors, run.world)
    return normalise(errors)
