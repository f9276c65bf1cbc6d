"""Drop-in cached inference for diffusers DiT and PixArt (enable_cache / disable_cache).

The independent reference for any schedule is :class:`tiny.HookedReference`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, Transformer2DModel

import harmonica as hc
from harmonica.cache.install import BlockForward
from harmonica.sampling import denoise, sample
from tiny import (BLOCKS, MODELS, SCHEDULES, STEPS, dit_conditioning, dit_pipeline, hooked_pipeline_run, make_dit,
                  make_vae, pixart_pipeline, pixart_pipeline_kwargs, random_schedule, reference_sample, rel_err)


# ---------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_sampling_matches_independent_reference(family, schedule_name):
    make_model, conditioning = MODELS[family]
    model = make_model()
    schedule = SCHEDULES[schedule_name]()
    cond, uncond = conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_sample(model, schedule, latents, cond, uncond, 3.0)
    uncached = reference_sample(model, hc.Schedule.full(STEPS, BLOCKS), latents, cond, uncond, 3.0)
    hc.enable_cache(model, schedule)
    got = sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                 guidance_scale=3.0, progress=False)
    # Same arithmetic up to fused multiply-add rounding in the cache kernels (one rounding where the
    # reference has two). These random-weight models amplify such differences (a schedule moves the
    # result by 27-104%), so after 4 steps single elements differ by up to 1.7e-5 on an AVX-512 Xeon
    # (1e-5 on an AMD EPYC) while the error over the whole output stays at 2-3e-6: bound both, with
    # the norm-wise bound at float32 rounding level, as for the pipelines below.
    assert rel_err(got, expected) <= 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert rel_err(got, uncached) > 1e-3, "the schedule must actually change the result"
    state = hc.get_cache_state(model)
    assert state.cache_bytes == 0, "slots are released at the end of a run"
    assert state.peak_cache_bytes > 0


def test_dit_pipeline_full_schedule_matches_unpatched():
    pipe = DiTPipeline(transformer=make_dit(), vae=make_vae(), scheduler=DDIMScheduler())
    kwargs = dict(class_labels=[1, 5], num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    hc.enable_cache(pipe, hc.Schedule.full(STEPS, BLOCKS))
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("pipeline_cls", [PixArtAlphaPipeline, PixArtSigmaPipeline], ids=lambda c: c.__name__)
def test_pixart_pipeline_full_schedule_matches_unpatched(pipeline_cls):
    pipe = pixart_pipeline(pipeline_cls)
    expected = pipe(**pixart_pipeline_kwargs(), generator=torch.Generator().manual_seed(0)).images
    hc.enable_cache(pipe, hc.Schedule.full(STEPS, BLOCKS))
    got = pipe(**pixart_pipeline_kwargs(), generator=torch.Generator().manual_seed(0)).images
    assert rel_err(got, expected) <= 1e-5


def test_pipeline_loop_follows_schedule_across_calls():
    """Inside the pipeline's own loop (steps tracked through its scheduler), twice in a row."""
    schedule = random_schedule(1)
    kwargs = lambda: dict(class_labels=[3], num_inference_steps=STEPS, guidance_scale=2.0, output_type="np")  # noqa: E731
    expected = hooked_pipeline_run(dit_pipeline(), kwargs, schedule)
    pipe = dit_pipeline()
    hc.enable_cache(pipe, schedule)
    for _ in range(2):  # the second call must start again at step 0
        got = pipe(**kwargs(), generator=torch.Generator().manual_seed(0)).images
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cfg_as_two_calls_per_step_in_a_foreign_loop():
    """A bare transformer called by another loop, cond and uncond as separate calls: steps follow t."""
    model = make_dit()
    schedule = random_schedule(2)
    cond, uncond = dit_conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = reference_sample(model, schedule, latents, cond, uncond, 2.5)

    def two_calls(x, t, step):
        ts = torch.as_tensor(t).expand(x.shape[0])
        c = model(x, timestep=ts, **cond).sample[:, :4]
        u = model(x, timestep=ts, **uncond).sample[:, :4]
        return u + 2.5 * (c - u)

    runtime = hc.enable_cache(model, schedule, calls_per_step=2)
    with torch.no_grad():
        for _ in range(2):
            got = denoise(two_calls, DDIMScheduler(), latents, num_inference_steps=STEPS, progress=False)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Each call of a step keeps its own slots: one block of twice the schedule's peak (a bound: the two
    # calls' tables need not peak at the same time).
    slots = runtime.slots
    assert (slots.allocations, slots.allocated_slots) == (1, 2 * schedule.peak_cache_slots())
    assert 0 < runtime.peak_cache_bytes <= slots.allocated_slots * 2 * 16 * 32 * 4  # (2 samples, 16 tokens, width 32)


# ---------------------------------------------------------------------------------- per-sample
@pytest.mark.parametrize("family", MODELS)
def test_per_sample_steps_follow_each_samples_row(family):
    """A serving loop: row 0 starts at call 0, row 1 restarts at step 0 until call 2, then advances.

    Each row's outputs must equal those of a run of that sample alone under the uniform schedule.
    """
    make_model, conditioning = MODELS[family]
    model = make_model()
    schedule = random_schedule(4)
    cond, _ = conditioning()
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(STEPS)]
    offset = 2
    steps_per_call = [(k, max(0, k - offset)) for k in range(STEPS)]

    def call(m, x, steps, rows):
        t = torch.tensor([999.0 - 100 * s for s in steps])
        kwargs = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
        return m(x, timestep=t, **kwargs).sample

    hc.enable_cache(model, schedule)
    with torch.no_grad():
        got = []
        with hc.per_sample(model) as serving:
            for k, steps in enumerate(steps_per_call):
                serving.steps = steps
                got.append(call(model, inputs[k], steps, slice(None)))
        hc.disable_cache(model)

        for row, first_call in ((0, 0), (1, offset)):
            hc.enable_cache(model, schedule)
            for k in range(first_call, STEPS):
                step = steps_per_call[k][row]
                expected = call(model, inputs[k][row : row + 1], [step], slice(row, row + 1))
                torch.testing.assert_close(got[k][row : row + 1], expected, rtol=1e-5, atol=1e-5)
            hc.disable_cache(model)


def test_per_sample_rejects_a_sample_that_skips_step_zero():
    model = make_dit()
    hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS))
    with hc.per_sample(model) as serving:
        serving.steps = [0, 1]
        with pytest.raises(RuntimeError, match="sample 1 is at step 1 .* never filled; start each sample at step 0"):
            with torch.no_grad():
                model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 899]), class_labels=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"steps must be .* ints in \[0, 6\)"):
            serving.steps = [0, 6]


# ---------------------------------------------------------------------------------- torch.compile
def test_torch_compile_without_graph_breaks():
    model = make_dit()
    schedule = random_schedule(6)
    cond, uncond = dit_conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    hc.enable_cache(model, schedule)
    eager = sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                   guidance_scale=2.0, progress=False)
    torch._dynamo.reset()
    # fullgraph=True turns any graph break into an error. One graph per distinct schedule step.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=STEPS + 1):
        got = sample(compiled, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                     guidance_scale=2.0, progress=False)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- memory, cost
def test_slots_live_only_until_their_last_read():
    model = make_dit()
    # Only block 0's mlp is ever reused, at steps 1 and 2: one slot of (2 CFG halves x 2, 16, 32) floats.
    mask = torch.ones(STEPS, BLOCKS, 2, dtype=torch.bool)
    mask[1:3, 0, 1] = False
    hc.enable_cache(model, hc.Schedule(mask))
    cond, uncond = dit_conditioning()
    sample(model, DDIMScheduler(), torch.randn(2, 4, 8, 8), num_inference_steps=STEPS, cond=cond, uncond=uncond,
           guidance_scale=2.0, progress=False)
    state = hc.get_cache_state(model)
    assert state.peak_cache_bytes == 4 * 16 * 32 * 4
    assert state.cache_bytes == 0


def test_model_cost_counts_the_real_matmuls():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = make_dit()
    batch, tokens, dim = 3, 16, 32
    cost = hc.model_cost(model, batch=batch)
    block = model.transformer_blocks[0]
    h = torch.randn(batch, tokens, dim)
    # The math backend runs attention as two bmm's that FlopCounterMode counts (the CPU flash kernel is not).
    with FlopCounterMode(display=False) as attn_counter, sdpa_kernel(SDPBackend.MATH):
        block.attn1(h)
    with FlopCounterMode(display=False) as mlp_counter:
        block.ff(h)
    norm_and_modulation = 8.0 * batch * tokens * dim  # elementwise work, not counted by FlopCounterMode
    assert cost.attn - norm_and_modulation == attn_counter.get_total_flops()
    assert cost.mlp - norm_and_modulation == mlp_counter.get_total_flops()
    assert 0 < cost.fixed < cost.attn + cost.mlp
    speedup = hc.Schedule.fora(20, BLOCKS).theoretical_speedup(cost)
    total = BLOCKS * (cost.attn + cost.mlp) + cost.fixed
    assert speedup == pytest.approx(20 * total / (10 * total + 10 * cost.fixed))


# ---------------------------------------------------------------------------------- enable / disable
def test_disable_restores_the_original_forwards():
    model = make_dit()
    block_forward = type(model.transformer_blocks[0]).forward
    hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS))
    # The transformer is only observed (torch module hooks); each block's own forward is replaced.
    assert "forward" not in model.__dict__
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    assert all(isinstance(b.__dict__.get("forward"), BlockForward) for b in model.transformer_blocks)
    hc.disable_cache(model)
    assert "forward" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    for block in model.transformer_blocks:
        assert block.forward.__func__ is block_forward and "forward" not in block.__dict__
    assert hc.get_cache_state(model) is None
    with pytest.raises(RuntimeError, match="caching is not enabled"):
        hc.disable_cache(model)


def test_enable_twice_is_an_error():
    model = make_dit()
    hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS))
    with pytest.raises(RuntimeError, match="already enabled.*disable_cache"):
        hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))


def assert_untouched(model):
    assert "forward" not in model.__dict__ and not model._forward_pre_hooks
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)
    assert hc.get_cache_state(model) is None


def test_schedule_for_another_depth_fails_before_patching():
    model = make_dit()
    with pytest.raises(ValueError, match="incompatible schedule"):
        hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS + 1))
    assert_untouched(model)


def test_schedule_for_another_model_class_fails_before_patching():
    model = make_dit()
    schedule = hc.Schedule(hc.Schedule.fora(STEPS, BLOCKS).mask, metadata={"model_class": "PixArtTransformer2DModel"})
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        hc.enable_cache(model, schedule)
    assert_untouched(model)


def test_unsupported_models_get_the_supported_list():
    plain = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1, norm_num_groups=4,
                               norm_type="layer_norm")
    with pytest.raises(TypeError, match="not supported; harmonica supports: dit .*pixart"):
        hc.enable_cache(plain, hc.Schedule.full(STEPS, 1))
    with pytest.raises(TypeError, match="has no `transformer_blocks`"):
        hc.enable_cache(torch.nn.Linear(2, 2), hc.Schedule.full(STEPS, 1))
    with pytest.raises(TypeError, match="schedule must be a harmonica.Schedule"):
        hc.enable_cache(make_dit(), torch.ones(STEPS, BLOCKS, 2, dtype=torch.bool))


def test_pipeline_run_longer_than_schedule_fails_before_any_block_runs():
    pipe = DiTPipeline(transformer=make_dit(), vae=make_vae(), scheduler=DDIMScheduler())
    hc.enable_cache(pipe, hc.Schedule.fora(STEPS, BLOCKS))
    calls = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=f"schedule has {STEPS} steps .* pass num_inference_steps={STEPS}"):
        pipe(class_labels=[1], num_inference_steps=STEPS + 1, output_type="np")
    assert calls == []


def test_foreign_loop_longer_than_schedule_fails_with_the_fix():
    model = make_dit()
    hc.enable_cache(model, hc.Schedule.fora(3, BLOCKS))
    x, labels = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with torch.no_grad():
        for t in (900, 600, 300):
            model(x, timestep=torch.tensor([t]), class_labels=labels)
        with pytest.raises(RuntimeError, match="schedule has 3 steps .* pass num_inference_steps=3"):
            model(x, timestep=torch.tensor([100]), class_labels=labels)
