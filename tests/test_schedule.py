import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harmonica.schedule import ModelCost, Router, Schedule, check_sampler, load_plan, sampler_grid

# Odd sizes on purpose: off-by-one errors in step/block bookkeeping show up when T, L are not even.
SIZES = [(1, 1), (2, 3), (7, 5), (10, 28), (13, 4)]


def random_schedule(num_steps, num_blocks, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_steps, num_blocks, 2, generator=g) < p
    mask[0] = True
    return Schedule(mask, metadata={"model_class": "DiTTransformer2DModel", "block_width": 1152, "sampler": "ddim"})


def rewrite(path, *, tensors=None, header=None):
    """Rewrite a saved file with some tensors or header fields replaced, to simulate tampering."""
    with safe_open(str(path), framework="pt") as f:
        old_tensors = {k: f.get_tensor(k) for k in f.keys()}
        document = json.loads(f.metadata()["harmonica"])
    document.update(header or {})
    save_file(tensors if tensors is not None else old_tensors, str(path), metadata={"harmonica": json.dumps(document)})


# ---------------------------------------------------------------------------------------------
# construction and validation


def test_mask_round_trips_and_is_immutable():
    mask = torch.ones(3, 2, 2, dtype=torch.bool)
    mask[1, 0, 1] = False
    sched = Schedule(mask)
    assert torch.equal(sched.mask, mask)
    mask[2] = False  # the caller's tensor must not alias the schedule
    sched.mask[2] = False  # nor the tensor it hands out
    assert bool(sched.mask[2].all())
    assert (sched.num_steps, sched.num_blocks) == (3, 2)
    assert sched.metadata == {"model_class": None, "block_width": None, "sampler": None, "threshold": None}


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(3, 2, 2, dtype=torch.uint8), "mask must have dtype torch.bool.*got torch.uint8"),
        (torch.ones(3, 2, dtype=torch.bool), r"shape \(num_steps, num_blocks, 2\).*got shape \(3, 2\)"),
        (torch.ones(3, 2, 3, dtype=torch.bool), r"got shape \(3, 2, 3\)"),
        (torch.ones(0, 2, 2, dtype=torch.bool), "at least one step and one block"),
        (torch.ones(3, 0, 2, dtype=torch.bool), "at least one step and one block"),
        (torch.zeros(3, 2, 2, dtype=torch.bool), r"mask\[0\].*must be all True.*4 of its 4.*set mask\[0\] = True"),
    ],
    ids=["uint8", "2d", "last-dim-3", "no-steps", "no-blocks", "step0-cached"],
)
def test_constructor_rejects_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        Schedule(mask)


def test_constructor_rejects_bad_metadata():
    ok = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        Schedule([[[True, True]]])
    with pytest.raises(ValueError, match=r"\['cache_usage'\] are reserved"):
        Schedule(ok, metadata={"cache_usage": 0.3})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Schedule(ok, metadata={"sampler": object()})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Schedule(ok, metadata={"threshold": float("nan")})


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_constructors_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        Schedule.full(bad, 3)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        Schedule.fora(4, bad)
    with pytest.raises(ValueError, match="interval must be a positive int"):
        Schedule.fora(4, 3, interval=bad)


# ---------------------------------------------------------------------------------------------
# baselines


@pytest.mark.parametrize("num_steps, num_blocks", SIZES)
def test_full_caches_nothing(num_steps, num_blocks):
    sched = Schedule.full(num_steps, num_blocks)
    assert sched.cache_usage == 0.0
    assert sched.theoretical_speedup(ModelCost(attn=3.0, mlp=5.0, fixed=2.0)) == 1.0


@pytest.mark.parametrize(
    "num_steps, interval, expected_cur",
    [(20, 2, 0.5), (10, 2, 0.5), (9, 3, 2 / 3), (30, 3, 2 / 3), (12, 4, 3 / 4), (5, 1, 0.0), (7, 2, 3 / 7), (3, 5, 2 / 3)],
)
def test_fora_cache_usage(num_steps, interval, expected_cur):
    sched = Schedule.fora(num_steps, 6, interval=interval)
    assert sched.cache_usage == pytest.approx(expected_cur, abs=1e-15)
    mask = sched.mask
    for t in range(num_steps):
        assert bool(mask[t].all()) == (t % interval == 0)
        assert bool(mask[t].any()) == (t % interval == 0)


@pytest.mark.parametrize("num_steps, num_blocks", [(10, 4), (9, 7), (20, 28), (5, 1)])
@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("cached, boundary", [(None, None), (0, 3), (2, 0), (1, 5)])
def test_delta_dit_pattern_cell_by_cell(num_steps, num_blocks, interval, cached, boundary):
    cached_eff = num_blocks // 2 if cached is None else min(cached, num_blocks)
    boundary_eff = num_steps // 2 if boundary is None else min(boundary, num_steps)
    sched = Schedule.delta_dit(
        num_steps, num_blocks, num_cached_blocks=cached_eff if cached is not None else None,
        boundary_step=boundary_eff if boundary is not None else None, interval=interval,
    )
    mask = sched.mask
    for t in range(num_steps):
        for block in range(num_blocks):
            if t % interval == 0:
                expected = True
            elif t < boundary_eff:  # early: the last cached_eff blocks reuse
                expected = block < num_blocks - cached_eff
            else:  # late: the first cached_eff blocks reuse
                expected = block >= cached_eff
            for branch in range(2):
                assert bool(mask[t, block, branch]) == expected, (t, block, branch)
    assert sched.metadata["num_cached_blocks"] == cached_eff
    assert sched.metadata["boundary_step"] == boundary_eff


def test_delta_dit_validation():
    with pytest.raises(ValueError, match=r"num_cached_blocks must be an int in \[0, num_blocks=4\], got 5"):
        Schedule.delta_dit(10, 4, num_cached_blocks=5)
    with pytest.raises(ValueError, match=r"boundary_step must be an int in \[0, num_steps=10\], got -1"):
        Schedule.delta_dit(10, 4, boundary_step=-1)


# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("num_steps, num_blocks", SIZES)
def test_statistics_against_loops(num_steps, num_blocks):
    sched = random_schedule(num_steps, num_blocks, seed=num_steps * 100 + num_blocks)
    mask = sched.mask.tolist()
    per_step = [[sum(mask[t][b][k] for b in range(num_blocks)) for k in range(2)] for t in range(num_steps)]
    per_block = [[sum(mask[t][b][k] for t in range(num_steps)) for k in range(2)] for b in range(num_blocks)]
    cached = sum(not mask[t][b][k] for t in range(num_steps) for b in range(num_blocks) for k in range(2))
    assert sched.computed_per_step().tolist() == per_step
    assert sched.computed_per_block().tolist() == per_block
    assert sched.cache_usage == cached / (num_steps * num_blocks * 2)


def test_theoretical_speedup_hand_computed():
    # T=3, L=2. Step 0: everything. Step 1: block 0 attn only. Step 2: both mlps only.
    mask = torch.tensor(
        [[[1, 1], [1, 1]],
         [[1, 0], [0, 0]],
         [[0, 1], [0, 1]]], dtype=torch.bool)
    cost = ModelCost(attn=10.0, mlp=20.0, fixed=4.0)
    full = 3 * (4 + 2 * (10 + 20))            # 192
    spent = (4 + 60) + (4 + 10) + (4 + 2 * 20)  # 64 + 14 + 44 = 122
    assert Schedule(mask).theoretical_speedup(cost) == pytest.approx(192 / 122, rel=1e-15)
    assert full == 192 and spent == 122


def test_theoretical_speedup_fora_bounds():
    # With no fixed cost, FORA interval 2 halves the FLOPs exactly; fixed cost can only lower the gain.
    assert Schedule.fora(20, 28).theoretical_speedup(ModelCost(attn=1.0, mlp=2.0, fixed=0.0)) == 2.0
    assert Schedule.fora(20, 28).theoretical_speedup(ModelCost(attn=1.0, mlp=2.0, fixed=5.0)) < 2.0


def test_theoretical_speedup_needs_model_cost():
    with pytest.raises(TypeError, match="ModelCost"):
        Schedule.full(2, 2).theoretical_speedup((1.0, 2.0, 3.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attn=-1.0, mlp=1.0, fixed=1.0), r"ModelCost.attn must be a finite number >= 0, got -1.0"),
        (dict(attn=1.0, mlp=float("inf"), fixed=1.0), "ModelCost.mlp"),
        (dict(attn=1.0, mlp=1.0, fixed=float("nan")), "ModelCost.fixed"),
        (dict(attn=0.0, mlp=0.0, fixed=0.0), "positive total"),
    ],
)
def test_model_cost_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCost(**kwargs)


def test_model_cost_is_frozen():
    cost = ModelCost(attn=1.0, mlp=2.0, fixed=3.0)
    with pytest.raises(AttributeError):
        cost.attn = 5.0


# ---------------------------------------------------------------------------------------------
# equality, repr, compatibility


def test_equality_and_repr():
    a = Schedule.fora(10, 4)
    b = Schedule(Schedule.fora(10, 4).mask, metadata={"sampler": "other"})  # metadata is not part of identity
    assert a == b and hash(a) == hash(b)
    assert a != Schedule.full(10, 4)
    assert a != Schedule.fora(10, 5)
    assert repr(a) == "Schedule(T=10, L=4, CUR=50.00%)"


def test_check_compatible():
    sched = random_schedule(20, 28)
    sched.check_compatible(num_steps=20, num_blocks=28, model_class="DiTTransformer2DModel", block_width=1152)
    sched.check_compatible()
    with pytest.raises(ValueError, match=r"schedule has 20 steps but the sampler runs 25; pass num_inference_steps=20"):
        sched.check_compatible(num_steps=25)
    with pytest.raises(ValueError, match=r"schedule has 28 blocks but the model has 12"):
        sched.check_compatible(num_blocks=12)
    with pytest.raises(ValueError, match=r"made for DiTTransformer2DModel but the model is PixArtTransformer2DModel"):
        sched.check_compatible(model_class="PixArtTransformer2DModel")
    with pytest.raises(ValueError, match=r"blocks of width 1152 but the model's width is 384"):
        sched.check_compatible(block_width=384)
    with pytest.raises(ValueError, match=r"25.*; .*12"):  # every mismatch is reported at once
        sched.check_compatible(num_steps=25, num_blocks=12)
    # A baseline records no model, so only the shape can be checked.
    Schedule.fora(20, 28).check_compatible(model_class="Anything", block_width=7, num_blocks=28)


# ---------------------------------------------------------------------------------------------
# schedule files


def test_schedule_save_load_round_trip(tmp_path):
    sched = random_schedule(13, 4)
    path = tmp_path / "s.safetensors"
    sched.save(path)
    loaded = Schedule.load(path)
    assert loaded == sched
    assert torch.equal(loaded.mask, sched.mask)
    assert loaded.metadata == sched.metadata
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["harmonica"])
        assert f.get_tensor("mask").dtype == torch.uint8
    assert doc["format_version"] == 1 and doc["kind"] == "schedule"
    assert (doc["num_steps"], doc["num_blocks"]) == (13, 4)
    assert doc["cache_usage"] == sched.cache_usage
    assert doc["model_class"] == "DiTTransformer2DModel" and doc["threshold"] is None


def _mask_u8(num_steps=6, num_blocks=3):
    return Schedule.fora(num_steps, num_blocks).mask.to(torch.uint8)


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        (None, {"format_version": 2}, "format_version 2 is not supported.*upgrade harmonica"),
        (None, {"format_version": "1"}, "format_version '1' is not supported"),
        (None, {"kind": "router"}, "holds kind 'router', expected 'schedule'; load it with Router.load"),
        (None, {"num_steps": 7}, r"shape \(6, 3, 2\) but the header records num_steps=7"),
        (None, {"num_blocks": 0}, "num_blocks must be a positive int, got 0"),
        (None, {"cache_usage": 0.25}, "records cache_usage 0.25 but the mask has 0.5"),
        (None, {"cache_usage": "half"}, "cache_usage must be a number"),
        ({"mask": _mask_u8()[:, :2].contiguous()}, None, r"shape \(6, 2, 2\) but the header records"),
        ({"mask": _mask_u8() * 2}, None, r"only 0 and 1, found values \[0, 2\]"),
        ({"mask": _mask_u8().bool()}, None, "must be uint8"),
        ({"mask": _mask_u8(), "extra": torch.zeros(1)}, None, r"expected a tensor named 'mask' \(and optionally 'order'\), found \['extra', 'mask'\]"),
        ({"logits": _mask_u8()}, None, r"expected a tensor named 'mask' \(and optionally 'order'\), found \['logits'\]"),
    ],
    ids=["newer-version", "string-version", "wrong-kind", "steps-vs-shape", "zero-blocks", "cur-mismatch",
         "cur-not-number", "tensor-shape", "values", "dtype", "extra-tensor", "wrong-name"],
)
def test_schedule_load_rejects_tampered_files(tmp_path, tensors, header, match):
    path = tmp_path / "s.safetensors"
    Schedule.fora(6, 3).save(path)
    rewrite(path, tensors=tensors, header=header)
    with pytest.raises(ValueError, match=match) as info:
        Schedule.load(path)
    assert str(path) in str(info.value)


def test_schedule_load_rejects_step0_cached(tmp_path):
    path = tmp_path / "s.safetensors"
    Schedule.fora(6, 3).save(path)
    mask = _mask_u8()
    mask[0, 1, 0] = 0
    rewrite(path, tensors={"mask": mask}, header={"cache_usage": 1 - 19 / 36})
    with pytest.raises(ValueError, match="step 0 of the mask is not all 1"):
        Schedule.load(path)


def test_schedule_load_rejects_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"mask": _mask_u8()}, str(plain))
    with pytest.raises(ValueError, match="no 'harmonica' metadata entry"):
        Schedule.load(plain)
    broken = tmp_path / "broken.safetensors"
    save_file({"mask": _mask_u8()}, str(broken), metadata={"harmonica": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(broken)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Schedule.load(junk)
    with pytest.raises(FileNotFoundError):
        Schedule.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# router


def test_router_init_and_weights():
    g = torch.Generator().manual_seed(0)
    router = Router.init(num_steps=5, num_blocks=3, std=2.0, generator=g)
    assert router.logits.shape == (5, 3, 2) and router.logits.requires_grad
    expected = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0)) * 2.0
    assert torch.equal(router.logits.detach(), expected)
    w = router.weights()
    assert torch.equal(w[0], torch.ones(3, 2))
    assert torch.equal(w[1:], torch.sigmoid(expected[1:]))
    assert [name for name, _ in router.named_parameters()] == ["logits"]


def test_router_row0_gets_zero_gradient():
    router = Router.init(4, 3, generator=torch.Generator().manual_seed(1))
    router.logits.data[0] = -3.0  # even a row-0 logit that would mean "cache" must not matter
    (router.weights() * torch.arange(1.0, 25.0).view(4, 3, 2)).sum().backward()
    grad = router.logits.grad
    assert torch.equal(grad[0], torch.zeros(3, 2))
    assert bool((grad[1:] != 0).all())
    # d/dx sigmoid(x) * c = sigmoid(x) * (1 - sigmoid(x)) * c
    s = torch.sigmoid(router.logits.detach()[1:])
    torch.testing.assert_close(grad[1:], s * (1 - s) * torch.arange(7.0, 25.0).view(3, 3, 2))


def test_router_clamp():
    router = Router(torch.tensor([[[9.0, -9.0]], [[4.0, -7.5]], [[0.25, 5.0]]]))
    assert router.clamp_() is router
    assert router.logits.detach().tolist() == [[[5.0, -5.0]], [[4.0, -5.0]], [[0.25, 5.0]]]
    router.clamp_(bound=1.0)
    assert router.logits.detach().tolist() == [[[1.0, -1.0]], [[1.0, -1.0]], [[0.25, 1.0]]]
    with pytest.raises(ValueError, match="bound must be a finite number > 0"):
        router.clamp_(0)


def test_router_to_schedule_matches_weights():
    router = Router.init(9, 5, generator=torch.Generator().manual_seed(2), metadata={"model_class": "M", "training": {"beta": 1e-7}})
    for tau in [0.0, 0.1, 0.5, 0.9, 1.0]:
        sched = router.to_schedule(tau)
        expected = torch.sigmoid(router.logits.detach()) > tau
        expected[0] = True
        assert torch.equal(sched.mask, expected)
        assert sched == Schedule.from_router(router, tau)
        assert sched.metadata["threshold"] == tau
        assert sched.metadata["model_class"] == "M" and sched.metadata["training"] == {"beta": 1e-7}
        assert sched.metadata["method"] == "router"
    assert router.to_schedule(1.0).cache_usage == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\].*got 10"):
        router.to_schedule(10)


@pytest.mark.parametrize("make", [
    lambda: Schedule.taylorseer(10, 3, 3, order=2),
    lambda: Schedule.fora(7, 2, 2),
    lambda: Schedule.delta_dit(9, 4),
    lambda: Schedule.full(5, 2),
])
def test_router_from_schedule_starts_as_the_schedule(make):
    schedule = make()
    router = Router.from_schedule(schedule)
    # At every threshold between the two weights, incl. the default one, the router is the schedule.
    low, high = torch.sigmoid(torch.tensor([-3.0, 3.0])).tolist()
    for tau in (low + 1e-6, 0.5, high - 1e-6):
        assert router.to_schedule(tau) == schedule
    assert router.to_schedule() == schedule
    assert Router.from_schedule(schedule, confidence=1.0).to_schedule(0.3) == schedule
    assert router.to_schedule(high) != schedule or bool(schedule.mask[1:].all())
    assert router.forecast_order == schedule.max_order
    assert router.metadata["init_schedule"]["method"] == schedule.metadata["method"]


def test_router_from_schedule_refuses_what_a_router_cannot_express():
    mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    mask[0] = True
    orders = torch.zeros(4, 2, 2, dtype=torch.long)
    orders[2] = 1
    with pytest.raises(ValueError, match=r"orders \[0, 1\]; a router has one forecast order"):
        Router.from_schedule(Schedule(mask, orders=orders))
    with pytest.raises(ValueError, match="routers forecast over step indices"):
        Router.from_schedule(Schedule(mask, orders=orders.clamp(max=0) + 1, metadata={"coords": [9, 7, 5, 3]}))
    with pytest.raises(ValueError, match="confidence must be a finite number > 0"):
        Router.from_schedule(Schedule(mask), confidence=0)
    with pytest.raises(TypeError, match="must be a harmonica Schedule"):
        Router.from_schedule(mask)


def test_router_constructor_validation():
    with pytest.raises(ValueError, match="floating-point"):
        Router(torch.zeros(3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"got shape \(3, 2\)"):
        Router(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        Router.init(0, 2)


def _candidates(router):
    return sorted(set(router.weights()[1:].detach().double().flatten().tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target_cur", [0.05, 0.25, 0.5, 0.7])
def test_threshold_for_cur_is_exact(seed, target_cur):
    router = Router.init(10, 6, generator=torch.Generator().manual_seed(seed))
    tau = router.threshold_for(target_cur=target_cur)
    assert router.to_schedule(tau).cache_usage >= target_cur
    candidates = _candidates(router)
    assert tau in candidates
    i = candidates.index(tau)
    below = candidates[i - 1] if i > 0 else 0.0
    assert router.to_schedule(below).cache_usage < target_cur
    # Exhaustive independent check: the first candidate (ascending) reaching the target.
    first = next(c for c in candidates if (torch.sigmoid(router.logits.detach()[1:]) <= c).sum().item() / 120 >= target_cur)
    assert tau == first


@pytest.mark.parametrize("target", [1.1, 1.3, 1.6])
def test_threshold_for_speedup_is_exact(target):
    router = Router.init(8, 5, generator=torch.Generator().manual_seed(3))
    cost = ModelCost(attn=4.0, mlp=8.0, fixed=3.0)
    tau = router.threshold_for(target_speedup=target, cost=cost)
    assert router.to_schedule(tau).theoretical_speedup(cost) >= target
    candidates = _candidates(router)
    i = candidates.index(tau)
    below = candidates[i - 1] if i > 0 else 0.0
    assert router.to_schedule(below).theoretical_speedup(cost) < target


def test_threshold_for_trivial_target_returns_zero():
    router = Router.init(6, 3, generator=torch.Generator().manual_seed(4))
    assert router.threshold_for(target_cur=0.0) == 0.0
    assert router.threshold_for(target_speedup=1.0, cost=ModelCost(attn=1.0, mlp=1.0, fixed=0.0)) == 0.0


def test_threshold_for_unreachable_and_bad_arguments():
    router = Router.init(4, 3, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"target CUR 0.8 is unreachable.*steps 1..3 gives CUR 0.75"):
        router.threshold_for(target_cur=0.8)
    # No fixed cost: caching steps 1..3 leaves one of four evaluations, so 4x is the ceiling.
    with pytest.raises(ValueError, match=r"target speedup 4.5 is unreachable.*gives speedup 4\b"):
        router.threshold_for(target_speedup=4.5, cost=ModelCost(attn=1.0, mlp=1.0, fixed=0.0))
    assert router.threshold_for(target_cur=0.75) == max(_candidates(router))
    with pytest.raises(ValueError, match="exactly one of"):
        router.threshold_for()
    with pytest.raises(ValueError, match="exactly one of"):
        router.threshold_for(target_cur=0.1, target_speedup=1.2)
    with pytest.raises(ValueError, match="target_speedup needs cost=ModelCost"):
        router.threshold_for(target_speedup=1.2)
    with pytest.raises(ValueError, match=r"target_cur must be a number in \[0, 1\]"):
        router.threshold_for(target_cur=50)
    with pytest.raises(ValueError, match="target CUR 0.1 is unreachable"):
        Router.init(1, 3).threshold_for(target_cur=0.1)


# ---------------------------------------------------------------------------------------------
# router files


def test_router_save_load_round_trip(tmp_path):
    metadata = {"model_class": "DiT", "block_width": 384, "sampler": "ddim",
                "training": {"method": "harmonica", "beta": 7e-8, "lr": 0.01}, "cur": 0.23}
    router = Router.init(7, 3, generator=torch.Generator().manual_seed(6), metadata=metadata)
    path = tmp_path / "r.safetensors"
    router.save(path)
    loaded = Router.load(path)
    assert torch.equal(loaded.logits.detach(), router.logits.detach())
    assert loaded.logits.dtype == torch.float32
    assert loaded.metadata == router.metadata
    assert loaded.metadata["training"]["beta"] == 7e-8
    assert loaded.to_schedule(0.3) == router.to_schedule(0.3)
    router.metadata["method"] = "harmonica"
    assert router.to_schedule(0.3).metadata["method"] == "harmonica"
    with pytest.raises(ValueError, match="holds kind 'router', expected 'schedule'; load it with Router.load"):
        Schedule.load(path)


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        (None, {"format_version": 0}, "format_version 0 is not supported"),
        (None, {"kind": "schedule"}, "expected 'router'; load it with Schedule.load"),
        (None, {"num_steps": 3}, r"shape \(4, 2, 2\) but the header records num_steps=3"),
        ({"logits": torch.zeros(4, 2, 2, dtype=torch.float16)}, None, "must be float32"),
        ({"logits": torch.full((4, 2, 2), float("nan"))}, None, "NaN or infinite"),
    ],
    ids=["version", "kind", "shape", "dtype", "nan"],
)
def test_router_load_rejects_tampered_files(tmp_path, tensors, header, match):
    path = tmp_path / "r.safetensors"
    Router.init(4, 2).save(path)
    rewrite(path, tensors=tensors, header=header)
    with pytest.raises(ValueError, match=match):
        Router.load(path)


def test_router_save_rejects_bad_metadata(tmp_path):
    router = Router.init(2, 2)
    router.metadata["num_steps"] = 5
    with pytest.raises(ValueError, match=r"reserved"):
        router.save(tmp_path / "r.safetensors")
    router.metadata = {"cur": math.inf}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        router.save(tmp_path / "r.safetensors")


# ---------------------------------------------------------------------------------------------
# finite values only


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_router_refuses_non_finite_logits(bad):
    logits = torch.zeros(3, 2, 2)
    logits[1, 0, 1] = bad
    with pytest.raises(ValueError, match="logits must be finite"):
        Router(logits)


def test_router_save_refuses_logits_that_went_nan_after_construction(tmp_path):
    router = Router.init(3, 2)
    with torch.no_grad():
        router.logits[2, 1, 0] = float("nan")  # what a diverged optimiser step does to the Parameter
    with pytest.raises(ValueError, match=r"cannot save router to .*NaN or infinite.*diverged"):
        router.save(tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize("recorded", [float("nan"), float("inf"), 1.5, -0.25])
def test_schedule_load_checks_a_cache_usage_that_is_not_a_fraction(tmp_path, recorded):
    path = tmp_path / "s.safetensors"
    Schedule.fora(6, 3).save(path)
    rewrite(path, header={"cache_usage": recorded})  # json.dumps writes NaN/Infinity literals
    with pytest.raises(ValueError, match=r"is not allowed|cache_usage must be a number in \[0, 1\]") as info:
        Schedule.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# sampler families and step grids (check_sampler)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000)


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000)


def test_sampler_grid_is_the_schedulers_timesteps_and_leaves_it_untouched():
    scheduler = _ddim()
    scheduler.set_timesteps(5)
    before = scheduler.timesteps.clone()
    assert sampler_grid(scheduler, 4) == [750.0, 500.0, 250.0, 0.0]
    assert torch.equal(scheduler.timesteps, before)


def test_a_plan_for_another_sampler_family_warns_once(recwarn):
    schedule = Schedule(Schedule.fora(4, 2).mask, metadata={"sampler": "ddim"})
    check_sampler(schedule, _ddim())
    assert len(recwarn) == 0
    with pytest.warns(UserWarning, match="trained for the ddim sampler but runs with euler"):
        check_sampler(schedule, _euler())
    check_sampler(schedule, _euler())  # once per plan and family
    assert [str(w.message) for w in recwarn] == []
    with pytest.warns(UserWarning):  # another plan warns for itself
        check_sampler(Schedule(Schedule.fora(4, 2).mask, metadata={"sampler": "ddim"}), _euler())


def test_a_plan_trained_at_other_timesteps_is_refused():
    grid = sampler_grid(_ddim(), 4)
    router = Router.init(4, 2, metadata={"sampler": "ddim", "timesteps": grid})
    check_sampler(router, _ddim())
    check_sampler(router.to_schedule(), _ddim())  # the schedule carries the record
    with pytest.raises(ValueError, match=r"trained at the timesteps of ddim \(4 timesteps 750, 500, 250, 0\) but "
                                         r"euler with 4 steps evaluates the model at"):
        check_sampler(router.to_schedule(), _euler())
    from diffusers import DDIMScheduler

    trailing = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="drop its training record: harmonica.Schedule"):
        check_sampler(router, trailing)  # same family, other grid
    check_sampler(Schedule(router.to_schedule().mask), trailing)  # the documented way out


def test_plans_without_a_record_pass_silently(recwarn):
    check_sampler(Schedule.fora(4, 2), _euler())
    check_sampler(Router.init(4, 2), _euler())
    assert len(recwarn) == 0
    with pytest.raises(ValueError, match="'timesteps' must be a list of numbers"):
        check_sampler(Schedule(Schedule.fora(4, 2).mask, metadata={"timesteps": "ddim"}), _euler())


@pytest.mark.parametrize("name, value", [("height", 0), ("width", -8), ("batch", 0), ("text_tokens", 0),
                                         ("height", 16.0), ("batch", True)])
def test_model_cost_refuses_sizes_that_are_not_positive_ints(name, value):
    from diffusers import DiTTransformer2DModel

    from harmonica import model_cost

    with torch.device("meta"):  # only the structure is read
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    kwargs = {"batch": 2, name: value}
    with pytest.raises(ValueError, match=f"model_cost: {name} must be a positive int, got {value!r}"):
        model_cost(model, **kwargs)
    assert model_cost(model, batch=2, height=16, width=16).attn > model_cost(model, batch=2).attn


def test_load_plan_returns_what_the_file_holds(tmp_path):
    router = Router.init(6, 3, generator=torch.Generator().manual_seed(0))
    schedule = Schedule.taylorseer(6, 3, 2, order=1)
    router.save(tmp_path / "r.safetensors")
    schedule.save(tmp_path / "s.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    loaded = load_plan(tmp_path / "r.safetensors")
    assert type(loaded) is Router and torch.equal(loaded.logits, router.logits)
    assert load_plan(tmp_path / "s.safetensors") == schedule
    with pytest.raises(ValueError, match="other.safetensors is neither a harmonica router nor a schedule"):
        load_plan(tmp_path / "other.safetensors")
