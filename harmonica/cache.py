"""Per-run cache state of one cached transformer: slots, step tracking, memory accounting.

One :class:`CacheState` is attached to a transformer by :func:`harmonica.enable_cache`. Every cached
block forward (one per model family, in ``harmonica.adapters``) hands each of its two branches to
:meth:`CacheState.run_branch`, the single place that decides between computing, storing, reading,
router-weighted blending (training) and per-sample merging.

Step tracking has one mechanism: a scheduler *drives* the state. ``set_timesteps`` starts a run and
``step`` ends a model evaluation, whether the loop is a diffusers pipeline's or harmonica's own
(:meth:`driven_by`). Only a bare transformer called by some other loop falls back to watching the
timestep (a host read): equal timestep = the other CFG half of the same step, a larger one = new run.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from . import ops
from .schedule import Schedule

# What a unit does at a step, precomputed from the schedule so the forward needs no tensor lookups
# (and torch.compile sees plain Python constants, no host sync).
COMPUTE = 0  # compute; no later step reads this result, so no slot is kept
STORE = 1  # compute and keep the pre-gate output: the next step reads it
READ = 2  # reuse the slot; a later step reads it again
READ_LAST = 3  # reuse the slot for the last time, then free it

BranchFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def build_plan(mask: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Actions (T, L, 2) from a compute mask: a slot lives only from its write to its last read."""
    m = mask.tolist()
    steps = len(m)
    plan = []
    for t in range(steps):
        row = []
        for l, units in enumerate(m[t]):
            acts = []
            for b, compute in enumerate(units):
                next_reads = t + 1 < steps and not m[t + 1][l][b]
                if compute:
                    acts.append(STORE if next_reads else COMPUTE)
                else:
                    acts.append(READ if next_reads else READ_LAST)
            row.append(tuple(acts))
        plan.append(tuple(row))
    return tuple(plan)


def _gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The uncached residual ``x + gate * branch``, in the order diffusers computes it."""
    return gate.view(gate.shape[0], 1, gate.shape[-1]) * branch + x


def _in_place(x: torch.Tensor) -> bool:
    """Whether the residual may be added into the block input itself.

    At inference nothing else reads a block's input after the block (diffusers rebinds
    ``hidden_states``), so the in-place ops save one (B, N, D) allocation per branch - 38 MB per op at
    PixArt-1024. With autograd on, the input may be saved for backward, so never.
    """
    return not torch.is_grad_enabled() and x.is_contiguous()


def _write(x, gate, branch, slot):
    return (ops.cache_write_ if _in_place(x) else ops.cache_write)(x, gate, branch, slot)


def _read(x, gate, slot):
    return (ops.cache_read_ if _in_place(x) else ops.cache_read)(x, gate, slot)


def _merge(x, gate, fresh, rows, slot):
    return (ops.gated_merge_ if _in_place(x) else ops.gated_merge)(x, gate, fresh, rows, slot)


class CacheState:
    """Cache slots and step position of one cached transformer."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.num_steps = schedule.num_steps
        self._plan = build_plan(schedule.mask)
        self._compute = schedule.mask.tolist()
        self._slots: dict[tuple[int, int, int], torch.Tensor] = {}
        self._filled_rows: dict[tuple[int, int, int], list[bool]] = {}
        self.step = 0
        self._first_step = 0  # the step whose soft forward fills empty slots (see begin_run)
        self._call = 0  # model calls so far in this step: CFG as two calls keeps two sets of slots
        self._calls_in_step = 0
        self._driven = False
        self._last_timestep: float | None = None
        self._drivers: dict[int, object] = {}
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        # Training (soft) mode: router weights (T, L, 2) and which slots each step refreshes.
        self.weights: torch.Tensor | None = None
        self._refresh: list | None = None
        self.refresh_threshold = 0.1
        # Teacher mode: compute everything, touch no slot.
        self.bypass = False
        # Per-sample mode: each sample's own step (a serving loop batching requests at different steps).
        self.sample_steps: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ run / step bookkeeping
    def begin_run(self, first_step: int = 0) -> None:
        """Start a run with empty slots. ``first_step > 0`` (soft mode only) starts mid-run: that
        step computes everything and fills the slots, as step 0 does (L2C training starts there)."""
        if not 0 <= first_step < self.num_steps:
            raise ValueError(f"first_step must be in [0, {self.num_steps}), got {first_step}")
        self.release()
        self.step = first_step
        self._first_step = first_step
        self._calls_in_step = 0
        self._last_timestep = None

    def end_step(self) -> None:
        self.step += 1
        self._calls_in_step = 0
        if self.step >= self.num_steps:
            # The run is over: no slot can be read again, and until a scheduler starts the next run
            # (or a larger timestep shows one began) the state is not driven.
            self.release()
            self._driven = False

    def release(self) -> None:
        """Free every slot (end of run, disable_cache)."""
        self._slots.clear()
        self._filled_rows.clear()
        self.cache_bytes = 0

    def reset_peak(self) -> None:
        self.peak_cache_bytes = self.cache_bytes

    def _check_timesteps(self, scheduler) -> None:
        evaluations = len(scheduler.timesteps)
        if evaluations != self.num_steps:
            raise ValueError(
                f"the schedule has {self.num_steps} steps but the scheduler was set up for {evaluations} model "
                f"evaluations; pass num_inference_steps={self.num_steps} or use a schedule made for "
                f"{evaluations} steps"
            )

    def attach(self, scheduler) -> None:
        """Let ``scheduler`` drive this state: ``set_timesteps`` begins a run, ``step`` ends a step."""
        if id(scheduler) in self._drivers:
            return
        original_set, original_step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(original_set)
        def set_timesteps(*args, **kwargs):
            result = original_set(*args, **kwargs)
            self._check_timesteps(scheduler)
            self.begin_run()
            self._driven = True
            return result

        @functools.wraps(original_step)
        def step(*args, **kwargs):
            result = original_step(*args, **kwargs)
            self.end_step()
            return result

        scheduler.set_timesteps, scheduler.step = set_timesteps, step
        self._drivers[id(scheduler)] = scheduler

    def detach(self, scheduler) -> None:
        if self._drivers.pop(id(scheduler), None) is None:
            return
        # The wrappers are instance attributes shadowing the class methods: deleting them restores.
        del scheduler.set_timesteps, scheduler.step
        if not self._drivers:
            self._driven = False

    def detach_all(self) -> None:
        for scheduler in list(self._drivers.values()):
            self.detach(scheduler)

    @contextmanager
    def driven_by(self, scheduler) -> Iterator[None]:
        """Drive this state by ``scheduler`` for the duration of one loop (harmonica's own loops)."""
        attached_here = id(scheduler) not in self._drivers
        self.attach(scheduler)
        try:
            yield
        finally:
            if attached_here:
                self.detach(scheduler)
            self.release()

    def on_model_call(self, timestep) -> None:
        """Called once per transformer forward, before any block runs."""
        if self.bypass:
            return
        if self.sample_steps is not None:
            return
        if not self._driven:
            self._follow_timestep(timestep)
        elif self.step >= self.num_steps:
            raise RuntimeError(
                f"the schedule has {self.num_steps} steps but the sampler made model evaluation number "
                f"{self.step + 1}; pass num_inference_steps={self.num_steps} or use a schedule made for more steps"
            )
        self._call = self._calls_in_step
        self._calls_in_step += 1

    def _follow_timestep(self, timestep) -> None:
        if timestep is None:
            raise ValueError("a cached transformer needs the `timestep` argument to know its schedule step")
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        if self._last_timestep is None or t > self._last_timestep:
            self.begin_run()
        elif t < self._last_timestep:
            self.step += 1
            self._calls_in_step = 0
            if self.step >= self.num_steps:
                raise RuntimeError(
                    f"the schedule has {self.num_steps} steps but the transformer was called at a "
                    f"{self.step + 1}th distinct timestep; pass num_inference_steps={self.num_steps} or "
                    f"use a schedule made for more steps"
                )
        self._last_timestep = t

    # ------------------------------------------------------------------ slots
    def _new_slot(self, key, like: torch.Tensor) -> torch.Tensor:
        slot = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._slots[key] = slot
        self.cache_bytes += slot.numel() * slot.element_size()
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        return slot

    def _free(self, key) -> None:
        slot = self._slots.pop(key, None)
        self._filled_rows.pop(key, None)
        if slot is not None:
            self.cache_bytes -= slot.numel() * slot.element_size()

    def _slot_for_read(self, key, block: int, branch: int) -> torch.Tensor:
        slot = self._slots.get(key)
        if slot is None:
            raise RuntimeError(
                f"block {block} {('attn', 'mlp')[branch]} should reuse its cache at step {self.step} but nothing "
                f"was cached; the model calls of this run do not follow one sampling run of the schedule "
                f"(did the batch or the number of calls per step change mid-run?)"
            )
        return slot

    # ------------------------------------------------------------------ the one branch runner
    def computes(self, block: int) -> tuple[bool, bool]:
        """Whether the (attn, mlp) branch of ``block`` computes in this call, for any sample.

        Adapters use it to skip modulation work that only a computed branch needs.
        """
        if self.bypass or self.weights is not None:
            return True, True
        if self.sample_steps is not None:
            return tuple(any(self._compute[s][block][b] for s in self.sample_steps) for b in (0, 1))
        return tuple(action in (COMPUTE, STORE) for action in self._plan[self.step][block])

    def run_branch(
        self, block: int, branch: int, x: torch.Tensor, gate: torch.Tensor, branch_fn: BranchFn
    ) -> torch.Tensor:
        """``x + gate * branch_fn(x)`` for one unit, computed or served from the cache.

        ``branch_fn(x_rows, rows)`` returns the branch output (before the gate) for the samples
        ``rows`` of the batch (``None`` = all); ``x_rows`` are those samples' block inputs.
        """
        if self.bypass:
            return _gated(x, gate, branch_fn(x, None))
        if self.weights is not None:
            return self._run_soft(block, branch, x, gate, branch_fn)
        if self.sample_steps is not None:
            return self._run_per_sample(block, branch, x, gate, branch_fn)
        key = (block, branch, self._call)
        action = self._plan[self.step][block][branch]
        if action == COMPUTE:
            return _gated(x, gate, branch_fn(x, None))
        if action == STORE:
            out = branch_fn(x, None)
            slot = self._slots.get(key)
            if slot is None or slot.shape != out.shape:
                self._free(key)
                slot = self._new_slot(key, out)
            return _write(x, gate, out, slot)
        slot = self._slot_for_read(key, block, branch)
        out = _read(x, gate, slot)
        if action == READ_LAST:
            self._free(key)
        return out

    def _run_soft(self, block, branch, x, gate, branch_fn) -> torch.Tensor:
        """Training: always compute, blend with the slot by the router weight (gradient reaches w)."""
        key = (block, branch, self._call)
        fresh = branch_fn(x, None)
        slot = self._slots.get(key)
        w = self.weights[self.step, block, branch]
        if slot is None:
            if self.step != self._first_step:
                self._slot_for_read(key, block, branch)  # raises with the explanation
            out = _gated(x, gate, fresh)
            self._store_soft(key, fresh.detach())
            return out
        out = ops.blend(x, gate, fresh, slot, w)
        if self._refresh[self.step][block][branch]:
            # At inference this unit computes (w > threshold) and refreshes its slot; in training the
            # slot takes the blended value, detached (reference-code behaviour). A new tensor, since
            # blend saved the old slot for its backward.
            with torch.no_grad():
                self._store_soft(key, torch.lerp(slot, fresh.detach(), w.detach()))
        return out

    def _store_soft(self, key, value: torch.Tensor) -> None:
        self._free(key)
        self._new_slot(key, value).copy_(value)

    def set_weights(self, weights: torch.Tensor | None) -> None:
        """Enter (or leave, with None) training mode with router weights of shape (T, L, 2)."""
        if weights is not None:
            expected = (self.num_steps, len(self._plan[0]), 2)
            if tuple(weights.shape) != expected:
                raise ValueError(f"weights must have shape {expected} (steps, blocks, 2), got {tuple(weights.shape)}")
            self._refresh = (weights.detach() > self.refresh_threshold).tolist()
        self.weights = weights

    def _run_per_sample(self, block, branch, x, gate, branch_fn) -> torch.Tensor:
        steps = self.sample_steps
        if len(steps) != x.shape[0]:
            raise ValueError(
                f"set_sample_steps gave {len(steps)} steps but the batch has {x.shape[0]} samples; "
                f"pass one step per sample"
            )
        key = (block, branch, 0)
        compute = [self._compute[s][block][branch] for s in steps]
        slot = self._slots.get(key)
        if slot is not None and slot.shape != x.shape:
            raise ValueError(
                f"the batch changed from {slot.shape[0]} to {x.shape[0]} samples while per-sample caching "
                f"is on; keep each request in its batch row, or call set_sample_steps(model, None) to reset"
            )
        if slot is None:
            slot = self._new_slot(key, x)
            self._filled_rows[key] = [False] * x.shape[0]
        filled = self._filled_rows[key]
        for row, (c, s) in enumerate(zip(compute, steps)):
            if not c and not filled[row]:
                raise RuntimeError(
                    f"sample {row} is at step {s} and should reuse block {block} "
                    f"{('attn', 'mlp')[branch]} but its cache row was never filled; start each sample at step 0"
                )
        self._filled_rows[key] = [f or c for f, c in zip(filled, compute)]
        if all(compute):
            return _write(x, gate, branch_fn(x, None), slot)
        if not any(compute):
            return _read(x, gate, slot)
        rows = torch.tensor([i for i, c in enumerate(compute) if c], device=x.device, dtype=torch.long)
        fresh = branch_fn(ops.gather_rows(x, rows), rows)
        return _merge(x, gate, fresh, rows, slot)

    def set_sample_steps(self, steps: Sequence[int] | None) -> None:
        if steps is None:
            self.sample_steps = None
            self.release()
            return
        steps = tuple(int(s) for s in steps)
        bad = [s for s in steps if not 0 <= s < self.num_steps]
        if bad:
            raise ValueError(f"sample steps must be in [0, {self.num_steps}) for this schedule, got {bad}")
        self.sample_steps = steps
