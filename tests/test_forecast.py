"""Forecasting caches: the plan (Newton's divided differences), the ops, and cached sampling against an
independent reference that interpolates the recorded branch outputs with Lagrange's formula."""

from __future__ import annotations


import pytest
import torch
from diffusers import DDIMScheduler

import harmonica as hc
from harmonica import ops
from harmonica.cache.forecast import Compute, Forecast, Update, unit_plan
from harmonica.sampling import denoise, guided, sample
from tiny import BLOCKS, MODELS, STEPS, rel_err


def lagrange_weights(x: float, points: list[float]) -> list[float]:
    """Weights of the values at ``points`` in the polynomial through them, evaluated at x."""
    weights = []
    for i, p in enumerate(points):
        w = 1.0
        for k, q in enumerate(points):
            if k != i:
                w *= (x - q) / (p - q)
        weights.append(w)
    return weights


def run_unit(actions, values, width: int = 3):
    """Execute one unit's plan with the reference ops on a 1-element 'model' whose output at step t is
    values[t]; returns what each step served."""
    x = torch.zeros(1, 1, width, dtype=torch.float64)
    gate = torch.ones(1, width, dtype=torch.float64)
    capacity = max((a.keep for a in actions if isinstance(a, Update)), default=0)
    table = [torch.full((1, 1, width), float("nan"), dtype=torch.float64) for _ in range(capacity + 1)]
    served = []
    for t, action in enumerate(actions):
        fresh = torch.full((1, 1, width), values[t], dtype=torch.float64)
        if isinstance(action, Compute):
            served.append(values[t])
        elif isinstance(action, Update):
            out = ops.forecast_update(x, gate, fresh, table[:action.keep + 1], action.inv)
            served.append(float(out[0, 0, 0]))
        else:
            served.append(float(ops.forecast_read(x, gate, table, action.coeffs)[0, 0, 0]))
    return served


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("coords", ["steps", "irregular"])
def test_forecasts_are_exact_for_polynomials_of_their_order(order, coords):
    steps = 12
    compute = [t in (0, 1, 3, 4, 7, 8, 11) for t in range(steps)]
    x = [float(t) for t in range(steps)] if coords == "steps" else [1000.0 - 7.3 * t - 0.4 * t * t for t in range(steps)]
    actions = unit_plan(compute, [order] * steps, x)
    g = torch.Generator().manual_seed(order)
    poly = torch.randn(order + 1, generator=g, dtype=torch.float64).tolist()  # degree == order
    values = [sum(c * xi ** k for k, c in enumerate(poly)) for xi in x]
    served = run_unit(actions, values)
    history = 0
    for t in range(steps):
        history += compute[t]
        if history >= order + 1 or compute[t]:  # enough computes for the full order: exact
            assert served[t] == pytest.approx(values[t], rel=1e-9, abs=1e-9), (t, actions[t])


def test_orders_are_capped_by_history_and_tables_live_only_while_needed():
    compute = [True, False, True, False, False, True, True, True, False]
    actions = unit_plan(compute, [2] * 9, [float(t) for t in range(9)])
    # Step 1 can forecast at order 0 only (one compute so far), steps 3 and 4 at order 1.
    assert len(actions[1].coeffs) == 1 and len(actions[3].coeffs) == 2 and len(actions[4].coeffs) == 2
    assert actions[0].keep == 0 and actions[2].keep == 1
    assert actions[1].last is False  # compute 2 needs the old D_0 for its first difference
    assert actions[3].last is False and actions[4].last is True  # compute 5 keeps order 0 only: no old table needed
    # Step 8 forecasts at order 2 from computes 5, 6, 7: they keep orders 0, 1, 2; compute 2 needs none.
    assert [actions[t].keep for t in (5, 6, 7)] == [0, 1, 2]
    assert actions[8].last is True
    x8 = lagrange_weights(8.0, [7.0, 6.0, 5.0])
    assert len(actions[8].coeffs) == 3 and sum(x8) == pytest.approx(1.0)


def test_reuse_plans_are_plain_slots():
    compute = [True, False, False, True, True, False]
    actions = unit_plan(compute, [0] * 6, [float(t) for t in range(6)])
    assert actions[0] == Update(0, ()) and actions[1] == Forecast((1.0,), False) and actions[2] == Forecast((1.0,), True)
    assert actions[3] == Compute() and actions[4] == Update(0, ()) and actions[5] == Forecast((1.0,), True)


class ForecastingReference:
    """Forecasting on the unpatched model: forward hooks on attn1 / ff record each computed output and
    replace a skipped one by the Lagrange interpolation of the unit's last (order + 1) computed outputs."""

    def __init__(self, model, schedule: hc.Schedule):
        self.mask, self.orders, self.x = schedule.mask, schedule.orders, schedule.coords
        self.step, self.history, self.handles = 0, {}, []
        for l, block in enumerate(model.transformer_blocks):
            for b, module in enumerate((block.attn1, block.ff)):
                self.handles.append(module.register_forward_hook(self._hook(l, b)))

    def _hook(self, l, b):
        def hook(module, args, output):
            past = self.history.setdefault((l, b), [])
            if bool(self.mask[self.step, l, b]):
                past.append((self.x[self.step], output))
                return None
            m = min(int(self.orders[self.step, l, b]), len(past) - 1)
            points = past[-(m + 1):]
            weights = lagrange_weights(self.x[self.step], [p for p, _ in points])
            return sum(w * out.double() for w, (_, out) in zip(weights, points)).to(output.dtype)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def forecast_schedules():
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(STEPS, BLOCKS, 2, generator=g) < 0.5
    mask[0] = mask[1] = True
    orders = torch.randint(0, 3, (STEPS, BLOCKS, 2), generator=g)
    return {
        "taylorseer_o1": hc.Schedule.taylorseer(STEPS, BLOCKS, interval=2, order=1, warmup=2),
        "taylorseer_o2": hc.Schedule.taylorseer(STEPS, BLOCKS, interval=3, order=2, warmup=3),
        "random_orders": hc.Schedule(mask, orders=orders),
        "timestep_coords": hc.Schedule(mask, orders=orders, metadata={"coords": [999.0 - 150 * t - 5 * t * t
                                                                                 for t in range(STEPS)]}),
    }


SCHEDULES = forecast_schedules()


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_forecast_sampling_matches_the_interpolating_reference(family, name):
    make_model, conditioning = MODELS[family]
    model, schedule = make_model(), SCHEDULES[name]
    cond, uncond = conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ForecastingReference(model, schedule)
    inner = guided(model, cond, uncond, 3.0)

    def model_fn(x, t, step):
        ref.step = step
        return inner(x, t, step)

    with torch.no_grad():
        expected = denoise(model_fn, DDIMScheduler(), latents, num_inference_steps=STEPS, progress=False)
    ref.remove()
    reuse = hc.Schedule(schedule.mask)
    runtime = hc.enable_cache(model, reuse)
    reused = sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                    guidance_scale=3.0, progress=False)
    hc.disable_cache(model)
    runtime = hc.enable_cache(model, schedule)
    got = sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                 guidance_scale=3.0, progress=False)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, reused) > 1e-3, "forecasting must differ from reuse"
    assert runtime.cache_bytes == 0 and runtime.peak_cache_bytes > 0


# ---------------------------------------------------------------------------------- schedules with orders
def test_taylorseer_schedule_and_its_file_round_trip(tmp_path):
    s = hc.Schedule.taylorseer(10, 3, interval=4, order=2, warmup=2, tail=1)
    computed = s.mask[:, 0, 0].tolist()
    assert computed == [True, True, False, False, True, False, False, False, True, True]
    assert int(s.orders[2, 0, 0]) == 2 and int(s.orders[0, 0, 0]) == 0 and s.max_order == 2
    s.save(tmp_path / "ts.safetensors")
    loaded = hc.Schedule.load(tmp_path / "ts.safetensors")
    assert loaded == s and torch.equal(loaded.orders, s.orders) and loaded.metadata["method"] == "taylorseer"
    reuse = hc.Schedule.fora(10, 3)
    reuse.save(tmp_path / "fora.safetensors")  # order-0 files carry no order tensor and load as before
    assert hc.Schedule.load(tmp_path / "fora.safetensors").max_order == 0
    assert hc.Schedule(s.mask) != s  # same mask, reuse instead of forecast


@pytest.mark.parametrize("bad, match", [
    (dict(orders=torch.full((4, 2, 2), 9)), r"orders must lie in \[0, 4\]"),
    (dict(orders=torch.zeros(4, 3, 2, dtype=torch.long)), r"orders must have the mask's shape"),
    (dict(orders=torch.zeros(4, 2, 2)), r"orders must be an integer tensor"),
    (dict(metadata={"coords": [1.0, 2.0, 2.0, 3.0]}), r"strictly increasing or decreasing"),
    (dict(metadata={"coords": [1.0, 2.0]}), r"must be 4 finite numbers"),
], ids=["order_too_high", "shape", "float_orders", "coords_not_monotone", "coords_length"])
def test_bad_orders_and_coords_are_refused(bad, match):
    mask = torch.ones(4, 2, 2, dtype=torch.bool)
    mask[1:, :, 1] = False
    with pytest.raises(ValueError, match=match):
        hc.Schedule(mask, **bad)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("order", [0, 1, 2])
def test_soft_training_at_hard_weights_is_the_inference_forecast(order):
    """SDT's student at weights 0 / 1 is exactly the deployed schedule: it forecasts the same way."""
    from harmonica.train.policies import SoftPolicy

    make_model, conditioning = MODELS["dit"]
    model = make_model()
    cond, uncond = conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(order)
    mask = torch.rand(STEPS, BLOCKS, 2, generator=g) < 0.4
    mask[0] = True
    schedule = hc.Schedule(mask, orders=torch.full((STEPS, BLOCKS, 2), order))

    def run():
        return sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                      guidance_scale=3.0, progress=False)

    runtime = hc.enable_cache(model, schedule)
    deployed = run()
    hc.disable_cache(model)
    runtime = hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))
    with runtime.using(SoftPolicy(mask.float(), 0.5, order=order)):
        soft = run()
    hc.disable_cache(model)
    assert rel_err(soft, deployed) <= 1e-5


def test_router_trained_with_forecasting_deploys_forecasts():
    from harmonica.train import ClassConditioning, TrainConfig, train_router

    model = MODELS["dit"][0]()
    config = TrainConfig(method="harmonica", num_steps=STEPS, guidance_scale=1.5, batch_size=2, iterations=2,
                         conditioning=ClassConditioning(1000, 1000), forecast_order=2, progress=False,
                         target_speedup=1.3)
    router = train_router(model, DDIMScheduler(), config)
    assert router.metadata["forecast_order"] == 2
    schedule = router.to_schedule()
    skipped = ~schedule.mask
    assert skipped.any() and bool((schedule.orders[skipped] == 2).all())
    with pytest.raises(ValueError, match=r"TrainConfig.forecast_order: must be an int in \[0, 4\]"):
        train_router(model, DDIMScheduler(), TrainConfig(num_steps=STEPS, conditioning=ClassConditioning(1000, 1000),
                                                         forecast_order=7))


@pytest.mark.parametrize("name", SCHEDULES)
def test_peak_cache_bytes_count_every_difference_slot(name):
    make_model, conditioning = MODELS["dit"]
    model, schedule = make_model(), SCHEDULES[name]
    cond, uncond = conditioning()
    runtime = hc.enable_cache(model, schedule)
    for run in range(3):
        sample(model, DDIMScheduler(), torch.randn(2, 4, 8, 8), num_inference_steps=STEPS, cond=cond,
               uncond=uncond, guidance_scale=3.0, progress=False)
        if run == 0:
            cold = runtime.slots.allocations
    assert runtime.slots.allocations == cold, "tables and plain slots of warm runs come from the pool"
    assert runtime.slots.pooled_bytes <= runtime.peak_cache_bytes
    slot_bytes = 4 * 16 * 32 * 4  # (2 CFG halves x 2 samples, 16 tokens, width 32) float32
    peak = schedule.peak_cache_slots()
    assert runtime.peak_cache_bytes == peak * slot_bytes
    assert (runtime.slots.allocations, runtime.slots.allocated_slots) == (1, peak), "one block, the liveness bound"
    assert peak > hc.Schedule(schedule.mask).peak_cache_slots(), "forecast tables hold more than reuse slots"


@pytest.mark.parametrize("history_grad", [False, True])
def test_history_grad_credits_a_refresh_with_the_later_forecasts_it_feeds(history_grad):
    """Step 2 forecasts (order 1) from the refreshes at steps 0 and 1: with history_grad its output depends
    on step 1's weight through the refreshed value lerp(forecast, fresh, w_1), and the gradient is the
    one of that expression; without it the history is detached and step 1's weight gets nothing."""
    from types import SimpleNamespace

    from harmonica.cache.slots import SlotStore
    from harmonica.train.policies import SoftPolicy

    weights = torch.full((3, 1, 2), 0.9, dtype=torch.float64, requires_grad=True)
    policy = SoftPolicy(weights, 0.5, order=1, history_grad=history_grad)
    runtime = SimpleNamespace(clock=SimpleNamespace(step=0, call=0), slots=SlotStore())
    x, gate = torch.zeros(1, 3, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    fresh = [torch.full((1, 3, 2), v, dtype=torch.float64) for v in (1.0, 3.0, 4.0)]
    for step in range(3):
        runtime.clock.step = step
        out = policy.run_branch(runtime, 0, 0, x, gate, lambda x_, _: fresh[step])
    out.sum().backward()
    # By hand: the step-1 refresh is v1 = f0 + w1 (f1 - f0) (its forecast is reuse of f0), step 2 serves
    # w2 f2 + (1 - w2) (v1 + (v1 - f0)), so d out / d w1 = (1 - w2) * 2 (f1 - f0) per element.
    expected = (1 - 0.9) * 2 * (3.0 - 1.0) * 6 if history_grad else 0.0
    assert float(weights.grad[1, 0, 0]) == pytest.approx(expected)
    assert float(weights.grad[2, 0, 0]) != 0.0  # step 2's own weight, either way
