"""The cache runtime where users live: diffusers' offloading and casting hooks, copies, autocast,
interrupted runs, and the one home of each concept (clock, slots, policies).

Pipelines are tiny random-weight diffusers models on the CPU (offloading to "cpu" exercises the real
hook code paths: sequential offload really moves weights to the meta device between calls).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline

import harmonica as hc
from harmonica import ops
from harmonica.cache.install import BlockForward
from harmonica.sampling import denoise, guided, sample
from tiny import (BLOCKS, STEPS, dit_conditioning, dit_pipeline, dit_pipeline_kwargs, hooked_pipeline_run, make_dit,
                  pixart_pipeline, pixart_pipeline_kwargs, random_schedule, rel_err)

def pixart_latent_kwargs() -> dict:
    # Latents, not decoded images: the tiny random VAE flattens the differences a schedule makes.
    return {**pixart_pipeline_kwargs(), "output_type": "latent"}


PIPELINES = {"dit": (dit_pipeline, dit_pipeline_kwargs), "pixart": (pixart_pipeline, pixart_latent_kwargs)}
SCHEDULE = random_schedule(7)


def run(pipe, kwargs_fn, seed: int = 0) -> np.ndarray:
    return np.asarray(pipe(**kwargs_fn(), generator=torch.Generator().manual_seed(seed)).images)


def hooked_reference_run(pipe, kwargs_fn, schedule) -> np.ndarray:
    return np.asarray(hooked_pipeline_run(pipe, kwargs_fn, schedule))


# ---------------------------------------------------------------------------------- diffusers hooks
def _count_calls(obj, name: str) -> list:
    calls, inner = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def _model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")


def _model_offload_active(pipe):
    calls = _count_calls(pipe.transformer._hf_hook, "pre_forward")
    return lambda: len(calls) == STEPS


def _sequential_offload(pipe):
    # What pipe.enable_sequential_cpu_offload() installs (accelerate's cpu_offload on every component).
    # The pipeline method itself cannot run on a CPU-only machine: it turns device="cpu" into "cpu:0",
    # on which accelerate 1.15 fails with or without harmonica; a GPU test calls it for real.
    from accelerate import cpu_offload

    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


def _sequential_offload_active(pipe):
    # Between calls the weights live on the meta device: only the hooks make a forward possible at all.
    return lambda: pipe.transformer.transformer_blocks[0].ff.net[0].proj.weight.device.type == "meta"


def _group_offload(offload_type):
    # What model.enable_group_offload() installs; called directly because diffusers marks
    # DiTTransformer2DModel (not PixArt) as unsupported by that method.
    from diffusers.hooks import apply_group_offloading

    def enable(pipe):
        apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"), offload_type=offload_type,
                               num_blocks_per_group=1 if offload_type == "block_level" else None)
    return enable


def _group_offload_active(pipe):
    module = pipe.transformer.transformer_blocks[0]
    if getattr(module, "_diffusers_hook", None) is None:  # leaf level: hooks on the leaves
        module = module.ff.net[0].proj
    calls = _count_calls(module._diffusers_hook.get_hook("group_offloading").group, "onload_")
    return lambda: len(calls) >= STEPS


def _layerwise_casting(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _layerwise_casting_active(pipe):
    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.weight
    return lambda: weight.dtype == torch.bfloat16


# name -> (enable the helper on a pipeline, arm a probe that later says whether the helper ran)
HELPERS = {
    "model_cpu_offload": (_model_offload, _model_offload_active),
    "sequential_cpu_offload": (_sequential_offload, _sequential_offload_active),
    "group_offload_block": (_group_offload("block_level"), _group_offload_active),
    "group_offload_leaf": (_group_offload("leaf_level"), _group_offload_active),
    "layerwise_casting": (_layerwise_casting, _layerwise_casting_active),
}


def assert_no_harmonica(transformer):
    assert hc.get_cache_state(transformer) is None
    assert not any(isinstance(getattr(m, "forward", None), BlockForward) for m in transformer.modules())


@pytest.mark.parametrize("order", ["cache_first", "hook_first"])
@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("family", PIPELINES)
def test_cache_composes_with_diffusers_hooks(family, helper, order):
    make_pipe, kwargs_fn = PIPELINES[family]
    enable_helper, probe = HELPERS[helper]

    def with_helper():
        pipe = make_pipe()
        enable_helper(pipe)
        return pipe

    # References: the helper alone (uncached) and the schedule by the independent hooked reference.
    uncached = run(with_helper(), kwargs_fn)
    expected = hooked_reference_run(with_helper(), kwargs_fn, SCHEDULE)
    assert rel_err(expected, uncached) > 1e-3, "the schedule must change the result"

    pipe = make_pipe()
    if order == "cache_first":
        hc.enable_cache(pipe, SCHEDULE)
        enable_helper(pipe)
    else:
        enable_helper(pipe)
        hc.enable_cache(pipe, SCHEDULE)
    active = probe(pipe)
    for _ in range(2):  # the second run checks that maybe_free_model_hooks' re-install kept the cache
        # Norm-wise at float32 rounding level: the fused kernels round once where the reference rounds
        # twice, and these random-weight models amplify that to ~3e-5 in single elements.
        assert rel_err(run(pipe, kwargs_fn), expected) <= 1e-5
    assert active(), f"{helper} stopped working with the cache enabled"

    hc.disable_cache(pipe)
    assert_no_harmonica(pipe.transformer)
    active = probe(pipe)
    np.testing.assert_allclose(run(pipe, kwargs_fn), uncached, rtol=1e-5, atol=1e-6)
    assert active(), f"disable_cache broke {helper}"
    # With the helper still on, caching everything is the uncached pipeline, to the bit.
    hc.enable_cache(pipe, hc.Schedule.full(STEPS, BLOCKS))
    np.testing.assert_array_equal(run(pipe, kwargs_fn), uncached)


CUDA_HELPERS = {
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cuda"),
    "sequential_cpu_offload": lambda pipe: pipe.enable_sequential_cpu_offload(device="cuda"),
    "group_offload_leaf_streams": lambda pipe: pipe.transformer.enable_group_offload(
        onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order", ["cache_first", "hook_first"])
@pytest.mark.parametrize("helper", CUDA_HELPERS)
def test_cache_composes_with_the_pipelines_own_offloading_on_cuda(helper, order):
    """The pipeline methods themselves (the CPU tests install the same hooks directly: on a machine
    without a GPU these methods refuse or fail inside accelerate). PixArt: diffusers allows group
    offloading on it, not on DiT."""
    make_pipe, kwargs_fn = PIPELINES["pixart"]
    pipe = make_pipe()
    CUDA_HELPERS[helper](pipe)
    expected = hooked_reference_run(pipe, kwargs_fn, SCHEDULE)
    pipe = make_pipe()
    steps = (lambda: hc.enable_cache(pipe, SCHEDULE), lambda: CUDA_HELPERS[helper](pipe))
    for step in steps if order == "cache_first" else steps[::-1]:
        step()
    for _ in range(2):
        assert rel_err(run(pipe, kwargs_fn), expected) <= 1e-4  # TF32-free float32 on the GPU, fused rounding
    hc.disable_cache(pipe)
    assert_no_harmonica(pipe.transformer)


@pytest.mark.parametrize("helper", ["model_cpu_offload", "sequential_cpu_offload"])
def test_remove_all_hooks_keeps_the_cache_and_disable_still_cleans_up(helper):
    expected = hooked_reference_run(dit_pipeline(), dit_pipeline_kwargs, SCHEDULE)
    for order in ("cache_first", "hook_first"):
        pipe = dit_pipeline()
        steps = (lambda: hc.enable_cache(pipe, SCHEDULE), lambda: HELPERS[helper][0](pipe))
        for step in steps if order == "cache_first" else steps[::-1]:
            step()
        pipe.remove_all_hooks()
        assert not hasattr(pipe.transformer, "_hf_hook")
        assert rel_err(run(pipe, dit_pipeline_kwargs), expected) <= 1e-5
        hc.disable_cache(pipe)
        assert_no_harmonica(pipe.transformer)
        # Every module runs its own forward again (accelerate leaves its bound method as an attribute).
        assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in pipe.transformer.modules())


def test_another_diffusers_cache_is_refused_before_anything_changes():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = dit_pipeline()
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(TypeError, match=r"already has diffusers hook .* \(another cache\?\)"):
        hc.enable_cache(pipe, SCHEDULE)
    assert_no_harmonica(pipe.transformer)


def test_a_foreign_forward_wrapper_is_refused_before_anything_changes():
    model = make_dit()
    block = model.transformer_blocks[1]
    own = block.forward
    block.forward = lambda *args, **kwargs: own(*args, **kwargs)
    with pytest.raises(TypeError, match="wrapped by .* cannot compose"):
        hc.enable_cache(model, SCHEDULE)
    assert_no_harmonica(model)


# ---------------------------------------------------------------------------------- copies
def test_deepcopy_of_a_cached_model_is_an_independent_cached_model():
    model = make_dit()
    cond, uncond = dit_conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def cached_sample(m):
        return sample(m, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                      guidance_scale=3.0, progress=False)

    hc.enable_cache(model, SCHEDULE)
    before = cached_sample(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.transformer_blocks[0].ff.net[2].weight.mul_(2.0)  # the copy's own weights
    changed = cached_sample(twin)
    assert rel_err(changed, before) > 1e-3, "the copy must run its own weights"
    torch.testing.assert_close(cached_sample(model), before, rtol=0, atol=0)
    # The copy is cached (the schedule applies) and independent: its own runtime and slots.
    assert hc.get_cache_state(twin) is not hc.get_cache_state(model)
    reference = make_dit()
    with torch.no_grad():
        reference.transformer_blocks[0].ff.net[2].weight.mul_(2.0)
    from tiny import reference_sample

    torch.testing.assert_close(changed, reference_sample(reference, SCHEDULE, latents, cond, uncond, 3.0),
                               rtol=1e-5, atol=1e-4)
    hc.disable_cache(twin)
    assert hc.get_cache_state(model) is not None


def test_deepcopy_of_a_cached_pipeline_is_driven_by_its_own_scheduler():
    pipe = dit_pipeline()
    hc.enable_cache(pipe, SCHEDULE)
    expected = run(pipe, dit_pipeline_kwargs)
    twin = copy.deepcopy(pipe)
    assert hc.get_cache_state(twin).drives(twin.scheduler)
    assert not hc.get_cache_state(twin).drives(pipe.scheduler)
    assert not hc.get_cache_state(pipe).drives(twin.scheduler)
    np.testing.assert_array_equal(run(twin, dit_pipeline_kwargs), expected)
    np.testing.assert_array_equal(run(pipe, dit_pipeline_kwargs), expected)


def test_pickling_a_cached_model_is_refused_with_the_way_out(tmp_path):
    model = make_dit()
    hc.enable_cache(model, SCHEDULE)
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(model, tmp_path / "m.pt")
    hc.disable_cache(model)
    pickle.dumps(model)  # an uncached model pickles as before


# ---------------------------------------------------------------------------------- autocast, promotion
@pytest.mark.parametrize("family", PIPELINES)
def test_autocast_bf16_cached_follows_the_uncached_model(family):
    make_pipe, kwargs_fn = PIPELINES[family]
    pipe = make_pipe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = run(pipe, kwargs_fn)
        expected = hooked_reference_run(pipe, kwargs_fn, SCHEDULE)
        hc.enable_cache(pipe, hc.Schedule.full(STEPS, BLOCKS))
        full = run(pipe, kwargs_fn)
        hc.disable_cache(pipe)
        hc.enable_cache(pipe, SCHEDULE)
        scheduled = run(pipe, kwargs_fn)
    hc.disable_cache(pipe)
    float32 = run(pipe, kwargs_fn)
    bf16_error = rel_err(uncached, float32)  # what bf16 autocast itself costs this model
    assert 1e-3 < bf16_error < 0.1
    # Cached under the same autocast, the model computes what the uncached one does: a full schedule runs
    # the eager composition, so only rounding noise separates them ...
    assert rel_err(full, uncached) < 0.25 * bf16_error
    # ... and the fused ops of a real schedule compute gate * branch in float32 where eager first rounds
    # the product to bf16, which moves a random-weight model by less than bf16's own error.
    assert rel_err(scheduled, expected) < bf16_error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_on_cuda_cached_follows_the_uncached_model(dtype):
    pipe = dit_pipeline().to("cuda")
    with torch.autocast("cuda", dtype=dtype):
        uncached = run(pipe, dit_pipeline_kwargs)
        expected = hooked_reference_run(pipe, dit_pipeline_kwargs, SCHEDULE)
        hc.enable_cache(pipe, SCHEDULE)
        scheduled = run(pipe, dit_pipeline_kwargs)
    hc.disable_cache(pipe)
    half_error = rel_err(uncached, run(pipe, dit_pipeline_kwargs))  # what autocast itself costs
    assert rel_err(scheduled, expected) < max(half_error, 1e-3)


def test_ops_promote_mixed_dtypes_like_the_eager_composition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    gate = torch.randn(2, 16, generator=g).bfloat16()
    branch = torch.randn(2, 5, 16, generator=g).bfloat16()
    # torch.addcmul promotes its inputs first and rounds once, as the fused kernels do (the two-op
    # composition x + gate * branch would round the bf16 product to bf16 before adding).
    eager = torch.addcmul(x, gate[:, None], branch)
    assert eager.dtype == torch.float32
    slot = torch.empty(2, 5, 16)
    out = ops.cache_write(x, gate, branch, slot)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(slot, branch.float())
    torch.testing.assert_close(ops.cache_read(x, gate, slot), eager)
    with pytest.raises(ValueError, match="x, updated in place, has dtype torch.bfloat16.*out-of-place cache_read"):
        ops.cache_read_(x.bfloat16(), gate, slot)


# ---------------------------------------------------------------------------------- interrupted runs
class Interrupt(Exception):
    pass


def inject_at_call(transformer, k: int, error=Interrupt):
    """Raise inside model call number ``k`` (after block 0 ran and stored its slots)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == k + 1:
            raise error(f"injected at model call {k}")

    return transformer.transformer_blocks[1].register_forward_pre_hook(hook)


def _bare_loop(pipe, kwargs_fn):
    """A foreign loop with its own scheduler object, driving the bare transformer (timestep following)."""
    cond, uncond = dit_conditioning(2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return denoise(guided(pipe.transformer, cond, uncond, 3.0), DDIMScheduler(), latents,
                       num_inference_steps=STEPS, progress=False).numpy()


def _harmonica_loop(pipe, kwargs_fn):
    cond, uncond = dit_conditioning(2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return sample(pipe.transformer, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
                  guidance_scale=3.0, progress=False).numpy()


def _new_scheduler_object(pipe, kwargs_fn):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return run(pipe, kwargs_fn)


def _second_pipeline(pipe, kwargs_fn):
    other = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=DDIMScheduler())
    return run(other, kwargs_fn)


DRIVERS = {
    "pipeline": lambda pipe, kwargs_fn: run(pipe, kwargs_fn),
    "harmonica_loop": _harmonica_loop,
    "new_scheduler_object": _new_scheduler_object,
    "second_pipeline": _second_pipeline,
    "bare_loop": _bare_loop,
}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_run_after_an_interrupted_one_starts_clean(driver):
    def fresh_result():
        pipe = dit_pipeline()
        hc.enable_cache(pipe, SCHEDULE)
        return DRIVERS[driver](pipe, dit_pipeline_kwargs)

    expected = fresh_result()
    for k in range(STEPS):
        for error in (Interrupt, KeyboardInterrupt):
            pipe = dit_pipeline()
            hc.enable_cache(pipe, SCHEDULE)
            handle = inject_at_call(pipe.transformer, k, error)
            with pytest.raises(error):
                run(pipe, dit_pipeline_kwargs)
            handle.remove()
            np.testing.assert_array_equal(DRIVERS[driver](pipe, dit_pipeline_kwargs), expected,
                                          err_msg=f"after an interruption at model call {k}")


def test_a_bare_loop_shorter_than_the_schedule_fails_at_the_next_run():
    model = make_dit()
    hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS))
    x, labels = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with torch.no_grad():
        for t in (900, 700, 500):  # 3 of the schedule's 6 steps
            model(x, timestep=torch.tensor([t]), class_labels=labels)
        with pytest.raises(RuntimeError, match=f"previous run .* made 3 model evaluations but the schedule has {STEPS}"):
            model(x, timestep=torch.tensor([900]), class_labels=labels)
        model(x, timestep=torch.tensor([900]), class_labels=labels)  # the error does not stick


def test_repeated_calls_at_one_timestep_are_refused_not_accumulated():
    model = make_dit()
    runtime = hc.enable_cache(model, hc.Schedule.fora(STEPS, BLOCKS))
    x, labels, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([999, 999])
    with torch.no_grad():
        model(x, timestep=t, class_labels=labels)
        stored = runtime.cache_bytes
        assert stored > 0
        with pytest.raises(RuntimeError, match="called 2 times in step 0 .* calls_per_step=2"):
            model(x, timestep=t, class_labels=labels)
    assert runtime.cache_bytes <= stored


def test_per_sample_mode_is_scoped():
    pipe = dit_pipeline()
    hc.enable_cache(pipe, SCHEDULE)
    expected = run(pipe, dit_pipeline_kwargs)
    runtime = hc.get_cache_state(pipe)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with hc.per_sample(pipe) as serving, torch.no_grad():
        for step in range(3):
            serving.steps = [step, 0]
            pipe.transformer(x, timestep=torch.tensor([999 - step, 999]), class_labels=labels)
            # One slot per unit whatever the steps: memory stays bounded in per-sample mode.
            assert runtime.cache_bytes <= BLOCKS * 2 * x.shape[0] * 16 * 32 * 4
        assert runtime.cache_bytes > 0 and runtime.slots.block_slots == BLOCKS * 2
    assert runtime.cache_bytes == 0 and runtime.slots.block_slots == SCHEDULE.peak_cache_slots()
    np.testing.assert_array_equal(run(pipe, dit_pipeline_kwargs), expected)


# ---------------------------------------------------------------------------------- one home per concept
def test_router_to_schedule_uses_its_trained_threshold():
    logits = torch.linspace(-3, 3, 6 * 3 * 2).reshape(6, 3, 2)
    router = hc.Router(logits, metadata={"threshold": 0.6})
    assert router.to_schedule() == router.to_schedule(0.6)
    assert router.to_schedule() != router.to_schedule(hc.schedule.DEFAULT_THRESHOLD)
    assert hc.Router(logits).to_schedule() == hc.Router(logits).to_schedule(hc.schedule.DEFAULT_THRESHOLD)


def test_soft_training_refreshes_slots_at_the_configured_threshold():
    from harmonica.train.policies import SoftPolicy

    model = make_dit()
    runtime = hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))
    cond, uncond = dit_conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    weights = torch.full((STEPS, BLOCKS, 2), 0.5)

    def slots_after_step_1(threshold):
        seen = {}

        def fn(x, t, step):
            eps = guided(model, cond, uncond, 2.0)(x, t, step)
            if step == 1:
                seen.update({k: runtime.slots.get(k).clone() for k in runtime.slots.keys()})
            return eps

        scheduler = DDIMScheduler()
        with torch.no_grad(), runtime.using(SoftPolicy(weights, threshold)), runtime.driven_by(scheduler):
            denoise(fn, scheduler, latents, num_inference_steps=STEPS, progress=False)
        return seen

    kept, refreshed = slots_after_step_1(0.7), slots_after_step_1(0.3)
    assert kept.keys() == refreshed.keys()
    assert all(not torch.equal(kept[k], refreshed[k]) for k in kept), "w=0.5 refreshes at 0.3, not at 0.7"


def test_model_facts_live_on_the_adapters():
    from harmonica.adapters import model_facts

    dit = model_facts(make_dit())
    assert (dit.family, dit.conditioning, dit.num_classes, dit.null_class, dit.num_blocks) == ("dit", "class", 1000,
                                                                                              1000, BLOCKS)
    pixart = model_facts(pixart_pipeline().transformer)
    assert (pixart.family, pixart.conditioning, pixart.text_dim) == ("pixart", "text", 24)


# ---------------------------------------------------------------------------------- slot memory
def liveness_peak(mask: torch.Tensor) -> int:
    """The most slots alive at once, simulated unit by unit in forward order: a computed unit whose
    next step reuses it holds a slot from its compute to its last consecutive reuse."""
    steps, blocks, _ = mask.shape
    live, peak = set(), 0
    for t in range(steps):
        for block in range(blocks):
            for branch in range(2):
                unit = (block, branch)
                reused_next = t + 1 < steps and not bool(mask[t + 1, block, branch])
                if bool(mask[t, block, branch]):
                    live.discard(unit)
                    if reused_next:
                        live.add(unit)
                elif not reused_next:
                    peak = max(peak, len(live))
                    live.discard(unit)
                    continue
                peak = max(peak, len(live))
    return peak


def test_warm_runs_allocate_no_slot_storage_and_peak_is_the_liveness_bound():
    model = make_dit()
    runtime = hc.enable_cache(model, SCHEDULE)
    cond, uncond = dit_conditioning()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def one_run():
        sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
               guidance_scale=2.0, progress=False)

    one_run()
    slot_bytes = 4 * 16 * 32 * 4  # (2 CFG halves x 2 samples, 16 tokens, width 32) float32
    peak = liveness_peak(SCHEDULE.mask)
    # One block of storage, of exactly as many slots as are alive at once.
    assert (runtime.slots.allocations, runtime.slots.allocated_slots) == (1, peak) and peak > 0
    assert runtime.peak_cache_bytes == peak * slot_bytes
    for _ in range(2):
        one_run()
    assert (runtime.slots.allocations, runtime.slots.allocated_slots) == (1, peak), "warm runs recycle the storage"
    assert runtime.peak_cache_bytes == peak * slot_bytes
    assert runtime.cache_bytes == 0 and runtime.slots.pooled_bytes == runtime.peak_cache_bytes
    hc.disable_cache(model)


def test_training_slots_are_never_pooled():
    """Training stores each slot as a new tensor (store_new: autograd may still hold the old one). Those
    tensors must neither be handed out again nor pile up in the pool run after run (an L2C run with
    forecast tables grew by every update's slots, to 21 GB before the OOM killer stopped it)."""
    from harmonica.cache.slots import SlotStore

    store = SlotStore()
    for _ in range(50):  # one "run" per optimiser update: every unit's table replaced at each step
        for step in range(3):
            for unit in range(4):
                store.store_new(unit, torch.full((3, 2, 8), float(step)))
        store.release()
        assert store.pooled_bytes == 0 and store.cache_bytes == 0
    kept = torch.zeros(3, 2, 8)
    store.store_new("unit", kept)
    store.free("unit")
    assert store.slot_for("other", kept).data_ptr() != kept.data_ptr()  # its memory is not reused


def test_fresh_slots_are_views_of_one_block_each_starting_on_a_cache_line():
    from harmonica.cache.slots import SlotStore

    store = SlotStore()
    store.block_slots = 3
    like = torch.empty(5, 3, dtype=torch.float16)  # 30 bytes: the next slot starts 64 bytes on
    slots = [store.slot_for(key, like) for key in "abc"]
    assert (store.allocations, store.allocated_slots) == (1, 3)
    assert all(s.shape == like.shape and s.dtype == like.dtype and s.is_contiguous() for s in slots)
    pointers = sorted(s.data_ptr() for s in slots)
    assert all(p % 64 == 0 for p in pointers) and pointers[1] - pointers[0] == 64
    assert len({s.untyped_storage().data_ptr() for s in slots}) == 1  # one block
    for s, value in zip(slots, (1.0, 2.0, 3.0)):
        s.fill_(value)
    assert [s.unique().tolist() for s in slots] == [[1.0], [2.0], [3.0]]  # no two slots overlap
    store.slot_for("d", like)  # a fourth slot alive at once: a block of one more
    assert (store.allocations, store.allocated_slots) == (2, 4)
