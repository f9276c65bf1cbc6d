"""Branch policies: how a cached block's branch is served (computed, stored, read, merged).

A policy is installed on a :class:`~harmonica.cache.CacheRuntime` and answers, for each block branch
of each model call, through two methods (the :class:`BranchPolicy` protocol):

* ``computes(runtime, block)``: whether the (attn, mlp) branch of ``block`` computes in this call for
  any sample (adapters skip the modulation work a reused branch does not need);
* ``run_branch(runtime, block, branch, x, gate, branch_fn)``: ``x + gate * branch_fn(x)``, computed
  or served from the runtime's slots.

Inference has two policies, here: :class:`PlanPolicy` (a static :class:`~harmonica.Schedule`, the
default) and :class:`PerSamplePolicy` (each sample at its own step, for serving loops). Training's soft
and teacher policies live in :mod:`harmonica.train.policies`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from .. import ops
from ..schedule import Schedule
from .forecast import Action, Compute, Forecast, Update, unit_plan

if TYPE_CHECKING:
    from .runtime import CacheRuntime

__all__ = ["BranchFn", "BranchPolicy", "PlanPolicy", "PerSamplePolicy", "build_plan"]

BranchFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``branch_fn(x_rows, rows)``: the branch output (before the gate) for the samples ``rows`` of the
batch (``None`` = all); ``x_rows`` are those samples' block inputs."""

BRANCH_NAMES = ("attn", "mlp")


class BranchPolicy(Protocol):
    #: Whether model calls under this policy are steps of a run (advance the runtime's step clock).
    counts_calls: bool

    def computes(self, runtime: "CacheRuntime", block: int) -> tuple[bool, bool]: ...

    def run_branch(self, runtime: "CacheRuntime", block: int, branch: int, x: torch.Tensor, gate: torch.Tensor,
                   branch_fn: BranchFn) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------- fused residuals


def gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The uncached residual ``x + gate * branch``, in the order diffusers computes it."""
    return gate.view(gate.shape[0], 1, gate.shape[-1]) * branch + x


def _in_place(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the residual may be added into the block input itself.

    At inference nothing else reads a block's input after the block (diffusers rebinds
    ``hidden_states``), so the in-place ops save one (B, N, D) allocation per branch - 38 MB per op at
    PixArt-1024. Not with autograd on (the input may be saved for backward), and not when the result
    has another dtype than the input (type promotion under autocast).
    """
    return not torch.is_grad_enabled() and x.is_contiguous() and x.dtype == dtype


def write(x, gate, branch, slot):
    return (ops.cache_write_ if _in_place(x, slot.dtype) else ops.cache_write)(x, gate, branch, slot)


def read(x, gate, slot):
    dtype = ops.result_dtype(x, gate, slot)
    return (ops.cache_read_ if _in_place(x, dtype) else ops.cache_read)(x, gate, slot)


def update(x, gate, fresh, slots, inv):
    return (ops.forecast_update_ if _in_place(x, slots[0].dtype) else ops.forecast_update)(x, gate, fresh, slots, inv)


def forecast(x, gate, slots, coeffs):
    dtype = ops.result_dtype(x, gate, *slots)
    return (ops.forecast_read_ if _in_place(x, dtype) else ops.forecast_read)(x, gate, slots, coeffs)


def merge(x, gate, fresh, rows, slot):
    return (ops.gated_merge_ if _in_place(x, slot.dtype) else ops.gated_merge)(x, gate, fresh, rows, slot)


def slot_like(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """A tensor with the shape, device and (promoted) dtype a slot for ``branch`` must have."""
    dtype = ops.result_dtype(x, gate, branch)
    return branch if branch.dtype == dtype else branch.new_empty((), dtype=dtype).expand(branch.shape)


def missing_slot(runtime: "CacheRuntime", block: int, branch: int, step: int) -> RuntimeError:
    return RuntimeError(
        f"block {block} {BRANCH_NAMES[branch]} should reuse its cache at step {step} but nothing was cached; the "
        f"model calls of this run do not follow one sampling run of the schedule (did the batch or the number of "
        f"calls per step change mid-run?)"
    )


# ---------------------------------------------------------------------------------------------- static plans


def build_plan(schedule: Schedule) -> tuple[tuple[tuple[Action, Action], ...], ...]:
    """Actions (T, L, 2) of a schedule (see harmonica.cache.forecast): each unit keeps a slot, or a
    table of divided differences, only from the compute a later step needs to the last step needing it."""
    mask, orders, coords = schedule.mask.tolist(), schedule.orders.tolist(), schedule.coords
    steps, blocks = len(mask), len(mask[0])
    per_unit = {(l, b): unit_plan([mask[t][l][b] for t in range(steps)], [orders[t][l][b] for t in range(steps)],
                                  coords)
                for l in range(blocks) for b in range(2)}
    return tuple(tuple((per_unit[l, 0][t], per_unit[l, 1][t]) for l in range(blocks)) for t in range(steps))


class PlanPolicy:
    """Serve every branch as a static :class:`~harmonica.Schedule` says, at the step clock's step.

    A unit's table of divided differences is ``keep + 1`` ordinary slots (keys ``(..., i)``), so every
    slot has one shape and its storage recycles, and a unit holds only the orders its next forecasts use.
    """

    counts_calls = True

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.plan = build_plan(schedule)
        self._peak = self._count_peak()

    def computes(self, runtime, block):
        return tuple(not isinstance(action, Forecast) for action in self.plan[runtime.clock.step][block])

    def peak_slots(self) -> int:
        """The most branch-output-sized slots alive at once in a run: what ``peak_cache_bytes`` will be,
        in units of one branch output, whatever the model."""
        return self._peak

    def _count_peak(self) -> int:
        live, peak = {}, 0
        for row in self.plan:
            for block, actions in enumerate(row):
                for branch, action in enumerate(actions):
                    unit = (block, branch)
                    if isinstance(action, Update):
                        live[unit] = action.keep + 1
                    peak = max(peak, sum(live.values()))
                    if isinstance(action, Forecast) and action.last:
                        live.pop(unit, None)
        return peak

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        clock, slots = runtime.clock, runtime.slots
        unit = (block, branch, clock.call)
        action = self.plan[clock.step][block][branch]
        if isinstance(action, Compute):
            return gated(x, gate, branch_fn(x, None))
        if isinstance(action, Update):
            out = branch_fn(x, None)
            like = slot_like(x, gate, out)
            _free_orders(slots, unit, action.keep + 1)  # orders no later forecast uses
            if action.keep == 0:
                return write(x, gate, out, slots.slot_for((*unit, 0), like))
            return update(x, gate, out, [slots.slot_for((*unit, i), like) for i in range(action.keep + 1)], action.inv)
        table = [slots.get((*unit, i)) for i in range(len(action.coeffs))]
        if any(slot is None for slot in table):
            raise missing_slot(runtime, block, branch, clock.step)
        out = read(x, gate, table[0]) if len(table) == 1 else forecast(x, gate, table, action.coeffs)
        if action.last:
            _free_orders(slots, unit, 0)
        return out


def _free_orders(slots, unit: tuple, first: int) -> None:
    """Free the unit's difference slots of order ``first`` and up."""
    while slots.get((*unit, first)) is not None:
        slots.free((*unit, first))
        first += 1


# ---------------------------------------------------------------------------------------------- per-sample


class RowIndices:
    """Device index tensors of sets of batch rows, built once per distinct set and kept (most recent 64).

    A serving loop repeats a few patterns; each is staged through pinned memory on CUDA, so building it
    never makes the host wait for the GPU, and a forward that reuses it (the one a CUDA graph captures)
    creates nothing. Kept by the runtime, so per-sample scopes share them."""

    _MAX = 64

    def __init__(self):
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (rows, device)
        entry = self._cache.get(key)
        if entry is None:
            host = torch.tensor(rows, dtype=torch.long, pin_memory=device.type == "cuda")
            entry = (host, host.to(device, non_blocking=True))  # the host copy lives as long as the index
            self._cache[key] = entry
            if len(self._cache) > self._MAX:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return entry[1]


class PerSamplePolicy:
    """Each sample of the batch at its own schedule step (a serving loop batching requests).

    Each request keeps its batch row (its row of every slot) for its whole run and starts at step 0.
    One slot per unit holds every row; a computing row refreshes its row of the slot.
    """

    counts_calls = False

    def __init__(self, schedule: Schedule, row_indices: "RowIndices"):
        self.num_steps = schedule.num_steps
        self.compute = schedule.mask.tolist()
        self.steps: tuple[int, ...] | None = None
        self._filled: dict[tuple[int, int], list[bool]] = {}
        self._rows = row_indices

    def peak_slots(self) -> int:
        """One slot per unit."""
        return 2 * len(self.compute[0])

    def set_steps(self, steps: Sequence[int]) -> None:
        steps = tuple(steps)
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.num_steps]
        if bad or not steps:
            raise ValueError(f"steps must be a non-empty sequence of ints in [0, {self.num_steps}) for this schedule, "
                             f"one per sample; got {list(steps)}")
        self.steps = steps

    def _steps_for(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.steps is None:
            raise RuntimeError("per-sample caching needs each sample's step before the model call; set "
                               "`serving.steps = [...]` inside `with harmonica.per_sample(model) as serving`")
        if len(self.steps) != x.shape[0]:
            raise ValueError(f"serving.steps gives {len(self.steps)} steps but the batch has {x.shape[0]} samples; "
                             f"give one step per sample")
        return self.steps

    def computes(self, runtime, block):
        steps = self.steps or ()
        return tuple(any(self.compute[s][block][b] for s in steps) for b in (0, 1))

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        steps = self._steps_for(x)
        key = (block, branch)
        compute = [self.compute[s][block][branch] for s in steps]
        slot = runtime.slots.get(key)
        if slot is not None and slot.shape != x.shape:
            raise ValueError(
                f"the batch changed from {slot.shape[0]} to {x.shape[0]} samples while per-sample caching is on; "
                f"keep each request in its batch row, or leave the `with harmonica.per_sample(...)` block to reset"
            )
        filled = self._filled.get(key) or [False] * x.shape[0]
        for row, (c, s) in enumerate(zip(compute, steps)):
            if not c and not filled[row]:
                raise RuntimeError(
                    f"sample {row} is at step {s} and should reuse block {block} {BRANCH_NAMES[branch]} but its cache "
                    f"row was never filled; start each sample at step 0"
                )
        if all(compute):
            out = branch_fn(x, None)
            slot = runtime.slots.slot_for(key, slot_like(x, gate, out))
            result = write(x, gate, out, slot)
        elif not any(compute):
            result = read(x, gate, slot)
        else:
            rows = self._rows.get(tuple(i for i, c in enumerate(compute) if c), x.device)
            fresh = branch_fn(ops.gather_rows(x, rows), rows)
            if slot is None:  # cannot happen: a reusing row implies a filled (so allocated) slot
                raise missing_slot(runtime, block, branch, min(steps))
            result = merge(x, gate, fresh, rows, slot)
        self._filled[key] = [f or c for f, c in zip(filled, compute)]
        return result
