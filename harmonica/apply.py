"""enable_cache / disable_cache: drop-in, reversible, atomic feature caching for diffusers transformers.

No diffusers source is edited and no other library's hooks are disturbed (see harmonica.cache.install):
each block's own forward is replaced, in the innermost place of its call chain, by the adapter's cached
block forward; torch module hooks on the transformer tell the step clock when a model call begins and
returns; the pipeline's scheduler, if given a pipeline, drives the clock.

Composition rules (tested): offloading (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``,
``enable_group_offload`` at block or leaf level), ``enable_layerwise_casting`` and ``remove_all_hooks``
work before or after ``enable_cache``, and ``disable_cache`` removes only what harmonica added. Another
diffusers cache on the same model (FasterCache, FirstBlockCache, ...) is refused. ``copy.deepcopy`` of a
cached model or pipeline gives an independent cached copy (own weights, slots and step); pickling a
cached model is refused with the way out (``state_dict``/``save_pretrained`` are unaffected).
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .adapters import find_adapter, find_blocks
from .cache import CacheRuntime, PerSamplePolicy, PerSampleSteps
from .cache.install import BlockForward, ModelCallHooks, check_block, install_block, uninstall_block
from .schedule import ModelCost, Schedule, check_sampler

__all__ = ["enable_cache", "disable_cache", "get_cache_state", "per_sample", "model_cost"]

_ATTR = "_harmonica_cache"


def _resolve(target) -> tuple[nn.Module, object | None]:
    """(transformer, pipeline or None) from a diffusers pipeline or a transformer."""
    if isinstance(target, nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, target
    raise TypeError(
        f"expected a diffusers pipeline with a `.transformer` or a transformer nn.Module, got {type(target).__name__}"
    )


class _Installation:
    """Everything enable_cache added to one transformer, so that disable_cache removes exactly that."""

    def __init__(self, runtime: CacheRuntime, blocks: list[nn.Module], hooks: ModelCallHooks, pipeline):
        self.runtime = runtime
        self.blocks = blocks
        self.hooks = hooks
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.scheduler = None  # the pipeline scheduler driving the clock

    def follow_pipeline_scheduler(self) -> None:
        """Before a model call: drive the clock by the pipeline's current scheduler (a user may swap it).

        Only looked at between driven runs, so a driven run's compiled forward never sees it."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        if pipeline is None or self.runtime.clock.driving:
            return
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None or scheduler is self.scheduler:
            return
        if self.scheduler is not None:
            self.runtime.detach(self.scheduler)
        self.runtime.attach(scheduler)  # may refuse the scheduler (check_sampler): then tried again next call
        self.scheduler = scheduler
        if not self.runtime.clock.running:
            # Its set_timesteps for this run came before the swap was seen: this call begins the run.
            # (A clock already running follows the timestep until the new scheduler's next run.)
            timesteps = getattr(scheduler, "timesteps", None)
            self.runtime.clock.begin_run(driven=True, evaluations=None if timesteps is None else len(timesteps))

    def remove(self) -> None:
        if self.scheduler is not None:
            self.runtime.detach(self.scheduler)
        self.hooks.remove()
        for block in self.blocks:
            uninstall_block(block)
        self.runtime.release()

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        pipeline = self._pipeline() if self._pipeline is not None else None
        for key, value in self.__dict__.items():
            if key != "_pipeline":
                setattr(new, key, copy.deepcopy(value, memo))
        # A pipeline being deep-copied is already in memo; a transformer copied alone has no pipeline.
        copied = memo.get(id(pipeline)) if pipeline is not None else None
        new._pipeline = weakref.ref(copied) if copied is not None else None
        return new


def get_cache_state(target) -> CacheRuntime | None:
    """The cache runtime of a cached pipeline/transformer (slots, step, ``peak_cache_bytes``), or None."""
    transformer, _ = _resolve(target)
    installation = getattr(transformer, _ATTR, None)
    return installation.runtime if installation is not None else None


def enable_cache(target, schedule: Schedule, *, calls_per_step: int = 1) -> CacheRuntime:
    """Make ``target`` (a diffusers pipeline or its transformer) follow ``schedule``.

    ``calls_per_step``: model calls per sampling step, 1 when the conditional and unconditional CFG
    halves share one batch (diffusers' pipelines, harmonica's loop), 2 for a loop that calls the model
    once per half. Everything is validated before anything is changed, so on error the model is
    unchanged. Returns the :class:`~harmonica.cache.CacheRuntime` (e.g. for ``peak_cache_bytes``).
    """
    transformer, pipe = _resolve(target)
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be a harmonica.Schedule, got {type(schedule).__name__}; "
            f"use router.to_schedule() or Schedule.load(path)"
        )
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"calls_per_step must be a positive int (1, or 2 for CFG as two calls), got {calls_per_step!r}")
    if getattr(transformer, _ATTR, None) is not None:
        raise RuntimeError(
            f"caching is already enabled on this {type(transformer).__name__}; call harmonica.disable_cache first"
        )
    adapter = find_adapter(transformer)
    facts = adapter.facts(transformer)
    schedule.check_compatible(num_blocks=facts.num_blocks, model_class=facts.model_class,
                              block_width=facts.block_width)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        check_sampler(schedule, pipe.scheduler)  # here, as attaching it below must not fail
    blocks = find_blocks(transformer)
    for block in blocks:
        check_block(block)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        for name, hook in registry.hooks.items():
            if hasattr(hook, "new_forward"):
                raise TypeError(f"{type(transformer).__name__} already has diffusers hook {name!r}, which replaces "
                                f"its forward (another cache?); disable it before enabling harmonica's cache")

    runtime = CacheRuntime(schedule, num_blocks=facts.num_blocks, calls_per_step=calls_per_step)
    cached = [BlockForward(adapter, block, index, runtime, type(block).forward.__get__(block))
              for index, block in enumerate(blocks)]
    # Nothing above touched the model; from here on nothing can fail.
    for block, forward in zip(blocks, cached):
        install_block(block, forward)
    installation = _Installation(runtime, blocks, None, pipe)  # hooks set below: they call back into it
    installation.hooks = ModelCallHooks(runtime, transformer, on_call=installation.follow_pipeline_scheduler)
    setattr(transformer, _ATTR, installation)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        installation.scheduler = pipe.scheduler
        runtime.attach(pipe.scheduler)
    return runtime


def disable_cache(target) -> None:
    """Undo :func:`enable_cache`: the blocks' own forwards come back and every slot is freed."""
    transformer, _ = _resolve(target)
    installation = getattr(transformer, _ATTR, None)
    if installation is None:
        raise RuntimeError(f"caching is not enabled on this {type(transformer).__name__}; nothing to disable")
    installation.remove()
    delattr(transformer, _ATTR)


def _runtime(target, what: str) -> CacheRuntime:
    runtime = get_cache_state(target)
    if runtime is None:
        raise RuntimeError(f"{what} needs caching enabled; call harmonica.enable_cache first")
    return runtime


@contextmanager
def per_sample(target) -> Iterator[PerSampleSteps]:
    """Per-sample schedules for serving loops that batch requests at different steps.

    Inside the block, set ``serving.steps`` (one schedule step per sample) before each model call::

        with harmonica.per_sample(transformer) as serving:
            serving.steps = [0, 3, 7]
            eps = transformer(x, timestep=t, ...)

    Each request keeps its batch row (its cache row) for its whole run and starts at step 0. Leaving
    the block frees the per-sample slots and returns to the schedule's step clock.
    """
    runtime = _runtime(target, "per_sample")
    policy = PerSamplePolicy(runtime.schedule, runtime.row_indices)
    with runtime.using(policy):
        yield PerSampleSteps(policy)


def model_cost(
    target, *, batch: int, height: int | None = None, width: int | None = None, text_tokens: int | None = None
) -> ModelCost:
    """FLOPs of one model evaluation, split into attn / mlp per block and the uncacheable rest.

    ``height``/``width`` are the transformer's input size (latent pixels; default: its sample_size);
    ``batch`` counts both CFG halves. Feed it to ``Schedule.theoretical_speedup``.
    """
    transformer, _ = _resolve(target)
    adapter = find_adapter(transformer)
    for name, value in (("batch", batch), ("height", height), ("width", width), ("text_tokens", text_tokens)):
        if value is None and name != "batch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model_cost: {name} must be a positive int, got {value!r}")
    size = transformer.config.sample_size
    return adapter.model_cost(transformer, batch, height or size, width or size, text_tokens)
