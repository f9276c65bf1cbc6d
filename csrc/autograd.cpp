// Autograd kernels of the ops other than blend (whose fused backward is registered from Python).
//
// torch.library's Python register_autograd only accepts functional ops, and cache_write,
// gated_merge and forecast_update write their cache slots; without a kernel at the Autograd key torch falls back to one
// that warns and silently drops the gradients of gate and branch. So every op has one here:
// * when no input requires grad (inference, the usual case) the op goes straight to its CPU/CUDA
//   kernel below autograd, and the tensors it wrote get a new version, as after any in-place op;
// * otherwise the out-of-place ops run as at inference, then rebuild their output differentiably
//   with `blend` at w = 1, which is x + gate * fresh with the fused backward (cache slots stay
//   detached, as in blend); gather_rows with index_select; forecast_read with ATen (its forecast value
//   has no tensor of x's dtype to hand to blend);
// * the in-place variants overwrite x, which a backward pass may need, so with inputs that require
//   grad they refuse and name the out-of-place op.
#include <initializer_list>
#include <string>
#include <utility>

#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/index_put.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/ones.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace harmonica {
namespace {

// Typed handle of harmonica::<name> (callers keep it in a function-local static: looked up once).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls the op's CPU/CUDA kernel, below autograd.
template <typename Signature, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(args...);
}

// The name of the first input that requires grad (nullptr if none, or if grad mode is off).
const char* first_requiring_grad(std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  if (c10::GradMode::is_enabled()) {
    for (const auto& [name, tensor] : inputs) {
      if (tensor->requires_grad()) {
        return name;
      }
    }
  }
  return nullptr;
}

// What an in-place ATen op does, so autograd can tell a tensor saved for backward was overwritten.
void mark_written(const at::Tensor& t) {
  if (!t.is_inference()) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

// w = 1 as a host scalar (a 0-dim CPU tensor), whatever x's device: the kernels take it by value,
// so no fill kernel and no range-check kernel run on a GPU.
at::Tensor weight_one(const at::Tensor& x) {
  return at::ones({}, at::TensorOptions().dtype(at::toOpMathType(x.scalar_type())));
}

using BlendSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&);

// x + gate * value, differentiable in x, gate and value (the fused blend at w = 1).
at::Tensor gated_residual_with_grad(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& value) {
  static const auto blend = op_handle<BlendSig>("harmonica::blend");
  return blend.call(x, gate, value, value.detach(), weight_one(x));
}

// ---- out-of-place ops -------------------------------------------------------------------------
// With grad, the op itself still runs first (below autograd): it validates every input and writes
// the slot, so errors and slot contents are the same as at inference, and nothing is written when a
// check fails. The differentiable output is then rebuilt from its parts.

using CacheWriteSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

at::Tensor cache_write_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                const at::Tensor& cache) {
  static const auto op = op_handle<CacheWriteSig>("harmonica::cache_write");
  const at::Tensor out = call_below_autograd(op, x, gate, branch, cache);
  mark_written(cache);
  return first_requiring_grad({{"x", &x}, {"gate", &gate}, {"branch", &branch}})
             ? gated_residual_with_grad(x, gate, branch)
             : out;
}

using CacheReadSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

at::Tensor cache_read_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  static const auto op = op_handle<CacheReadSig>("harmonica::cache_read");
  const at::Tensor out = call_below_autograd(op, x, gate, cache);
  return first_requiring_grad({{"x", &x}, {"gate", &gate}}) ? gated_residual_with_grad(x, gate, cache.detach()) : out;
}

using GatherRowsSig = at::Tensor(const at::Tensor&, const at::Tensor&);

at::Tensor gather_rows_autograd(const at::Tensor& x, const at::Tensor& index) {
  static const auto op = op_handle<GatherRowsSig>("harmonica::gather_rows");
  const at::Tensor out = call_below_autograd(op, x, index);
  return first_requiring_grad({{"x", &x}}) ? at::index_select(x, 0, index) : out;
}

using GatedMergeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&);

at::Tensor gated_merge_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                const at::Tensor& index, const at::Tensor& cache) {
  static const auto op = op_handle<GatedMergeSig>("harmonica::gated_merge");
  const at::Tensor out = call_below_autograd(op, x, gate, branch_active, index, cache);
  mark_written(cache);
  if (!first_requiring_grad({{"x", &x}, {"gate", &gate}, {"branch_active", &branch_active}})) {
    return out;
  }
  // What each sample added: the slot now holds it; index_put puts branch_active into the graph.
  const at::Tensor value = at::index_put(cache.detach(), {index}, branch_active);
  return gated_residual_with_grad(x, gate, value);
}

using ForecastReadSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::ArrayRef<double>);

// x + gate * sum_i coeffs[i] * slots[i], differentiable in x and gate (slots detached, as cache_read's
// slot): ATen in the accumulation type, rounded once, which is what the kernels compute. Unlike
// cache_read's, the forecast value has no tensor of x's dtype that blend could take without a second
// rounding for half types.
at::Tensor forecast_with_grad(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                              at::ArrayRef<double> coeffs) {
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor value;
  for (size_t i = 0; i < coeffs.size(); ++i) {
    const at::Tensor term = slots[i].detach().to(acc_type).mul(coeffs[i]);
    value = value.defined() ? value.add(term) : term;
  }
  const at::Tensor gate_acc = gate.to(acc_type).reshape({x.size(0), 1, x.size(2)});
  return x.to(acc_type).add(gate_acc.mul(value)).to(x.scalar_type()).contiguous();
}

at::Tensor forecast_read_autograd(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                                  at::ArrayRef<double> coeffs) {
  static const auto op = op_handle<ForecastReadSig>("harmonica::forecast_read");
  const at::Tensor out = call_below_autograd(op, x, gate, slots, coeffs);
  return first_requiring_grad({{"x", &x}, {"gate", &gate}}) ? forecast_with_grad(x, gate, slots, coeffs) : out;
}

using ForecastUpdateSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                     at::ArrayRef<double>);

// The output is cache_write's, x + gate * fresh; the slots (written, detached) are not in the graph.
at::Tensor forecast_update_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                    at::TensorList slots, at::ArrayRef<double> inv) {
  static const auto op = op_handle<ForecastUpdateSig>("harmonica::forecast_update");
  const at::Tensor out = call_below_autograd(op, x, gate, fresh, slots, inv);
  for (const at::Tensor& slot : slots) {
    mark_written(slot);
  }
  return first_requiring_grad({{"x", &x}, {"gate", &gate}, {"fresh", &fresh}}) ? gated_residual_with_grad(x, gate, fresh)
                                                                                 : out;
}

// ---- in-place variants --------------------------------------------------------------------------

void refuse_grad(const char* op, const char* argument) {
  const std::string name(op);
  TORCH_CHECK(false, "harmonica.", name, ": `", argument, "` requires grad, but ", name,
              " overwrites x, which a backward pass needs; use the differentiable harmonica.ops.",
              name.substr(0, name.size() - 1), " (same arguments, returns the result) or call it under ",
              "torch.no_grad().");
}

using CacheWriteInPlaceSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

void cache_write_inplace_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                  const at::Tensor& cache) {
  if (const char* argument = first_requiring_grad({{"x", &x}, {"gate", &gate}, {"branch", &branch}})) {
    refuse_grad("cache_write_", argument);
  }
  static const auto op = op_handle<CacheWriteInPlaceSig>("harmonica::cache_write_");
  call_below_autograd(op, x, gate, branch, cache);
  mark_written(x);
  mark_written(cache);
}

using CacheReadInPlaceSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&);

void cache_read_inplace_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  if (const char* argument = first_requiring_grad({{"x", &x}, {"gate", &gate}})) {
    refuse_grad("cache_read_", argument);
  }
  static const auto op = op_handle<CacheReadInPlaceSig>("harmonica::cache_read_");
  call_below_autograd(op, x, gate, cache);
  mark_written(x);
}

using GatedMergeInPlaceSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&);

void gated_merge_inplace_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                  const at::Tensor& index, const at::Tensor& cache) {
  const char* argument = first_requiring_grad({{"x", &x}, {"gate", &gate}, {"branch_active", &branch_active}});
  if (argument != nullptr) {
    refuse_grad("gated_merge_", argument);
  }
  static const auto op = op_handle<GatedMergeInPlaceSig>("harmonica::gated_merge_");
  call_below_autograd(op, x, gate, branch_active, index, cache);
  mark_written(x);
  mark_written(cache);
}

using ForecastReadInPlaceSig = void(const at::Tensor&, const at::Tensor&, at::TensorList, at::ArrayRef<double>);

void forecast_read_inplace_autograd(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                                    at::ArrayRef<double> coeffs) {
  if (const char* argument = first_requiring_grad({{"x", &x}, {"gate", &gate}})) {
    refuse_grad("forecast_read_", argument);
  }
  static const auto op = op_handle<ForecastReadInPlaceSig>("harmonica::forecast_read_");
  call_below_autograd(op, x, gate, slots, coeffs);
  mark_written(x);
}

using ForecastUpdateInPlaceSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                      at::ArrayRef<double>);

void forecast_update_inplace_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                      at::TensorList slots, at::ArrayRef<double> inv) {
  if (const char* argument = first_requiring_grad({{"x", &x}, {"gate", &gate}, {"fresh", &fresh}})) {
    refuse_grad("forecast_update_", argument);
  }
  static const auto op = op_handle<ForecastUpdateInPlaceSig>("harmonica::forecast_update_");
  call_below_autograd(op, x, gate, fresh, slots, inv);
  mark_written(x);
  for (const at::Tensor& slot : slots) {
    mark_written(slot);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(harmonica, Autograd, m) {
  m.impl("cache_write", TORCH_FN(cache_write_autograd));
  m.impl("cache_read", TORCH_FN(cache_read_autograd));
  m.impl("gather_rows", TORCH_FN(gather_rows_autograd));
  m.impl("gated_merge", TORCH_FN(gated_merge_autograd));
  m.impl("cache_write_", TORCH_FN(cache_write_inplace_autograd));
  m.impl("cache_read_", TORCH_FN(cache_read_inplace_autograd));
  m.impl("gated_merge_", TORCH_FN(gated_merge_inplace_autograd));
  m.impl("forecast_read", TORCH_FN(forecast_read_autograd));
  m.impl("forecast_update", TORCH_FN(forecast_update_autograd));
  m.impl("forecast_read_", TORCH_FN(forecast_read_inplace_autograd));
  m.impl("forecast_update_", TORCH_FN(forecast_update_inplace_autograd));
}

}  // namespace harmonica
