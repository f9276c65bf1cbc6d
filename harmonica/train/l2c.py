"""Learning-to-Cache (L2C, Ma et al. 2024): the traditional training paradigm, kept as the baseline.

One update: take real data x_0, noise it to a random step k of the sampling grid (forward process),
run one FULL step at k (it fills the cache, and the sampler advances to step k+1), then compare the
teacher (full compute) with the student (soft blend reading that cache) at step k+1:
loss = MSE(teacher, student) + beta * sum(w_{k+1}). With ``forecast_order`` m the cache is filled by
m + 1 full steps, k-m..k, so the student forecasts from as much history as at inference.

The cache therefore always comes from one full step, never from earlier cached steps as at inference
("prior timestep disregard"), and the loss is per-step noise prediction, not the final image
("objective mismatch"): the two discrepancies HarmoniCa removes.

DDIM only: starting mid-run needs a sampler step that depends on nothing but (eps, t, x), which
DDIM's is; multistep solvers (DPM-Solver++) carry history from steps that never ran.
"""

from __future__ import annotations

import torch

from ..sampling import guided
from .context import Run
from .distributed import draw_int, draw_normal, seeded


def update(run: Run, iteration: int) -> dict:
    cfg = run.config
    idx = run.indices()
    data = cfg.l2c_latents
    rows = draw_int(cfg.seed, iteration, idx, data.shape[0], "data")
    x0 = data.index_select(0, rows).to(run.device, run.dtype)
    if cfg.l2c_choices is not None:
        choices = cfg.l2c_choices.index_select(0, rows)
    else:
        choices = draw_int(cfg.seed, iteration, idx, cfg.conditioning.num_choices, "choice")
    noise = draw_normal(cfg.seed, iteration, idx, tuple(x0.shape[1:]), "noise").to(run.device, run.dtype)
    # One step per update, shared by all processes (so P processes = one process with P x the batch).
    k = int(torch.randint(run.num_steps - 1, (1,), generator=seeded(cfg.seed, iteration, -1, "l2c-step")))

    cond, uncond = run.conditioning(choices)
    fn = guided(run.transformer, cond, uncond, cfg.guidance_scale, raw=True)
    scheduler, runtime = run.scheduler, run.runtime
    # The cache is filled by full steps from the noised data: one step for reuse, order + 1 steps for a
    # forecast of that order (fewer near the start, where inference has fewer computes to extrapolate).
    start = max(0, k - cfg.forecast_order)
    soft = run.soft(first_step=start)
    with runtime.using(soft), runtime.driven_by(scheduler):
        scheduler.set_timesteps(run.num_steps, device=run.device)
        runtime.clock.begin_run(driven=True, first_step=start)
        t_start, t_next = scheduler.timesteps[start], scheduler.timesteps[k + 1]
        x = scheduler.add_noise(x0, noise, t_start.reshape(1).expand(x0.shape[0]))
        soft.weights = torch.ones_like(soft.weights)  # full computes: every unit refreshes its cache
        with torch.no_grad():
            for step in range(start, k + 1):
                t = scheduler.timesteps[step]
                eps = fn(scheduler.scale_model_input(x, t), t, step)[0]
                x = scheduler.step(eps, t, x, return_dict=False)[0]
        x_in = scheduler.scale_model_input(x, t_next)
        teacher = run.teacher(fn, x_in, t_next, k + 1)
        _, mse = run.student_update(fn, soft, x_in, t_next, k + 1, teacher, 1.0)
    out = torch.zeros(run.num_steps, device=run.device)
    out[k + 1] = mse
    return {"mse": out, "step": k + 1}
