"""The step clock: which schedule step (and which call within it) a model evaluation is.

This is the package's one step-tracking mechanism. A *run* is one sampling run of the schedule: T
steps, each made of ``calls_per_step`` model calls (1 when the conditional and unconditional CFG
halves share one batch, as in diffusers' pipelines; 2 when a loop calls the model once per half).

Where runs and steps come from:

* **A scheduler harmonica drives** (the pipeline's, harmonica's own loop, training): its
  ``set_timesteps`` begins a run and its ``step`` ends a step. Nothing is read from a tensor, so a
  driven run has no host synchronisation and the compiled forward sees plain Python ints.
  The run length is checked against the schedule at the first model call of the run (not inside
  ``set_timesteps``: a scheduler shared with an uncached pipeline may legitimately run other lengths).
* **Otherwise, the timestep of each model call** (one host read): a larger timestep than the last
  call's begins a run, an equal one is another call of the same step, a smaller one the next step. A
  run that made fewer evaluations than the schedule is reported when the next run begins.

Whatever drives the model, a run never inherits an interrupted run's position: a model call that did
not return (an exception or a KeyboardInterrupt anywhere inside it) leaves the call open, and the next
call then starts from scratch; ``set_timesteps`` of a driving scheduler always starts from scratch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["StepClock", "SchedulerTap"]


class StepClock:
    """Position of the current model call within a run of ``num_steps`` steps."""

    def __init__(self, num_steps: int, calls_per_step: int, on_new_run: Callable[[], None]):
        self.num_steps = num_steps
        self.calls_per_step = calls_per_step
        self._on_new_run = on_new_run  # the runtime frees its slots: nothing carries into a new run
        self.step = 0
        self.call = 0
        self._running = False
        self._driven = False
        self._pending_length: Optional[int] = None  # a driver's run length, checked at its first call
        self._calls_made = 0  # calls of the current step so far
        self._in_call = False
        self._last_timestep: Optional[float] = None

    @property
    def running(self) -> bool:
        """Whether a run is in progress (driven or followed by timestep)."""
        return self._running

    @property
    def driving(self) -> bool:
        """Whether a run driven by a scheduler is in progress."""
        return self._running and self._driven

    # ------------------------------------------------------------------ events from a driving scheduler
    def begin_run(self, *, driven: bool, evaluations: Optional[int] = None, first_step: int = 0) -> None:
        """Start a run at ``first_step`` (> 0 only for training that starts mid-run, L2C)."""
        if not 0 <= first_step < self.num_steps:
            raise ValueError(f"first_step must be in [0, {self.num_steps}), got {first_step}")
        self._on_new_run()
        self.step, self.call, self._calls_made = first_step, 0, 0
        self._running, self._driven = True, driven
        self._pending_length = evaluations
        self._in_call = False
        self._last_timestep = None

    def end_step(self) -> None:
        """A driving scheduler's ``step``: the current step is over."""
        if not (self._running and self._driven) or self._calls_made == 0:
            # A scheduler step without a model call of this clock (a shared scheduler) means nothing here.
            return
        self.step += 1
        self._calls_made = 0
        if self.step >= self.num_steps:
            self._stop()

    def _stop(self) -> None:
        self._running = self._driven = False
        self._on_new_run()

    # ------------------------------------------------------------------ events from the model
    def before_call(self, timestep) -> None:
        """Called once per model call, before any block runs; raises on a run the schedule cannot serve."""
        if self._in_call:
            # The previous call never returned: its run is broken, whoever drove it.
            self._stop()
        if self._running and self._driven:
            self._check_driven_call()
        else:
            self._follow(timestep)
        self.call = self._calls_made
        self._calls_made += 1
        self._in_call = True

    def after_call(self) -> None:
        self._in_call = False

    def _check_driven_call(self) -> None:
        if self._pending_length is not None:
            evaluations, self._pending_length = self._pending_length, None
            if evaluations != self.num_steps:
                self._stop()
                raise ValueError(
                    f"the schedule has {self.num_steps} steps but the scheduler was set up for {evaluations} model "
                    f"evaluations; pass num_inference_steps={self.num_steps} or use a schedule made for "
                    f"{evaluations} steps"
                )
        if self.step >= self.num_steps:
            self._stop()
            raise RuntimeError(
                f"the schedule has {self.num_steps} steps but the sampler made model evaluation number "
                f"{self.step + 1}; pass num_inference_steps={self.num_steps} or use a schedule made for more steps"
            )
        self._check_calls()

    def _check_calls(self) -> None:
        if self._calls_made >= self.calls_per_step:
            calls = self._calls_made + 1
            self._stop()
            raise RuntimeError(
                f"the model was called {calls} times in step {self.step} of the schedule, but caching was "
                f"enabled with calls_per_step={self.calls_per_step}; if the loop calls the model once for the "
                f"conditional and once for the unconditional half, enable it with calls_per_step=2"
            )

    def _follow(self, timestep) -> None:
        if timestep is None:
            raise ValueError(
                "a cached transformer outside a pipeline needs the `timestep` argument to know its schedule step"
            )
        t = float(torch.as_tensor(timestep).reshape(-1)[0])  # the one host read, only when nothing drives
        last = self._last_timestep
        if not self._running or last is None or t > last:
            made = self.step + 1
            if self._running and made < self.num_steps:
                self._stop()
                raise RuntimeError(
                    f"the previous run of this cached model made {made} model evaluations but the schedule has "
                    f"{self.num_steps}; pass num_inference_steps={self.num_steps} or use a schedule made for "
                    f"{made} steps (if the previous run was interrupted outside the model, just run again)"
                )
            self.begin_run(driven=False)
        elif t == last:
            self._check_calls()
        else:
            if self.step + 1 >= self.num_steps:
                self._stop()
                raise RuntimeError(
                    f"the schedule has {self.num_steps} steps but the transformer was called at a "
                    f"{self.num_steps + 1}th distinct timestep; pass num_inference_steps={self.num_steps} or use "
                    f"a schedule made for more steps"
                )
            self.step += 1
            self._calls_made = 0
        self._last_timestep = t


class SchedulerTap:
    """Stands in for a scheduler's ``set_timesteps`` or ``step`` (an instance attribute) and tells the
    clocks listening to that scheduler. One tap per scheduler method, shared by every cached model the
    scheduler drives; removing the last listener removes the tap.

    A plain object, not a closure: ``copy.deepcopy`` of a pipeline copies it with the scheduler and the
    listening clocks, so a copied pipeline drives its own copied transformer.
    """

    def __init__(self, scheduler, name: str):
        self.scheduler = scheduler
        self.name = name
        self.inner = getattr(scheduler, name)  # whatever was there: the bound method or another wrapper
        self.clocks: list[StepClock] = []

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        if self.name == "set_timesteps":
            evaluations = len(self.scheduler.timesteps)
            for clock in self.clocks:
                clock.begin_run(driven=True, evaluations=evaluations)
        else:
            for clock in self.clocks:
                clock.end_step()
        return result

    @classmethod
    def attach(cls, scheduler, clock: StepClock) -> None:
        for name in ("set_timesteps", "step"):
            tap = scheduler.__dict__.get(name)
            if not isinstance(tap, cls):
                tap = cls(scheduler, name)
                setattr(scheduler, name, tap)
            if clock not in tap.clocks:
                tap.clocks.append(clock)

    @classmethod
    def detach(cls, scheduler, clock: StepClock) -> None:
        for name in ("set_timesteps", "step"):
            tap = scheduler.__dict__.get(name)
            if not isinstance(tap, cls):
                continue
            if clock in tap.clocks:
                tap.clocks.remove(clock)
            if not tap.clocks:
                # Restore whatever the tap replaced: deleting the attribute when that was the class method.
                inner = tap.inner
                if getattr(inner, "__self__", None) is scheduler and getattr(inner, "__func__", None) is getattr(
                    type(scheduler), name, None
                ):
                    delattr(scheduler, name)
                else:
                    setattr(scheduler, name, inner)

    @classmethod
    def drives(cls, scheduler, clock: StepClock) -> bool:
        tap = scheduler.__dict__.get("set_timesteps")
        return isinstance(tap, cls) and clock in tap.clocks
