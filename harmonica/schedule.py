"""Caching plans: the boolean `Schedule`, the trainable `Router` that produces one, and `ModelCost`.

A plan is a bool tensor of shape (T, L, 2): T model evaluations per sampling run (step 0 = first,
noisiest), L transformer blocks, 2 cacheable branches per block (index 0 = attn, 1 = mlp).
True = compute the branch and refresh its cache slot, False = reuse the slot. Step 0 always computes
everything because the cache is empty then.

Files are safetensors (no pickle): one tensor plus a JSON document stored under the "harmonica" key
of the safetensors header metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from typing import Any, Mapping, Optional

import torch

from . import formats

__all__ = ["BRANCHES", "DEFAULT_THRESHOLD", "ModelCost", "Router", "Schedule", "check_sampler", "load_plan", "sampler_grid"]

BRANCHES = ("attn", "mlp")

# The one default: compute a unit iff its router weight exceeds this (the reference code's tau).
# Routers record the threshold they were trained to, and Router.to_schedule() uses that one.
DEFAULT_THRESHOLD = 0.1
# Written by save() from the tensor itself; user metadata may not shadow them.
_STRUCTURAL_KEYS = frozenset({"format_version", "kind", "num_steps", "num_blocks", "cache_usage"})
# Present (possibly None) in every metadata dict, so consumers can index them without .get().
_SCHEDULE_KEYS = ("model_class", "block_width", "sampler", "threshold")
_ROUTER_KEYS = ("model_class", "block_width", "sampler")


# ----------------------------------------------------------------------------------------------
# validation helpers


def _positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; Schedule.full(True, 3) is a bug, not a request for one step.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _normalized_metadata(metadata: Optional[Mapping[str, Any]], required: tuple, owner: str) -> dict:
    """A JSON-normalised deep copy, so what save() writes is exactly what load() gives back."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    reserved = sorted(_STRUCTURAL_KEYS.intersection(metadata))
    if reserved:
        raise ValueError(
            f"metadata keys {reserved} are reserved: {owner}.save() derives them from the tensor; "
            f"remove them from metadata"
        )
    try:
        normalized = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{owner} metadata must be JSON-serialisable (str, int, finite float, bool, None, list, "
            f"dict with str keys) because it is stored as JSON in the file header; got: {e}"
        ) from e
    for key in required:
        normalized.setdefault(key, None)
    return normalized


# ----------------------------------------------------------------------------------------------
# file format (harmonica.formats), shared by Schedule and Router


def _read(path, kind: str, tensor_name: str, loader: str, optional: tuple[str, ...] = ()):
    """(tensors, document) after the checks common to both kinds: the main tensor (and any of the
    ``optional`` ones), each of the (num_steps, num_blocks, 2) shape the header records."""
    tensors, document = formats.read(path, kind, loader=loader)

    def fail(problem: str) -> ValueError:
        return _file_error(kind, path, problem)

    for key in ("num_steps", "num_blocks"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(f"{key} must be a positive int, got {value!r}")
    names = sorted(tensors)
    if tensor_name not in tensors or not set(names) <= {tensor_name, *optional}:
        expected = " (and optionally " + ", ".join(map(repr, optional)) + ")" if optional else ""
        raise fail(f"expected a tensor named {tensor_name!r}{expected}, found {names}")
    expected_shape = (document["num_steps"], document["num_blocks"], 2)
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected_shape:
            raise fail(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the header records "
                f"num_steps={expected_shape[0]}, num_blocks={expected_shape[1]}, i.e. shape {expected_shape}"
            )
    return tensors, document


def _file_error(kind: str, path, problem: str) -> ValueError:
    return formats.FileFormatError(f"cannot load {kind} from {os.fspath(path)}: {problem}")


def _user_metadata(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in _STRUCTURAL_KEYS}


# ----------------------------------------------------------------------------------------------


def check_fits(
    plan,
    what: str,
    *,
    num_steps: Optional[int] = None,
    num_blocks: Optional[int] = None,
    model_class: Optional[str] = None,
    block_width: Optional[int] = None,
) -> None:
    """The one compatibility check of a Schedule or Router (``plan``) against a model and sampler.

    Raises ValueError listing every mismatch, each with its fix. Arguments left None are not checked;
    model_class and block_width also pass when ``plan`` does not record them (hand-made plans).
    """
    problems = []
    if num_steps is not None and num_steps != plan.num_steps:
        problems.append(
            f"{what} has {plan.num_steps} steps but the sampler runs {num_steps}; pass "
            f"num_inference_steps={plan.num_steps} or use a {what} made for {num_steps} steps "
            f"(e.g. train a router with num_steps={num_steps})"
        )
    if num_blocks is not None and num_blocks != plan.num_blocks:
        problems.append(
            f"{what} has {plan.num_blocks} blocks but the model has {num_blocks}; "
            f"use a {what} made for a {num_blocks}-block model"
        )
    recorded_class = plan.metadata.get("model_class")
    if model_class is not None and recorded_class is not None and model_class != recorded_class:
        problems.append(f"{what} was made for {recorded_class} but the model is {model_class}; "
                        f"use a {what} trained on {model_class}")
    recorded_width = plan.metadata.get("block_width")
    if block_width is not None and recorded_width is not None and block_width != recorded_width:
        problems.append(f"{what} was made for blocks of width {recorded_width} but the model's width is "
                        f"{block_width}; use a {what} trained on this model")
    if problems:
        raise ValueError(f"incompatible {what}: " + "; ".join(problems))


class _Plan:
    """What Schedule and Router share: a (num_steps, num_blocks) plan checked against a model."""

    __slots__ = ()
    _what = "plan"

    def check_compatible(
        self,
        *,
        num_blocks: Optional[int] = None,
        model_class: Optional[str] = None,
        block_width: Optional[int] = None,
        num_steps: Optional[int] = None,
    ) -> None:
        """Raise ValueError listing every mismatch with the model/sampler about to use this plan.

        Arguments left None are not checked; model_class and block_width are also skipped when the
        plan does not record them (hand-made masks, baselines).
        """
        check_fits(self, self._what, num_steps=num_steps, num_blocks=num_blocks, model_class=model_class,
                   block_width=block_width)


def sampler_grid(scheduler, num_steps: int) -> Optional[list[float]]:
    """The timesteps at which ``scheduler`` evaluates the model in a run of ``num_steps`` steps.

    Computed on a fresh scheduler built from ``scheduler.config``, so the caller's scheduler (maybe in
    the middle of a run) is not touched. None for a scheduler that cannot be rebuilt from its config.
    """
    try:
        # A side computation: what the scheduler would warn about here is not the caller's business.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(scheduler).from_config(scheduler.config)
            fresh.set_timesteps(num_steps)
        return [float(t) for t in fresh.timesteps.tolist()]
    except (AttributeError, TypeError, ValueError):
        return None


def check_sampler(plan, scheduler) -> None:
    """Whether ``plan`` (a Schedule or Router) was made for the sampler ``scheduler`` runs.

    A plan learned on one sampler chose which steps to cache at that sampler's noise levels. When its
    metadata records the timesteps it was trained at (``timesteps``, written by training) and
    ``scheduler`` evaluates the model at others, this raises ValueError; when only the sampler family
    (``sampler``) differs, it warns, once per plan and family. Plans that record neither (baselines,
    hand-made masks) pass silently.
    """
    from .sampling import scheduler_name

    metadata = plan.metadata
    recorded, grid = metadata.get("sampler"), metadata.get("timesteps")
    if recorded is None and grid is None:
        return
    what = "router" if isinstance(plan, Router) else "schedule"
    name = scheduler_name(scheduler)
    if grid is not None:
        if not isinstance(grid, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in grid):
            raise ValueError(f"{what} metadata 'timesteps' must be a list of numbers, got {grid!r}")
        current = sampler_grid(scheduler, plan.num_steps)
        same = current is not None and len(current) == len(grid) and all(
            abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(current, grid))
        if current is not None and not same:
            raise ValueError(
                f"{what} was trained at the timesteps of {recorded or 'another sampler'} ({_brief(grid)}) but "
                f"{name} with {plan.num_steps} steps evaluates the model at {_brief(current)}; train a {what} for "
                f"this scheduler, or to use it anyway drop its training record: harmonica.Schedule(schedule.mask)"
            )
    if recorded is not None and name != recorded:
        if name not in plan._warned_samplers:
            plan._warned_samplers.add(name)
            warnings.warn(
                f"this {what} was trained for the {recorded} sampler but runs with {name}: the steps it caches were "
                f"chosen at {recorded}'s noise levels, so image quality may suffer; train a {what} for {name}",
                UserWarning, stacklevel=3,
            )


def _brief(grid: list) -> str:
    shown = ", ".join(f"{t:g}" for t in grid[:4])
    return f"{len(grid)} timesteps {shown}{', ...' if len(grid) > 4 else ''}"


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """FLOPs of one model evaluation, split into what caching can and cannot skip.

    attn:  one block's attention branch (including its norm and adaLN modulation)
    mlp:   one block's MLP branch (including its norm and modulation)
    fixed: spent every evaluation regardless of caching (embeddings, final layer, PixArt
           cross-attention, gated residual adds)
    All blocks are assumed to cost the same, which holds for DiT and PixArt.
    """

    attn: float
    mlp: float
    fixed: float
    unit_elements: float = 0.0  # elements of one branch output (batch x tokens x width): forecasts cost per element

    def __post_init__(self):
        for name in ("attn", "mlp", "fixed", "unit_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"ModelCost.{name} must be a finite number >= 0, got {value!r}")
        if self.attn + self.mlp + self.fixed <= 0:
            raise ValueError("ModelCost must have a positive total (attn + mlp + fixed), got all zeros")

    def speedup(self, num_steps: int, num_blocks: int, attn_computes: float, mlp_computes: float,
                forecast_terms: float = 0.0) -> float:
        """FLOPs of ``num_steps`` uncached evaluations over those of a run in which the attn and mlp
        branches compute ``attn_computes`` and ``mlp_computes`` times in all (over every step and block),
        and forecasts add ``forecast_terms`` multiply-adds per element of a branch output (an order-m
        forecast m, an update keeping order k, k).

        The one speedup arithmetic of the package: hard schedules pass their counts, router training
        its expected counts (the sums of the weights).
        """
        full = num_steps * (self.fixed + num_blocks * (self.attn + self.mlp))
        spent = (num_steps * self.fixed + attn_computes * self.attn + mlp_computes * self.mlp
                 + 2.0 * forecast_terms * self.unit_elements)
        return full / spent


class Schedule(_Plan):
    """An immutable caching plan: bool (T, L, 2), True = compute and refresh the cache, False = serve
    the unit from the cache, by reuse (order 0) or by a forecast of the order ``orders`` gives.

    A forecast of order m extrapolates the unit's last m + 1 computed outputs (Newton's divided
    differences over their positions, see :mod:`harmonica.cache.forecast`); the positions are the step
    indices unless ``metadata["coords"]`` gives one number per step (e.g. the timesteps).
    """

    # _warned_samplers: the sampler families check_sampler has warned about for this schedule.
    __slots__ = ("_mask", "_orders", "_metadata", "_warned_samplers")
    _what = "schedule"

    def __init__(self, mask: torch.Tensor, *, orders: Optional[torch.Tensor] = None,
                 metadata: Optional[Mapping[str, Any]] = None):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor of dtype bool and shape (T, L, 2), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"mask must have dtype torch.bool (True = compute), got {mask.dtype}; convert with mask.bool() "
                f"or, from router weights, use Router.to_schedule(threshold)"
            )
        if mask.dim() != 3 or mask.shape[2] != 2:
            raise ValueError(
                f"mask must have shape (num_steps, num_blocks, 2) with last dim 0 = attn, 1 = mlp, "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.shape[0] < 1 or mask.shape[1] < 1:
            raise ValueError(f"mask needs at least one step and one block, got shape {tuple(mask.shape)}")
        mask = mask.detach().to("cpu", copy=True).contiguous()
        if not bool(mask[0].all()):
            missing = int((~mask[0]).sum())
            raise ValueError(
                f"mask[0] (the first, noisiest step) must be all True because the cache is still empty, "
                f"but {missing} of its {mask[0].numel()} units are False; set mask[0] = True"
            )
        self._mask = mask
        self._orders = _checked_orders(orders, mask)
        self._metadata = _normalized_metadata(metadata, _SCHEDULE_KEYS, "Schedule")
        _check_coords(self._metadata.get("coords"), mask.shape[0])
        self._warned_samplers: set[str] = set()

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def full(cls, num_steps: int, num_blocks: int) -> "Schedule":
        """Compute everything: the uncached model."""
        _positive_int("num_steps", num_steps)
        _positive_int("num_blocks", num_blocks)
        return cls(torch.ones(num_steps, num_blocks, 2, dtype=torch.bool), metadata={"method": "full"})

    @classmethod
    def fora(cls, num_steps: int, num_blocks: int, interval: int = 2) -> "Schedule":
        """FORA: compute every unit at steps t % interval == 0, reuse every unit otherwise."""
        _positive_int("num_steps", num_steps)
        _positive_int("num_blocks", num_blocks)
        _positive_int("interval", interval)
        refresh = torch.arange(num_steps) % interval == 0
        mask = refresh[:, None, None].expand(num_steps, num_blocks, 2)
        return cls(mask, metadata={"method": "fora", "interval": interval})

    @classmethod
    def taylorseer(cls, num_steps: int, num_blocks: int, interval: int = 4, order: int = 1, *, warmup: int = 1,
                   tail: int = 0) -> "Schedule":
        """TaylorSeer's static schedule (Liu et al., ICCV 2025): compute every unit at steps
        t % interval == 0, at the first ``warmup`` steps and the last ``tail`` steps, and forecast every
        unit in between from its last ``order`` + 1 computes (order 0 = FORA's reuse).

        The forecast is harmonica's (Newton's interpolating polynomial, harmonica.cache.forecast): the
        same as TaylorSeer's finite-difference Taylor rule at order 1, the exact polynomial through the
        computes (rather than TaylorSeer's truncated series) from order 2 on."""
        for name, value in (("num_steps", num_steps), ("num_blocks", num_blocks), ("interval", interval)):
            _positive_int(name, value)
        for name, value, high in (("order", order, MAX_ORDER), ("warmup", warmup, num_steps), ("tail", tail, num_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ValueError(f"{name} must be an int in [0, {high}], got {value!r}")
        t = torch.arange(num_steps)
        refresh = (t % interval == 0) | (t < warmup) | (t >= num_steps - tail)
        mask = refresh[:, None, None].expand(num_steps, num_blocks, 2)
        orders = torch.full((num_steps, num_blocks, 2), order, dtype=torch.long)
        return cls(mask, orders=orders, metadata={"method": "taylorseer", "interval": interval, "order": order,
                                                  "warmup": warmup, "tail": tail})

    @classmethod
    def delta_dit(
        cls,
        num_steps: int,
        num_blocks: int,
        *,
        num_cached_blocks: Optional[int] = None,
        boundary_step: Optional[int] = None,
        interval: int = 2,
    ) -> "Schedule":
        """Delta-DiT's stage-adaptive baseline.

        Every `interval` steps (t % interval == 0) everything is computed. On the other steps, both
        branches of `num_cached_blocks` blocks are reused: the REAR ones while t < boundary_step (early
        steps shape the outline, which the front blocks produce) and the FRONT ones afterwards (late
        steps refine detail, produced by the rear blocks).

        Delta-DiT has no public code, so the defaults are ours: half the blocks (num_blocks // 2) and
        the boundary in the middle of the run (num_steps // 2), which with interval 2 gives CUR near
        25%, half of FORA's.
        """
        _positive_int("num_steps", num_steps)
        _positive_int("num_blocks", num_blocks)
        _positive_int("interval", interval)
        if num_cached_blocks is None:
            num_cached_blocks = num_blocks // 2
        if boundary_step is None:
            boundary_step = num_steps // 2
        if isinstance(num_cached_blocks, bool) or not isinstance(num_cached_blocks, int) or not 0 <= num_cached_blocks <= num_blocks:
            raise ValueError(f"num_cached_blocks must be an int in [0, num_blocks={num_blocks}], got {num_cached_blocks!r}")
        if isinstance(boundary_step, bool) or not isinstance(boundary_step, int) or not 0 <= boundary_step <= num_steps:
            raise ValueError(f"boundary_step must be an int in [0, num_steps={num_steps}], got {boundary_step!r}")

        steps = torch.arange(num_steps)[:, None]
        blocks = torch.arange(num_blocks)[None, :]
        rear = blocks >= num_blocks - num_cached_blocks
        front = blocks < num_cached_blocks
        reused = torch.where(steps < boundary_step, rear, front) & (steps % interval != 0)
        mask = (~reused)[:, :, None].expand(num_steps, num_blocks, 2)
        return cls(
            mask,
            metadata={
                "method": "delta_dit",
                "num_cached_blocks": num_cached_blocks,
                "boundary_step": boundary_step,
                "interval": interval,
            },
        )

    @classmethod
    def from_router(cls, router: "Router", threshold: Optional[float] = None) -> "Schedule":
        """``router.to_schedule(threshold)``: by default at the threshold the router was trained to."""
        return router.to_schedule(threshold)

    # -- accessors ------------------------------------------------------------------------------

    @property
    def mask(self) -> torch.Tensor:
        # A copy, so a caller writing into it cannot corrupt a schedule that enable_cache holds.
        return self._mask.clone()

    @property
    def orders(self) -> torch.Tensor:
        """int64 (T, L, 2): the forecast order of each unit served from the cache (0 = reuse), 0 where computed."""
        return self._orders.clone()

    @property
    def max_order(self) -> int:
        return int(self._orders.max())

    @property
    def coords(self) -> list[float]:
        """The position of each step that forecasts extrapolate in: ``metadata["coords"]`` or the step index."""
        coords = self._metadata.get("coords")
        return [float(c) for c in coords] if coords is not None else [float(t) for t in range(self.num_steps)]

    @property
    def metadata(self) -> dict:
        return copy.deepcopy(self._metadata)

    @property
    def num_steps(self) -> int:
        return self._mask.shape[0]

    @property
    def num_blocks(self) -> int:
        return self._mask.shape[1]

    # -- statistics -----------------------------------------------------------------------------

    @property
    def cache_usage(self) -> float:
        """CUR: fraction of (step, unit) pairs served from cache, over all T steps and L*2 units."""
        total = self._mask.numel()
        return (total - int(self._mask.sum())) / total

    def computed_per_step(self) -> torch.Tensor:
        """int64 (T, 2): how many blocks compute their [attn, mlp] branch at each step."""
        return self._mask.sum(dim=1)

    def computed_per_block(self) -> torch.Tensor:
        """int64 (L, 2): at how many steps each block computes its [attn, mlp] branch."""
        return self._mask.sum(dim=0)

    def theoretical_speedup(self, cost: ModelCost) -> float:
        """FLOPs of the uncached run divided by FLOPs of this schedule's run."""
        if not isinstance(cost, ModelCost):
            raise TypeError(f"cost must be a harmonica ModelCost, got {type(cost).__name__}")
        attn, mlp = self._mask.sum(dim=(0, 1)).tolist()
        return cost.speedup(self.num_steps, self.num_blocks, attn, mlp, self.forecast_terms())

    def peak_cache_slots(self) -> int:
        """The most slots alive at once in a run, each one branch output (batch x tokens x width): times
        its bytes, the ``peak_cache_bytes`` a run will report. Forecast tables count order + 1 slots."""
        from .cache.policies import PlanPolicy

        return PlanPolicy(self).peak_slots()

    def forecast_terms(self) -> int:
        """Multiply-adds per output element that forecasting adds over the run: each order-m forecast m,
        each compute that refreshes an order-k table k (the plan of harmonica.cache.forecast, orders
        capped by history). 0 for reuse."""
        if self.max_order == 0:
            return 0
        from .cache.forecast import Forecast, Update, unit_plan

        mask, orders, coords = self._mask.tolist(), self._orders.tolist(), self.coords
        terms = 0
        for l in range(self.num_blocks):
            for b in range(2):
                for action in unit_plan([m[l][b] for m in mask], [o[l][b] for o in orders], coords):
                    if isinstance(action, Forecast):
                        terms += len(action.coeffs) - 1
                    elif isinstance(action, Update):
                        terms += action.keep
        return terms

    # -- compatibility ---------------------------------------------------------------------------

    # -- I/O ------------------------------------------------------------------------------------

    def save(self, path) -> None:
        document = {
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "cache_usage": self.cache_usage,
            **self._metadata,
        }
        tensors = {"mask": self._mask.to(torch.uint8)}
        if self.max_order > 0:
            tensors["order"] = self._orders.to(torch.uint8)
        formats.write(path, "schedule", tensors, document)

    @classmethod
    def load(cls, path) -> "Schedule":
        tensors, document = _read(path, "schedule", "mask", "Schedule.load", optional=("order",))
        tensor = tensors["mask"]

        def fail(problem: str) -> ValueError:
            return _file_error("schedule", path, problem)

        if tensor.dtype != torch.uint8:
            raise fail(f"tensor 'mask' must be uint8 (0 = reuse, 1 = compute), got {tensor.dtype}")
        if bool(((tensor != 0) & (tensor != 1)).any()):
            raise fail(f"tensor 'mask' must hold only 0 and 1, found values {sorted(set(tensor.unique().tolist()))}")
        mask = tensor.bool()
        if not bool(mask[0].all()):
            raise fail("step 0 of the mask is not all 1 (compute), but the cache is empty at step 0")
        recorded = document.get("cache_usage")
        if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0 <= recorded <= 1:
            raise fail(f"header cache_usage must be a number in [0, 1], got {recorded!r}")
        orders = tensors.get("order")
        if orders is not None and orders.dtype != torch.uint8:
            raise fail(f"tensor 'order' must be uint8 (forecast order per unit), got {orders.dtype}")
        try:
            schedule = cls(mask, orders=None if orders is None else orders.long(), metadata=_user_metadata(document))
        except ValueError as e:
            raise fail(str(e)) from None
        # Half a unit of tolerance: any real disagreement is at least one (step, unit) pair.
        if abs(recorded - schedule.cache_usage) > 0.5 / mask.numel():
            raise fail(
                f"header records cache_usage {recorded} but the mask has {schedule.cache_usage}; "
                f"the file was modified or corrupted"
            )
        return schedule

    # -- dunder ---------------------------------------------------------------------------------

    def __eq__(self, other):
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self._mask.shape == other._mask.shape and torch.equal(self._mask, other._mask)
                and torch.equal(self._orders, other._orders) and self.coords == other.coords)

    def __hash__(self):
        return hash((tuple(self._mask.shape), self._mask.numpy().tobytes(), self._orders.numpy().tobytes()))

    def __repr__(self):
        return f"Schedule(T={self.num_steps}, L={self.num_blocks}, CUR={self.cache_usage:.2%})"


class Router(_Plan, torch.nn.Module):
    """Learned static schedule: logits (T, L, 2), weight = sigmoid(logits), compute iff weight > threshold.

    Row 0 (the first step) always computes: weights() pins it to exactly 1.0, so its logits get zero
    gradient and are never trained; their stored values are irrelevant. The reference code instead
    stores 5.0 there; pinning in weights() keeps the invariant without relying on what the logits hold.
    """

    _what = "router"

    def __init__(self, logits: torch.Tensor, *, metadata: Optional[Mapping[str, Any]] = None):
        super().__init__()
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise ValueError(
                f"logits must be a floating-point torch.Tensor of shape (num_steps, num_blocks, 2), got "
                f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}; "
                f"use Router.init(num_steps, num_blocks) for a fresh router"
            )
        if logits.dim() != 3 or logits.shape[2] != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
            raise ValueError(
                f"logits must have shape (num_steps >= 1, num_blocks >= 1, 2), got shape {tuple(logits.shape)}"
            )
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits must be finite; got NaN or infinite values (a diverged training run?)")
        self.logits = torch.nn.Parameter(logits.detach().clone())
        # Mutable on purpose: training records its config and achieved CUR/speedup here.
        self.metadata = _normalized_metadata(metadata, _ROUTER_KEYS, "Router")
        self._warned_samplers: set[str] = set()  # sampler families check_sampler has warned about

    @classmethod
    def init(
        cls,
        num_steps: int,
        num_blocks: int,
        *,
        std: float = 1.0,
        generator: Optional[torch.Generator] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> "Router":
        """Logits ~ N(0, std^2), the reference code's initialisation."""
        _positive_int("num_steps", num_steps)
        _positive_int("num_blocks", num_blocks)
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        logits = torch.randn(num_steps, num_blocks, 2, generator=generator) * std
        return cls(logits, metadata=metadata)

    @classmethod
    def from_schedule(cls, schedule: Schedule, *, confidence: float = 3.0) -> "Router":
        """A router that starts as ``schedule`` (e.g. ``Schedule.taylorseer(T, L, 3, order=2)``): logit
        +confidence where it computes, -confidence where it serves from the cache, so at any threshold
        in (sigmoid(-confidence), sigmoid(confidence)) its schedule is ``schedule``. Training then moves
        single units from a known-good plan instead of from noise. The skipped units must all be served
        the same way (one forecast order: a router has one); step positions must be the step indices."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a harmonica Schedule, got {type(schedule).__name__}")
        if not (isinstance(confidence, (int, float)) and math.isfinite(confidence) and confidence > 0):
            raise ValueError(f"confidence must be a finite number > 0, got {confidence!r}")
        skipped = schedule.orders[~schedule.mask]
        if skipped.numel() and bool((skipped != skipped[0]).any()):
            raise ValueError(f"schedule serves its skipped units with orders {sorted(set(skipped.tolist()))}; a "
                             f"router has one forecast order: pass a schedule with one")
        if schedule.metadata.get("coords") is not None:
            raise ValueError("schedule forecasts over metadata['coords']; routers forecast over step indices: pass a "
                             "schedule without coords")
        order = int(skipped[0]) if skipped.numel() else 0
        logits = torch.where(schedule.mask, float(confidence), -float(confidence))
        return cls(logits, metadata={"forecast_order": order, "init_schedule": schedule.metadata})

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.logits.shape[1]

    def weights(self) -> torch.Tensor:
        """sigmoid(logits) with row 0 exactly 1.0; differentiable w.r.t. rows 1..T-1 only."""
        first_step = torch.arange(self.num_steps, device=self.logits.device)[:, None, None] == 0
        one = torch.ones((), dtype=self.logits.dtype, device=self.logits.device)
        return torch.where(first_step, one, torch.sigmoid(self.logits))

    @torch.no_grad()
    def clamp_(self, bound: float = 5.0) -> "Router":
        """Clamp logits to [-bound, bound] in place (reference: after every optimiser step)."""
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
        self.logits.clamp_(-bound, bound)
        return self

    @property
    def threshold(self) -> float:
        """The threshold this router was trained to (its metadata), else DEFAULT_THRESHOLD."""
        recorded = self.metadata.get("threshold")
        return DEFAULT_THRESHOLD if recorded is None else recorded

    def to_schedule(self, threshold: Optional[float] = None) -> Schedule:
        """Compute iff weight > threshold; step 0 always computes.

        ``threshold=None`` uses :attr:`threshold`: the one training chose to meet its target speed.
        """
        if threshold is None:
            threshold = self.threshold
        _check_threshold(threshold)
        with torch.no_grad():
            mask = (self.weights() > threshold).cpu()
        mask[0] = True  # weights() gives 1.0 there, but threshold == 1.0 must not empty step 0
        # Skipped units are served as the router was trained to serve them: reuse or a forecast.
        orders = torch.full(mask.shape, self.forecast_order, dtype=torch.long)
        # The router's own "method" (e.g. "harmonica" or "l2c", set by training) wins over the generic one.
        return Schedule(mask, orders=orders,
                        metadata={"method": "router", **self.metadata, "threshold": float(threshold)})

    @property
    def forecast_order(self) -> int:
        """How skipped units are served: 0 = reuse, m = forecast of order m (``metadata["forecast_order"]``)."""
        order = self.metadata.get("forecast_order")
        return 0 if order is None else order

    def threshold_for(
        self,
        *,
        target_speedup: Optional[float] = None,
        target_cur: Optional[float] = None,
        cost: Optional[ModelCost] = None,
    ) -> float:
        """The smallest threshold whose schedule reaches the target, i.e. the one that caches least.

        Raising the threshold only ever turns computes into reuses, so CUR and speedup are monotone in
        it and only the distinct weights of steps 1..T-1 matter: threshold w caches exactly the units
        with weight <= w. A binary search over those candidates, each evaluated with the same
        Schedule arithmetic that callers will use, is therefore exact. Returns 0.0 when the uncached
        schedule already meets the target.
        """
        if (target_speedup is None) == (target_cur is None):
            raise ValueError("pass exactly one of target_speedup= or target_cur=")
        if target_cur is not None:
            if isinstance(target_cur, bool) or not isinstance(target_cur, (int, float)) or not 0 <= target_cur <= 1:
                raise ValueError(f"target_cur must be a number in [0, 1], got {target_cur!r}")

            def value(s: Schedule) -> float:
                return s.cache_usage

            target, what = target_cur, "CUR"
        else:
            if cost is None:
                raise ValueError("target_speedup needs cost=ModelCost(...) to turn the schedule into FLOPs")
            if not isinstance(cost, ModelCost):
                raise TypeError(f"cost must be a harmonica ModelCost, got {type(cost).__name__}")
            if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not target_speedup > 0:
                raise ValueError(f"target_speedup must be a number > 0, got {target_speedup!r}")

            def value(s: Schedule) -> float:
                return s.theoretical_speedup(cost)

            target, what = target_speedup, "speedup"

        if value(self.to_schedule(0.0)) >= target:
            return 0.0
        with torch.no_grad():
            candidates = torch.unique(self.weights()[1:].detach().cpu().double()).tolist()
        reachable = value(self.to_schedule(candidates[-1])) if candidates else value(self.to_schedule(0.0))
        if reachable < target:
            raise ValueError(
                f"target {what} {target} is unreachable: even caching every unit of steps 1..{self.num_steps - 1} "
                f"gives {what} {reachable:.6g} for T={self.num_steps}, L={self.num_blocks}; lower the target"
            )
        lo, hi = 0, len(candidates) - 1  # invariant: candidates[hi] meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if value(self.to_schedule(candidates[mid])) >= target:
                hi = mid
            else:
                lo = mid + 1
        return candidates[hi]

    # -- I/O ------------------------------------------------------------------------------------

    def save(self, path) -> None:
        document = {"num_steps": self.num_steps, "num_blocks": self.num_blocks, **self.metadata}
        reserved = sorted(_STRUCTURAL_KEYS.intersection(self.metadata))
        if reserved:
            raise ValueError(f"cannot save router to {path}: metadata keys {reserved} are reserved; remove them")
        # The logits are a trainable Parameter, so they can turn NaN after construction checked them;
        # a file load() refuses must not be written.
        if not bool(torch.isfinite(self.logits.detach()).all()):
            raise ValueError(f"cannot save router to {path}: its logits contain NaN or infinite values (a diverged "
                             f"training run?); retrain with a lower lr, or save a router with finite logits")
        formats.write(path, "router", {"logits": self.logits.detach().float()}, document)

    @classmethod
    def load(cls, path) -> "Router":
        tensors, document = _read(path, "router", "logits", "Router.load")
        tensor = tensors["logits"]

        def fail(problem: str) -> ValueError:
            return _file_error("router", path, problem)

        if tensor.dtype != torch.float32:
            raise fail(f"tensor 'logits' must be float32, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise fail("tensor 'logits' contains NaN or infinite values")
        return cls(tensor, metadata=_user_metadata(document))

    def extra_repr(self) -> str:
        return f"T={self.num_steps}, L={self.num_blocks}"


def load_plan(path) -> "Router | Schedule":
    """The Router or the Schedule a harmonica .safetensors file holds, whichever it is (ValueError if neither)."""
    errors = []
    for cls in (Router, Schedule):
        try:
            return cls.load(path)
        except ValueError as e:  # FileFormatError, or a file of the other kind
            errors.append(str(e))
    raise ValueError(f"{path} is neither a harmonica router nor a schedule ({errors[-1]})")


def _check_threshold(threshold) -> None:
    # Weights are probabilities, so a threshold outside [0, 1] is a unit mistake (e.g. percent).
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1] (compute iff weight > threshold), got {threshold!r}")


MAX_ORDER = 4  # beyond this, extrapolating a network's outputs diverges (and each order costs a slot)


def _checked_orders(orders: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """int64 (T, L, 2) forecast orders, zero where a unit computes."""
    if orders is None:
        return torch.zeros(mask.shape, dtype=torch.long)
    if not isinstance(orders, torch.Tensor) or orders.dtype in (torch.bool,) or orders.is_floating_point():
        raise ValueError(f"orders must be an integer tensor of shape {tuple(mask.shape)} (0 = reuse, m = forecast of "
                         f"order m), got {orders.dtype if isinstance(orders, torch.Tensor) else type(orders).__name__}")
    if tuple(orders.shape) != tuple(mask.shape):
        raise ValueError(f"orders must have the mask's shape {tuple(mask.shape)}, got {tuple(orders.shape)}")
    orders = orders.detach().to("cpu", torch.long, copy=True)
    if bool((orders < 0).any()) or bool((orders > MAX_ORDER).any()):
        raise ValueError(f"orders must lie in [0, {MAX_ORDER}], got values {sorted(set(orders.unique().tolist()))}")
    return orders.masked_fill_(mask, 0).contiguous()


def _check_coords(coords, num_steps: int) -> None:
    if coords is None:
        return
    ok = isinstance(coords, list) and len(coords) == num_steps and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coords)
    if ok and num_steps > 1:
        diffs = [b - a for a, b in zip(coords, coords[1:])]
        ok = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if not ok:
        raise ValueError(f"metadata['coords'] must be {num_steps} finite numbers, strictly increasing or decreasing "
                         f"(one position per step for forecasts), got {coords!r}")
