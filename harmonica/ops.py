"""Fused cache ops of harmonica (C++/CUDA kernels in csrc/, registered as torch.ops.harmonica.*).

Shapes: ``x``, ``branch``, ``fresh``, ``cache`` and every forecast slot are (B, N, D) hidden states;
``gate`` is the adaLN gate, (B, D) or (B, 1, D), broadcast over the N tokens. float32, float16,
bfloat16 and float64 are supported; half types are computed in float32 and rounded once on store (a
forecast's sum and its chain of differences stay in float32 throughout).

Contiguity: read-only inputs may be strided (they are made contiguous, or for ``gate`` read with
its batch stride); tensors written in place (``cache``, the slots of ``forecast_update``, and ``x``
for the ``*_`` variants) must be contiguous, otherwise a clear error is raised.

Aliasing: a tensor an op writes (``cache``, every slot of ``forecast_update``, and ``x`` for the
``*_`` variants) must share no memory with any other argument, nor with another written slot, as ATen
requires of its own ops; otherwise a RuntimeError names the pair (``slots[0]`` and ``slots[2]``). The
one exception is ``cache_write(x, gate, cache, cache)``, a slot refreshed from itself.

Validation happens in C++, on the host, and names the argument. Nothing synchronises with a GPU, so
the only checks that differ by device are of values that live in GPU memory: on CUDA, a ``w`` tensor on
the GPU outside [0, 1] (or NaN), an out-of-range ``index`` entry (gather_rows, gated_merge) and a
repeated one (gated_merge) are caught on the GPU as a device-side assert (gather_rows runs
``index_select``, which checks its indices the same way). PyTorch reports it at the next
synchronisation as ``RuntimeError: CUDA error: device-side assert triggered`` (the assert's message in
the kernel log names the op and the argument), and the CUDA context is unusable afterwards: the
process must restart. The same inputs on the CPU raise a RuntimeError at the call. Pass ``w`` as a Python float or a 0-dim CPU tensor to have
it checked on the host on every device (it is then a kernel argument, like a Python scalar).

Autograd: every out-of-place op is differentiable in ``x``, ``gate`` and the branch (``branch``,
``fresh``, ``branch_active``; ``forecast_read`` has none) and, for ``blend``, ``w``; cache slots are
detached and get no gradient. ``blend`` has a fused backward (it is what router training runs); the
others rebuild their output with it, or ``forecast_read`` with ATen in float32, when an input requires
grad (csrc/autograd.cpp). Training's forecasting does not go through the forecast ops (it blends with
``blend``), but a cached model run with grad enabled does. The in-place ``*_`` variants overwrite
``x``, which a backward pass needs, so they raise when an input requires grad.

``reference`` holds a pure-PyTorch implementation of every op with the same signature: the
specification the kernels are tested against.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.harmonica.*)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "harmonica._C is not built; install the package with "
        "`pip install --no-build-isolation -e .` (HARMONICA_CUDA=0 for a CPU-only build)"
    ) from error

__all__ = [
    "cache_write",
    "cache_write_",
    "cache_read",
    "cache_read_",
    "blend",
    "gather_rows",
    "gated_merge",
    "gated_merge_",
    "forecast_read",
    "forecast_read_",
    "forecast_update",
    "forecast_update_",
    "reference",
]

_ops = torch.ops.harmonica


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the eager composition (``x + gate * branch``) would have: torch's type promotion.

    Mixed dtypes are what torch.autocast produces (a bf16 branch and gate on a float32 residual
    stream); the kernels run in one dtype, so the wrappers promote mismatched inputs first.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _promoted(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _check_in_place(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    if x.dtype != dtype:
        raise ValueError(
            f"harmonica.{name}: the result has dtype {dtype} (promoted from the inputs) but x, updated in place, "
            f"has dtype {x.dtype}; use the out-of-place {name.rstrip('_')}"
        )


def cache_write(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Return ``x + gate * branch`` and store ``branch`` into ``cache`` (in place) in the same pass.

    Mixed input dtypes are promoted as torch promotes them; ``cache`` must have the promoted dtype."""
    x, gate, branch = _promoted(result_dtype(x, gate, branch), x, gate, branch)
    return _ops.cache_write.default(x, gate, branch, cache)


def cache_write_(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``cache_write`` that updates ``x`` in place and returns it (no output allocation)."""
    dtype = result_dtype(x, gate, branch)
    _check_in_place("cache_write_", x, dtype)
    gate, branch = _promoted(dtype, gate, branch)
    _ops.cache_write_.default(x, gate, branch, cache)
    return x


def cache_read(x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Return ``x + gate * cache``: the residual add of a skipped branch (mixed dtypes promoted)."""
    x, gate, cache = _promoted(result_dtype(x, gate, cache), x, gate, cache)
    return _ops.cache_read.default(x, gate, cache)


def cache_read_(x: torch.Tensor, gate: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``cache_read`` that updates ``x`` in place and returns it."""
    dtype = result_dtype(x, gate, cache)
    _check_in_place("cache_read_", x, dtype)
    gate, cache = _promoted(dtype, gate, cache)
    _ops.cache_read_.default(x, gate, cache)
    return x


def blend(
    x: torch.Tensor, gate: torch.Tensor, fresh: torch.Tensor, cache: torch.Tensor, w: torch.Tensor | float
) -> torch.Tensor:
    """Return ``x + gate * (w * fresh + (1 - w) * cache)``, the soft forward used to train the router.

    ``w`` is a 0-dim tensor, a per-sample (B,) tensor on x's device, or a Python float, all in [0, 1].
    Differentiable with respect to x, gate, fresh and w; ``cache`` is a detached slot and gets no
    gradient.
    """
    if not isinstance(w, torch.Tensor):
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"harmonica.blend: `w` must lie in [0, 1] (a sigmoid routing weight), got {w}")
        # A 0-dim CPU tensor, whatever x's device: the kernels take it by value, so a CUDA call copies
        # nothing to the device (torch.tensor(w, device="cuda") would wait for the GPU, and cannot be
        # captured in a CUDA graph).
        w = torch.scalar_tensor(float(w), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    x, gate, fresh, cache = _promoted(result_dtype(x, gate, fresh, cache), x, gate, fresh, cache)
    return _ops.blend.default(x, gate, fresh, cache, w)


def _table(name: str, slots, factors, what: str) -> list:
    """The slots the op takes for these factors, or a clear error. ``coeffs``: one per slot read (later
    slots are not read); ``inv``: one per order above 0. Shapes, dtypes and devices are checked by the op."""
    if not isinstance(slots, (list, tuple)) or not slots:
        raise RuntimeError(f"harmonica.{name}: `slots` must be a non-empty list of tensors (a unit's divided "
                           f"differences, order 0 first), got {type(slots).__name__}")
    if what == "coeffs":
        if not 1 <= len(factors) <= len(slots):
            raise RuntimeError(f"harmonica.{name}: `coeffs` has {len(factors)} entries for {len(slots)} slots; pass "
                               f"1 to {len(slots)}, one per slot read")
        return list(slots[:len(factors)])
    if len(factors) != len(slots) - 1:
        raise RuntimeError(f"harmonica.{name}: `inv` has {len(factors)} entries for {len(slots)} slots; pass "
                           f"{len(slots) - 1}, one per order above 0")
    return list(slots)


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def forecast_read(x: torch.Tensor, gate: torch.Tensor, slots, coeffs) -> torch.Tensor:
    """Return ``x + gate * sum_i coeffs[i] * slots[i]``: a skipped branch served by a forecast, in one pass.

    ``slots`` hold a unit's divided differences (order 0 first, harmonica.cache.forecast) and ``coeffs``
    (Python floats, one per slot read, 1 to 5; later slots are not read) the Newton coefficients of the
    step; one coefficient 1.0 over one slot is :func:`cache_read`. Mixed input dtypes are promoted; the
    sum is taken in float32 (float64 for float64) and the result rounded once. Differentiable in x and
    gate (the slots are detached, as in :func:`cache_read`)."""
    slots = _table("forecast_read", slots, coeffs, "coeffs")
    x, gate, *slots = _promoted(result_dtype(x, gate, *slots), x, gate, *slots)
    return _ops.forecast_read.default(x, gate, slots, _floats(coeffs))


def forecast_read_(x: torch.Tensor, gate: torch.Tensor, slots, coeffs) -> torch.Tensor:
    """``forecast_read`` that updates ``x`` in place and returns it."""
    slots = _table("forecast_read_", slots, coeffs, "coeffs")
    dtype = result_dtype(x, gate, *slots)
    _check_in_place("forecast_read_", x, dtype)
    gate, *slots = _promoted(dtype, gate, *slots)
    _ops.forecast_read_.default(x, gate, slots, _floats(coeffs))
    return x


def forecast_update(x: torch.Tensor, gate: torch.Tensor, fresh: torch.Tensor, slots, inv) -> torch.Tensor:
    """Return ``x + gate * fresh`` and refresh the unit's divided differences in the same pass:
    ``slots[0] = fresh``, ``slots[i] = (slots[i-1]_new - slots[i-1]_old) * inv[i-1]``, i = 1..len(inv).

    ``inv`` are the inverse distances to the unit's earlier computes (Python floats), one fewer than
    ``slots`` (at most 5 slots); with one slot and no ``inv`` this is :func:`cache_write`. The chain of
    differences stays in float32 (float64) between orders, each slot is rounded once. The slots are
    written, never converted: they must have the promoted dtype of x, gate and fresh, be contiguous and
    share no memory with any argument or with each other. Differentiable in x, gate and fresh (the slots
    are detached, as in :func:`cache_write`)."""
    slots = _table("forecast_update", slots, inv, "inv")
    x, gate, fresh = _promoted(result_dtype(x, gate, fresh), x, gate, fresh)
    return _ops.forecast_update.default(x, gate, fresh, slots, _floats(inv))


def forecast_update_(x: torch.Tensor, gate: torch.Tensor, fresh: torch.Tensor, slots, inv) -> torch.Tensor:
    """``forecast_update`` that updates ``x`` in place and returns it."""
    slots = _table("forecast_update_", slots, inv, "inv")
    dtype = result_dtype(x, gate, fresh)
    _check_in_place("forecast_update_", x, dtype)
    gate, fresh = _promoted(dtype, gate, fresh)
    _ops.forecast_update_.default(x, gate, fresh, slots, _floats(inv))
    return x


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Return ``x[index]`` (index: 1-D int64 on x's device), the samples that compute this step."""
    return _ops.gather_rows.default(x, index)


def gated_merge(
    x: torch.Tensor, gate: torch.Tensor, branch_active: torch.Tensor, index: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """Per-sample schedule in one pass.

    Sample ``index[j]`` takes ``x + gate * branch_active[j]`` and refreshes its cache slot; every
    other sample takes ``x + gate * cache``. ``index`` must not repeat a sample.
    """
    x, gate, branch_active = _promoted(result_dtype(x, gate, branch_active), x, gate, branch_active)
    return _ops.gated_merge.default(x, gate, branch_active, index, cache)


def gated_merge_(
    x: torch.Tensor, gate: torch.Tensor, branch_active: torch.Tensor, index: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """``gated_merge`` that updates ``x`` in place and returns it."""
    dtype = result_dtype(x, gate, branch_active)
    _check_in_place("gated_merge_", x, dtype)
    gate, branch_active = _promoted(dtype, gate, branch_active)
    _ops.gated_merge_.default(x, gate, branch_active, index, cache)
    return x


# ---- fake (meta) kernels: output shapes for torch.compile / FakeTensor tracing --------------------


def _like_hidden(x: torch.Tensor) -> torch.Tensor:
    # The kernels always return contiguous outputs, whatever the input strides.
    return x.new_empty(x.shape)


@torch.library.register_fake("harmonica::cache_write")
def _(x, gate, branch, cache):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::cache_write_")
def _(x, gate, branch, cache):
    return None


@torch.library.register_fake("harmonica::cache_read")
def _(x, gate, cache):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::cache_read_")
def _(x, gate, cache):
    return None


@torch.library.register_fake("harmonica::blend")
def _(x, gate, fresh, cache, w):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::blend_backward")
def _(grad_out, gate, fresh, cache, w):
    # grad_w is on grad_out's device, also for a 0-dim CPU w (see _blend_backward).
    return gate.new_empty(gate.shape), fresh.new_empty(fresh.shape), grad_out.new_empty(w.shape, dtype=w.dtype)


@torch.library.register_fake("harmonica::gather_rows")
def _(x, index):
    return x.new_empty((index.shape[0], *x.shape[1:]))


@torch.library.register_fake("harmonica::gated_merge")
def _(x, gate, branch_active, index, cache):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::gated_merge_")
def _(x, gate, branch_active, index, cache):
    return None


@torch.library.register_fake("harmonica::forecast_read")
def _(x, gate, slots, coeffs):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::forecast_read_")
def _(x, gate, slots, coeffs):
    return None


@torch.library.register_fake("harmonica::forecast_update")
def _(x, gate, fresh, slots, inv):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::forecast_update_")
def _(x, gate, fresh, slots, inv):
    return None


@torch.library.register_fake("harmonica::_simulate_cuda_cache_write")
def _(x, gate, branch, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_cache_write_")
def _(x, gate, branch, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return None


@torch.library.register_fake("harmonica::_simulate_cuda_cache_read_")
def _(x, gate, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return None


@torch.library.register_fake("harmonica::_simulate_cuda_gated_merge_")
def _(x, gate, branch_active, index, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return None


@torch.library.register_fake("harmonica::_simulate_cuda_cache_read")
def _(x, gate, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_blend")
def _(x, gate, fresh, cache, w, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_blend_backward")
def _(grad_out, gate, fresh, cache, w, block_dim, grid_dim, vector_width, max_packs=0):
    return gate.new_empty(gate.shape), fresh.new_empty(fresh.shape), grad_out.new_empty(w.shape, dtype=w.dtype)


@torch.library.register_fake("harmonica::_simulate_cuda_gated_merge")
def _(x, gate, branch_active, index, cache, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_forecast_read")
def _(x, gate, slots, coeffs, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_forecast_read_")
def _(x, gate, slots, coeffs, block_dim, grid_dim, vector_width, max_packs=0):
    return None


@torch.library.register_fake("harmonica::_simulate_cuda_forecast_update")
def _(x, gate, fresh, slots, inv, block_dim, grid_dim, vector_width, max_packs=0):
    return _like_hidden(x)


@torch.library.register_fake("harmonica::_simulate_cuda_forecast_update_")
def _(x, gate, fresh, slots, inv, block_dim, grid_dim, vector_width, max_packs=0):
    return None


# ---- autograd for blend -------------------------------------------------------------------------


def _blend_setup_context(ctx, inputs, output):
    _, gate, fresh, cache, w = inputs
    ctx.save_for_backward(gate, fresh, cache, w)


def _blend_backward(ctx, grad_out):
    gate, fresh, cache, w = ctx.saved_tensors
    needs_x, needs_gate, needs_fresh, _, needs_w = ctx.needs_input_grad
    grad_gate = grad_fresh = grad_w = None
    if needs_gate or needs_fresh or needs_w:
        # One fused pass yields all three; the unused ones are cheap by-products of the same reads.
        grad_gate, grad_fresh, grad_w = _ops.blend_backward.default(grad_out, gate, fresh, cache, w)
        if needs_w and grad_w.device != w.device:
            grad_w = grad_w.to(w.device)  # a 0-dim CPU w that requires grad: the one copy back (a sync on CUDA)
    return (
        grad_out if needs_x else None,
        grad_gate if needs_gate else None,
        grad_fresh if needs_fresh else None,
        None,
        grad_w if needs_w else None,
    )


torch.library.register_autograd("harmonica::blend", _blend_backward, setup_context=_blend_setup_context)


# ---- pure-PyTorch reference -----------------------------------------------------------------------


class reference:
    """Eager PyTorch implementations of every op, same signatures: the specification.

    Arithmetic is done in float32 (float64 for float64 inputs) and rounded once to the input dtype,
    which is what the kernels promise. Mutations (cache slots, in-place ``x``) are the same.
    """

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    @staticmethod
    def _gate(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reference._acc(gate).reshape(x.shape[0], 1, x.shape[-1])

    @staticmethod
    def cache_write(x, gate, branch, cache):
        out = (reference._acc(x) + reference._gate(gate, x) * reference._acc(branch)).to(x.dtype)
        cache.copy_(branch)
        return out

    @staticmethod
    def cache_write_(x, gate, branch, cache):
        return x.copy_(reference.cache_write(x, gate, branch, cache))

    @staticmethod
    def cache_read(x, gate, cache):
        return (reference._acc(x) + reference._gate(gate, x) * reference._acc(cache)).to(x.dtype)

    @staticmethod
    def cache_read_(x, gate, cache):
        return x.copy_(reference.cache_read(x, gate, cache))

    @staticmethod
    def blend(x, gate, fresh, cache, w):
        w = torch.as_tensor(w, device=x.device)
        w_acc = reference._acc(w).reshape(-1, 1, 1) if w.dim() == 1 else reference._acc(w)
        value = w_acc * reference._acc(fresh) + (1 - w_acc) * reference._acc(cache.detach())
        return (reference._acc(x) + reference._gate(gate, x) * value).to(x.dtype)

    @staticmethod
    def forecast_read(x, gate, slots, coeffs):
        value = sum(c * reference._acc(slots[i]) for i, c in enumerate(coeffs))
        return (reference._acc(x) + reference._gate(gate, x) * value).to(x.dtype)

    @staticmethod
    def forecast_update(x, gate, fresh, slots, inv):
        out = (reference._acc(x) + reference._gate(gate, x) * reference._acc(fresh)).to(x.dtype)
        old = [reference._acc(slots[i]).clone() for i in range(len(inv))]  # read before the writes below
        new = reference._acc(fresh)
        slots[0].copy_(fresh)
        for i, h in enumerate(inv, start=1):
            new = (new - old[i - 1]) * h  # the chain stays in float32: each order is rounded once, on store
            slots[i].copy_(new)
        return out

    @staticmethod
    def gather_rows(x, index):
        return x[index]

    @staticmethod
    def gated_merge(x, gate, branch_active, index, cache):
        value = cache.clone()
        value[index] = branch_active
        cache[index] = branch_active
        return (reference._acc(x) + reference._gate(gate, x) * reference._acc(value)).to(x.dtype)

    @staticmethod
    def gated_merge_(x, gate, branch_active, index, cache):
        return x.copy_(reference.gated_merge(x, gate, branch_active, index, cache))
