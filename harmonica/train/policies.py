"""The two branch policies of router training (see harmonica.cache.policies for the protocol).

* :class:`SoftPolicy`: the student. Every branch computes and is blended with its slot by the router
  weight, ``x + gate * (w * fresh + (1 - w) * slot)``, so the loss has a gradient for w. A unit whose
  weight exceeds the inference threshold refreshes its slot (with the blended value, detached: the
  reference code's behaviour), as the hard schedule at that threshold would recompute it. The
  decision is taken on the device (no host read of w), so a training step never waits for the GPU.
* :class:`TeacherPolicy`: the uncached model. Everything computes, no slot is read or written, and
  its calls are not steps of the run (the student's call at the same step is).
"""

from __future__ import annotations

import torch

from .. import ops
from ..cache.policies import gated, missing_slot


class SoftPolicy:
    counts_calls = True

    def __init__(self, weights: torch.Tensor, refresh_threshold: float, first_step: int = 0):
        """``weights`` (T, L, 2) in [0, 1], replaced before each optimiser update (``policy.weights = w``);
        ``first_step``: the step whose forward fills the empty slots (0, or L2C's random start step)."""
        self.weights = weights
        self.refresh_threshold = refresh_threshold
        self.first_step = first_step

    def computes(self, runtime, block):
        return True, True

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        step = runtime.clock.step
        key = (block, branch, runtime.clock.call)
        fresh = branch_fn(x, None)
        slot = runtime.slots.get(key)
        if slot is None:
            if step != self.first_step:
                raise missing_slot(runtime, block, branch, step)
            runtime.slots.store_new(key, fresh.detach())
            return gated(x, gate, fresh)
        w = self.weights[step, block, branch]
        out = ops.blend(x, gate, fresh, slot, w)
        with torch.no_grad():
            w = w.detach()
            refreshed = torch.where(w > self.refresh_threshold, torch.lerp(slot, fresh.detach().to(slot.dtype), w), slot)
        # A new tensor, never the old slot's memory: blend saved that slot for its backward.
        runtime.slots.store_new(key, refreshed)
        return out


class TeacherPolicy:
    counts_calls = False

    def computes(self, runtime, block):
        return True, True

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        return gated(x, gate, branch_fn(x, None))
