"""Router training (harmonica.train): SDT, IEPO, L2C, target speed, data parallelism, resume, errors.

Tiny random diffusers models, a handful of steps: the checks are about what the training computes,
not about how good the routers get (the testbed's RESULTS.md measures that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers import LMSDiscreteScheduler
from safetensors import safe_open

import harmonica as hc
from harmonica.sampling import sample
from harmonica.train import ClassConditioning, PromptConditioning, TrainConfig, start_from, train_router
from harmonica.train.distributed import draw_int, draw_normal
from harmonica.train.policies import SoftPolicy, TeacherPolicy


# Tiny models: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

STEPS = 4
BLOCKS = 2
NUM_CLASSES = 10
DIT_KW = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=BLOCKS,
              sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)


def make_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**DIT_KW, **overrides}).eval()


def make_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=BLOCKS,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2,
    ).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000)


def config(**kw) -> TrainConfig:
    base = dict(method="harmonica", num_steps=STEPS, conditioning=ClassConditioning(NUM_CLASSES, NUM_CLASSES),
                guidance_scale=1.5, batch_size=2, iterations=1, iepo_refresh=1, progress=False)
    return TrainConfig(**{**base, **kw})


def l2c_data(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(11))


class CallRecorder:
    """Records every transformer call: its input, whether it was a teacher call, whether grad was on."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.model = model

    def hook(self, module, args, kwargs):
        state = hc.get_cache_state(module)
        x = args[0] if args else kwargs["hidden_states"]
        teacher = isinstance(state.policy, TeacherPolicy) if state else None
        self.calls.append((x.detach().clone(), teacher, torch.is_grad_enabled()))

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- SDT


def test_only_router_logits_get_gradients_and_teacher_runs_without_graph():
    model = make_dit()
    model.requires_grad_(True)  # training must freeze it itself, and give the flags back
    rec = CallRecorder(model)
    try:
        router = train_router(model, ddim(), config(iterations=2))
    finally:
        rec.remove()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    teacher = [grad for _, bypass, grad in rec.calls if bypass]
    student = [grad for _, bypass, grad in rec.calls if bypass is False]
    assert len(teacher) == 2 * (STEPS - 1)
    assert not any(teacher)
    assert sum(student) == 2 * (STEPS - 1)  # one graph per trained step; IEPO and step 0 have none
    assert router.logits.grad is None or router.logits.requires_grad


def hand_written_sdt(model, router0, lam, *, beta, lr, guidance, batch, seed=0):
    """SDT for one trajectory written out directly: teacher and student on the student's x_t."""
    router = hc.Router(router0.logits.detach().clone())
    opt = torch.optim.AdamW([router.logits], lr=lr, weight_decay=0.0)
    x = draw_normal(seed, 0, range(batch), (4, 8, 8), "x_T")
    labels = draw_int(seed, 0, range(batch), NUM_CLASSES, "choice")
    y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
    sched = ddim()
    state = hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))
    xs = []

    def forward(x, t):
        out = model(torch.cat([x, x]), timestep=t.expand(2 * batch), class_labels=y, return_dict=False)[0]
        return out[:, :4]

    soft = SoftPolicy(router.weights().detach(), 0.1)
    try:
        with state.using(soft), state.driven_by(sched):
            sched.set_timesteps(STEPS)
            for i, t in enumerate(sched.timesteps):
                xs.append(x.clone())
                if i == 0:
                    with torch.no_grad():
                        out = forward(x, t)
                else:
                    with state.using(TeacherPolicy(), keep_slots=True), torch.no_grad():
                        teacher = forward(x, t)
                    w = router.weights()
                    soft.weights = w
                    out = forward(x, t)
                    loss = lam[i] * (out - teacher).pow(2).mean() + beta * w[i].sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        router.logits.clamp_(-5, 5)
                cond, uncond = out.detach().chunk(2)
                eps = uncond + guidance * (cond - uncond)
                x = sched.step(eps, t, x, return_dict=False)[0]
    finally:
        hc.disable_cache(model)
    return router, xs


def test_sdt_matches_hand_written_loop_and_follows_the_students_trajectory():
    model = make_dit()
    router0 = hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(7))
    rec = CallRecorder(model)
    try:
        trained = train_router(model, ddim(), config(init_router=router0, beta=1e-3))
    finally:
        rec.remove()
    lam = torch.tensor(trained.metadata["lambda"])
    expected, xs = hand_written_sdt(model, router0, lam, beta=1e-3, lr=1e-2, guidance=1.5, batch=2)
    torch.testing.assert_close(trained.logits, expected.logits.detach())
    assert not torch.equal(trained.logits[1:], router0.logits[1:])
    assert torch.equal(trained.logits[0], router0.logits[0])  # step 0 never trains
    teacher_inputs = [x[:2] for x, bypass, _ in rec.calls if bypass]
    for got, want in zip(teacher_inputs, xs[1:]):
        torch.testing.assert_close(got, want)
    # ...which is not the uncached model's own trajectory: caching at step 1 moved x_2 and later.
    labels = draw_int(0, 0, range(2), NUM_CLASSES, "choice")
    rec = CallRecorder(model)
    try:
        sample(model, ddim(), xs[0], num_inference_steps=STEPS, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, NUM_CLASSES)}, guidance_scale=1.5, progress=False)
    finally:
        rec.remove()
    uncached_inputs = [x[:2] for x, _, _ in rec.calls]
    torch.testing.assert_close(uncached_inputs[1], xs[1])
    assert not torch.allclose(uncached_inputs[STEPS - 1], xs[STEPS - 1])


# ---------------------------------------------------------------------------------------------- IEPO


def soft_sample(model, weights, x_T, labels, guidance=1.5):
    state = hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))
    try:
        with state.using(SoftPolicy(weights, 0.1)):
            return sample(model, ddim(), x_T, num_inference_steps=STEPS, cond={"class_labels": labels},
                          uncond={"class_labels": torch.full_like(labels, NUM_CLASSES)}, guidance_scale=guidance,
                          progress=False)
    finally:
        hc.disable_cache(model)


@pytest.mark.parametrize("variant", ["paper", "sensitivity", "cumulative"])
def test_iepo_lambda_matches_its_definition(variant):
    model = make_dit()
    router0 = hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(3))
    trained = train_router(model, ddim(), config(init_router=router0, iepo_variant=variant, batch_size=3))
    x_T = draw_normal(0, 0, range(3), (4, 8, 8), "x_T")
    labels = draw_int(0, 0, range(3), NUM_CLASSES, "choice")
    w = router0.weights().detach()

    def with_full(rows, weight=1.0):
        v = w.clone()
        v[rows] = weight
        return soft_sample(model, v, x_T, labels)

    def err(a, b):
        return (a - b).pow(2).flatten(1).sum(1).mean()

    errors = torch.zeros(STEPS)
    if variant == "paper":
        x0 = soft_sample(model, w, x_T, labels)
        for t in range(1, STEPS):
            errors[t] = err(x0, with_full(slice(t, t + 1)))
    elif variant == "sensitivity":
        for t in range(1, STEPS):
            errors[t] = err(with_full(slice(t, t + 1)), with_full(slice(t, t + 1), 0.0))
    else:
        runs = [with_full(slice(0, i)) for i in range(STEPS + 1)]  # runs[i]: caching on steps >= i
        for i in range(1, STEPS):
            errors[i] = err(runs[i], runs[i + 1])
    assert bool((errors[1:] > 0).all())
    expected = errors / errors[1:].mean()
    expected[0] = 0.0
    torch.testing.assert_close(torch.tensor(trained.metadata["lambda"]), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- L2C


def test_l2c_trains_one_row_per_update_from_a_one_step_cache():
    model = make_dit()
    router0 = hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(1))
    rec = CallRecorder(model)
    try:
        trained = train_router(model, ddim(), config(method="l2c", init_router=router0, l2c_latents=l2c_data(),
                                                     l2c_choices=torch.arange(6) % NUM_CLASSES))
    finally:
        rec.remove()
    changed = [t for t in range(STEPS) if not torch.equal(trained.logits[t], router0.logits[t])]
    assert len(changed) == 1 and changed[0] >= 1
    # One full (cache-filling) call, then teacher and student on the same input.
    assert [bypass for _, bypass, _ in rec.calls] == [False, True, False]
    assert torch.equal(rec.calls[1][0], rec.calls[2][0])
    assert trained.metadata["method"] == "l2c" and trained.metadata["train_config"]["lr"] == 1e-3


# ---------------------------------------------------------------------------------------------- targets


def timestep_sensitive_dit() -> DiTTransformer2DModel:
    """A random DiT whose features change strongly between steps, so caching has a real cost and the
    trade-off beta controls exists (with default init the tiny model is nearly step-invariant)."""
    model = make_dit()
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.emb.timestep_embedder.linear_1.weight.mul_(30)
    return model


def test_beta_adaptation_moves_cur_toward_the_target():
    model = timestep_sensitive_dit()
    # Logits near 0 and CUR measured at threshold 0.5: the hard schedule responds within a few updates.
    router0 = hc.Router.init(STEPS, BLOCKS, std=0.1, generator=torch.Generator().manual_seed(5))
    start_cur = router0.to_schedule(0.5).cache_usage
    final = {}
    for target in (0.6, None, 0.1):
        seen = []
        trained = train_router(model, ddim(), config(init_router=router0, iterations=20, lr=0.1, beta=1e-2,
                                                     threshold=0.5, target_cur=target, iepo_refresh=100,
                                                     beta_adapt_rate=1.0), callback=seen.append)
        final[target] = (seen[-1]["cur"], seen, trained)
    assert final[0.6][0] > start_cur > final[0.1][0]
    # Relative to the same run with a fixed beta, adaptation moved CUR in the direction of each target:
    # the soft CUR it steers (the hard one only moves when a weight crosses the threshold; since the soft
    # refresh follows TrainConfig.threshold, 20 updates leave the hard CUR of None and 0.1 equal).
    soft = {target: run[1][-1]["soft_cur"] for target, run in final.items()}
    assert soft[0.6] > soft[None] > soft[0.1]
    assert final[0.6][0] > final[None][0] >= final[0.1][0]
    assert max(s["beta"] for s in final[0.6][1]) > 1e-2 > final[0.1][1][-1]["beta"]
    # The delivered threshold meets the target exactly as Router.threshold_for defines it.
    for target in (0.6, 0.1):
        trained = final[target][2]
        assert trained.metadata["achieved_cur"] >= target
        assert trained.metadata["achieved_cur"] == trained.to_schedule(trained.metadata["threshold"]).cache_usage


def test_target_speedup_is_met_and_recorded():
    model = make_dit()
    trained = train_router(model, ddim(), config(iterations=2, target_speedup=1.3))
    cost = hc.model_cost(model, batch=4)
    schedule = trained.to_schedule(trained.metadata["threshold"])
    assert schedule.theoretical_speedup(cost) >= 1.3
    assert trained.metadata["theoretical_speedup"] == pytest.approx(schedule.theoretical_speedup(cost))
    assert trained.metadata["train_config"]["target_speedup"] == 1.3


def test_keep_threshold_steers_the_trained_schedule_and_never_delivers_longer_gaps():
    """A router started from TaylorSeer's schedule at that schedule's speed: with keep_threshold beta steers the
    hard schedule at the training threshold, which meets the target from the first iteration, so beta holds
    still; steering the soft speed instead (the default) moves it (sigmoid(+-3) is not 0/1)."""
    model = make_dit()
    start = hc.Schedule.taylorseer(STEPS, BLOCKS, 2, order=1)
    speed = start.theoretical_speedup(hc.model_cost(model, batch=4))
    common = dict(init_router=hc.Router.from_schedule(start), forecast_order=1, threshold=0.5, iterations=3,
                  lr=1e-6, target_speedup=speed, beta_adapt_rate=1.0)
    kept, soft = [], []
    router = train_router(model, ddim(), config(keep_threshold=True, **common), callback=kept.append)
    assert [s["beta"] for s in kept] == [1e-4] * 3 and [s["speedup"] for s in kept] == [speed] * 3
    assert router.to_schedule() == start
    assert router.metadata["train_config"]["init_router"]["method"] == "taylorseer"
    train_router(model, ddim(), config(**common), callback=soft.append)
    assert all(s["beta"] != 1e-4 for s in soft) and all(s["soft_speedup"] != speed for s in soft)


def test_history_grad_trains_order_2_routers_to_finite_other_logits():
    """Through a young history (order 2 capped by fewer computes: NaN positions) the gradient stays finite,
    and crediting refreshes changes what training does to the rows that refresh."""
    model = make_dit()
    start = hc.Schedule.taylorseer(STEPS, BLOCKS, 2, order=2)
    runs = {flag: train_router(model, ddim(), config(**{**start_from(start), "history_grad": flag}, iterations=2))
            for flag in (False, True)}
    assert all(bool(torch.isfinite(r.logits).all()) for r in runs.values())
    assert not torch.equal(runs[True].logits[2], runs[False].logits[2])  # step 2 refreshes, step 3 forecasts


def test_keep_threshold_adds_computes_for_a_slower_target_but_never_removes_trained_ones():
    model = make_dit()
    start = hc.Schedule.taylorseer(STEPS, BLOCKS, 2, order=1)
    speed = start.theoretical_speedup(hc.model_cost(model, batch=4))
    # Skipped units get distinct weights below 0.5, so a lower threshold can add computes one by one.
    offsets = torch.arange(STEPS * BLOCKS * 2, dtype=torch.float32).reshape(STEPS, BLOCKS, 2) * 0.1
    init = hc.Router(torch.where(start.mask, 3.0, -3.0 + offsets), metadata={"forecast_order": 1})
    common = dict(init_router=init, forecast_order=1, threshold=0.5, iterations=1, lr=1e-6, keep_threshold=True)
    slower = train_router(model, ddim(), config(target_speedup=(1 + speed) / 2, **common))
    delivered = slower.to_schedule()
    assert slower.metadata["threshold"] < 0.5 and slower.metadata["theoretical_speedup"] >= (1 + speed) / 2
    assert bool((delivered.mask >= start.mask).all()) and delivered != start
    faster = train_router(model, ddim(), config(target_speedup=speed * 1.05, **common))
    assert faster.metadata["threshold"] == 0.5 and faster.to_schedule() == start
    # Without keep_threshold the faster target is met by dropping units training computed.
    dropped = train_router(model, ddim(), config(target_speedup=speed * 1.05, **{**common, "keep_threshold": False}))
    assert dropped.metadata["threshold"] > 0.5 and not bool((dropped.to_schedule().mask >= start.mask).all())


# ---------------------------------------------------------------------------------------------- errors


class Untouched:
    """Asserts the model never ran: errors must come before any work."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("overrides, match", [
    (dict(num_steps=0), r"TrainConfig.num_steps: must be an int >= 1"),
    (dict(iterations=-1), r"TrainConfig.iterations"),
    (dict(batch_size=0), r"TrainConfig.batch_size"),
    (dict(method="l2x"), r"TrainConfig.method: unknown method 'l2x'; choose one of harmonica, l2c"),
    (dict(iepo_variant="both"), r"TrainConfig.iepo_variant"),
    (dict(target_cur=0.9), r"TrainConfig.target_cur: 0.9 is unreachable.*CUR 0.7500"),
    (dict(target_speedup=50.0), r"TrainConfig.target_speedup: 50.0 is unreachable"),
    (dict(init_router=hc.Router.init(STEPS + 1, BLOCKS)), r"TrainConfig.init_router: .*router has 5 steps but the sampler runs 4"),
    (dict(init_router=hc.Router.init(STEPS, BLOCKS + 1)), r"TrainConfig.init_router: .*3 blocks but the model has 2"),
    (dict(method="l2c"), r"TrainConfig.l2c_latents: L2C trains on real data"),
    (dict(conditioning=None), r"TrainConfig.conditioning"),
    (dict(resume=True), r"TrainConfig.resume: resume=True needs checkpoint_dir"),
])
def test_bad_configs_fail_before_any_work(overrides, match):
    model = make_dit()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=match):
        train_router(model, ddim(), config(**overrides))
    assert guard.calls == 0


def test_unknown_scheduler_and_l2c_sampler_fail_before_any_work():
    model = make_dit()
    guard = Untouched(model)
    with pytest.raises(ValueError, match="scheduler LMSDiscreteScheduler is not supported"):
        train_router(model, LMSDiscreteScheduler(), config())
    with pytest.raises(ValueError, match="L2C training supports the DDIM scheduler only"):
        train_router(model, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
                     config(method="l2c", l2c_latents=l2c_data()))
    assert guard.calls == 0


def test_resume_from_another_models_checkpoint_fails_before_any_work(tmp_path):
    train_router(make_dit(), ddim(), config(checkpoint_dir=str(tmp_path)))
    other = make_dit(num_layers=BLOCKS + 1)
    guard = Untouched(other)
    with pytest.raises(ValueError, match=r"TrainConfig.resume: the checkpoint .* belongs to a different run "
                                         r"\(model num_blocks: checkpoint 2, now 3"):
        train_router(other, ddim(), config(checkpoint_dir=str(tmp_path), resume=True, iterations=2))
    with pytest.raises(ValueError, match=r"num_steps: checkpoint 4, now 5"):
        train_router(make_dit(), ddim(), config(checkpoint_dir=str(tmp_path), resume=True, num_steps=5))
    assert guard.calls == 0


@pytest.mark.parametrize("conditioning, match", [
    (ClassConditioning(1000, 1000), r"ClassConditioning.num_classes=1000 but DiTTransformer2DModel has 10 classes; "
                                    r"pass num_classes <= 10"),
    (ClassConditioning(NUM_CLASSES, 3), r"ClassConditioning.null_class=3 is wrong: the model's unconditional label is 10; pass null_class=10"),
])
def test_class_conditioning_is_checked_against_the_model(conditioning, match):
    model = make_dit()
    guard = Untouched(model)
    with pytest.raises(ValueError, match="TrainConfig.conditioning: " + match):
        train_router(model, ddim(), config(conditioning=conditioning))
    assert guard.calls == 0


def test_prompt_embeddings_of_the_wrong_width_fail_before_any_work():
    cond = PromptConditioning(embeds=torch.randn(3, 5, 7), negative_embeds=torch.randn(5, 7))
    model = make_pixart()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=r"PromptConditioning.embeds have width 7 but PixArtTransformer2DModel expects "
                                         r"text-encoder outputs of width 12 \(caption_channels\)"):
        train_router(model, ddim(), config(conditioning=cond))
    assert guard.calls == 0


@pytest.mark.parametrize("field", ["embeds", "negative_embeds"])
def test_non_finite_prompt_embeddings_are_refused_at_construction(field):
    values = {"embeds": torch.randn(3, 5, 12), "negative_embeds": torch.randn(5, 12)}
    values[field][0, 1] = float("inf") if field == "embeds" else float("nan")
    with pytest.raises(ValueError, match=f"PromptConditioning.{field} contains NaN or infinite values"):
        PromptConditioning(**values)


@pytest.mark.parametrize("fields, match", [
    (dict(num_steps=1), r"TrainConfig.num_steps: must be >= 2"),
    (dict(guidance_scale=float("nan")), r"TrainConfig.guidance_scale: must be a finite number >= 0.0, got nan"),
    (dict(guidance_scale=-1), r"TrainConfig.guidance_scale"),
    (dict(threshold=float("nan")), r"TrainConfig.threshold: must be in \(0, 1\)"),
    (dict(target_cur=0.3, target_speedup=1.5), r"TrainConfig.target_speedup: pass at most one"),
    (dict(target_speedup=0.9), r"TrainConfig.target_speedup: must be a finite number > 1.0"),
    (dict(seed=-1), r"TrainConfig.seed: must be an int >= 0"),
    (dict(keep_threshold="yes"), r"TrainConfig.keep_threshold: must be True or False, got 'yes'"),
    (dict(history_grad=1), r"TrainConfig.history_grad: must be True or False, got 1"),
    (dict(latent_size=0), r"TrainConfig.latent_size: must be an int >= 1"),
    (dict(conditioning=ClassConditioning(NUM_CLASSES, NUM_CLASSES), init_router="r.safetensors"),
     r"TrainConfig.init_router: must be a harmonica Router, got str"),
    (dict(method="l2c", l2c_latents=torch.full((2, 4, 8, 8), float("nan"))), r"TrainConfig.l2c_latents: contains NaN"),
    (dict(method="l2c", l2c_latents=torch.zeros(2, 4, 8, 8), l2c_choices=torch.tensor([0, 10]),
          conditioning=ClassConditioning(NUM_CLASSES, NUM_CLASSES)), r"TrainConfig.l2c_choices: values must lie in \[0, 10\)"),
])
def test_train_config_checks_its_fields_at_construction(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_class_conditioning_checks_itself_at_construction():
    with pytest.raises(ValueError, match="ClassConditioning.null_class must be an int >= 0, got -1"):
        ClassConditioning(10, -1)
    with pytest.raises(ValueError, match="ClassConditioning.num_classes must be >= 1"):
        ClassConditioning(0, 0)


def test_l2c_latents_of_another_shape_than_the_model_takes_fail_before_any_work():
    model = make_dit()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=r"TrainConfig.l2c_latents: samples have shape \(3, 8, 8\) but "
                                         r"DiTTransformer2DModel takes \(4, 8, 8\)"):
        train_router(model, ddim(), config(method="l2c", l2c_latents=torch.zeros(6, 3, 8, 8)))
    assert guard.calls == 0


@pytest.mark.parametrize("where", ["checkpoint_dir", "log_file"])
def test_unwritable_outputs_fail_before_any_work(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    model = make_dit()
    guard = Untouched(model)
    target = str(tmp_path / "afile" / "inside")
    with pytest.raises(ValueError, match=f"TrainConfig.{where}: .*afile is a file, not a folder"):
        train_router(model, ddim(), config(**{where: target}))
    assert guard.calls == 0 and os.listdir(tmp_path) == ["afile"]


def test_a_damaged_checkpoint_is_refused_before_any_work(tmp_path):
    from harmonica import formats

    formats.write(tmp_path / "checkpoint.safetensors", "train_checkpoint", {"logits": torch.zeros(STEPS, BLOCKS, 2)},
                  {"iteration": 0, "beta": float(0)})
    model = make_dit()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=r"checkpoint .* is damaged \(tensor 'lambda' is missing; iteration must be an "
                                         r"int >= 1, got 0; lambda_refreshes"):
        train_router(model, ddim(), config(checkpoint_dir=str(tmp_path), resume=True))
    assert guard.calls == 0


def test_the_router_records_its_sampler_grid_and_refuses_another(recwarn):
    model = make_dit()
    router = train_router(model, ddim(), config())
    assert router.metadata["sampler"] == "ddim"
    assert router.metadata["timesteps"] == [750.0, 500.0, 250.0, 0.0]
    labels = torch.arange(2)
    kwargs = dict(num_inference_steps=STEPS, cond={"class_labels": labels},
                  uncond={"class_labels": torch.full_like(labels, NUM_CLASSES)}, guidance_scale=1.5, progress=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hc.enable_cache(model, router.to_schedule())
    try:
        sample(model, ddim(), latents, **kwargs)
        assert len(recwarn) == 0
        with pytest.raises(ValueError, match="trained at the timesteps of ddim"):
            sample(model, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), latents, **kwargs)
    finally:
        hc.disable_cache(model)


def test_an_initial_router_for_another_sampler_warns():
    init = hc.Router.init(STEPS, BLOCKS, metadata={"sampler": "euler"})
    with pytest.warns(UserWarning, match="trained for the euler sampler but runs with ddim"):
        train_router(make_dit(), ddim(), config(init_router=init))


# ---------------------------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["harmonica", "l2c"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    kw = dict(method=method, iterations=5, checkpoint_every=1, iepo_refresh=2, target_cur=0.4, lr=0.05,
              l2c_latents=l2c_data(), beta_adapt_rate=0.1)
    full = train_router(make_dit(), ddim(), config(checkpoint_dir=str(tmp_path / "a"), **kw))

    def kill_after_3(info):
        if info["iteration"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_router(make_dit(), ddim(), config(checkpoint_dir=str(tmp_path / "b"), **kw), callback=kill_after_3)
    resumed = train_router(make_dit(), ddim(), config(checkpoint_dir=str(tmp_path / "b"), resume=True, **kw))
    assert torch.equal(resumed.logits, full.logits)
    for key in ("beta_final", "lambda", "threshold", "achieved_cur", "optimizer_updates"):
        assert resumed.metadata[key] == full.metadata[key], key
    # Checkpoints are safetensors written through a temp file: nothing half-written is left behind.
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.safetensors"]
    with safe_open(str(tmp_path / "b" / "checkpoint.safetensors"), framework="pt") as f:
        assert {"logits", "lambda", "adam.exp_avg", "adam.exp_avg_sq", "adam.step"} <= set(f.keys())
        header = json.loads(f.metadata()["harmonica"])
        assert header["kind"] == "train_checkpoint" and header["iteration"] == 5


class FailingRename:
    """os.replace that fails on its ``n``-th call: a crash between writing a checkpoint and renaming it."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(5, "Input/output error")
        self.real(src, dst)


def test_a_checkpoint_write_failing_before_its_rename_leaves_the_previous_one(tmp_path, monkeypatch):
    from harmonica import formats
    from harmonica.train import checkpoint

    monkeypatch.setattr(formats.os, "replace", FailingRename(2))
    with pytest.raises(OSError, match="Input/output error"):
        train_router(make_dit(), ddim(), config(iterations=3, checkpoint_every=1, checkpoint_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]  # no temporary file left behind
    tensors, document = checkpoint.load(tmp_path)
    assert document["iteration"] == 1
    monkeypatch.undo()
    resumed = train_router(make_dit(), ddim(), config(iterations=3, checkpoint_every=1, checkpoint_dir=str(tmp_path),
                                                      resume=True))
    assert resumed.metadata["optimizer_updates"] == 3 * (STEPS - 1)


def test_a_resumed_log_continues_without_duplicates(tmp_path):
    log = tmp_path / "train.jsonl"
    kw = dict(iterations=5, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"), log_file=str(log))

    def kill_after_3(info):
        if info["iteration"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_router(make_dit(), ddim(), config(**kw), callback=kill_after_3)
    with open(log, "a") as f:
        f.write('{"iteration": 4, "lo')  # a line cut short by the kill
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()[:-1]] == [1, 2, 3]
    train_router(make_dit(), ddim(), config(resume=True, **kw))  # from the checkpoint of iteration 2
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    # A new run (no resume) starts the log afresh.
    train_router(make_dit(), ddim(), config(iterations=2, log_file=str(log)))
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]


def test_log_file_and_router_file_round_trip(tmp_path):
    log = tmp_path / "train.jsonl"
    router = train_router(make_dit(), ddim(), config(iterations=2, log_file=str(log)))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    assert {"loss", "cur", "beta", "lambda_refreshes"} <= set(lines[0])
    router.save(tmp_path / "r.safetensors")
    loaded = hc.Router.load(tmp_path / "r.safetensors")
    assert torch.equal(loaded.logits, router.logits)
    assert loaded.metadata == router.metadata
    for key in ("train_config", "achieved_cur", "theoretical_speedup", "threshold", "sampler", "model_class",
                "block_width", "wall_time_s"):
        assert key in loaded.metadata
    hc.enable_cache(make_dit(), loaded.to_schedule(loaded.metadata["threshold"]))


# ---------------------------------------------------------------------------------------------- PixArt


def pixart_conditioning(n: int = 3) -> PromptConditioning:
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[:, -1] = 0
    return PromptConditioning(embeds=torch.randn(n, 5, 12, generator=g), mask=mask,
                              negative_embeds=torch.randn(5, 12, generator=g), negative_mask=torch.ones(5))


def test_pixart_trains_with_prompt_embeddings_on_dpm_solver():
    model = make_pixart()
    router0 = hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(4))
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
    router = train_router(model, sched, config(conditioning=pixart_conditioning(), init_router=router0,
                                               iterations=2, target_speedup=1.2))
    assert router.metadata["sampler"] == "dpmsolver++"
    assert router.metadata["model_class"] == "PixArtTransformer2DModel"
    assert not torch.equal(router.logits[1:], router0.logits[1:])
    assert router.metadata["theoretical_speedup"] >= 1.2
    l2c = train_router(model, ddim(), config(method="l2c", conditioning=pixart_conditioning(),
                                             l2c_latents=l2c_data(), iterations=2))
    assert l2c.metadata["method"] == "l2c"


def test_pixart_needs_a_negative_prompt_for_guidance():
    cond = pixart_conditioning()
    cond.negative_embeds = None
    with pytest.raises(ValueError, match="TrainConfig.conditioning: guidance_scale != 1 needs"):
        train_router(make_pixart(), ddim(), config(conditioning=cond))
    with pytest.raises(ValueError, match="is text-conditioned; pass PromptConditioning"):
        train_router(make_pixart(), ddim(), config())


# ---------------------------------------------------------------------------------------------- processes

WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from harmonica.train import ClassConditioning, TrainConfig, train_router
    torch.set_num_threads(1)
    kw, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**kw["model"]).eval()
    cfg = TrainConfig(conditioning=ClassConditioning(10, 10), **kw["config"])
    router = train_router(model, DDIMScheduler(num_train_timesteps=1000), cfg)
    router.save(f"{out}/rank{dist.get_rank()}.safetensors")
    dist.destroy_process_group()
""")


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    train_kw = dict(method="harmonica", num_steps=STEPS, guidance_scale=1.5, iterations=2, iepo_refresh=1,
                    progress=False, target_cur=0.3)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = json.dumps({"model": DIT_KW, "config": {**train_kw, "batch_size": 1}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), args, str(tmp_path)], check=True, env=env, timeout=300,
                   capture_output=True)
    rank0 = hc.Router.load(tmp_path / "rank0.safetensors")
    rank1 = hc.Router.load(tmp_path / "rank1.safetensors")
    assert torch.equal(rank0.logits, rank1.logits)
    assert rank0.metadata["world_size"] == 2
    one = train_router(make_dit(), ddim(), config(**{**train_kw, "batch_size": 2}))
    # Same samples (seeded by global index), same averaged gradients and lambda: only the reduction
    # order differs (mean of two per-process means vs one mean).
    torch.testing.assert_close(rank0.logits, one.logits, rtol=1e-5, atol=1e-5)
    assert rank0.metadata["lambda"] == pytest.approx(one.metadata["lambda"], rel=1e-4)
    # ...and the second process's samples matter: a single process with batch 1 ends elsewhere.
    alone = train_router(make_dit(), ddim(), config(**{**train_kw, "batch_size": 1}))
    assert not torch.allclose(alone.logits, rank0.logits, atol=1e-4)
