"""Step-wise denoising training (SDT), HarmoniCa's image-free training paradigm.

One iteration is one sampling run of :func:`harmonica.sampling.denoise` from x_T ~ N(0, I) with a
training model function: at every step after the first, the teacher (full compute, no cache, no
graph) and the student (soft cache blend) both see the STUDENT's current x_t; the router takes one
optimiser step on that step's loss; the student's detached output advances the trajectory. So the
cache the student reads at step t was written along the student's own earlier steps, exactly as at
inference (HarmoniCa's fix of L2C's "prior timestep disregard").

The optimiser is one AdamW over all of P, stepped once per denoising step, as in the reference code:
a step's loss only has gradient for its own row, but earlier rows keep moving with their momentum.
"""

from __future__ import annotations

import torch

from ..sampling import denoise, guided
from .context import Run


def trajectory(run: Run, iteration: int, start: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train on one trajectory; returns detached per-step MSEs (T,) (step 0 has none) for logging."""
    x_T, choices = start if start is not None else run.draw_start(iteration)
    cond, uncond = run.conditioning(choices)
    fn = guided(run.transformer, cond, uncond, run.config.guidance_scale, raw=True)
    mse = torch.zeros(run.num_steps, device=run.device)

    def train_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        if step == 0:
            # The cache is empty: everything computes, teacher and student coincide, nothing to learn.
            with torch.no_grad():
                return fn(x, t, step)[0]
        teacher = run.teacher(fn, x, t, step)
        eps, mse[step] = run.student_update(fn, soft, x, t, step, teacher, run.lam[step])
        return eps

    soft = run.soft()
    with run.runtime.using(soft), run.runtime.driven_by(run.scheduler):
        denoise(train_fn, run.scheduler, x_T, num_inference_steps=run.num_steps,
                generator=run.sampler_generator(iteration), progress=False)
    return {"mse": mse}
