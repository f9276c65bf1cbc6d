"""The two branch policies of router training (see harmonica.cache.policies for the protocol).

* :class:`SoftPolicy`: the student. Every branch computes and is blended with what the cache would
  serve (its slot, or a forecast from its history) by the router weight,
  ``x + gate * (w * fresh + (1 - w) * cached)``, so the loss has a gradient for w. A unit whose
  weight exceeds the inference threshold refreshes its cache (with the blended value, detached: the
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

    def __init__(self, weights: torch.Tensor, refresh_threshold: float, first_step: int = 0, order: int = 0,
                 history_grad: bool = False):
        """``weights`` (T, L, 2) in [0, 1], replaced before each optimiser update (``policy.weights = w``);
        ``first_step``: the step whose forward fills the empty slots (0, or L2C's random start step);
        ``order``: what a skipped unit is served at inference, 0 = reuse of its last output, m = a forecast
        of order m (harmonica.cache.forecast), capped by the unit's history as at inference;
        ``history_grad``: a refresh keeps its graph to the weight it was taken at, so a later step's loss
        reaches the weights of the refreshes its forecast extrapolates from (the credit of a compute for
        later forecasts); the caller must then backward with ``retain_graph=True``."""
        self.weights = weights
        self.refresh_threshold = refresh_threshold
        self.first_step = first_step
        self.order = order
        self.history_grad = history_grad
        self._history: dict = {}  # unit -> (positions of its last order + 1 refreshes (K+1,), how many)

    def computes(self, runtime, block):
        return True, True

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        """Each unit keeps a table of divided differences, as at inference (one slot for reuse). The
        soft value ``w * fresh + (1 - w) * forecast`` feeds the loss; where ``w`` exceeds the threshold
        it also becomes the unit's newest history point, all on the device (no host read of ``w``)."""
        step = runtime.clock.step
        key = (block, branch, runtime.clock.call)
        fresh = branch_fn(x, None)
        table = runtime.slots.get(key)
        position = float(step)
        if table is None:
            if step != self.first_step:
                raise missing_slot(runtime, block, branch, step)
            table = fresh.detach().new_zeros((self.order + 1, *fresh.shape))
            table[0] = fresh.detach()
            runtime.slots.store_new(key, table)
            positions = torch.full((self.order + 1,), float("nan"), dtype=torch.float64, device=x.device)
            positions[0].fill_(position)  # a factory fill: no tensor made from Python data
            self._history[key] = (positions, torch.ones((), dtype=torch.long, device=x.device))
            return gated(x, gate, fresh)
        positions, count = self._history[key]
        w = self.weights[step, block, branch]
        with torch.no_grad():
            orders = torch.arange(self.order + 1, device=x.device)
            # Newton coefficients prod_{r<i} (x - x_r), zero beyond the history (order capped as at inference).
            distance = position - positions
            coeffs = torch.cat([distance.new_ones(1), torch.cumprod(distance[:-1], 0)])
            coeffs = torch.where(orders < count, coeffs, 0.0).to(table.dtype)
        through_history = self.history_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(through_history):
            forecast = (coeffs.view(-1, *([1] * fresh.dim())) * table).sum(0)
        out = ops.blend(x, gate, fresh, forecast.detach(), w)
        if forecast.requires_grad:  # zero in value; carries d out / d forecast = gate * (1 - w)
            out = gated(out, gate, (1 - w) * (forecast - forecast.detach()))
        with torch.set_grad_enabled(through_history):
            value = torch.lerp(forecast, fresh.detach().to(table.dtype), w)  # a graph only through_history
            rows = [value]
            for i in range(1, self.order + 1):  # the divided differences with this refresh as the newest point
                step_back = position - positions[i - 1]
                # NaN where the history is not that long yet: where() drops the value, but its gradient
                # would be 0 * NaN, so the divisor must be finite.
                step_back = torch.where(torch.isnan(step_back), 1.0, step_back).to(table.dtype)
                rows.append(torch.where(orders[i] <= count, (rows[-1] - table[i - 1]) / step_back, 0.0))
            refresh = w > self.refresh_threshold
            # A new tensor, never the old table's memory: blend saved the forecast built from it.
            runtime.slots.store_new(key, torch.where(refresh, torch.stack(rows), table))
        with torch.no_grad():
            shifted = torch.cat([positions.new_full((1,), position), positions[:-1]])
            self._history[key] = (torch.where(refresh, shifted, positions),
                                  torch.where(refresh, torch.clamp(count + 1, max=self.order + 1), count))
        return out


class TeacherPolicy:
    counts_calls = False

    def computes(self, runtime, block):
        return True, True

    def run_branch(self, runtime, block, branch, x, gate, branch_fn):
        return gated(x, gate, branch_fn(x, None))
