"""train_router: validation, the training loop shared by HarmoniCa and L2C, target speed, resume, output."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .. import formats
from ..adapters import ModelFacts, model_facts
from ..apply import disable_cache, enable_cache, get_cache_state, model_cost
from ..sampling import scheduler_name
from ..schedule import ModelCost, Router, Schedule, check_sampler, sampler_grid
from . import checkpoint, iepo, l2c, sdt
from .config import TrainConfig, _check_router_fits, validate
from .context import Run
from .distributed import World, broadcast_, current_world, seeded

__all__ = ["Checked", "check_training", "train_router", "training_cost"]


def training_cost(transformer, config: TrainConfig) -> ModelCost:
    """The FLOP model of one model evaluation of ``config``'s runs (CFG batch, latent size): what training
    measures speedups with. ``transformer`` may live on the meta device."""
    size = config.latent_size or model_facts(transformer).sample_size
    cfg_batch = 2 if config.guidance_scale != 1.0 else 1
    text_tokens = config.conditioning.text_tokens() if config.conditioning is not None else None
    return model_cost(transformer, batch=config.batch_size * cfg_batch, height=size, width=size,
                      text_tokens=text_tokens)


def _measure(router: Router, threshold: float, cost: ModelCost) -> tuple[float, float]:
    schedule = router.to_schedule(threshold)
    return schedule.cache_usage, schedule.theoretical_speedup(cost)


def soft_measure(router: Router, cost: ModelCost) -> tuple[float, float]:
    """CUR and theoretical speedup of the router read as probabilities (unit computes with chance w).

    This is what beta adaptation steers: it responds to every optimiser update, while the hard
    schedule at the threshold only changes once a logit crosses it - with logits starting around 0
    and moving at most lr per update, controlling on the hard CUR winds beta up for tens of
    iterations and then overshoots far past the target. The delivered schedule is still hard: the
    final threshold is chosen with Router.threshold_for so it meets the target exactly.
    """
    with torch.no_grad():
        w = router.weights().detach().double().cpu()
    attn, mlp = w.sum(dim=(0, 1)).tolist()
    return float((1 - w).mean()), cost.speedup(router.num_steps, router.num_blocks, attn, mlp)


def adapt_beta(beta: float, config: TrainConfig, cur: float, speedup: float, updates: int) -> float:
    """Lagrange-multiplier step in log space: raise beta while the router caches less than the target,
    lower it while it caches more. The step is per optimiser update, so HarmoniCa (T-1 updates per
    iteration) and L2C (one) move beta equally fast per update."""
    if config.target_cur is not None:
        error = config.target_cur - cur
    elif config.target_speedup is not None:
        error = math.log(config.target_speedup / speedup)
    else:
        return beta
    # Bounded so one far-off measurement cannot move beta by more than e per iteration.
    step = max(-1.0, min(1.0, config.beta_adapt_rate * updates * error))
    return beta * math.exp(step)


@dataclasses.dataclass
class Checked:
    """What :func:`check_training` established, for the run that follows."""

    facts: ModelFacts
    sampler: str
    latent_size: int
    cost: ModelCost
    expected: dict  # what a checkpoint of this run records about it (compared on resume)
    resumed: Optional[tuple[dict, dict]]  # (tensors, document) of the checkpoint to resume from


def check_training(transformer: torch.nn.Module, scheduler, config: TrainConfig) -> Checked:
    """Everything :func:`train_router` checks before it starts, and nothing else: the config against the
    model and sampler, the output locations, the checkpoint to resume from, an initial router's sampler.

    Reads only the model's structure, so ``transformer`` may live on the meta device (built from its
    config without weights): the command line checks a run this way before it loads any weights.
    """
    world = current_world()
    facts = model_facts(transformer)
    sampler = scheduler_name(scheduler)
    size = config.latent_size or facts.sample_size
    cost = validate(config, sampler=sampler, facts=facts, cost_fn=lambda: training_cost(transformer, config))
    if get_cache_state(transformer) is not None:
        raise RuntimeError("caching is enabled on this transformer; call harmonica.disable_cache before training")
    model_doc = {"model_class": facts.model_class, "num_blocks": facts.num_blocks, "block_width": facts.block_width,
                 "num_steps": config.num_steps}
    expected = {"model": model_doc, "sampler": sampler, "global_batch": config.batch_size * world.size,
                "config": {**config.to_json(), "world_size": world.size}}
    resumed = None
    if config.resume:
        tensors, document = checkpoint.load(config.checkpoint_dir)
        checkpoint.check_resumable(document, expected, checkpoint.path_in(config.checkpoint_dir))
        _check_router_fits(Router(tensors["logits"]), "resume", config.num_steps, facts)
        resumed = (tensors, document)
    if config.init_router is not None:
        check_sampler(config.init_router, scheduler)
    return Checked(facts, sampler, size, cost, expected, resumed)


def train_router(transformer: torch.nn.Module, scheduler, config: TrainConfig,
                 *, callback: Optional[Callable[[dict], None]] = None) -> Router:
    """Train a caching router for ``transformer`` sampled with ``scheduler`` (a diffusers scheduler).

    The DiT is frozen for the duration (requires_grad False, eval mode; both restored afterwards).
    Under torch.distributed (torchrun) each process trains on its own trajectories and the router
    gradients and IEPO lambda are averaged; only rank 0 writes checkpoints and logs.

    ``callback(info)`` is called after every iteration (and after its checkpoint) with the iteration's
    statistics; an exception it raises stops training (the checkpoint stays for ``resume=True``).
    Returns the trained :class:`~harmonica.Router`; its ``metadata`` records the config, the sampler
    and its timesteps, the final threshold (``router.to_schedule()`` uses it), achieved CUR and speedup.
    Everything is checked (:func:`check_training`) before the first model call.
    """
    started = time.perf_counter()
    world = current_world()
    checked = check_training(transformer, scheduler, config)
    facts, sampler, size, cost = checked.facts, checked.sampler, checked.latent_size, checked.cost
    expected = checked.expected
    T, L = config.num_steps, facts.num_blocks

    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    if config.init_router is not None:
        logits = config.init_router.logits.detach().float()
    else:
        logits = Router.init(T, L, std=config.init_std, generator=seeded(config.seed, -1, 0, "router-init")).logits
    # Measured (CUR, speedup, threshold_for) as it will be served: forecasts cost their multiply-adds.
    router = Router(logits.to(device), metadata={"forecast_order": config.forecast_order})
    optimizer = torch.optim.AdamW([router.logits], lr=config.learning_rate, weight_decay=config.weight_decay)
    lam = torch.ones(T, device=device)
    beta, start, previous_wall, refreshes, updates = config.beta, 0, 0.0, 0, 0
    if checked.resumed is not None:
        tensors, document = checked.resumed
        with torch.no_grad():
            router.logits.copy_(tensors["logits"].to(device))
        checkpoint.restore_optimizer(optimizer, tensors)
        lam = tensors["lambda"].to(device)
        beta, start = document["beta"], document["iteration"]
        previous_wall, refreshes, updates = document["wall_time_s"], document["lambda_refreshes"], document["updates"]
    # Identical routers on every process, whatever each loaded.
    with torch.no_grad():
        broadcast_(router.logits.data, world)

    grad_flags = [p.requires_grad for p in transformer.parameters()]
    was_training = transformer.training
    transformer.requires_grad_(False).eval()
    runtime = enable_cache(transformer, Schedule.full(T, L))
    channels = transformer.config.in_channels
    run = Run(transformer=transformer, scheduler=scheduler, runtime=runtime, router=router, optimizer=optimizer,
              config=config, world=world, latent_shape=(channels, size, size), device=device, dtype=dtype,
              beta=beta, lam=lam, updates=updates, lambda_refreshes=refreshes)
    log = _open_log(config.log_file, start if checked.resumed else None) if config.log_file and world.is_main else None
    bar = tqdm(total=config.iterations, initial=start, desc=f"train {config.method}",
               disable=not (config.progress and world.is_main))
    stats = {}
    try:
        for iteration in range(start, config.iterations):
            if config.method == "harmonica":
                start_point = run.draw_start(iteration)
                if iteration % config.iepo_refresh == 0:
                    run.lam = iepo.refresh_lambda(run, *start_point, iteration)
                    run.lambda_refreshes += 1
                out = sdt.trajectory(run, iteration, start_point)
                updates_now = T - 1
            else:
                out = l2c.update(run, iteration)
                updates_now = 1
            cur, speedup = _measure(router, config.threshold, cost)
            soft_cur, soft_speedup = soft_measure(router, cost)
            # Steer what will be delivered: the hard schedule at the threshold if it is kept, else the soft one.
            steered = (cur, speedup) if config.keep_threshold else (soft_cur, soft_speedup)
            run.beta = adapt_beta(run.beta, config, *steered, updates_now)
            # The one host read of the loss per iteration (logging); the hot loop never syncs for it.
            mse = out["mse"]
            loss = float((run.lam * mse).sum() / (mse != 0).sum().clamp(min=1))
            stats = {"iteration": iteration + 1, "loss": loss, "cur": cur, "speedup": speedup, "soft_cur": soft_cur,
                     "soft_speedup": soft_speedup, "beta": run.beta,
                     "lambda_refreshes": run.lambda_refreshes, "updates": run.updates,
                     "wall_time_s": previous_wall + time.perf_counter() - started}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}", CUR=f"{cur:.3f}", beta=f"{run.beta:.3g}", lam=run.lambda_refreshes)
            if log is not None:
                log.write(json.dumps(stats) + "\n")
                log.flush()
            last = iteration + 1 == config.iterations
            every = config.checkpoint_every
            if config.checkpoint_dir and world.is_main and (last or (every and (iteration + 1) % every == 0)):
                checkpoint.save(config.checkpoint_dir, logits=router.logits, optimizer=optimizer, lam=run.lam,
                                document={**expected, "iteration": iteration + 1, "beta": run.beta,
                                          "lambda_refreshes": run.lambda_refreshes, "updates": run.updates,
                                          "wall_time_s": stats["wall_time_s"]})
            if callback is not None:
                callback(dict(stats))
    finally:
        bar.close()
        if log is not None:
            log.close()
        disable_cache(transformer)
        for p, flag in zip(transformer.parameters(), grad_flags):
            p.requires_grad_(flag)
        transformer.train(was_training)

    return _finish(router, run, config, cost, sampler, facts, world,
                   wall=previous_wall + time.perf_counter() - started)


def _open_log(path, resumed_at: Optional[int]):
    """The training log, open for appending. A new run starts it afresh. A resumed run keeps one line
    per iteration its checkpoint includes (1..resumed_at) and drops the later ones, which it is about
    to run again (they were logged after the last checkpoint, before the interruption)."""
    kept: dict[int, str] = {}
    if resumed_at is not None and os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    iteration = json.loads(line)["iteration"]
                except (ValueError, KeyError, TypeError):  # e.g. a line cut short by the interruption
                    continue
                if isinstance(iteration, int) and 1 <= iteration <= resumed_at:
                    kept[iteration] = line.rstrip("\n") + "\n"
    formats.write_text(path, "".join(kept[i] for i in sorted(kept)), "TrainConfig.log_file:")
    return open(path, "a")


def _finish(router: Router, run: Run, config: TrainConfig, cost: ModelCost, sampler: str, facts,
            world: World, wall: float) -> Router:
    if config.target_speedup is not None:
        threshold = router.threshold_for(target_speedup=config.target_speedup, cost=cost)
    elif config.target_cur is not None:
        threshold = router.threshold_for(target_cur=config.target_cur)
    else:
        threshold = config.threshold
    if config.keep_threshold:  # lower only: add computes to meet the target, never make longer gaps
        threshold = min(threshold, config.threshold)
    cur, speedup = _measure(router, threshold, cost)
    return Router(router.logits.detach().cpu(), metadata={
        "method": config.method,
        "sampler": sampler,
        # The grid the router learned on; check_sampler refuses a scheduler that evaluates other timesteps.
        "timesteps": sampler_grid(run.scheduler, config.num_steps),
        "model_class": facts.model_class,
        "block_width": facts.block_width,
        "threshold": threshold,
        "forecast_order": config.forecast_order,
        "achieved_cur": cur,
        "theoretical_speedup": speedup,
        "guidance_scale": config.guidance_scale,
        "beta_final": run.beta,
        "lambda": run.lam.detach().cpu().tolist() if config.method == "harmonica" else None,
        "optimizer_updates": run.updates,
        "world_size": world.size,
        "wall_time_s": wall,
        "train_config": config.to_json(),
    })
