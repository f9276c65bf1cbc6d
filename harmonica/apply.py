"""enable_cache / disable_cache: drop-in, reversible, atomic feature caching for diffusers transformers.

No diffusers source is edited: each block's ``forward`` is shadowed by an instance attribute that runs
the adapter's cached block forward, and the transformer's ``forward`` by one that tells the cache a
model evaluation begins. Deleting the instance attributes restores the class methods exactly.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

from torch import nn

from .adapters import find_adapter, find_blocks
from .cache import CacheState
from .schedule import ModelCost, Schedule

__all__ = ["enable_cache", "disable_cache", "get_cache_state", "set_sample_steps", "model_cost"]

_STATE_ATTR = "_harmonica_cache"


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


def block_width(transformer: nn.Module) -> int:
    return find_blocks(transformer)[0].attn1.to_q.in_features


def get_cache_state(target) -> CacheState | None:
    """The cache state of a cached pipeline/transformer (slots, step, peak_cache_bytes), or None."""
    transformer, _ = _resolve(target)
    return getattr(transformer, _STATE_ATTR, None)


def enable_cache(target, schedule: Schedule) -> CacheState:
    """Make ``target`` (a diffusers pipeline or its transformer) follow ``schedule``.

    Everything is validated before anything is patched, so on error the model is unchanged.
    Returns the :class:`~harmonica.cache.CacheState` (e.g. for ``peak_cache_bytes``).
    """
    transformer, pipe = _resolve(target)
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be a harmonica.Schedule, got {type(schedule).__name__}; "
            f"use router.to_schedule(threshold) or Schedule.load(path)"
        )
    if getattr(transformer, _STATE_ATTR, None) is not None:
        raise RuntimeError(
            f"caching is already enabled on this {type(transformer).__name__}; call harmonica.disable_cache first"
        )
    adapter = find_adapter(transformer)
    blocks = find_blocks(transformer)
    schedule.check_compatible(
        num_blocks=len(blocks), model_class=type(transformer).__name__, block_width=block_width(transformer)
    )
    for name in ("forward",):
        if name in transformer.__dict__ or any(name in b.__dict__ for b in blocks):
            raise RuntimeError(
                "the transformer or one of its blocks already has an instance-level forward (another hook?); "
                "remove it before enabling harmonica's cache"
            )

    state = CacheState(schedule)
    block_forwards = []
    for index, block in enumerate(blocks):
        cached = functools.partial(adapter.block_forward, block, index, state)
        block_forwards.append(functools.update_wrapper(cached, block.forward))

    original_forward = transformer.forward
    timestep_position = list(inspect.signature(original_forward).parameters).index("timestep")

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        else:
            timestep = args[timestep_position] if len(args) > timestep_position else None
        state.on_model_call(timestep)
        return original_forward(*args, **kwargs)

    # Nothing above touched the model; from here on nothing can fail.
    for block, cached in zip(blocks, block_forwards):
        block.forward = cached
    transformer.forward = forward
    setattr(transformer, _STATE_ATTR, state)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        state.attach(pipe.scheduler)
    return state


def disable_cache(target) -> None:
    """Undo :func:`enable_cache`: the original forwards come back and every slot is freed."""
    transformer, _ = _resolve(target)
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"caching is not enabled on this {type(transformer).__name__}; nothing to disable")
    state.detach_all()
    state.release()
    for block in find_blocks(transformer):
        del block.forward
    del transformer.forward
    delattr(transformer, _STATE_ATTR)


def set_sample_steps(target, steps: Sequence[int] | None) -> None:
    """Per-sample schedules: the next forwards run sample ``i`` at schedule step ``steps[i]``.

    For serving loops that batch requests at different steps. Each request keeps its batch row (its
    cache row) for its whole run and starts at step 0. ``None`` leaves per-sample mode.
    """
    state = get_cache_state(target)
    if state is None:
        raise RuntimeError("set_sample_steps needs caching enabled; call harmonica.enable_cache first")
    state.set_sample_steps(steps)


def model_cost(
    target, *, batch: int, height: int | None = None, width: int | None = None, text_tokens: int | None = None
) -> ModelCost:
    """FLOPs of one model evaluation, split into attn / mlp per block and the uncacheable rest.

    ``height``/``width`` are the transformer's input size (latent pixels; default: its sample_size);
    ``batch`` counts both CFG halves. Feed it to ``Schedule.theoretical_speedup``.
    """
    transformer, _ = _resolve(target)
    adapter = find_adapter(transformer)
    size = transformer.config.sample_size
    height = height or size
    width = width or size
    kwargs = {} if text_tokens is None else {"text_tokens": text_tokens}
    return adapter.model_cost(transformer, batch, height, width, **kwargs)
