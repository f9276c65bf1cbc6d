"""No host synchronisation in the fused ops, a cached forward or the soft (training) forward.

On a GPU, a tensor made from Python data on the device (``torch.tensor(..., device="cuda")``), a value
read back (``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``) or an op whose output size depends on
the data (``nonzero``, ``unique``, ``masked_select``) makes the host wait for the GPU, and cannot be
captured in a CUDA graph. These tests run on the CPU under a dispatch mode that records every such
operation, so a regression shows on machines without a GPU; tests/test_cuda_graphs.py checks the
capture itself on a GPU.

A tensor made from Python data is recorded on the CPU too (``aten.lift_fresh``): the recorder cannot
know which device the code would pick on a GPU machine. Scalars belong in 0-dim CPU tensors made by a
factory (``torch.scalar_tensor``), which the kernels take by value.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

import harmonica as hc
from harmonica import ops
from harmonica.sampling import denoise, guided, sample

aten = torch.ops.aten
# Ops that read device memory on the host, or allocate by a size only the data knows.
SYNCING_OPS = {
    aten.lift_fresh.default: "a tensor made from Python data (torch.tensor / torch.as_tensor of a list or number)",
    aten.lift_fresh_copy.default: "a tensor made from Python data",
    aten._local_scalar_dense.default: "a value read back (.item(), float(t), int(t), bool(t))",
    aten.nonzero.default: "nonzero (output size depends on the data)",
    aten.masked_select.default: "masked_select (output size depends on the data)",
    aten._unique2.default: "unique (output size depends on the data)",
    aten.unique_consecutive.default: "unique_consecutive (output size depends on the data)",
}


class HostSyncRecorder(TorchDispatchMode):
    """Records every operation above, and Tensor.tolist (no dispatcher op), with where it came from."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.active = True

    def _record(self, what: str) -> None:
        if self.active:
            frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename.replace("\\", "/")]
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
            self.events.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            self._record(SYNCING_OPS[func])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        recorder = self

        def tolist(tensor):
            recorder._record("Tensor.tolist (reads every value back)")
            return recorder._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


@contextlib.contextmanager
def no_host_sync(*, only_inside: torch.nn.Module | None = None):
    """Fails the test if the block (or, with only_inside, any forward of that module within the block)
    performs an operation that synchronises with a GPU."""
    recorder = HostSyncRecorder()
    handles = []
    if only_inside is not None:
        recorder.active = False

        def enter(module, args):
            recorder.active = True

        def leave(module, args, output):
            recorder.active = False

        handles = [only_inside.register_forward_pre_hook(enter), only_inside.register_forward_hook(leave)]
    try:
        with recorder:
            yield recorder
    finally:
        for handle in handles:
            handle.remove()
    assert not recorder.events, "host synchronisations:\n  " + "\n  ".join(recorder.events)


def test_the_recorder_catches_what_it_should():
    # Guards the guard: each of these would wait for a GPU.
    for syncing in (lambda t: torch.tensor([1, 2]), lambda t: t.sum().item(), lambda t: t.tolist(),
                    lambda t: bool(t[0] > 0), lambda t: t.nonzero()):
        with pytest.raises(AssertionError, match="host synchronisations"):
            with no_host_sync():
                syncing(torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# The ops


def _op_calls():
    g = torch.Generator().manual_seed(0)
    x, branch, cache = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    gate = torch.randn(3, 8, generator=g)
    index = torch.tensor([2, 0])
    w = torch.rand(3, generator=g)
    return {
        "cache_write": lambda: ops.cache_write(x, gate, branch, cache.clone()),
        "cache_write_": lambda: ops.cache_write_(x.clone(), gate, branch, cache.clone()),
        "cache_read": lambda: ops.cache_read(x, gate, cache),
        "cache_read_": lambda: ops.cache_read_(x.clone(), gate, cache),
        "blend (float w)": lambda: ops.blend(x, gate, branch, cache, 0.25),
        "blend (tensor w)": lambda: ops.blend(x, gate, branch, cache, w),
        "gather_rows": lambda: ops.gather_rows(x, index),
        "gated_merge": lambda: ops.gated_merge(x, gate, branch[:2], index, cache.clone()),
        "gated_merge_": lambda: ops.gated_merge_(x.clone(), gate, branch[:2], index, cache.clone()),
        # Coefficients and inverse distances are plan constants (Python floats): no tensor is made of them.
        "forecast_read": lambda: ops.forecast_read(x, gate, [cache, branch], (1.0, -2.5)),
        "forecast_read_": lambda: ops.forecast_read_(x.clone(), gate, [cache, branch, x], (1.0, -2.5, 7.0)),
        "forecast_update": lambda: ops.forecast_update(x, gate, branch, [cache.clone(), torch.zeros_like(x)], (0.5,)),
        "forecast_update_": lambda: ops.forecast_update_(x.clone(), gate, branch, [cache.clone()], ()),
    }


@pytest.mark.parametrize("name", list(_op_calls()))
def test_ops_do_not_synchronise(name):
    call = _op_calls()[name]  # inputs made outside the recorded block
    with no_host_sync():
        call()


def test_forward_and_backward_do_not_synchronise():
    g = torch.Generator().manual_seed(1)
    x, fresh, cache = (torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    gate = torch.randn(2, 8, generator=g, requires_grad=True)
    w = torch.rand(2, generator=g).requires_grad_()
    with no_host_sync():
        ops.blend(x, gate, fresh, cache.detach(), w).square().sum().backward()
        ops.cache_write(x, gate, fresh, torch.empty(2, 5, 8)).sum().backward()
        ops.forecast_update(x, gate, fresh, [torch.zeros(2, 5, 8), torch.zeros(2, 5, 8)], (0.5,)).sum().backward()
        ops.forecast_read(x, gate, [cache.detach(), fresh.detach()], (1.0, -0.5)).sum().backward()


# ---------------------------------------------------------------------------------------------------
# Cached forwards of a DiT


STEPS, BLOCKS = 4, 2


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=BLOCKS, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()


def mixed_schedule() -> hc.Schedule:
    """Every plan action: compute, store, read, read for the last time."""
    mask = torch.ones(STEPS, BLOCKS, 2, dtype=torch.bool)
    mask[1, 0, 0] = mask[2, 0, 0] = False  # block 0 attn: stored at 0, read at 1 and 2 (last)
    mask[3, 1, 1] = False  # block 1 mlp: stored at 2, read at 3
    return hc.Schedule(mask)


def conditioning():
    labels = torch.tensor([3])
    return {"class_labels": labels}, {"class_labels": torch.full_like(labels, 1000)}


def test_cached_sampling_forwards_do_not_synchronise():
    model = tiny_dit()
    hc.enable_cache(model, mixed_schedule())
    cond, uncond = conditioning()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # Only the transformer's forwards are watched: the scheduler's own step is not harmonica's.
    with no_host_sync(only_inside=model):
        sample(model, DDIMScheduler(), latents, num_inference_steps=STEPS, cond=cond, uncond=uncond,
               guidance_scale=2.0, progress=False)


def _soft_run(model, weights, record):
    """One soft (router-training) sampling run with the weights set, forwards and backward recorded
    by `record` (a context manager factory)."""
    state = hc.get_cache_state(model)
    cond, uncond = conditioning()
    scheduler = DDIMScheduler()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fn = guided(model, cond, uncond, 2.0)
    with state.driven_by(scheduler):
        def train_fn(x, t, step):
            out = fn(x, t, step)
            if step > 0:
                with record():
                    out.square().mean().backward(inputs=[weights])
            return out.detach()

        denoise(train_fn, scheduler, latents, num_inference_steps=STEPS, progress=False)


def test_soft_forward_and_backward_do_not_synchronise():
    from harmonica.train.policies import SoftPolicy

    model = tiny_dit().requires_grad_(False)
    runtime = hc.enable_cache(model, hc.Schedule.full(STEPS, BLOCKS))
    weights = torch.full((STEPS, BLOCKS, 2), 0.5, requires_grad=True)
    for order in (0, 2):  # reuse, and a forecast whose coefficients and history live on the device
        with no_host_sync():
            soft = SoftPolicy(weights, 0.1, order=order)
            soft.weights = weights  # what each router update does
        weights.grad = None
        with runtime.using(soft), no_host_sync(only_inside=model):
            _soft_run(model, weights, no_host_sync)
        assert weights.grad is not None and bool(weights.grad[1:].abs().sum() > 0)


def _per_sample_calls(model, check):
    """A serving loop's calls: both samples at step 0, then sample 0 at step 1 (it reuses block 0's attn
    while sample 1, at step 0, computes it), twice; ``check`` wraps the last call."""
    cond, uncond = conditioning()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kwargs = {"class_labels": torch.cat([cond["class_labels"], uncond["class_labels"]]), "return_dict": False}
    with torch.no_grad(), hc.per_sample(model) as serving:
        serving.steps = [0, 0]
        model(x, timestep=torch.tensor([999, 999]), **kwargs)
        serving.steps = [1, 0]
        timestep = torch.tensor([900, 999])
        model(x, timestep=timestep, **kwargs)  # a new pattern of rows: its index is built (and cached) here
        with check():
            return model(x, timestep=timestep, **kwargs)


def test_per_sample_forwards_do_not_synchronise():
    # Each distinct set of computing rows gets its index once (staged through pinned memory on CUDA,
    # no wait for the GPU); a serving loop's repeated patterns then create nothing in the forward.
    model = tiny_dit()
    hc.enable_cache(model, mixed_schedule())
    _per_sample_calls(model, lambda: no_host_sync(only_inside=model))
