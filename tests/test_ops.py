"""Tests of the fused cache ops (torch.ops.harmonica.*) against the pure-PyTorch reference.

CPU cases always run; CUDA cases are skipped without a GPU. The CUDA indexing logic (vector width,
scalar tail, grid-stride loop, gate/w broadcasting, row remapping) is also checked on the CPU by
running the CUDA per-thread bodies over every simulated thread (harmonica::_simulate_cuda_*).
"""

from __future__ import annotations

import math
import os
import re
import zlib

import pytest
import torch

from harmonica import _C as harmonica_C
from harmonica import ops
from harmonica.ops import reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (B, N, D): single token, D not a multiple of any pack width, B = 1 and B = 7, a pack-aligned
# DiT-like row, and D = 1 (every element its own row).
SHAPES = [(1, 1, 8), (7, 3, 13), (2, 16, 64), (1, 33, 136), (3, 5, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "strided": x and the branch are every-other-channel views and the gate is one chunk of a
# (B, 6 * D) adaLN output (batch stride 6 * D), like DiT's emb.chunk(6, dim=1).
LAYOUTS = ["contiguous", "strided"]
GATE_FORMS = ["2d", "3d"]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# The kernels compute in float32 (float64 for float64) and round once to the output dtype, like the
# reference. They may still differ from it by one unit in the last place of the output dtype
# (FMA contraction on the GPU, operation order), hence rtol = that dtype's machine epsilon; atol
# covers results that cancel to ~0, where one float32 ulp of the operands is large relative to
# the result.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2 * torch.finfo(torch.float32).eps, atol=1e-6),
    torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-6),
    torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6),
}


def shape_id(shape):
    return "B{}xN{}xD{}".format(*shape)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_generator(*seed_parts) -> torch.Generator:
    # crc32, not hash(): str hashes change between processes, and failures must be reproducible.
    return torch.Generator().manual_seed(zlib.crc32(repr(seed_parts).encode()))


def hidden(shape, dtype, device, layout, generator) -> torch.Tensor:
    B, N, D = shape
    if layout == "strided":
        wide = torch.randn(B, N, 2 * D, generator=generator).to(dtype)
        tensor = wide[..., ::2]
        assert not tensor.is_contiguous() or D == 1 or tensor.numel() == 0
    else:
        tensor = torch.randn(B, N, D, generator=generator).to(dtype)
    return tensor.to(device)


def adaln_gate(shape, dtype, device, layout, form, generator) -> torch.Tensor:
    B, _, D = shape
    if layout == "strided":
        gate = torch.randn(B, 6 * D, generator=generator).to(dtype).to(device).chunk(6, dim=1)[2]
    else:
        gate = torch.randn(B, D, generator=generator).to(dtype).to(device)
    return gate.unsqueeze(1) if form == "3d" else gate


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def assert_reduction_close(actual, expected, absolute_mass, dtype, ulps=8):
    """Sums of float32 terms computed in another order (or with fused multiply-adds) than the
    reference: each side's roundings are at most half a float32 ulp of the summed magnitude
    (absolute_mass = sum of |term|). Gradients summed over tokens (and channels) add up to
    ~sqrt(terms) of them (ulps = 8); a short sum is bounded by its operation count. Then one rounding to
    the output dtype (rtol)."""
    terms_bound = ulps * torch.finfo(torch.float32).eps * absolute_mass
    tolerance = TOLERANCES[dtype]["rtol"] * expected.abs() + terms_bound + 1e-6
    error = (actual.double() - expected.double()).abs()
    assert bool((error <= tolerance).all()), f"max error {error.max().item():.3g}, max tolerance {tolerance.max().item():.3g}"


def random_index(batch, active, generator, device) -> torch.Tensor:
    return torch.randperm(batch, generator=generator)[:active].to(device)


# ---------------------------------------------------------------------------------------------------
# Registration


ALL_OPS = ["cache_write", "cache_write_", "cache_read", "cache_read_", "blend", "blend_backward", "gather_rows",
           "gated_merge", "gated_merge_", "forecast_read", "forecast_read_", "forecast_update", "forecast_update_"]


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_has_cpu_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"harmonica::{name}", "CPU")


# A CUDA build registers its kernels whether or not a GPU is present, so CI (no GPU) checks them.
@pytest.mark.skipif(
    not harmonica_C.built_with_cuda, reason="extension built without CUDA kernels (HARMONICA_CUDA=0 or no toolkit)"
)
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_has_cuda_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"harmonica::{name}", "CUDA")


# ---------------------------------------------------------------------------------------------------
# cache_write / cache_read


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cache_write(shape, dtype, layout, gate_form, device):
    g = make_generator("write", shape, dtype, layout, gate_form)
    x = hidden(shape, dtype, device, layout, g)
    gate = adaln_gate(shape, dtype, device, layout, gate_form, g)
    branch = hidden(shape, dtype, device, layout, g)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    x_before = x.clone()

    out = ops.cache_write(x, gate, branch, cache)

    assert_close(out, reference.cache_write(x, gate, branch, torch.empty_like(cache)))
    torch.testing.assert_close(cache, branch, rtol=0, atol=0)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    assert out.is_contiguous() and out.shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cache_write_inplace(shape, dtype, device):
    g = make_generator("write_", shape, dtype)
    x = hidden(shape, dtype, device, "contiguous", g)
    gate = adaln_gate(shape, dtype, device, "strided", "2d", g)
    branch = hidden(shape, dtype, device, "strided", g)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    expected = reference.cache_write(x, gate, branch, torch.empty_like(cache))

    returned = ops.cache_write_(x, gate, branch, cache)

    assert returned.data_ptr() == x.data_ptr()
    assert_close(x, expected)
    torch.testing.assert_close(cache, branch, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cache_read(shape, dtype, layout, gate_form, device):
    g = make_generator("read", shape, dtype, layout, gate_form)
    x = hidden(shape, dtype, device, layout, g)
    gate = adaln_gate(shape, dtype, device, layout, gate_form, g)
    cache = hidden(shape, dtype, device, layout, g)
    cache_before = cache.clone()

    out = ops.cache_read(x, gate, cache)

    assert_close(out, reference.cache_read(x, gate, cache))
    torch.testing.assert_close(cache, cache_before, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cache_read_inplace(shape, dtype, device):
    g = make_generator("read_", shape, dtype)
    x = hidden(shape, dtype, device, "contiguous", g)
    gate = adaln_gate(shape, dtype, device, "contiguous", "3d", g)
    cache = hidden(shape, dtype, device, "contiguous", g)
    expected = reference.cache_read(x, gate, cache)

    returned = ops.cache_read_(x, gate, cache)

    assert returned.data_ptr() == x.data_ptr()
    assert_close(x, expected)


def test_cache_write_accepts_branch_that_is_the_cache():
    # Refreshing a slot from itself is legal (cache and branch alias) and must not corrupt it.
    g = make_generator("alias")
    x, cache = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    gate = torch.randn(2, 10, generator=g)
    expected = reference.cache_read(x, gate, cache)
    saved = cache.clone()
    assert_close(ops.cache_write(x, gate, cache, cache), expected)
    torch.testing.assert_close(cache, saved, rtol=0, atol=0)


def test_gate_with_zero_batch_stride_broadcasts_one_row():
    g = make_generator("expand")
    x, branch = torch.randn(4, 3, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    gate = torch.randn(1, 10, generator=g).expand(4, 10)
    assert_close(ops.cache_write(x, gate, branch, torch.empty_like(x)), x + gate[:, None] * branch)


# ---------------------------------------------------------------------------------------------------
# blend


def make_w(kind, batch, device, generator, dtype=torch.float32):
    if kind == "scalar":
        return torch.rand((), generator=generator).to(dtype).to(device)
    if kind == "per_sample":
        w = torch.rand(batch, generator=generator).to(dtype)
        w[0] = 1.0  # the exact ends of the range: a computed sample and (below) a cached one
        if batch > 1:
            w[-1] = 0.0
        return w.to(device)
    raise ValueError(kind)


W_KINDS = ["scalar", "per_sample"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_blend_forward(shape, dtype, layout, w_kind, device):
    g = make_generator("blend", shape, dtype, layout, w_kind)
    x, fresh, cache = (hidden(shape, dtype, device, layout, g) for _ in range(3))
    gate = adaln_gate(shape, dtype, device, layout, "2d", g)
    w = make_w(w_kind, shape[0], device, g)
    assert_close(ops.blend(x, gate, fresh, cache, w), reference.blend(x, gate, fresh, cache, w))


@pytest.mark.parametrize("w_value", [0.0, 1.0])
def test_blend_at_the_ends_of_the_range_is_exactly_one_input(w_value):
    g = make_generator("blend_ends", w_value)
    x, fresh, cache = (torch.randn(2, 4, 12, generator=g) for _ in range(3))
    gate = torch.randn(2, 12, generator=g)
    selected = fresh if w_value == 1.0 else cache
    torch.testing.assert_close(ops.blend(x, gate, fresh, cache, w_value), ops.cache_read(x, gate, selected),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_blend_backward_matches_float64_autograd(shape, dtype, gate_form, w_kind, device):
    g = make_generator("blend_bwd", shape, dtype, gate_form, w_kind)
    x, fresh, cache, grad_out = (hidden(shape, dtype, device, "contiguous", g) for _ in range(4))
    gate = adaln_gate(shape, dtype, device, "strided", gate_form, g)
    w = make_w(w_kind, shape[0], device, g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, fresh, w)]
    out = ops.blend(leaves[0], leaves[1], leaves[2], cache, leaves[3])
    out.backward(grad_out)

    exact = [t.detach().double().requires_grad_() for t in (x, gate, fresh, w)]
    reference.blend(exact[0], exact[1], exact[2], cache.double(), exact[3]).backward(grad_out.double())

    x_grad, gate_grad, fresh_grad, w_grad = (leaf.grad for leaf in leaves)
    torch.testing.assert_close(x_grad, grad_out, rtol=0, atol=0)
    assert_close(fresh_grad, exact[2].grad.to(dtype))
    assert gate_grad.shape == gate.shape and gate_grad.dtype == dtype
    assert w_grad.shape == w.shape and w_grad.dtype == w.dtype

    B, N, D = shape
    g64, f64, c64, w64 = gate.double().reshape(B, 1, D), fresh.double(), cache.double(), w.double()
    w64 = w64.reshape(-1, 1, 1) if w.dim() == 1 else w64
    value_mass = (grad_out.double() * (w64 * f64 + (1 - w64) * c64)).abs()
    w_mass = (grad_out.double() * g64 * (f64 - c64)).abs()
    assert_reduction_close(gate_grad, exact[1].grad, value_mass.sum(1).reshape(gate.shape), dtype)
    w_mass_total = w_mass.sum() if w.dim() == 0 else w_mass.sum((1, 2))
    assert_reduction_close(w_grad, exact[3].grad, w_mass_total, torch.float32)


@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 8), (3, 2, 1)], ids=shape_id)
def test_blend_gradcheck_float64(shape, gate_form, w_kind):
    g = make_generator("gradcheck", shape, gate_form, w_kind)
    x, fresh, cache = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    gate = adaln_gate(shape, torch.float64, "cpu", "contiguous", gate_form, g)
    # Keep w away from 0 and 1 so the finite-difference probes stay inside the valid range.
    w = 0.25 + 0.5 * torch.rand(() if w_kind == "scalar" else (shape[0],), generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, gate, fresh)] + [cache, w.requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, gate, fresh, cache, w: ops.blend(x, gate, fresh, cache, w), inputs,
                                    eps=1e-6, atol=1e-8)


def test_blend_backward_with_constant_gate_and_w():
    # Inference-style call from a training loop: only x and fresh require grad.
    g = make_generator("partial_grad")
    x, fresh, cache = (torch.randn(2, 5, 9, generator=g) for _ in range(3))
    gate = torch.randn(2, 9, generator=g)
    x.requires_grad_()
    fresh.requires_grad_()
    ops.blend(x, gate, fresh, cache, torch.tensor(0.3)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=0)
    assert_close(fresh.grad, (0.3 * gate[:, None, :]).expand_as(fresh).contiguous())
    assert gate.grad is None and cache.grad is None


def test_blend_gives_no_gradient_to_cache():
    g = make_generator("cache_grad")
    x, fresh, cache = (torch.randn(2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    gate = torch.randn(2, 4, generator=g, requires_grad=True)
    ops.blend(x, gate, fresh, cache, torch.tensor(0.5)).sum().backward()
    assert cache.grad is None


# Autograd of the other ops (csrc/autograd.cpp): the out-of-place ops are differentiable in x, gate
# and the branch (cache slots are detached, as in blend); the in-place variants refuse inputs that
# require grad.


def _grad_case(shape, gate_form, name):
    g = make_generator("autograd", shape, gate_form, name)
    x, branch, cache = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    gate = adaln_gate(shape, torch.float64, "cpu", "contiguous", gate_form, g)
    rows = torch.randperm(shape[0], generator=g)[: max(1, shape[0] // 2)]
    return x, gate, branch, cache, rows


DIFFERENTIABLE = {  # name -> (op applied to (x, gate, branch, cache, rows), inputs that get a gradient)
    "cache_write": (lambda x, gate, branch, cache, rows: ops.cache_write(x, gate, branch, cache),
                    ("x", "gate", "branch")),
    "cache_read": (lambda x, gate, branch, cache, rows: ops.cache_read(x, gate, cache), ("x", "gate")),
    "gather_rows": (lambda x, gate, branch, cache, rows: ops.gather_rows(x, rows), ("x",)),
    "gated_merge": (lambda x, gate, branch, cache, rows: ops.gated_merge(x, gate, branch[rows], rows, cache),
                    ("x", "gate", "branch")),
    "forecast_read": (lambda x, gate, branch, cache, rows: ops.forecast_read(x, gate, [cache, cache.flip(0)],
                                                                             (1.0, -0.75)), ("x", "gate")),
    "forecast_update": (lambda x, gate, branch, cache, rows: ops.forecast_update(x, gate, branch,
                                                                                 [cache, torch.zeros_like(cache)],
                                                                                 (0.5,)), ("x", "gate", "branch")),
}


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 1, 8)], ids=shape_id)
def test_gradcheck_float64(name, shape, gate_form):
    fn, differentiable = DIFFERENTIABLE[name]
    x, gate, branch, cache, rows = _grad_case(shape, gate_form, name)
    args = dict(x=x, gate=gate, branch=branch)
    for arg in differentiable:
        args[arg].requires_grad_()

    def op(x, gate, branch):
        return fn(x, gate, branch, cache.clone(), rows)  # a fresh slot per call: gradcheck calls it many times

    assert torch.autograd.gradcheck(op, (x, gate, branch), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["cache_write", "gated_merge", "forecast_update"])
def test_differentiable_slot_writers_match_reference_and_detach_the_slot(name):
    fn, _ = DIFFERENTIABLE[name]
    x, gate, branch, cache, rows = _grad_case((4, 3, 6), "2d", name)
    x.requires_grad_(), gate.requires_grad_(), branch.requires_grad_()
    slot, expected_slot = cache.clone(), cache.clone()
    out = fn(x, gate, branch, slot, rows)
    x_, gate_, branch_ = x.detach(), gate.detach(), branch.detach()
    expected = {
        "cache_write": lambda: reference.cache_write(x_, gate_, branch_, expected_slot),
        "gated_merge": lambda: reference.gated_merge(x_, gate_, branch_[rows], rows, expected_slot),
        "forecast_update": lambda: reference.forecast_update(x_, gate_, branch_,
                                                             [expected_slot, torch.zeros_like(cache)], (0.5,)),
    }[name]()
    assert_close(out.detach(), expected)
    assert torch.equal(slot, expected_slot) and not slot.requires_grad
    out.sum().backward()  # the slot write is not part of the graph: backward runs after it
    assert x.grad is not None and gate.grad is not None and branch.grad is not None


@pytest.mark.parametrize("name", list(DIFFERENTIABLE))
def test_opcheck_with_inputs_that_require_grad(name):
    fn, differentiable = DIFFERENTIABLE[name]
    case = _grad_case((3, 5, 12), "2d", name)
    x, gate, branch, cache, rows = (t.float() if t.is_floating_point() else t for t in case)
    args = dict(x=x, gate=gate, branch=branch)
    for arg in differentiable:
        args[arg].requires_grad_()
    op_args = {
        "cache_write": (x, gate, branch, cache),
        "cache_read": (x, gate, cache),
        "gather_rows": (x, rows),
        "gated_merge": (x, gate, branch[rows].detach().requires_grad_(), rows, cache),
        "forecast_read": (x, gate, [cache, cache.flip(0)], [1.0, -0.75]),
        "forecast_update": (x, gate, branch, [cache, torch.zeros_like(cache)], [0.5]),
    }[name]
    torch.library.opcheck(getattr(torch.ops.harmonica, name).default, op_args)


@pytest.mark.parametrize("name,argument",
                         [("cache_write_", "gate"), ("cache_read_", "x"), ("gated_merge_", "branch_active")])
def test_in_place_ops_refuse_inputs_that_require_grad_and_change_nothing(name, argument):
    x, gate, branch, cache, rows = _grad_case((3, 2, 5), "2d", name)
    args = {
        "cache_write_": dict(x=x, gate=gate, branch=branch, cache=cache),
        "cache_read_": dict(x=x, gate=gate, cache=cache),
        "gated_merge_": dict(x=x, gate=gate, branch_active=branch[rows], index=rows, cache=cache),
    }[name]
    args[argument] = args[argument].clone().requires_grad_()
    if argument == "x":
        args["x"] = args["x"] * 1  # a non-leaf, as inside a model
    before = {k: v.detach().clone() for k, v in args.items()}
    with pytest.raises(RuntimeError, match=rf"harmonica.{name}: `{argument}` requires grad.*harmonica.ops.{name[:-1]}"):
        getattr(ops, name)(**args)
    for key, value in args.items():
        assert torch.equal(value.detach(), before[key]), key
    with torch.no_grad():  # the same call is fine without autograd
        getattr(ops, name)(**args)


@pytest.mark.parametrize("name,argument", [("forecast_read_", "gate"), ("forecast_read_", "x"),
                                           ("forecast_update_", "fresh"), ("forecast_update_", "gate")])
def test_in_place_forecast_ops_refuse_inputs_that_require_grad_and_change_nothing(name, argument):
    x, gate, fresh, cache, _ = _grad_case((3, 2, 5), "2d", name)
    slots = [cache, cache.flip(0).contiguous()]
    args = dict(x=x, gate=gate, fresh=fresh)
    args[argument] = args[argument].clone().requires_grad_() * 1  # a non-leaf, as inside a model

    def call():
        if name == "forecast_read_":
            return ops.forecast_read_(args["x"], args["gate"], slots, (1.0, 2.0))
        return ops.forecast_update_(args["x"], args["gate"], args["fresh"], slots, (0.5,))

    before = [t.detach().clone() for t in (args["x"], *slots)]
    with pytest.raises(RuntimeError, match=rf"harmonica.{name}: `{argument}` requires grad.*harmonica.ops.{name[:-1]}"):
        call()
    for tensor, saved in zip((args["x"], *slots), before):
        assert torch.equal(tensor.detach(), saved)
    with torch.no_grad():  # the same call is fine without autograd
        call()


def test_in_place_ops_mark_what_they_write_for_autograd():
    # A tensor saved for a backward pass and then overwritten by an in-place op must make that
    # backward fail, as after any in-place ATen op, instead of using the new values.
    x, gate, branch, cache, _ = _grad_case((2, 3, 4), "2d", "version")
    weight = torch.ones(4, dtype=torch.float64, requires_grad=True)
    saved = {"x": x * weight, "cache": cache * weight}  # each product saves its tensor for d/dweight
    with torch.no_grad():
        ops.cache_write_(x, gate, branch, cache)
    for name, product in saved.items():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            product.sum().backward()
    # forecast_update_ writes x and every slot of its table.
    x, gate, branch, cache, _ = _grad_case((2, 3, 4), "2d", "version_forecast")
    slots = [cache, torch.zeros_like(cache)]
    saved = {"x": x * weight, "slots[0]": slots[0] * weight, "slots[1]": slots[1] * weight}
    with torch.no_grad():
        ops.forecast_update_(x, gate, branch, slots, (0.5,))
    for name, product in saved.items():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            product.sum().backward()


# ---------------------------------------------------------------------------------------------------
# gather_rows / gated_merge

MERGE_CASES = [  # (shape, number of active samples)
    ((1, 1, 8), 1),
    ((1, 4, 13), 0),
    ((7, 3, 13), 3),
    ((7, 3, 13), 7),
    ((4, 16, 64), 2),
    ((5, 2, 1), 4),
]


def merge_id(case):
    shape, active = case
    return f"{shape_id(shape)}-active{active}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MERGE_CASES, ids=merge_id)
def test_gather_rows(case, dtype, layout, device):
    shape, active = case
    g = make_generator("gather", shape, active, dtype, layout)
    x = hidden(shape, dtype, device, layout, g)
    index = random_index(shape[0], active, g, device)
    out = ops.gather_rows(x, index)
    torch.testing.assert_close(out, reference.gather_rows(x, index), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_gather_rows_samples_larger_than_a_copy_piece(dtype, device):
    # The CPU kernel copies samples in 256 KB pieces; (67, 1001) float32 is 1.02 pieces, float64 2.05:
    # whole pieces, a short last piece, and pieces of different samples handed to different threads.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 67, 1001, generator=g, dtype=dtype).to(device)
    index = torch.tensor([4, 0, 2], device=device)
    torch.testing.assert_close(ops.gather_rows(x, index), reference.gather_rows(x, index), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MERGE_CASES, ids=merge_id)
def test_gated_merge(case, dtype, layout, device):
    shape, active = case
    B, N, D = shape
    g = make_generator("merge", shape, active, dtype, layout)
    x = hidden(shape, dtype, device, layout, g)
    gate = adaln_gate(shape, dtype, device, layout, "2d", g)
    index = random_index(B, active, g, device)
    branch_active = hidden((active, N, D), dtype, device, layout, g)
    cache = hidden(shape, dtype, device, "contiguous", g)
    expected_cache = cache.clone()
    expected = reference.gated_merge(x, gate, branch_active, index, expected_cache)

    out = ops.gated_merge(x, gate, branch_active, index, cache)

    assert_close(out, expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MERGE_CASES, ids=merge_id)
def test_gated_merge_inplace(case, dtype, device):
    shape, active = case
    B, N, D = shape
    g = make_generator("merge_", shape, active, dtype)
    x = hidden(shape, dtype, device, "contiguous", g)
    gate = adaln_gate(shape, dtype, device, "contiguous", "3d", g)
    index = random_index(B, active, g, device)
    branch_active = hidden((active, N, D), dtype, device, "contiguous", g)
    cache = hidden(shape, dtype, device, "contiguous", g)
    expected_cache = cache.clone()
    expected = reference.gated_merge(x, gate, branch_active, index, expected_cache)

    returned = ops.gated_merge_(x, gate, branch_active, index, cache)

    assert returned.data_ptr() == x.data_ptr()
    assert_close(x, expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


def test_gated_merge_with_all_samples_active_equals_cache_write():
    g = make_generator("merge_all")
    x, branch = torch.randn(3, 4, 10, generator=g), torch.randn(3, 4, 10, generator=g)
    gate = torch.randn(3, 10, generator=g)
    merge_cache, write_cache = torch.zeros_like(x), torch.zeros_like(x)
    merged = ops.gated_merge(x, gate, branch, torch.arange(3), merge_cache)
    written = ops.cache_write(x, gate, branch, write_cache)
    torch.testing.assert_close(merged, written, rtol=0, atol=0)
    torch.testing.assert_close(merge_cache, write_cache, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# forecast_read / forecast_update: a unit's Newton divided differences (harmonica/cache/forecast.py)

ORDERS = [0, 1, 2, 3, 4]
# Newton coefficients (1, then products of distances to earlier computes) and inverse distances:
# negative (coordinates that decrease, like timesteps) and above and below 1 in magnitude. A plan's
# large ones are in test_forecast_ops_follow_a_plan_on_timestep_coordinates.
COEFFS = (1.0, -3.5, 12.25, -42.875, 150.0625)
INV = (0.5, -1 / 3, 2.5, -0.125)


def assert_forecast_close(out, x, gate, slots, coeffs):
    """forecast_read's result against the reference, to float32 rounding of the terms' magnitude: a
    forecast of n terms is 2n + 1 float32 operations on either side (products, sums, the gated add)."""
    expected = reference.forecast_read(x, gate, slots, coeffs)
    B, _, D = x.shape
    terms = sum(abs(c) * s.double().abs() for c, s in zip(coeffs, slots))
    mass = x.double().abs() + gate.double().reshape(B, 1, D).abs() * terms
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_reduction_close(out, expected, mass, expected.dtype, ulps=2 * len(coeffs) + 1)


def assert_forecast_update_matches(out, slots_after, x, gate, fresh, slots_before, inv):
    """forecast_update's output and slots against the reference run on copies of the slots before."""
    expected_slots = [slot.clone() for slot in slots_before]
    expected = reference.forecast_update(x, gate, fresh, expected_slots, inv)
    assert_close(out, expected)
    # (new - old) * inv has no fused form: kernels and reference round the same operations, so the
    # tables agree bit for bit, and a forecast from them is off by its own rounding only.
    for got, want in zip(slots_after, expected_slots):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forecast_read(shape, dtype, layout, order, device):
    g = make_generator("forecast_read", shape, dtype, layout, order)
    x = hidden(shape, dtype, device, layout, g)
    gate = adaln_gate(shape, dtype, device, layout, GATE_FORMS[order % 2], g)
    slots = [hidden(shape, dtype, device, layout, g) for _ in range(order + 1)]
    before = [t.clone() for t in (x, *slots)]

    out = ops.forecast_read(x, gate, slots, COEFFS[: order + 1])

    assert out.is_contiguous()
    assert_forecast_close(out, x, gate, slots, COEFFS[: order + 1])
    for tensor, saved in zip((x, *slots), before):
        torch.testing.assert_close(tensor, saved, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forecast_read_inplace(shape, dtype, order, device):
    g = make_generator("forecast_read_", shape, dtype, order)
    x = hidden(shape, dtype, device, "contiguous", g)
    gate = adaln_gate(shape, dtype, device, "strided", "3d", g)
    slots = [hidden(shape, dtype, device, "strided", g) for _ in range(order + 1)]
    x_before = x.clone()

    returned = ops.forecast_read_(x, gate, slots, COEFFS[: order + 1])

    assert returned.data_ptr() == x.data_ptr()
    assert_forecast_close(x, x_before, gate, slots, COEFFS[: order + 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forecast_update(shape, dtype, layout, order, device):
    g = make_generator("forecast_update", shape, dtype, layout, order)
    x, fresh = hidden(shape, dtype, device, layout, g), hidden(shape, dtype, device, layout, g)
    gate = adaln_gate(shape, dtype, device, layout, GATE_FORMS[order % 2], g)
    slots = [hidden(shape, dtype, device, "contiguous", g) for _ in range(order + 1)]  # written: contiguous
    slots_before, x_before = [slot.clone() for slot in slots], x.clone()

    out = ops.forecast_update(x, gate, fresh, slots, INV[:order])

    assert out.is_contiguous() and out.shape == shape
    assert_forecast_update_matches(out, slots, x, gate, fresh, slots_before, INV[:order])
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forecast_update_inplace(shape, dtype, order, device):
    g = make_generator("forecast_update_", shape, dtype, order)
    x, fresh = hidden(shape, dtype, device, "contiguous", g), hidden(shape, dtype, device, "strided", g)
    gate = adaln_gate(shape, dtype, device, "strided", "2d", g)
    slots = [hidden(shape, dtype, device, "contiguous", g) for _ in range(order + 1)]
    slots_before, x_before = [slot.clone() for slot in slots], x.clone()

    returned = ops.forecast_update_(x, gate, fresh, slots, INV[:order])

    assert returned.data_ptr() == x.data_ptr()
    assert_forecast_update_matches(x, slots, x_before, gate, fresh, slots_before, INV[:order])


def test_forecast_ops_of_one_slot_are_cache_read_and_cache_write():
    g = make_generator("forecast_order0")
    x, fresh, slot = (torch.randn(3, 5, 24, generator=g) for _ in range(3))
    gate = torch.randn(3, 24, generator=g)
    torch.testing.assert_close(ops.forecast_read(x, gate, [slot], (1.0,)), ops.cache_read(x, gate, slot), rtol=0,
                               atol=0)
    forecast_slot, cache_slot = slot.clone(), slot.clone()
    torch.testing.assert_close(ops.forecast_update(x, gate, fresh, [forecast_slot], ()),
                               ops.cache_write(x, gate, fresh, cache_slot), rtol=0, atol=0)
    torch.testing.assert_close(forecast_slot, cache_slot, rtol=0, atol=0)


def test_forecast_read_reads_only_the_slots_it_has_coefficients_for():
    # A unit's table may hold more orders than this step's forecast uses (a later step needs them).
    g = make_generator("forecast_fewer")
    x, d0, d1 = (torch.randn(2, 3, 16, generator=g) for _ in range(3))
    gate = torch.randn(2, 16, generator=g)
    unused = torch.full_like(x, float("nan"))
    out = ops.forecast_read(x, gate, [d0, d1, unused], (1.0, 0.5))
    assert_forecast_close(out, x, gate, [d0, d1], (1.0, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_forecast_ops_follow_a_plan_on_timestep_coordinates(dtype):
    # A unit computed at 5 steps, then forecast at order 4 on DDIM-like timestep coordinates: the plan's
    # coefficients reach ~1e8 and its inverse distances ~1e-2, all negative or alternating. The ops and
    # the reference, fed the same branch outputs, keep identical tables and serve the same forecasts.
    from harmonica.cache.forecast import Forecast, Update, unit_plan

    coords = [999.0 - 50.0 * t - 0.5 * t * t for t in range(8)]
    actions = unit_plan([True] * 5 + [False] * 3, [4] * 8, coords)
    g = make_generator("forecast_plan", dtype)
    shape = (2, 7, 40)
    gate = torch.randn(2, 40, generator=g).to(dtype)
    table = [torch.zeros(shape, dtype=dtype) for _ in range(5)]
    expected_table = [t.clone() for t in table]
    forecasts = 0
    for step, action in enumerate(actions):
        x = torch.randn(shape, generator=g).to(dtype)
        if isinstance(action, Update):
            fresh = (torch.randn(shape, generator=g) + 0.01 * step * step).to(dtype)
            out = ops.forecast_update(x, gate, fresh, table[: action.keep + 1], action.inv)
            expected = reference.forecast_update(x, gate, fresh, expected_table[: action.keep + 1], action.inv)
            assert_close(out, expected)
            for got, want in zip(table, expected_table):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert isinstance(action, Forecast) and len(action.coeffs) == 5 and max(map(abs, action.coeffs)) > 1e7
            assert_forecast_close(ops.forecast_read(x, gate, table, action.coeffs), x, gate, table, action.coeffs)
            forecasts += 1
    assert forecasts == 3


def test_forecast_ops_promote_mixed_dtypes_and_write_slots_of_the_result_dtype():
    g = make_generator("forecast_promote")
    x, fresh = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g).bfloat16()
    gate = torch.randn(2, 16, generator=g).half()
    slots = [torch.randn(2, 3, 16, generator=g).bfloat16(), torch.randn(2, 3, 16, generator=g)]
    promoted = [s.float() for s in slots]
    assert_forecast_close(ops.forecast_read(x, gate, slots, (1.0, -2.0)), x, gate.float(), promoted, (1.0, -2.0))
    written, before = [s.clone() for s in promoted], [s.clone() for s in promoted]
    out = ops.forecast_update(x, gate, fresh, written, (0.5,))
    assert_forecast_update_matches(out, written, x, gate.float(), fresh.float(), before, (0.5,))
    with pytest.raises(RuntimeError, match=r"`slots\[1\]` has dtype BFloat16 but `x` has dtype Float"):
        ops.forecast_update(x, gate, fresh, [promoted[0], slots[0]], (0.5,))
    with pytest.raises(ValueError, match=r"result has dtype torch.float32 .* has dtype torch.bfloat16; use the "
                                         r"out-of-place forecast_read"):
        ops.forecast_read_(x.bfloat16(), gate, slots, (1.0, -2.0))


def test_forecast_ops_compile_without_graph_breaks():
    # The slot list is mutated in place (Tensor(a!)[]): functionalization must write it back.
    g = make_generator("forecast_compile")
    x, fresh = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    gate = torch.randn(2, 16, generator=g)

    def step(x, slots):
        y = ops.forecast_update_(x.clone(), gate, fresh, slots, (0.5, -2.0))
        return ops.forecast_read(y, gate, slots, (1.0, 0.25, -0.125))

    eager_slots = [torch.randn(2, 4, 16, generator=g) for _ in range(3)]
    compiled_slots = [s.clone() for s in eager_slots]
    expected = step(x, eager_slots)
    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, compiled_slots)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(compiled_slots, eager_slots):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Large targets: the CPU kernels write cache slots and out-of-place outputs above a quarter of the
# last-level cache with non-temporal stores (slots: whole rows; float32/float64 outputs: full chunks
# of 32-byte aligned rows, other rows and row tails as usual; half types: normal stores)


LLC_BYTES = harmonica_C.last_level_cache_bytes  # the size the kernels read


def test_last_level_cache_size_is_read_from_sysfs():
    sysfs = [f"/sys/devices/system/cpu/cpu0/cache/index{index}/size" for index in (3, 2)]
    sizes = [int(open(path).read().strip().removesuffix("K")) * 1024 for path in sysfs if os.path.exists(path)]
    assert LLC_BYTES == (sizes[0] if sizes else 32 << 20)


# D = 1152: every row starts 32-byte aligned and is streamed whole. D = 1151: only every 8th
# (float32) or 16th (half types) row start is aligned, and every row ends in a partial chunk.
@pytest.mark.parametrize("D", [1152, 1151])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=dtype_id)
@pytest.mark.parametrize("op", ["cache_write", "cache_read", "blend", "gated_merge"])
def test_tensors_beyond_a_quarter_of_the_llc_are_streamed_correctly(op, dtype, D):
    B = 2
    N = LLC_BYTES // 4 // (B * D * dtype.itemsize) + 1
    shape = (B, N, D)
    g = make_generator("streamed", op, dtype, D)
    x, branch = (hidden(shape, dtype, "cpu", "contiguous", g) for _ in range(2))
    gate = adaln_gate(shape, dtype, "cpu", "contiguous", "2d", g)
    cache = hidden(shape, dtype, "cpu", "contiguous", g)
    expected_cache = cache.clone()
    w = torch.tensor([0.25, 0.75], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    index = torch.tensor([1])
    run = {
        "cache_write": lambda module, slot: module.cache_write(x, gate, branch, slot),
        "cache_read": lambda module, slot: module.cache_read(x, gate, slot),
        "blend": lambda module, slot: module.blend(x, gate, branch, slot, w),
        "gated_merge": lambda module, slot: module.gated_merge(x, gate, branch[index], index, slot),
    }[op]
    expected = run(reference, expected_cache)

    out = run(ops, cache)

    assert out.nbytes > LLC_BYTES // 4
    assert_close(out, expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)


@pytest.mark.parametrize("D", [1152, 1151])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_forecast_tensors_beyond_a_quarter_of_the_llc_are_streamed_correctly(dtype, D):
    # forecast_update streams its slots (every row whose slot rows are all 32-byte aligned) and its
    # out-of-place output; forecast_read its output.
    B = 2
    shape = (B, LLC_BYTES // 4 // (B * D * dtype.itemsize) + 1, D)
    g = make_generator("forecast_streamed", dtype, D)
    x, fresh = hidden(shape, dtype, "cpu", "contiguous", g), hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "contiguous", "2d", g)
    slots = [hidden(shape, dtype, "cpu", "contiguous", g) for _ in range(3)]
    assert x.nbytes > LLC_BYTES // 4
    assert_forecast_close(ops.forecast_read(x, gate, slots, COEFFS[:3]), x, gate, slots, COEFFS[:3])
    written = [slot.clone() for slot in slots]
    out = ops.forecast_update(x, gate, fresh, written, INV[:2])
    assert_forecast_update_matches(out, written, x, gate, fresh, slots, INV[:2])
    x_in_place, written_in_place = x.clone(), [slot.clone() for slot in slots]
    ops.forecast_update_(x_in_place, gate, fresh, written_in_place, INV[:2])
    assert_forecast_update_matches(x_in_place, written_in_place, x, gate, fresh, slots, INV[:2])


# ---------------------------------------------------------------------------------------------------
# The CUDA launchers (cuda/launchers.h) with every (block, thread) of each launch run on the CPU: the
# same launch code, parameter structs and per-thread bodies as the CUDA build, including the check
# kernels

sim = torch.ops.harmonica

# (block_dim, grid_dim): the launcher's grid; a single small block that must stride over
# everything; several blocks of a warp each.
LAUNCHES = [(256, 0), (32, 1), (32, 3)]
SIM_SHAPES = [(1, 1, 8), (7, 3, 13), (2, 16, 64), (3, 5, 1), (2, 3, 12)]


def launch_id(launch):
    return f"block{launch[0]}-grid{launch[1] or 'auto'}"


def packed_width(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def vector_widths(shape, dtype):
    """0 = the launcher's choice, then every power-of-two pack that divides the rows (inputs are
    freshly allocated, so aligned): a pack never straddles a row."""
    return [0] + [w for w in (1, 2, 4, 8, 16) if w <= packed_width(dtype) and shape[2] % w == 0]


def sim_cases():
    return [
        pytest.param(shape, dtype, width, launch,
                     id=f"{shape_id(shape)}-{dtype_id(dtype)}-vec{width or 'auto'}-{launch_id(launch)}")
        for shape in SIM_SHAPES
        for dtype in DTYPES
        for width in vector_widths(shape, dtype)
        for launch in LAUNCHES
    ]


@pytest.mark.parametrize("shape,dtype,width,launch", sim_cases())
def test_simulated_cuda_cache_write_and_read(shape, dtype, width, launch):
    g = make_generator("sim_write", shape, dtype)
    x, branch = hidden(shape, dtype, "cpu", "contiguous", g), hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "strided", "3d", g)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    out = sim._simulate_cuda_cache_write(x, gate, branch, cache, launch[0], launch[1], width)
    assert_close(out, reference.cache_write(x, gate, branch, torch.empty_like(cache)))
    torch.testing.assert_close(cache, branch, rtol=0, atol=0)
    read = sim._simulate_cuda_cache_read(x, gate, cache, launch[0], launch[1], width)
    assert_close(read, reference.cache_read(x, gate, cache))
    # The in-place launches: out is x itself.
    x_written, x_read, slot = x.clone(), x.clone(), torch.full(shape, float("nan"), dtype=dtype)
    sim._simulate_cuda_cache_write_(x_written, gate, branch, slot, launch[0], launch[1], width)
    assert_close(x_written, reference.cache_write(x, gate, branch, torch.empty_like(slot)))
    torch.testing.assert_close(slot, branch, rtol=0, atol=0)
    sim._simulate_cuda_cache_read_(x_read, gate, cache, launch[0], launch[1], width)
    assert_close(x_read, read)


@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("shape,dtype,width,launch", sim_cases())
def test_simulated_cuda_blend(shape, dtype, width, launch, w_kind):
    # A (B,) w is read from (device) memory and range-checked by the check kernel; a 0-dim CPU w is a
    # host scalar passed to the kernel by value.
    g = make_generator("sim_blend", shape, dtype, w_kind)
    x, fresh, cache = (hidden(shape, dtype, "cpu", "contiguous", g) for _ in range(3))
    gate = adaln_gate(shape, dtype, "cpu", "strided", "2d", g)
    w = make_w(w_kind, shape[0], "cpu", g)
    out = sim._simulate_cuda_blend(x, gate, fresh, cache, w, launch[0], launch[1], width)
    assert_close(out, reference.blend(x, gate, fresh, cache, w))


@pytest.mark.parametrize("shape,dtype,width,launch", sim_cases())
def test_simulated_cuda_blend_backward(shape, dtype, width, launch):
    g = make_generator("sim_blend_bwd", shape, dtype)
    grad_out, fresh, cache = (hidden(shape, dtype, "cpu", "contiguous", g) for _ in range(3))
    gate = adaln_gate(shape, dtype, "cpu", "strided", "2d", g)
    w = make_w("per_sample", shape[0], "cpu", g)
    simulated = sim._simulate_cuda_blend_backward(grad_out, gate, fresh, cache, w, launch[0], launch[1], width)
    cpu_kernel = torch.ops.harmonica.blend_backward(grad_out, gate, fresh, cache, w)
    g64, f64, c64, go64 = gate.double()[:, None], fresh.double(), cache.double(), grad_out.double()
    w64 = w.double()[:, None, None]
    value = go64 * (w64 * f64 + (1 - w64) * c64)
    w_terms = go64 * g64 * (f64 - c64)
    assert_reduction_close(simulated[0], value.sum(1), value.abs().sum(1), dtype)
    assert_close(simulated[1], (go64 * g64 * w64).to(dtype))
    assert_reduction_close(simulated[2], w_terms.sum((1, 2)), w_terms.abs().sum((1, 2)), torch.float32)
    # grad_fresh is elementwise: the simulated GPU and the CPU kernel must agree to the last bit
    # up to float32 operation order, which for one product chain is identical.
    torch.testing.assert_close(simulated[1], cpu_kernel[1], rtol=0, atol=0)


@pytest.mark.parametrize("shape,dtype,width,launch", sim_cases())
def test_simulated_cuda_gated_merge(shape, dtype, width, launch):
    B, N, D = shape
    g = make_generator("sim_merge", shape, dtype)
    x = hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "strided", "2d", g)
    index = random_index(B, (B + 1) // 2, g, "cpu")
    branch_active = hidden((index.numel(), N, D), dtype, "cpu", "contiguous", g)
    cache = hidden(shape, dtype, "cpu", "contiguous", g)
    expected_cache = cache.clone()
    expected = reference.gated_merge(x, gate, branch_active, index, expected_cache)
    slot_in_place = cache.clone()
    out = sim._simulate_cuda_gated_merge(x, gate, branch_active, index, cache, launch[0], launch[1], width)
    assert_close(out, expected)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)
    x_in_place = x.clone()
    sim._simulate_cuda_gated_merge_(x_in_place, gate, branch_active, index, slot_in_place, launch[0], launch[1], width)
    assert_close(x_in_place, expected)
    torch.testing.assert_close(slot_in_place, expected_cache, rtol=0, atol=0)


def offset_view(shape, dtype, elements, generator):
    """A contiguous tensor whose data starts `elements` elements past a 16-byte boundary."""
    storage = torch.randn(math.prod(shape) + elements, generator=generator).to(dtype)
    return storage[elements:].view(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset_bytes", [2, 4, 8])
def test_simulated_cuda_takes_the_widest_pack_the_alignment_allows(dtype, offset_bytes):
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset_bytes % itemsize:
        pytest.skip("offset is not a whole element")
    shape = (2, 4, 64)
    g = make_generator("misaligned", dtype, offset_bytes)
    x, branch = offset_view(shape, dtype, offset_bytes // itemsize, g), hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "contiguous", "2d", g)
    expected = reference.cache_read(x, gate, branch)
    allowed = offset_bytes // itemsize  # the widest pack whose alignment the offset keeps
    # The launcher's own choice must notice the misalignment and stay correct...
    assert_close(sim._simulate_cuda_cache_read(x, gate, branch, 64, 0, 0), expected)
    # ...with partial packs where the alignment allows them (an 8-byte aligned bfloat16 view: 4 wide)...
    assert_close(sim._simulate_cuda_cache_read(x, gate, branch, 64, 0, allowed), expected)
    # ...and refuse anything wider.
    with pytest.raises(RuntimeError, match="needs .*-byte aligned pointers"):
        sim._simulate_cuda_cache_read(x, gate, branch, 64, 0, 2 * allowed)


def test_simulated_cuda_refuses_packs_that_would_straddle_rows():
    x = torch.randn(3, 2, 13)  # D = 13 is odd: only single elements fit a row
    gate, cache = torch.randn(3, 13), torch.randn(3, 2, 13)
    with pytest.raises(RuntimeError, match="multiple of the pack width; these inputs allow at most 1"):
        sim._simulate_cuda_cache_read(x, gate, cache, 32, 0, 4)


@pytest.mark.parametrize("max_packs", [6, 7, 25])
def test_simulated_cuda_splits_large_launches_by_samples(max_packs):
    # 5 samples of 2 x 12 float32 = 6 packs each: one sample per launch (max 6 or 7), or 4 then 1 (max 25).
    # Each launch offsets every pointer by its first sample, the per-sample w and slot_of_row too.
    shape = (5, 2, 12)
    g = make_generator("split", max_packs)
    x, fresh, cache = (torch.randn(*shape, generator=g) for _ in range(3))
    gate = adaln_gate(shape, torch.float32, "cpu", "strided", "2d", g)
    w = make_w("per_sample", 5, "cpu", g)
    assert_close(sim._simulate_cuda_blend(x, gate, fresh, cache, w, 32, 0, 0, max_packs),
                 reference.blend(x, gate, fresh, cache, w))
    slot = torch.full(shape, float("nan"))
    assert_close(sim._simulate_cuda_cache_write(x, gate, fresh, slot, 32, 0, 0, max_packs),
                 reference.cache_write(x, gate, fresh, torch.empty_like(slot)))
    torch.testing.assert_close(slot, fresh, rtol=0, atol=0)
    index = torch.tensor([4, 1, 2])
    merged_slot, expected_slot = cache.clone(), cache.clone()
    expected = reference.gated_merge(x, gate, fresh[index], index, expected_slot)
    assert_close(sim._simulate_cuda_gated_merge(x, gate, fresh[index], index, merged_slot, 32, 0, 0, max_packs),
                 expected)
    torch.testing.assert_close(merged_slot, expected_slot, rtol=0, atol=0)
    grads = sim._simulate_cuda_blend_backward(x, gate, fresh, cache, w, 32, 0, 0, max_packs)
    for got, want in zip(grads, sim._simulate_cuda_blend_backward(x, gate, fresh, cache, w, 32, 0, 0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # same sums, other launch boundaries


# The check kernels use grid-stride loops: with more entries than the launcher's largest grid
# (8192 blocks x 256 threads = 2^21 threads) every entry is still checked, so a bad one near the end
# is caught, and every computed sample refreshes its slot.
MANY = (1 << 21) + 37


def test_simulated_cuda_w_check_covers_every_entry():
    x, fresh, cache = (torch.zeros(MANY, 1, 1) for _ in range(3))
    gate = torch.ones(MANY, 1)
    w = torch.full((MANY,), 0.5)
    w[MANY - 3] = 1.5
    with pytest.raises(RuntimeError, match=rf"`w` must lie in \[0, 1\] \(entry {MANY - 3}; a device-side assert"):
        sim._simulate_cuda_blend(x, gate, fresh, cache, w, 256, 0, 0)


@pytest.mark.parametrize("bad", ["out_of_range", "repeated"])
def test_simulated_cuda_index_check_covers_every_entry(bad):
    x, cache = torch.zeros(MANY, 1, 1), torch.zeros(MANY, 1, 1)
    gate = torch.ones(MANY, 1)
    index = torch.arange(MANY - 1)
    index[MANY - 4] = MANY if bad == "out_of_range" else MANY - 5
    message = "out of range for the batch" if bad == "out_of_range" else "lists a sample twice"
    with pytest.raises(RuntimeError, match=rf"`index` {message}.*\(entry {MANY - 4}; a device-side assert"):
        sim._simulate_cuda_gated_merge(x, gate, torch.ones(MANY - 1, 1, 1), index, cache, 256, 0, 0)


def test_simulated_cuda_gated_merge_refreshes_every_slot_beyond_one_grid():
    x = torch.zeros(MANY, 1, 1)
    gate = torch.ones(MANY, 1)
    index = torch.arange(MANY - 1, -1, -1)  # every sample computed, listed in reverse
    branch_active = torch.arange(MANY, dtype=torch.float32).flip(0).view(MANY, 1, 1)
    cache = torch.full((MANY, 1, 1), -1.0)
    out = sim._simulate_cuda_gated_merge(x, gate, branch_active, index, cache, 256, 0, 0)
    expected = torch.arange(MANY, dtype=torch.float32).view(MANY, 1, 1)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape,dtype,width,launch", sim_cases())
def test_simulated_cuda_forecast_read_and_update(shape, dtype, width, launch):
    # Every order through the one kernel per op (its slot loops are guarded by the runtime count).
    g = make_generator("sim_forecast", shape, dtype)
    x, fresh = hidden(shape, dtype, "cpu", "contiguous", g), hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "strided", "2d", g)
    for order in ORDERS:
        slots = [hidden(shape, dtype, "cpu", "contiguous", g) for _ in range(order + 1)]
        coeffs, inv = list(COEFFS[: order + 1]), list(INV[:order])
        read = sim._simulate_cuda_forecast_read(x, gate, slots, coeffs, launch[0], launch[1], width)
        assert_forecast_close(read, x, gate, slots, coeffs)
        x_read = x.clone()
        sim._simulate_cuda_forecast_read_(x_read, gate, slots, coeffs, launch[0], launch[1], width)
        torch.testing.assert_close(x_read, read, rtol=0, atol=0)
        written = [slot.clone() for slot in slots]
        out = sim._simulate_cuda_forecast_update(x, gate, fresh, written, inv, launch[0], launch[1], width)
        assert_forecast_update_matches(out, written, x, gate, fresh, slots, inv)
        x_written, written_in_place = x.clone(), [slot.clone() for slot in slots]
        sim._simulate_cuda_forecast_update_(x_written, gate, fresh, written_in_place, inv, launch[0], launch[1], width)
        torch.testing.assert_close(x_written, out, rtol=0, atol=0)
        for a, b in zip(written_in_place, written):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset_bytes", [2, 4, 8])
def test_simulated_cuda_forecast_packs_fit_every_slot(dtype, offset_bytes):
    # x, gate and the first slots aligned, only the last slot misaligned: the pack must fit it too.
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset_bytes % itemsize:
        pytest.skip("offset is not a whole element")
    shape, allowed = (2, 4, 64), offset_bytes // itemsize
    g = make_generator("forecast_misaligned", dtype, offset_bytes)
    x, fresh = hidden(shape, dtype, "cpu", "contiguous", g), hidden(shape, dtype, "cpu", "contiguous", g)
    gate = adaln_gate(shape, dtype, "cpu", "contiguous", "2d", g)
    slots = [hidden(shape, dtype, "cpu", "contiguous", g), offset_view(shape, dtype, allowed, g)]
    for width in (0, allowed):
        assert_forecast_close(sim._simulate_cuda_forecast_read(x, gate, slots, [1.0, -2.0], 64, 0, width), x, gate,
                              slots, (1.0, -2.0))
        written = [slot.clone() for slot in slots[:1]] + [offset_view(shape, dtype, allowed, g)]
        before = [slot.clone() for slot in written]
        out = sim._simulate_cuda_forecast_update(x, gate, fresh, written, [0.5], 64, 0, width)
        assert_forecast_update_matches(out, written, x, gate, fresh, before, (0.5,))
    with pytest.raises(RuntimeError, match="needs .*-byte aligned pointers"):
        sim._simulate_cuda_forecast_read(x, gate, slots, [1.0, -2.0], 64, 0, 2 * allowed)
    with pytest.raises(RuntimeError, match="needs .*-byte aligned pointers"):
        sim._simulate_cuda_forecast_update(x, gate, fresh, written, [0.5], 64, 0, 2 * allowed)


@pytest.mark.parametrize("max_packs", [6, 7, 25])
def test_simulated_cuda_forecast_splits_large_launches_by_samples(max_packs):
    # As test_simulated_cuda_splits_large_launches_by_samples: every slot pointer offset per launch.
    shape = (5, 2, 12)
    g = make_generator("forecast_split", max_packs)
    x, fresh = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    gate = adaln_gate(shape, torch.float32, "cpu", "strided", "2d", g)
    slots = [torch.randn(*shape, generator=g) for _ in range(3)]
    assert_forecast_close(sim._simulate_cuda_forecast_read(x, gate, slots, list(COEFFS[:3]), 32, 0, 0, max_packs),
                          x, gate, slots, COEFFS[:3])
    written = [slot.clone() for slot in slots]
    out = sim._simulate_cuda_forecast_update(x, gate, fresh, written, list(INV[:2]), 32, 0, 0, max_packs)
    assert_forecast_update_matches(out, written, x, gate, fresh, slots, INV[:2])


# ---------------------------------------------------------------------------------------------------
# Aliasing: a tensor an op writes shares no memory with another argument (refused on every device;
# with an overlap the CPU kernels and the GPU read and write elements in different orders)


def _aliasing_cases():
    """(name, call(module), argument names in the error): every written tensor against the arguments
    it could alias. `module` is ops (the CPU kernels) or `simulated` (the CUDA launchers)."""
    g = make_generator("alias")
    shape = (3, 4, 8)

    def fresh():
        return torch.randn(*shape, generator=g)

    gate = torch.randn(3, 8, generator=g)
    index = torch.tensor([2, 0])
    storage = torch.randn(4 * 4 * 8, generator=g)
    slot_view, branch_view = storage[: 3 * 32].view(shape), storage[32:].view(shape)  # overlap in 2 samples
    x_for_gate = fresh()
    return [
        ("cache_write_ cache=x", lambda m, x=fresh(): m.cache_write_(x, gate, fresh(), x), ("cache", "x")),
        ("cache_write cache=x", lambda m, x=fresh(): m.cache_write(x, gate, fresh(), x), ("cache", "x")),
        ("cache_write branch overlaps slot", lambda m: m.cache_write(fresh(), gate, branch_view, slot_view),
         ("cache", "branch")),
        ("cache_write_ branch=x", lambda m, x=fresh(): m.cache_write_(x, gate, x, torch.zeros(shape)), ("x", "branch")),
        ("cache_write_ gate in x", lambda m: m.cache_write_(x_for_gate, x_for_gate[:, 0], fresh(), torch.zeros(shape)),
         ("x", "gate")),
        ("cache_read_ cache=x", lambda m, x=fresh(): m.cache_read_(x, gate, x), ("x", "cache")),
        ("gated_merge cache=x", lambda m, x=fresh(): m.gated_merge(x, gate, fresh()[:2], index, x), ("cache", "x")),
        ("gated_merge_ cache=x", lambda m, x=fresh(): m.gated_merge_(x, gate, fresh()[:2], index, x), ("cache", "x")),
        ("gated_merge branch is the slot", lambda m, c=fresh(): m.gated_merge(fresh(), gate, c[:2], index, c),
         ("cache", "branch_active")),
        ("gated_merge_ branch is x", lambda m, x=fresh(): m.gated_merge_(x, gate, x[1:], index, fresh()),
         ("x", "branch_active")),
        ("forecast_read_ slot is x", lambda m, x=fresh(): m.forecast_read_(x, gate, [fresh(), x], (1.0, 0.5)),
         ("x", "slots[1]")),
        ("forecast_read_ gate in x", lambda m: m.forecast_read_(x_for_gate, x_for_gate[:, 1], [fresh()], (1.0,)),
         ("x", "gate")),
        ("forecast_update slot is x", lambda m, x=fresh(): m.forecast_update(x, gate, fresh(), [x, fresh()], (0.5,)),
         ("slots[0]", "x")),
        ("forecast_update_ slot is x", lambda m, x=fresh(): m.forecast_update_(x, gate, fresh(), [fresh(), x], (0.5,)),
         ("slots[1]", "x")),
        ("forecast_update slot is fresh", lambda m, f=fresh(): m.forecast_update(fresh(), gate, f, [f, fresh()], (0.5,)),
         ("slots[0]", "fresh")),
        ("forecast_update gate in slot", lambda m, s=fresh(): m.forecast_update(fresh(), s[:, 0], fresh(), [s], ()),
         ("slots[0]", "gate")),
        ("forecast_update two slots are one",
         lambda m, s=fresh(): m.forecast_update(fresh(), gate, fresh(), [s, fresh(), s], (0.5, 2.0)),
         ("slots[0]", "slots[2]")),
        ("forecast_update slots overlap",
         lambda m: m.forecast_update(fresh(), gate, fresh(), [fresh(), slot_view, branch_view], (0.5, 2.0)),
         ("slots[1]", "slots[2]")),
        ("forecast_update_ fresh is x", lambda m, x=fresh(): m.forecast_update_(x, gate, x, [fresh()], ()),
         ("x", "fresh")),
    ]


class simulated:
    """The writing ops' signatures over the simulated CUDA launchers."""

    @staticmethod
    def cache_write(x, gate, branch, cache):
        return sim._simulate_cuda_cache_write(x, gate, branch, cache, 32, 0, 0)

    @staticmethod
    def cache_write_(x, gate, branch, cache):
        sim._simulate_cuda_cache_write_(x, gate, branch, cache, 32, 0, 0)

    @staticmethod
    def cache_read_(x, gate, cache):
        sim._simulate_cuda_cache_read_(x, gate, cache, 32, 0, 0)

    @staticmethod
    def gated_merge(x, gate, branch_active, index, cache):
        return sim._simulate_cuda_gated_merge(x, gate, branch_active, index, cache, 32, 0, 0)

    @staticmethod
    def gated_merge_(x, gate, branch_active, index, cache):
        sim._simulate_cuda_gated_merge_(x, gate, branch_active, index, cache, 32, 0, 0)

    @staticmethod
    def forecast_read_(x, gate, slots, coeffs):
        sim._simulate_cuda_forecast_read_(x, gate, slots, list(coeffs), 32, 0, 0)

    @staticmethod
    def forecast_update(x, gate, fresh, slots, inv):
        return sim._simulate_cuda_forecast_update(x, gate, fresh, slots, list(inv), 32, 0, 0)

    @staticmethod
    def forecast_update_(x, gate, fresh, slots, inv):
        sim._simulate_cuda_forecast_update_(x, gate, fresh, slots, list(inv), 32, 0, 0)


@pytest.mark.parametrize("name,call,names", _aliasing_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_writes_into_memory_another_argument_uses_are_refused(name, call, names):
    written, other = map(re.escape, names)
    with pytest.raises(RuntimeError, match=rf"`{written}` is written by this op and shares memory with `{other}`"):
        call(ops)


@pytest.mark.parametrize("name,call,names", _aliasing_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_simulated_cuda_refuses_the_same_aliasing(name, call, names):
    written, other = map(re.escape, names)
    with pytest.raises(RuntimeError, match=rf"`{written}` is written by this op and shares memory with `{other}`"):
        call(simulated)


def test_aliasing_refusal_writes_nothing():
    g = make_generator("alias_untouched")
    x, branch = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    before = x.clone()
    with pytest.raises(RuntimeError, match="shares memory"):
        ops.cache_write_(x, torch.randn(2, 4, generator=g), branch, x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema (mutation annotations), fake kernels, autograd registration,
# AOT dispatch with dynamic shapes.


def _opcheck_cases():
    g = make_generator("opcheck")
    x, branch, cache = (torch.randn(3, 5, 12, generator=g) for _ in range(3))
    gate = torch.randn(3, 12, generator=g)
    index = torch.tensor([2, 0])
    active = torch.randn(2, 5, 12, generator=g)

    def requiring_grad(*tensors):
        return [t.clone().requires_grad_() for t in tensors]

    xr, gate_r, fresh_r = requiring_grad(x, gate, branch)
    return [
        pytest.param("cache_write", (x, gate, branch, cache.clone()), id="cache_write"),
        pytest.param("cache_write_", (x.clone(), gate, branch, cache.clone()), id="cache_write_"),
        pytest.param("cache_read", (x, gate.unsqueeze(1), cache), id="cache_read"),
        pytest.param("cache_read_", (x.clone(), gate, cache), id="cache_read_"),
        pytest.param("blend", (xr, gate_r, fresh_r, cache, torch.tensor([0.2, 0.5, 0.9], requires_grad=True)),
                     id="blend-per_sample_w"),
        pytest.param("blend", (xr, gate_r, fresh_r, cache, torch.tensor(0.3, requires_grad=True)), id="blend-scalar_w"),
        pytest.param("blend_backward", (x, gate, branch, cache, torch.tensor(0.3)), id="blend_backward"),
        pytest.param("gather_rows", (x, index), id="gather_rows"),
        pytest.param("gated_merge", (x, gate, active, index, cache.clone()), id="gated_merge"),
        pytest.param("gated_merge_", (x.clone(), gate, active, index, cache.clone()), id="gated_merge_"),
        pytest.param("forecast_read", (x, gate, [cache, branch, x], [1.0, -0.5, 2.0]), id="forecast_read"),
        pytest.param("forecast_read_", (x.clone(), gate.unsqueeze(1), [cache, branch], [1.0, 3.0]),
                     id="forecast_read_"),
        pytest.param("forecast_update", (x, gate, branch, [cache.clone(), 2 * cache, torch.zeros_like(x)], [0.5, -2.0]),
                     id="forecast_update"),
        pytest.param("forecast_update_", (x.clone(), gate, branch, [cache.clone(), torch.zeros_like(x)], [0.5]),
                     id="forecast_update_"),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases())
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.harmonica, name).default, args)


# ---------------------------------------------------------------------------------------------------
# Errors name the argument, the expected and the received value


@pytest.fixture
def tensors():
    g = make_generator("errors")
    x, branch, cache = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    return x, torch.randn(2, 8, generator=g), branch, cache


def test_error_branch_shape(tensors):
    x, gate, _, cache = tensors
    with pytest.raises(RuntimeError, match=r"`branch` must have the shape of `x` \[2, 4, 8\], got \[2, 4, 7\]"):
        ops.cache_write(x, gate, torch.randn(2, 4, 7), cache)


def test_error_written_slot_of_another_dtype(tensors):
    # Inputs are promoted like the eager composition, but a slot is written, never converted.
    x, gate, branch, cache = tensors
    with pytest.raises(RuntimeError, match=r"`cache` has dtype Half but `x` has dtype Float.*cache\.to\(x\.dtype\)"):
        ops.cache_write(x, gate, branch, cache.half())


def test_mixed_input_dtypes_are_promoted_and_in_place_refuses_a_dtype_change(tensors):
    x, gate, branch, cache = tensors
    expected = torch.addcmul(x, gate.bfloat16().view(x.shape[0], 1, -1), cache.half())  # one rounding, float32
    torch.testing.assert_close(ops.cache_read(x, gate.bfloat16(), cache.half()), expected)
    with pytest.raises(ValueError, match=r"result has dtype torch.float32 .* x, updated in place, has dtype "
                                         r"torch.bfloat16; use the out-of-place cache_read"):
        ops.cache_read_(x.bfloat16(), gate, cache)


@pytest.mark.parametrize("bad_gate_shape", [(2, 4, 8), (2, 9), (1, 8), (8,)], ids=str)
def test_error_gate_cannot_broadcast(tensors, bad_gate_shape):
    x, _, branch, cache = tensors
    with pytest.raises(RuntimeError, match=r"`gate` must broadcast over the tokens of `x`.*\(B, D\) = \(2, 8\)"):
        ops.cache_write(x, torch.randn(bad_gate_shape), branch, cache)


def test_error_hidden_states_not_3d(tensors):
    _, gate, _, _ = tensors
    with pytest.raises(RuntimeError, match=r"`x` must be a \(B, N, D\) hidden-state tensor, got shape \[2, 32\]"):
        ops.cache_read(torch.randn(2, 32), gate, torch.randn(2, 32))


def test_error_cache_not_contiguous(tensors):
    x, gate, branch, _ = tensors
    strided_cache = torch.empty(2, 4, 16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"`cache` is written in place and must be contiguous"):
        ops.cache_write(x, gate, branch, strided_cache)


def test_error_inplace_x_not_contiguous(tensors):
    _, gate, branch, cache = tensors
    strided_x = torch.randn(2, 8, 4).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"`x` is written in place and must be contiguous"):
        ops.cache_read_(strided_x, gate, cache)


@pytest.mark.parametrize("w", [torch.tensor(1.5), torch.tensor([0.5, -0.25]), torch.tensor(float("nan"))],
                         ids=["above", "below", "nan"])
def test_error_w_outside_unit_interval(tensors, w):
    x, gate, fresh, cache = tensors
    with pytest.raises(RuntimeError, match=r"`w` must lie in \[0, 1\]"):
        ops.blend(x, gate, fresh, cache, w)


def test_error_float_w_outside_unit_interval(tensors):
    x, gate, fresh, cache = tensors
    with pytest.raises(ValueError, match=r"`w` must lie in \[0, 1\].*got 2.0"):
        ops.blend(x, gate, fresh, cache, 2.0)


def test_error_w_shape(tensors):
    x, gate, fresh, cache = tensors
    with pytest.raises(RuntimeError, match=r"`w` must be a 0-dim tensor or have shape \(B,\) = \(2,\), got \[3\]"):
        ops.blend(x, gate, fresh, cache, torch.full((3,), 0.5))


def test_error_gather_index_out_of_range(tensors):
    x = tensors[0]
    with pytest.raises(RuntimeError, match=r"`index\[1\]` = 2 is out of range .* 2 samples"):
        ops.gather_rows(x, torch.tensor([0, 2]))


def test_error_index_dtype(tensors):
    x = tensors[0]
    with pytest.raises(RuntimeError, match=r"`index` must be int64, got Int"):
        ops.gather_rows(x, torch.tensor([0], dtype=torch.int32))


@pytest.mark.parametrize("index,message", [
    ([0, -1], r"`index\[1\]` = -1 is out of range for a batch of 2 samples"),
    ([1, 1], r"`index` lists sample 1 twice"),
    ([0, 1, 1], r"`index` has 3 entries but `x` has only 2 samples"),
], ids=["negative", "duplicate", "too_many"])
def test_error_merge_index(tensors, index, message):
    x, gate, _, cache = tensors
    branch_active = torch.randn(len(index), 4, 8)
    with pytest.raises(RuntimeError, match=message):
        ops.gated_merge(x, gate, branch_active, torch.tensor(index), cache)


def test_error_branch_active_rows(tensors):
    x, gate, _, cache = tensors
    with pytest.raises(RuntimeError, match=r"`branch_active` must have shape \(len\(index\), N, D\) = \(1, 4, 8\)"):
        ops.gated_merge(x, gate, torch.randn(2, 4, 8), torch.tensor([1]), cache)


def _forecast_errors():
    """(call(x, gate, fresh, slot), message): each refusal of a forecast op's table or factors."""
    other = torch.randn(2, 4, 8)
    direct = torch.ops.harmonica
    return [
        pytest.param(lambda x, gate, fresh, slot: direct.forecast_read(x, gate, [slot, other], [1.0]),
                     r"`coeffs` has 1 entries for 2 slots; pass one coefficient per slot read \(2\)", id="coeffs_count"),
        pytest.param(lambda x, gate, fresh, slot: direct.forecast_update(x, gate, fresh, [slot.clone()], [0.5]),
                     r"`inv` has 1 entries for 1 slots; pass one inverse distance per order above 0", id="inv_count"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_read(x, gate, [slot] * 6, (1.0,) * 6),
                     r"`slots` must hold 1 to 5 tensors \(divided differences of orders 0 to 4\), got 6",
                     id="too_many_slots"),
        pytest.param(lambda x, gate, fresh, slot: direct.forecast_read(x, gate, [], []),
                     r"`slots` must hold 1 to 5 tensors", id="no_slots"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_update(x, gate, fresh, [slot, other], (math.inf,)),
                     r"`inv\[0\]` = inf is not finite", id="inv_not_finite"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_read(x, gate, [slot, other], (1.0, math.nan)),
                     r"`coeffs\[1\]` = nan is not finite", id="coeff_not_finite"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_read(x, gate, [slot, torch.randn(2, 4, 7)], (1.0, 2.0)),
                     r"`slots\[1\]` must have the shape of `x` \[2, 4, 8\], got \[2, 4, 7\]", id="slot_shape"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_update(x, gate, fresh, [slot, other.half()], (0.5,)),
                     r"`slots\[1\]` has dtype Half but `x` has dtype Float.*slots\[1\]\.to\(x\.dtype\)",
                     id="written_slot_dtype"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_update(x, gate, fresh, [torch.empty(2, 4, 16)[..., ::2]],
                                                                      ()),
                     r"`slots\[0\]` is written in place and must be contiguous", id="written_slot_strided"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_update(x, gate, fresh, [slot, other], ()),
                     r"harmonica.forecast_update: `inv` has 0 entries for 2 slots; pass 1, one per order above 0",
                     id="wrapper_inv_count"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_read(x, gate, [slot], (1.0, 2.0)),
                     r"harmonica.forecast_read: `coeffs` has 2 entries for 1 slots; pass 1 to 1", id="wrapper_coeffs"),
        pytest.param(lambda x, gate, fresh, slot: ops.forecast_read(x, gate, slot, (1.0,)),
                     r"`slots` must be a non-empty list of tensors", id="slots_not_a_list"),
    ]


@pytest.mark.parametrize("call,message", _forecast_errors())
def test_error_forecast_tables(tensors, call, message):
    x, gate, fresh, slot = tensors
    before = slot.clone()
    with pytest.raises(RuntimeError, match=message):
        call(x, gate, fresh, slot)
    torch.testing.assert_close(slot, before, rtol=0, atol=0)


@requires_cuda
def test_error_device_mismatch(tensors):
    x, gate, branch, cache = tensors
    with pytest.raises(RuntimeError, match=r"`cache` is on cpu but `x` is on cuda:0.*cache\.to\(x\.device\)"):
        ops.cache_read(x.cuda(), gate.cuda(), cache)


# ---------------------------------------------------------------------------------------------------
# CUDA kernels agree with the CPU kernels (beyond the reference checks parametrised above)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_blend_backward_matches_cpu(dtype):
    g = make_generator("cuda_vs_cpu", dtype)
    shape = (4, 77, 136)
    grad_out, fresh, cache = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
    gate = torch.randn(4, 136, generator=g).to(dtype)
    w = torch.rand(4, generator=g)
    cpu = torch.ops.harmonica.blend_backward(grad_out, gate, fresh, cache, w)
    gpu = torch.ops.harmonica.blend_backward(grad_out.cuda(), gate.cuda(), fresh.cuda(), cache.cuda(), w.cuda())
    for c, d in zip(cpu, gpu):
        torch.testing.assert_close(d.cpu(), c, rtol=2 * TOLERANCES[dtype]["rtol"], atol=1e-3)


def cuda_offset_view(shape, dtype, elements, generator):
    """A contiguous CUDA tensor whose data starts `elements` elements past a 16-byte boundary."""
    storage = torch.randn(math.prod(shape) + elements, generator=generator).to(dtype).cuda()
    return storage[elements:].view(shape)


@requires_cuda
@pytest.mark.parametrize("offset_bytes", [0, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_every_pack_width(dtype, offset_bytes):
    # 16-byte packs when aligned; an offset of 8, 4 or 2 bytes leaves 8-, 4- or 2-byte packs (one
    # element for float32 at 2 and 4 bytes), the widest the alignment allows.
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset_bytes % itemsize:
        pytest.skip("offset is not a whole element")
    shape, k = (3, 4, 64), offset_bytes // itemsize
    g = make_generator("cuda_packs", dtype, offset_bytes)
    x, branch, slot = (cuda_offset_view(shape, dtype, k, g) for _ in range(3))
    gate = cuda_offset_view((3, 64), dtype, k, g)
    w = torch.rand(3, generator=g).cuda()
    index = torch.tensor([2, 0], device="cuda")
    assert_close(ops.cache_read(x, gate, slot), reference.cache_read(x, gate, slot))
    assert_close(ops.blend(x, gate, branch, slot, w), reference.blend(x, gate, branch, slot, w))
    merged, expected_slot = slot.clone(), slot.clone()
    expected = reference.gated_merge(x, gate, branch[:2], index, expected_slot)
    assert_close(ops.gated_merge(x, gate, branch[:2].contiguous(), index, merged), expected)
    torch.testing.assert_close(merged, expected_slot, rtol=0, atol=0)
    written = ops.cache_write(x, gate, branch, slot)
    assert_close(written, reference.cache_write(x, gate, branch, torch.empty_like(slot)))
    torch.testing.assert_close(slot, branch, rtol=0, atol=0)
    table = [cuda_offset_view(shape, dtype, k, g) for _ in range(3)]
    assert_forecast_close(ops.forecast_read(x, gate, table, COEFFS[:3]), x, gate, table, COEFFS[:3])
    before = [t.clone() for t in table]
    out = ops.forecast_update(x, gate, branch, table, INV[:2])
    assert_forecast_update_matches(out, table, x, gate, branch, before, INV[:2])


@requires_cuda
def test_cuda_ops_beyond_one_launch_grid():
    # More packs and more index entries than the largest grid has threads (2^21): every pack is
    # computed and every computed sample refreshes its slot.
    x = torch.zeros(MANY, 1, 1, device="cuda")
    gate = torch.ones(MANY, 1, device="cuda")
    index = torch.arange(MANY - 1, -1, -1, device="cuda")
    branch_active = torch.arange(MANY, dtype=torch.float32, device="cuda").flip(0).view(MANY, 1, 1)
    cache = torch.full((MANY, 1, 1), -1.0, device="cuda")
    out = ops.gated_merge(x, gate, branch_active, index, cache)
    expected = torch.arange(MANY, dtype=torch.float32, device="cuda").view(MANY, 1, 1)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    w = torch.rand(MANY, device="cuda")
    fresh = torch.ones(MANY, 1, 1, device="cuda")
    assert_close(ops.blend(x, gate, fresh, cache, w), reference.blend(x, gate, fresh, cache, w))


@requires_cuda
@pytest.mark.parametrize("w_form", ["python_float", "cpu_0dim"])
def test_cuda_blend_with_a_host_scalar_w(w_form):
    # w as a Python float or a 0-dim CPU tensor is a kernel argument: nothing is copied to the GPU.
    g = make_generator("cuda_host_w", w_form)
    x, fresh, cache = (torch.randn(2, 5, 16, generator=g).cuda().requires_grad_() for _ in range(3))
    gate = torch.randn(2, 16, generator=g).cuda().requires_grad_()
    w = 0.3 if w_form == "python_float" else torch.tensor(0.3, requires_grad=True)
    out = ops.blend(x, gate, fresh, cache.detach(), w)
    assert_close(out, reference.blend(x, gate, fresh, cache, torch.tensor(0.3)))
    out.sum().backward()
    assert_close(fresh.grad, (0.3 * gate[:, None, :]).expand_as(fresh).detach())
    if w_form == "cpu_0dim":  # its gradient comes back to the CPU
        expected = (gate[:, None, :] * (fresh - cache)).sum().detach().cpu()
        assert w.grad.device.type == "cpu"
        torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_errors_that_need_no_sync_are_raised_at_the_call():
    x = torch.zeros(2, 3, 8, device="cuda")
    gate = torch.ones(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"`w` must lie in \[0, 1\].*got 1.5"):
        ops.blend(x, gate, x, x, torch.tensor(1.5))
    with pytest.raises(RuntimeError, match=r"`w` is on cpu but `x` is on cuda:0.*0-dim CPU tensor"):
        ops.blend(x, gate, x, x, torch.full((2,), 0.5))
    with pytest.raises(RuntimeError, match=r"`index` has 3 entries but `x` has only 2 samples"):
        ops.gated_merge(x, gate, torch.zeros(3, 3, 8, device="cuda"), torch.tensor([0, 1, 1], device="cuda"),
                        torch.zeros_like(x))
    with pytest.raises(RuntimeError, match=r"`cache` is written by this op and shares memory with `x`"):
        ops.cache_write_(x, gate, torch.ones_like(x), x)
    with pytest.raises(RuntimeError, match=r"`slots\[0\]` is written by this op and shares memory with `slots\[1\]`"):
        ops.forecast_update(x, gate, torch.ones_like(x), [x.clone()] * 2, (0.5,))
    with pytest.raises(RuntimeError, match=r"`slots\[1\]` is on cpu but `x` is on cuda:0.*slots\[1\]\.to\(x\.device\)"):
        ops.forecast_read(x, gate, [x, torch.zeros(2, 3, 8)], (1.0, 1.0))


DEVICE_ASSERT_SCRIPT = """
import torch
from harmonica import ops
x, gate = torch.zeros(4, 2, 8, device="cuda"), torch.ones(4, 8, device="cuda")
if "{case}" == "w":
    ops.blend(x, gate, x.clone(), x.clone(), torch.tensor([0.5, 0.5, 2.0, 0.5], device="cuda"))
else:
    ops.gated_merge(x, gate, torch.ones(2, 2, 8, device="cuda"), torch.tensor([1, 1], device="cuda"), torch.zeros_like(x))
torch.cuda.synchronize()
print("no error")
"""


@requires_cuda
@pytest.mark.parametrize("case,message", [("w", "harmonica.blend: `w` must lie in [0, 1]"),
                                          ("index", "harmonica.gated_merge: `index` lists a sample twice")])
def test_cuda_bad_values_in_device_memory_are_a_device_side_assert(case, message):
    # What the user sees (documented in harmonica/ops.py): the call returns, the next synchronisation
    # raises, and the process's CUDA context is lost - hence a subprocess.
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", DEVICE_ASSERT_SCRIPT.format(case=case)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "no error" not in output
    assert "device-side assert triggered" in output
    assert message in output
