// The one launcher per op of the device kernels. cuda/cache_ops.cu calls them with its CUDA
// backend; cpu/simulate_cuda.cpp calls them with a backend that runs every simulated thread on the
// CPU. So what the tests simulate is the real launch: pack width, pointer offsets, launch splitting,
// check kernels, parameter structs, reductions.
//
// A Backend provides `options` (launch::LaunchOptions) and
//   template <typename Body, typename Params> void run(const Params& params, int64_t work_items) const
// which runs Body::run(thread, params) for every thread of launch::launch_shape(options, work_items).
#pragma once

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include "../checks.h"
#include "launch_plan.h"
#include "thread_bodies.h"

namespace harmonica {
namespace launch {

// Range check of a `w` that lives in device memory, when the host could not check it.
template <typename Backend>
void check_w_on_device(const Backend& backend, const BlendInputs& in) {
  if (!in.w_needs_device_check || in.w.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "harmonica_check_w", [&] {
    backend.template run<cuda_body::UnitIntervalBody<scalar_t>>(
        cuda_body::UnitIntervalParams<scalar_t>{in.w.const_data_ptr<scalar_t>(), in.w.numel()}, in.w.numel());
  });
}

// out = x + gate * value, and cache_out <- value when cache_out is given. out may be in.x (in place).
template <typename Backend>
void gated_residual(const Backend& backend, const char* op, const GatedResidualInputs& in, const at::Tensor& out,
                    const at::Tensor* cache_out) {
  const HiddenShape s = in.shape;
  if (s.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_residual", [&] {
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gate = in.gate.const_data_ptr<scalar_t>();
    const scalar_t* value = in.value.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    scalar_t* cache = cache_out == nullptr ? nullptr : cache_out->mutable_data_ptr<scalar_t>();
    const int64_t gate_stride = in.gate.stride(0);
    const int64_t width = choose_pack<scalar_t>(
        op, backend.options, widest_pack<scalar_t>(s.hidden, {x, gate, value, result, cache}, {gate_stride}));
    with_pack_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      for_each_launch(op, s, VEC, backend.options.max_packs, [&](int64_t first, const cuda_body::PackLayout& layout) {
        const int64_t at = first * s.sample_numel();
        const cuda_body::GatedResidualParams<scalar_t> params{layout,
                                                              x + at,
                                                              gate + first * gate_stride,
                                                              gate_stride,
                                                              value + at,
                                                              result + at,
                                                              cache == nullptr ? nullptr : cache + at};
        if (cache == nullptr) {
          backend.template run<cuda_body::GatedResidualBody<scalar_t, VEC, false>>(params, layout.packs);
        } else {
          backend.template run<cuda_body::GatedResidualBody<scalar_t, VEC, true>>(params, layout.packs);
        }
      });
    });
  });
}

template <typename Backend>
void blend(const Backend& backend, const char* op, const BlendInputs& in, const at::Tensor& out) {
  const HiddenShape s = in.shape;
  if (s.numel() == 0) {
    return;
  }
  check_w_on_device(backend, in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_blend", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gate = in.gate.const_data_ptr<scalar_t>();
    const scalar_t* fresh = in.fresh.const_data_ptr<scalar_t>();
    const scalar_t* cache = in.cache.const_data_ptr<scalar_t>();
    const acc_t* w = in.w_on_host ? nullptr : in.w.const_data_ptr<acc_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    const int64_t gate_stride = in.gate.stride(0);
    const int64_t width = choose_pack<scalar_t>(
        op, backend.options, widest_pack<scalar_t>(s.hidden, {x, gate, fresh, cache, result}, {gate_stride}));
    with_pack_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      for_each_launch(op, s, VEC, backend.options.max_packs, [&](int64_t first, const cuda_body::PackLayout& layout) {
        const int64_t at = first * s.sample_numel();
        const cuda_body::BlendParams<scalar_t> params{layout,
                                                      x + at,
                                                      gate + first * gate_stride,
                                                      gate_stride,
                                                      fresh + at,
                                                      cache + at,
                                                      w == nullptr ? nullptr : w + first * in.w_batch_stride,
                                                      in.w_batch_stride,
                                                      static_cast<acc_t>(in.w_value),
                                                      result + at};
        backend.template run<cuda_body::BlendBody<scalar_t, VEC>>(params, layout.packs);
      });
    });
  });
}

// (grad_gate, grad_fresh, grad_w) of blend. grad_w is on the device of grad_out.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward(const Backend& backend, const char* op,
                                                              const BlendInputs& in, const at::Tensor& gate,
                                                              const at::Tensor& w) {
  const HiddenShape s = in.shape;
  check_w_on_device(backend, in);
  at::Tensor grad_fresh = at::empty(in.fresh.sizes(), in.fresh.options());
  at::Tensor partial_grad_gate;
  at::Tensor partial_grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_blend_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_out = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gate_data = in.gate.const_data_ptr<scalar_t>();
    const scalar_t* fresh = in.fresh.const_data_ptr<scalar_t>();
    const scalar_t* cache = in.cache.const_data_ptr<scalar_t>();
    const acc_t* w_data = in.w_on_host ? nullptr : in.w.const_data_ptr<acc_t>();
    scalar_t* grad_fresh_data = grad_fresh.mutable_data_ptr<scalar_t>();
    const int64_t gate_stride = in.gate.stride(0);
    const int64_t width = choose_pack<scalar_t>(
        op, backend.options,
        widest_pack<scalar_t>(s.hidden, {grad_out, gate_data, fresh, cache, grad_fresh_data}, {gate_stride}));
    const int64_t groups = s.hidden / width;
    const BlendBackwardChunking chunking =
        blend_backward_chunking(s.batch, s.tokens, groups, backend.options.resident_threads);
    const at::TensorOptions acc_options = in.x.options().dtype(at::toOpMathType(in.x.scalar_type()));
    // Zero-initialised so that an empty token range still yields zero gradients.
    partial_grad_gate = at::zeros({s.batch, chunking.chunks, s.hidden}, acc_options);
    partial_grad_w = at::zeros({s.batch, chunking.chunks, groups}, acc_options);
    if (s.numel() == 0) {
      return;
    }
    acc_t* partial_gate = partial_grad_gate.mutable_data_ptr<acc_t>();
    acc_t* partial_w = partial_grad_w.mutable_data_ptr<acc_t>();
    // The tasks of one sample play the role of its packs in the launch splitting.
    const HiddenShape tasks_shape{s.batch, chunking.chunks, groups * width};
    with_pack_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      for_each_launch(op, tasks_shape, VEC, backend.options.max_packs,
                      [&](int64_t first, const cuda_body::PackLayout& layout) {
                        const int64_t at = first * s.sample_numel();
                        const int64_t partial_at = first * chunking.chunks;
                        const cuda_body::BlendBackwardParams<scalar_t> params{
                            layout.packs,
                            cuda_body::FastDivmod(static_cast<uint32_t>(groups)),
                            cuda_body::FastDivmod(static_cast<uint32_t>(chunking.chunks)),
                            s.tokens,
                            s.hidden,
                            chunking.tokens_per_chunk,
                            grad_out + at,
                            gate_data + first * gate_stride,
                            gate_stride,
                            fresh + at,
                            cache + at,
                            w_data == nullptr ? nullptr : w_data + first * in.w_batch_stride,
                            in.w_batch_stride,
                            static_cast<acc_t>(in.w_value),
                            grad_fresh_data + at,
                            partial_gate + partial_at * s.hidden,
                            partial_w + partial_at * groups};
                        backend.template run<cuda_body::BlendBackwardBody<scalar_t, VEC>>(params, layout.packs);
                      });
    });
  });
  auto [grad_gate, grad_w] = finish_blend_backward(partial_grad_gate, partial_grad_w, gate, w);
  return {grad_gate, grad_fresh, grad_w};
}

// Rows in in.index take x + gate * branch_active[j] and refresh their cache slot; the others take
// x + gate * cache. out may be in.x (in place).
template <typename Backend>
void gated_merge(const Backend& backend, const char* op, const GatedMergeInputs& in, const at::Tensor& cache,
                 const at::Tensor& out) {
  const HiddenShape s = in.shape;
  TORCH_CHECK(s.batch <= INT32_MAX, op, ": `x` has ", s.batch, " samples; at most 2^31 - 1 are supported.");
  const at::Tensor slot_of_row = at::full({s.batch}, -1, in.index.options().dtype(at::kInt));
  if (in.index.numel() > 0) {
    backend.template run<cuda_body::SlotOfRowBody>(
        cuda_body::SlotOfRowParams{in.index.const_data_ptr<int64_t>(), in.index.numel(), s.batch,
                                   slot_of_row.mutable_data_ptr<int32_t>()},
        in.index.numel());
  }
  if (s.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_merge", [&] {
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gate = in.gate.const_data_ptr<scalar_t>();
    const scalar_t* branch_active = in.branch_active.const_data_ptr<scalar_t>();
    const int32_t* slots = slot_of_row.const_data_ptr<int32_t>();
    scalar_t* slot_data = cache.mutable_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    const int64_t gate_stride = in.gate.stride(0);
    const int64_t width = choose_pack<scalar_t>(
        op, backend.options,
        widest_pack<scalar_t>(s.hidden, {x, gate, in.branch_active.numel() > 0 ? branch_active : nullptr, slot_data,
                                         result},
                              {gate_stride}));
    with_pack_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      for_each_launch(op, s, VEC, backend.options.max_packs, [&](int64_t first, const cuda_body::PackLayout& layout) {
        const int64_t at = first * s.sample_numel();
        const cuda_body::GatedMergeParams<scalar_t> params{layout,          x + at,        gate + first * gate_stride,
                                                           gate_stride,     branch_active, slots + first,
                                                           slot_data + at,  result + at};
        backend.template run<cuda_body::GatedMergeBody<scalar_t, VEC>>(params, layout.packs);
      });
    });
  });
}

// forecast_read (ForecastReadBody, kWritesSlots false) and forecast_update (ForecastUpdateBody, true).
// out may be in.x (in place). The pack width fits every tensor, slots included.
template <template <typename, int, int> class Body, bool kWritesSlots, typename Backend>
void forecast(const Backend& backend, const char* op, const ForecastInputs& in, const at::Tensor& out) {
  const HiddenShape s = in.shape;
  if (s.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_forecast", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Slot = std::conditional_t<kWritesSlots, scalar_t, const scalar_t>;
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gate = in.gate.const_data_ptr<scalar_t>();
    const scalar_t* fresh = in.fresh.defined() ? in.fresh.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    const int64_t gate_stride = in.gate.stride(0);
    std::vector<Slot*> slots;
    std::vector<const void*> pointers = {x, gate, fresh, result};
    for (const at::Tensor& slot : in.slots) {
      if constexpr (kWritesSlots) {
        slots.push_back(slot.mutable_data_ptr<scalar_t>());
      } else {
        slots.push_back(slot.const_data_ptr<scalar_t>());
      }
      pointers.push_back(slots.back());
    }
    const int64_t width =
        choose_pack<scalar_t>(op, backend.options, widest_pack<scalar_t>(s.hidden, pointers, {gate_stride}));
    with_pack_width<scalar_t>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      for_each_launch(op, s, VEC, backend.options.max_packs, [&](int64_t first, const cuda_body::PackLayout& layout) {
        const int64_t at = first * s.sample_numel();
        cuda_body::ForecastParams<scalar_t, Slot> params{};
        params.layout = layout;
        params.x = x + at;
        params.gate = gate + first * gate_stride;
        params.gate_batch_stride = gate_stride;
        params.fresh = fresh == nullptr ? nullptr : fresh + at;
        for (size_t i = 0; i < slots.size(); ++i) {
          params.slots[i] = slots[i] + at;
        }
        for (size_t i = 0; i < in.factors.size(); ++i) {
          params.factors[i] = static_cast<acc_t>(in.factors[i]);
        }
        params.count = static_cast<int>(slots.size());
        params.out = result + at;
        // One kernel per table size for the widest pack only (see ForecastParams).
        if constexpr (VEC == kMaxPack<scalar_t>) {
          with_slot_count(params.count, [&](auto count) {
            backend.template run<Body<scalar_t, VEC, decltype(count)::value>>(params, layout.packs);
          });
        } else {
          backend.template run<Body<scalar_t, VEC, 0>>(params, layout.packs);
        }
      });
    });
  });
}

}  // namespace launch
}  // namespace harmonica
