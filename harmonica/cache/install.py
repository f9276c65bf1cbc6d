"""Where harmonica sits in a module's call chain, so that it composes with diffusers' and accelerate's hooks.

A cached block *replaces* the block's own computation. Offloading (accelerate's CPU offload, diffusers'
group offloading) and layerwise casting wrap a module's forward to move or cast weights around it, and
those wrappers must keep running around the cached computation in whatever order they and the cache
were enabled. So the cached block forward takes the innermost place: exactly where the block's own
class ``forward`` is called from, found by following the chain of wrappers:

* no instance-level ``forward``: the class method is called directly, so the cached forward becomes the
  instance attribute;
* a diffusers ``HookRegistry`` wrapper: the innermost callable is held by the registry's first
  function reference (diffusers relinks those references when any of its hooks is removed);
* an accelerate hook wrapper: the inner callable is ``module._old_forward``, which accelerate looks up at
  every call (and makes the instance ``forward`` again when its hook is removed).

Registering through ``HookRegistry.register_hook`` would place a forward-replacing hook *outermost*, where
it would bypass a block-level offload hook registered before it (the weights would never be onloaded).

The transformer itself only needs to know that a model call begins and ends: torch's own module
hooks do that without touching ``forward`` at all, so nothing any other library installs can move them.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

__all__ = ["BlockForward", "ModelCallHooks", "install_block", "uninstall_block", "foreign_wrapper"]

_MAX_CHAIN = 32


class BlockForward:
    """The cached forward of one block: ``adapter.block_forward(block, index, runtime, ...)``."""

    def __init__(self, adapter, block: nn.Module, index: int, runtime, original):
        self.adapter = adapter
        self.block = block
        self.index = index
        self.runtime = runtime
        self.original = original  # the block's own bound forward, put back by uninstall_block
        functools.update_wrapper(self, original)  # inspect.signature and friends see the real signature

    def __call__(self, hidden_states, *args, **kwargs):
        from ..adapters import BlockArgs

        return self.adapter.block_forward(self.block, self.index, self.runtime, hidden_states, BlockArgs(*args, **kwargs))


def _own_forward(module: nn.Module, fn) -> bool:
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def _kind(fn) -> str | None:
    inner = fn.func if isinstance(fn, functools.partial) else None
    origin = getattr(inner, "__module__", "") or ""
    if origin.startswith("diffusers.hooks"):
        return "diffusers"
    if origin.startswith("accelerate"):
        return "accelerate"
    return None


def _innermost(module: nn.Module) -> tuple[object, str, object]:
    """(holder, attribute, value): where ``module``'s own forward (or harmonica's in its place) is called from.

    Raises TypeError naming the wrapper when the chain holds a wrapper harmonica cannot see through.
    """
    if "forward" not in module.__dict__:
        return module, "forward", None
    holder, attr = module, "forward"
    for _ in range(_MAX_CHAIN):
        fn = getattr(holder, attr)
        if _own_forward(module, fn) or isinstance(fn, BlockForward):
            return holder, attr, fn
        kind = _kind(fn)
        if kind == "diffusers" and getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook._fn_refs:
            first = module._diffusers_hook._fn_refs[0]
            holder, attr = first, ("original_forward" if first.original_forward is not None else "forward")
        elif kind == "accelerate" and "_old_forward" in module.__dict__:
            holder, attr = module, "_old_forward"
        else:
            raise TypeError(foreign_wrapper(module, fn))
    raise TypeError(foreign_wrapper(module, getattr(holder, attr)))


def foreign_wrapper(module: nn.Module, fn) -> str:
    return (
        f"{type(module).__name__}.forward is wrapped by {getattr(fn, '__qualname__', type(fn).__name__)}, which harmonica "
        f"cannot compose with (it composes with diffusers' hooks and accelerate's offloading); remove that wrapper "
        f"before enabling the cache"
    )


def check_block(module: nn.Module) -> None:
    """Raise (before anything changes) if the cache cannot be installed in ``module``'s call chain."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        for name, hook in registry.hooks.items():
            if hasattr(hook, "new_forward"):
                raise TypeError(
                    f"{type(module).__name__} already has diffusers hook {name!r}, which replaces the block's "
                    f"computation (another cache?); disable it before enabling harmonica's cache"
                )
    _innermost(module)


def install_block(module: nn.Module, cached: BlockForward) -> None:
    holder, attr, _ = _innermost(module)
    setattr(holder, attr, cached)


def uninstall_block(module: nn.Module) -> None:
    """Put the block's own forward back where the cached one is now (it may have moved outwards when
    other hooks were removed), or do nothing when someone else already took it out of the chain."""
    try:
        holder, attr, fn = _innermost(module)
    except TypeError:
        return
    if not isinstance(fn, BlockForward):
        return
    if holder is module and attr == "forward":
        del module.forward  # the class method again, exactly as before
    else:
        setattr(holder, attr, fn.original)


class ModelCallHooks:
    """torch forward (pre-)hooks on the transformer telling the runtime that a model call begins / returned."""

    def __init__(self, runtime, transformer: nn.Module, on_call=None):
        self.runtime = runtime
        self.on_call = on_call  # extra check before the clock (the pipeline's current scheduler)
        names = list(inspect.signature(type(transformer).forward).parameters)
        self._timestep_index = names.index("timestep") - 1 if "timestep" in names else None  # minus self
        self._handles = [
            transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            transformer.register_forward_hook(self._after),
        ]

    def _before(self, module, args, kwargs):
        timestep = kwargs.get("timestep")
        if timestep is None and self._timestep_index is not None and len(args) > self._timestep_index:
            timestep = args[self._timestep_index]
        if self.on_call is not None:
            self.on_call()
        self.runtime.before_model_call(timestep)
        return None

    def _after(self, module, args, output):
        self.runtime.after_model_call()
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its own forward (offload, casting or other hooks): then
    it must be called as a module, never bypassed by using its weights directly."""
    fn = module.__dict__.get("forward")
    if (fn is not None and not _own_forward(module, fn)) or module._forward_pre_hooks or module._forward_hooks:
        return True
    return bool(torch.nn.modules.module._global_forward_pre_hooks or torch.nn.modules.module._global_forward_hooks)
