"""CacheRuntime: the per-model cache of one cached transformer.

Three parts, each with one job: a :class:`~harmonica.cache.clock.StepClock` (which step a model call
is), a :class:`~harmonica.cache.slots.SlotStore` (the cached branch outputs) and the installed branch
policy (how a branch is served; a static schedule by default). Every cached block forward (one per
model family, in :mod:`harmonica.adapters`) hands its two branches to :meth:`CacheRuntime.run_branch`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..schedule import Schedule, check_sampler
from .clock import SchedulerTap, StepClock
from .policies import BranchFn, BranchPolicy, PerSamplePolicy, PlanPolicy, RowIndices
from .slots import SlotStore

__all__ = ["CacheRuntime", "PerSampleSteps"]


class CacheRuntime:
    """Step clock, slots and branch policy of one cached transformer (see :func:`harmonica.enable_cache`)."""

    def __init__(self, schedule: Schedule, *, num_blocks: int, calls_per_step: int = 1):
        self.schedule = schedule
        self.num_steps = schedule.num_steps
        self.num_blocks = num_blocks
        self.slots = SlotStore()
        self.clock = StepClock(schedule.num_steps, calls_per_step, on_new_run=self._new_run)
        self.plan = PlanPolicy(schedule)
        self.policy: BranchPolicy = self.plan
        self.row_indices = RowIndices()  # per-sample mode's device indices, kept across its scopes
        self._reserve_for(self.plan)

    def _reserve_for(self, policy: BranchPolicy) -> None:
        """Size the slot store's fresh blocks by the most slots ``policy`` keeps alive at once (1 when
        it does not say: training's policies store their own tensors)."""
        peak = getattr(policy, "peak_slots", None)
        # A step's calls each keep their own slots (a bound: their tables need not peak together).
        calls = self.clock.calls_per_step if policy.counts_calls else 1
        self.slots.block_slots = peak() * calls if peak is not None else 1

    # ------------------------------------------------------------------ what adapters call
    def computes(self, block: int) -> tuple[bool, bool]:
        """Whether the (attn, mlp) branch of ``block`` computes in this call, for any sample."""
        return self.policy.computes(self, block)

    def run_branch(self, block: int, branch: int, x: torch.Tensor, gate: torch.Tensor,
                   branch_fn: BranchFn) -> torch.Tensor:
        """``x + gate * branch_fn(x)`` for one unit (``branch`` 0 = attn, 1 = mlp), as the policy serves it."""
        return self.policy.run_branch(self, block, branch, x, gate, branch_fn)

    # ------------------------------------------------------------------ model-call hooks
    def before_model_call(self, timestep) -> None:
        if self.policy.counts_calls:
            self.clock.before_call(timestep)

    def after_model_call(self) -> None:
        self.clock.after_call()

    # ------------------------------------------------------------------ runs and drivers
    def _new_run(self) -> None:
        self.slots.release()

    def release(self) -> None:
        """Free every slot and its pooled storage (disable_cache)."""
        self.slots.release(keep_pool=False)

    def attach(self, scheduler) -> None:
        """Let ``scheduler`` drive the step clock (``set_timesteps`` begins a run, ``step`` ends a step)."""
        check_sampler(self.schedule, scheduler)  # before the tap: a refused scheduler is left as it was
        SchedulerTap.attach(scheduler, self.clock)

    def detach(self, scheduler) -> None:
        SchedulerTap.detach(scheduler, self.clock)

    def drives(self, scheduler) -> bool:
        return SchedulerTap.drives(scheduler, self.clock)

    @contextmanager
    def driven_by(self, scheduler) -> Iterator[None]:
        """Drive the clock by ``scheduler`` for one loop (harmonica's own loops); slots are freed after."""
        attached_here = not self.drives(scheduler)
        self.attach(scheduler)
        try:
            yield
        finally:
            if attached_here:
                self.detach(scheduler)
            self.slots.release()

    @contextmanager
    def using(self, policy: BranchPolicy, *, keep_slots: bool = False) -> Iterator[BranchPolicy]:
        """Serve branches by ``policy`` inside the block, then by the previous policy again.

        Slots start and end empty, unless ``keep_slots`` (training's teacher calls between student calls)."""
        previous = self.policy
        if not keep_slots:
            self.slots.release()
        self.policy = policy
        self._reserve_for(policy)
        try:
            yield policy
        finally:
            self.policy = previous
            self._reserve_for(previous)
            if not keep_slots:
                self.slots.release()

    # ------------------------------------------------------------------ memory
    @property
    def cache_bytes(self) -> int:
        """Bytes of live slots now."""
        return self.slots.cache_bytes

    @property
    def peak_cache_bytes(self) -> int:
        """The most bytes of live slots at any time (since enable or :meth:`reset_peak`)."""
        return self.slots.peak_cache_bytes

    def reset_peak(self) -> None:
        self.slots.reset_peak()

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo):
        # The default deep copy (a copied model gets its own runtime and slots), written out because
        # __reduce_ex__ below refuses pickling.
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a transformer with harmonica's cache enabled cannot be pickled (torch.save(model)): the cache is a "
            "run-time attachment. Save the weights (model.save_pretrained(...) or model.state_dict(), which the "
            "cache does not change), or call harmonica.disable_cache(model) before pickling and enable it again "
            "after loading"
        )


class PerSampleSteps:
    """Handle of a per-sample scope: set ``steps`` (one schedule step per sample) before each model call."""

    def __init__(self, policy: PerSamplePolicy):
        self._policy = policy

    @property
    def steps(self) -> tuple[int, ...] | None:
        return self._policy.steps

    @steps.setter
    def steps(self, steps: Sequence[int]) -> None:
        self._policy.set_steps(steps)
