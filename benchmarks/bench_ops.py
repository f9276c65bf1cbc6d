"""Fused cache ops vs the eager PyTorch composition they replace, and a plain copy as the
bandwidth yardstick, on DiT-XL/2 (N=256 tokens, D=1152) and PixArt-alpha 1024px (N=4096) shapes.
The forecast ops run at orders 1 and 2 ("forecast_read o2": a table of three slots).

Run: `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md). GB/s counts the bytes the
fused op must move at minimum (every input read once, every output written once); the eager
composition is charged the same bytes, so its GB/s is an effective rate.

pytest-benchmark times the fused op; before each of its rounds its `setup` times the eager
composition, so the two alternate (same cache contents, allocator state and interference from other
processes) and each fused time has an eager neighbour to be divided by: the paired speedup.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time

import pytest
import torch

from _device import DEVICE, synchronized
from harmonica import _C as harmonica_C
from harmonica import ops

# name -> (B, N, D)
SHAPES = {
    "DiT-XL/2 B=2": (2, 256, 1152),
    "DiT-XL/2 B=16": (16, 256, 1152),
    "PixArt-1024 B=2": (2, 4096, 1152),
}
CASES = [(name, torch.float32) for name in SHAPES] + [("DiT-XL/2 B=16", torch.bfloat16)]
CASE_IDS = [f"{name.replace(' ', '_').replace('/', '').replace('=', '')}-{str(dtype)[6:]}" for name, dtype in CASES]
# Rounds per benchmark: enough to fill about half a second of fused calls, within these bounds.
# Sub-millisecond ops get hundreds of rounds (their medians wander most with the machine's noise);
# big tensors get the minimum, which keeps the suite to a minute or two.
MIN_ROUNDS, MAX_ROUNDS, SECONDS_PER_BENCHMARK = 40, 400, 0.5


def rounds_for(fn):
    fn()  # the first call may page-fault its output
    start = time.perf_counter()
    fn()
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, SECONDS_PER_BENCHMARK / (time.perf_counter() - start))))


def tensors(shape, dtype, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(count)]


# Cache-slot state. A DiT-XL/2 or PixArt model has 56 cache slots (28 blocks x attn/mlp) and touches
# each once per step, a whole model forward (all the weights and activations) after the previous
# touch: at inference the slot an op writes or reads is cold (in DRAM) while x and the fresh branch
# output were just produced. "cold" cycles through enough slots to overflow the last-level cache twice
# (at least 128 MB), for the fused op and the eager composition alike; "hot" reuses one slot every
# round, the usual microbenchmark setting, where the slot stays in cache.
SLOT_STATES = ("hot", "cold")
COLD_SLOT_BYTES = max(128 << 20, 2 * harmonica_C.last_level_cache_bytes)


def cache_slots(shape, dtype, state, table=1):
    """An endless cycle of cache slots; `next()` gives the slot for one call, or one of the `table`
    distinct slots a forecast op takes per call."""
    count = table
    if state == "cold":
        slot_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        count = max(table + 1, math.ceil(COLD_SLOT_BYTES / slot_bytes))
    return itertools.cycle(tensors(shape, dtype, count, seed=2))


def gate_for(shape, dtype):
    B, _, D = shape
    return torch.randn(B, D).to(dtype).to(DEVICE)


# Each builder takes (shape, dtype, an iterator of cache slots) and returns
# ({"fused": fn, "eager": fn}, bytes the fused op moves at minimum).


def cache_write(shape, dtype, slots):
    x, branch = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)

    def eager():
        out = x + gate.unsqueeze(1) * branch
        next(slots).copy_(branch)
        return out

    # reads x, branch; writes out, cache
    return {"fused": lambda: ops.cache_write(x, gate, branch, next(slots)), "eager": eager}, 4 * x.nbytes


def cache_write_(shape, dtype, slots):
    x, branch = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)

    def eager():
        x.add_(gate.unsqueeze(1) * branch)
        next(slots).copy_(branch)

    return {"fused": lambda: ops.cache_write_(x, gate, branch, next(slots)), "eager": eager}, 4 * x.nbytes


def cache_read(shape, dtype, slots):
    (x,) = tensors(shape, dtype, 1)
    gate = gate_for(shape, dtype)
    return {
        "fused": lambda: ops.cache_read(x, gate, next(slots)),
        "eager": lambda: x + gate.unsqueeze(1) * next(slots),
    }, 3 * x.nbytes


def cache_read_(shape, dtype, slots):
    (x,) = tensors(shape, dtype, 1)
    gate = gate_for(shape, dtype)
    return {
        "fused": lambda: ops.cache_read_(x, gate, next(slots)),
        "eager": lambda: x.add_(gate.unsqueeze(1) * next(slots)),
    }, 3 * x.nbytes


def blend_eager(x, gate, fresh, cache, w):
    w_b = w.to(x.dtype).view(-1, 1, 1)
    return x + gate.unsqueeze(1) * (w_b * fresh + (1 - w_b) * cache)


def blend(shape, dtype, slots):
    x, fresh = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)
    w = torch.rand(shape[0], device=DEVICE)
    return {
        "fused": lambda: ops.blend(x, gate, fresh, next(slots), w),
        "eager": lambda: blend_eager(x, gate, fresh, next(slots), w),
    }, 4 * x.nbytes


def blend_forward_backward(shape, dtype, slots):
    x, fresh, grad_out = tensors(shape, dtype, 3)
    x.requires_grad_()
    fresh.requires_grad_()
    gate = gate_for(shape, dtype).requires_grad_()
    w = torch.rand(shape[0], device=DEVICE).requires_grad_()
    leaves = (x, fresh, gate, w)

    def step(forward):
        # Fresh .grad every call: accumulating into old gradients would add a pass to both sides.
        for leaf in leaves:
            leaf.grad = None
        forward(x, gate, fresh, next(slots), w).backward(grad_out)

    # forward: read x, fresh, cache, write out; backward: read grad_out, fresh, cache, write
    # grad_fresh (grad_x is grad_out itself, gate/w grads are tiny reductions)
    return {"fused": lambda: step(ops.blend), "eager": lambda: step(blend_eager)}, 8 * x.nbytes


def gather_rows(shape, dtype, slots):  # touches no cache slot
    (x,) = tensors(shape, dtype, 1)
    index = torch.arange(0, shape[0], 2, device=DEVICE)
    return {"fused": lambda: ops.gather_rows(x, index), "eager": lambda: x[index]}, 2 * x[index].nbytes


def gated_merge(shape, dtype, slots):
    B, N, D = shape
    (x,) = tensors(shape, dtype, 1)
    gate = gate_for(shape, dtype)
    index = torch.arange(0, B, 2, device=DEVICE)  # half of the samples compute
    (branch_active,) = tensors((index.numel(), N, D), dtype, 1, seed=1)

    def eager():
        cache = next(slots)
        out = x + gate.unsqueeze(1) * cache
        out[index] = x[index] + gate[index].unsqueeze(1) * branch_active
        cache[index] = branch_active
        return out

    # reads x, the cache rows not computed, branch_active; writes out and the refreshed cache rows
    bytes_moved = 2 * x.nbytes + 2 * branch_active.nbytes + (x.nbytes - branch_active.nbytes)
    return {"fused": lambda: ops.gated_merge(x, gate, branch_active, index, next(slots)), "eager": eager}, bytes_moved


# Forecasting (harmonica/cache/forecast.py): a unit's table of divided differences, one slot per order,
# every slot cold or hot like the single slot above. Coefficients and inverse distances of TaylorSeer's
# rule at interval 2 (the Newton form over step positions), the eager composition in the natural dtype.
FORECAST_COEFFS = (1.0, 1.0, 3.0)
FORECAST_INV = (0.5, 0.25)


def forecast_value_eager(table, coeffs):
    value = table[0] * coeffs[0] if len(table) == 1 else torch.add(table[0], table[1], alpha=coeffs[1])
    for coeff, difference in zip(coeffs[2:], table[2:]):
        value.add_(difference, alpha=coeff)
    return value


def forecast_update_eager(fresh, table, inv):
    difference = fresh
    for old, h in zip(table, inv):
        newer = (difference - old) * h  # reads the old difference before it is overwritten
        old.copy_(difference)
        difference = newer
    table[-1].copy_(difference)


def forecast_read(order, in_place):
    def build(shape, dtype, slots):
        (x,) = tensors(shape, dtype, 1)
        gate = gate_for(shape, dtype)
        coeffs = FORECAST_COEFFS[: order + 1]

        def table():
            return [next(slots) for _ in range(order + 1)]

        if in_place:
            impls = {"fused": lambda: ops.forecast_read_(x, gate, table(), coeffs),
                     "eager": lambda: x.add_(gate.unsqueeze(1) * forecast_value_eager(table(), coeffs))}
        else:
            impls = {"fused": lambda: ops.forecast_read(x, gate, table(), coeffs),
                     "eager": lambda: x + gate.unsqueeze(1) * forecast_value_eager(table(), coeffs)}
        # reads x and order + 1 slots, writes out (x in place)
        return impls, (order + 3) * x.nbytes

    build.table = order + 1
    return build


def forecast_update(order, in_place):
    def build(shape, dtype, slots):
        x, fresh = tensors(shape, dtype, 2)
        gate = gate_for(shape, dtype)
        inv = FORECAST_INV[:order]

        def table():
            return [next(slots) for _ in range(order + 1)]

        def eager():
            out = x.add_(gate.unsqueeze(1) * fresh) if in_place else x + gate.unsqueeze(1) * fresh
            forecast_update_eager(fresh, table(), inv)
            return out

        fused_op = ops.forecast_update_ if in_place else ops.forecast_update
        # reads x, fresh and `order` old slots; writes out (x in place) and order + 1 slots
        return {"fused": lambda: fused_op(x, gate, fresh, table(), inv), "eager": eager}, (2 * order + 4) * x.nbytes

    build.table = order + 1
    return build


OPS = {
    "cache_write": cache_write,
    "cache_write_": cache_write_,
    "cache_read": cache_read,
    "cache_read_": cache_read_,
    "blend": blend,
    "blend fwd+bwd": blend_forward_backward,
    "gather_rows": gather_rows,
    "gated_merge": gated_merge,
    **{f"{name}{'_' if in_place else ''} o{order}": builder(order, in_place)
       for name, builder in (("forecast_read", forecast_read), ("forecast_update", forecast_update))
       for in_place in (False, True) for order in (1, 2)},
}


def case_name(name, dtype):
    return f"{name}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_copy(benchmark, name, dtype):
    src, dst = tensors(SHAPES[name], dtype, 2)
    benchmark.group = f"copy/{case_name(name, dtype)}"
    benchmark.extra_info.update(bytes=2 * src.nbytes)

    @synchronized
    def copy():
        dst.copy_(src)

    benchmark.pedantic(copy, rounds=rounds_for(copy), iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "op,slot_state", [(op, state) for op in OPS for state in SLOT_STATES if state == "hot" or op != "gather_rows"]
)
def test_op(benchmark, op, slot_state, name, dtype):
    """Times the fused op; the untimed setup before each of its rounds times the eager composition."""
    shape = SHAPES[name]
    impls, bytes_moved = OPS[op](shape, dtype, cache_slots(shape, dtype, slot_state, getattr(OPS[op], "table", 1)))
    fused, eager = synchronized(impls["fused"]), synchronized(impls["eager"])
    eager_times = []

    def timed_eager():
        start = time.perf_counter()
        eager()
        eager_times.append(time.perf_counter() - start)

    benchmark.group = f"{op}/{case_name(name, dtype)}/{slot_state}"
    benchmark.pedantic(fused, setup=timed_eager, rounds=rounds_for(fused), iterations=1, warmup_rounds=2)
    fused_times = benchmark.stats.stats.data
    eager_times = eager_times[-len(fused_times):]  # drop the warm-up rounds
    benchmark.extra_info.update(
        bytes=bytes_moved,
        eager_median_s=statistics.median(eager_times),
        eager_min_s=min(eager_times),
        # Each eager call ran just before the fused call it is divided by: the ratio of neighbours
        # cancels load that drifts over seconds, which the ratio of two medians does not.
        paired_speedup=statistics.median(e / f for e, f in zip(eager_times, fused_times)),
    )
