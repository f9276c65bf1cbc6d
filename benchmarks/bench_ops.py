"""Fused cache ops vs the eager PyTorch composition they replace, and a plain copy as the
bandwidth yardstick, on DiT-XL/2 (N=256 tokens, D=1152) and PixArt-alpha 1024px (N=4096) shapes.

Run: `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md). GB/s counts the bytes the
fused op must move at minimum (every input read once, every output written once); the eager
composition is charged the same bytes, so its GB/s is an effective rate.
"""

from __future__ import annotations

import pytest
import torch

from harmonica import ops

DEVICE = "cpu"

# name -> (B, N, D)
SHAPES = {
    "DiT-XL/2 B=2": (2, 256, 1152),
    "DiT-XL/2 B=16": (16, 256, 1152),
    "PixArt-1024 B=2": (2, 4096, 1152),
}
CASES = [(name, torch.float32) for name in SHAPES] + [("DiT-XL/2 B=16", torch.bfloat16)]
CASE_IDS = [f"{name.replace(' ', '_').replace('/', '').replace('=', '')}-{str(dtype)[6:]}" for name, dtype in CASES]
# Big tensors take tens of ms per call; a fixed number of rounds keeps the suite to a few minutes
# on 2 shared cores while the median stays stable.
ROUNDS = 15


def case_name(name, dtype):
    return f"{name}-{str(dtype).removeprefix('torch.')}"


def run(benchmark, group, impl, bytes_moved, fn):
    benchmark.group = group
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, bytes=bytes_moved)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)


def tensors(shape, dtype, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(count)]


def gate_for(shape, dtype):
    B, _, D = shape
    return torch.randn(B, D).to(dtype).to(DEVICE)


@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_copy(benchmark, name, dtype):
    shape = SHAPES[name]
    src, dst = tensors(shape, dtype, 2)
    run(benchmark, f"copy/{case_name(name, dtype)}", "copy", 2 * src.nbytes, lambda: dst.copy_(src))


IMPLS = ["fused", "eager"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_cache_write(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, branch, cache = tensors(shape, dtype, 3)
    gate = gate_for(shape, dtype)
    if impl == "fused":
        fn = lambda: ops.cache_write(x, gate, branch, cache)  # noqa: E731
    else:
        def fn():
            out = x + gate.unsqueeze(1) * branch
            cache.copy_(branch)
            return out
    # reads x, branch; writes out, cache
    run(benchmark, f"cache_write/{case_name(name, dtype)}", impl, 4 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_cache_write_inplace(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, branch, cache = tensors(shape, dtype, 3)
    gate = gate_for(shape, dtype)
    if impl == "fused":
        fn = lambda: ops.cache_write_(x, gate, branch, cache)  # noqa: E731
    else:
        def fn():
            x.add_(gate.unsqueeze(1) * branch)
            cache.copy_(branch)
    run(benchmark, f"cache_write_/{case_name(name, dtype)}", impl, 4 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_cache_read(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, cache = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)
    if impl == "fused":
        fn = lambda: ops.cache_read(x, gate, cache)  # noqa: E731
    else:
        fn = lambda: x + gate.unsqueeze(1) * cache  # noqa: E731
    run(benchmark, f"cache_read/{case_name(name, dtype)}", impl, 3 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_cache_read_inplace(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, cache = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)
    if impl == "fused":
        fn = lambda: ops.cache_read_(x, gate, cache)  # noqa: E731
    else:
        fn = lambda: x.add_(gate.unsqueeze(1) * cache)  # noqa: E731
    run(benchmark, f"cache_read_/{case_name(name, dtype)}", impl, 3 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_blend_forward(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, fresh, cache = tensors(shape, dtype, 3)
    gate = gate_for(shape, dtype)
    w = torch.rand(shape[0], device=DEVICE)
    if impl == "fused":
        fn = lambda: ops.blend(x, gate, fresh, cache, w)  # noqa: E731
    else:
        w_b = w.to(dtype).view(-1, 1, 1)
        fn = lambda: x + gate.unsqueeze(1) * (w_b * fresh + (1 - w_b) * cache)  # noqa: E731
    run(benchmark, f"blend/{case_name(name, dtype)}", impl, 4 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_blend_forward_backward(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    x, fresh, cache, grad_out = tensors(shape, dtype, 4)
    x.requires_grad_()
    fresh.requires_grad_()
    gate = gate_for(shape, dtype).requires_grad_()
    w = torch.rand(shape[0], device=DEVICE).requires_grad_()
    leaves = (x, fresh, gate, w)

    def forward():
        if impl == "fused":
            return ops.blend(x, gate, fresh, cache, w)
        w_b = w.to(dtype).view(-1, 1, 1)
        return x + gate.unsqueeze(1) * (w_b * fresh + (1 - w_b) * cache)

    def fn():
        # Fresh .grad every call: accumulating into old gradients would add a pass to both sides.
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)
    # forward: read x, fresh, cache, write out; backward: read grad_out, fresh, cache, write
    # grad_fresh (grad_x is grad_out itself, gate/w grads are tiny reductions)
    run(benchmark, f"blend fwd+bwd/{case_name(name, dtype)}", impl, 8 * x.nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_gather_rows(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    (x,) = tensors(shape, dtype, 1)
    index = torch.arange(0, shape[0], 2, device=DEVICE)
    if impl == "fused":
        fn = lambda: ops.gather_rows(x, index)  # noqa: E731
    else:
        fn = lambda: x[index]  # noqa: E731
    run(benchmark, f"gather_rows/{case_name(name, dtype)}", impl, 2 * x[index].nbytes, fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,dtype", CASES, ids=CASE_IDS)
def test_gated_merge(benchmark, name, dtype, impl):
    shape = SHAPES[name]
    B, N, D = shape
    x, cache = tensors(shape, dtype, 2)
    gate = gate_for(shape, dtype)
    index = torch.arange(0, B, 2, device=DEVICE)  # half of the samples compute
    (branch_active,) = tensors((index.numel(), N, D), dtype, 1, seed=1)
    if impl == "fused":
        fn = lambda: ops.gated_merge(x, gate, branch_active, index, cache)  # noqa: E731
    else:
        def fn():
            out = x + gate.unsqueeze(1) * cache
            out[index] = x[index] + gate[index].unsqueeze(1) * branch_active
            cache[index] = branch_active
            return out
    # reads x, the cache rows not computed, branch_active; writes out and the refreshed cache rows
    bytes_moved = 2 * x.nbytes + 2 * branch_active.nbytes + (x.nbytes - branch_active.nbytes)
    run(benchmark, f"gated_merge/{case_name(name, dtype)}", impl, bytes_moved, fn)
