"""Forecasting a skipped unit from its earlier computes: the one home of the formula.

A unit that computes at steps c_0 < c_1 < ... keeps, after its compute c_j, the Newton divided
differences of its outputs F over the positions x of its last k + 1 computes (the *table*):

    D_0 = F(c_j),    D_i = (D_{i-1} - D_{i-1}^old) / (x(c_j) - x(c_{j-i})),  i = 1..k,

where D^old is the table after c_{j-1} (so D_i is the divided difference F[c_j, ..., c_{j-i}]). At a
skipped step s after c_j, a forecast of order m <= k is Newton's interpolating polynomial through
those m + 1 points, evaluated at x(s):

    F(s) ~ sum_{i=0..m} coeff_i D_i,   coeff_0 = 1,  coeff_i = prod_{r=0..i-1} (x(s) - x(c_{j-r})).

Order 0 is plain reuse (FORA, HarmoniCa). Order 1 with equal gaps is TaylorSeer's rule (finite
differences Taylor-expanded in the step distance); from order 2 on, TaylorSeer truncates a Taylor
series where this is the interpolating polynomial through the m + 1 points, and the divided
differences use the actual distances, which a learned, irregular schedule needs. The positions are
the step indices by default, or ``schedule.coords`` (e.g. the sampler's timesteps). On the testbed
(a study of this session, 5,000 samples per row) the step index beat alpha, sigma and log-SNR, and
Newton's form beat TaylorSeer's at order 2 in 5 of 7 settings.

Everything here is static: the plan below fixes, per unit and step, the table order an update keeps,
the inverse distances it divides by, and the coefficients a forecast uses, as Python floats. The
forward then needs no tensor lookup and no host synchronisation, and torch.compile sees constants.
An order is capped by the computes available (m computes give order m - 1 at most), and a unit keeps
a table only while a later forecast needs it (the slot store counts its k + 1 slots).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

__all__ = ["Compute", "Update", "Forecast", "Action", "unit_plan"]


class Compute(NamedTuple):
    """Compute; no later step needs this output."""


class Update(NamedTuple):
    """Compute and keep the table up to order ``keep`` (``len(inv) == keep``: the 1 / distances)."""

    keep: int
    inv: tuple[float, ...]


class Forecast(NamedTuple):
    """Serve ``sum_i coeffs[i] * D_i``; ``last``: no later action reads this table before a fresh write."""

    coeffs: tuple[float, ...]
    last: bool


Action = Union[Compute, Update, Forecast]


def unit_plan(compute: Sequence[bool], orders: Sequence[int], coords: Sequence[float]) -> list[Action]:
    """One unit's action at every step, from its compute flags, forecast orders and step positions."""
    steps = len(compute)
    computes = [t for t in range(steps) if compute[t]]
    if not computes or computes[0] != 0:
        raise ValueError("a unit must compute at step 0 (its cache is empty before)")
    index_at = []  # index j of the last compute at or before each step
    j = -1
    for t in range(steps):
        j += compute[t]
        index_at.append(j)
    # Order each forecast can have (capped by the history), and the table order each compute must keep:
    # a forecast of order m from compute j needs order m - (j - i) at compute i, for i = j - m .. j.
    order_at = [0 if compute[t] else min(orders[t], index_at[t]) for t in range(steps)]
    keep = [-1] * len(computes)
    for t in range(steps):
        if not compute[t]:
            j, m = index_at[t], order_at[t]
            for i in range(j - m, j + 1):
                keep[i] = max(keep[i], m - (j - i))
    # The table is read after compute i only if some later action uses it before a fresh write.
    actions: list[Action] = []
    for t in range(steps):
        j = index_at[t]
        if compute[t]:
            k = keep[j]
            if k < 0:
                actions.append(Compute())
            else:
                x = coords[t]
                actions.append(Update(k, tuple(1.0 / (x - coords[computes[j - i]]) for i in range(1, k + 1))))
            continue
        m, x = order_at[t], coords[t]
        coeffs, product = [1.0], 1.0
        for r in range(m):
            product *= x - coords[computes[j - r]]
            coeffs.append(product)
        later_reads = any(not compute[u] and index_at[u] == j for u in range(t + 1, steps))
        next_uses_table = j + 1 < len(computes) and keep[j + 1] >= 1
        actions.append(Forecast(tuple(coeffs), last=not (later_reads or next_uses_table)))
    return actions
