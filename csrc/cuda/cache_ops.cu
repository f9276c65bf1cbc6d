// CUDA kernels: thin __global__ wrappers around the per-thread bodies of thread_bodies.h, launched
// on the current stream with the decisions of launch_plan.h (16-byte packs where aligned, scalar
// tail, grid-stride loops). Lean headers only: torch/extension.h and ATen/cuda/CUDAContext.h cost
// minutes of nvcc time per architecture.
#include <cstdint>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch_plan.h"
#include "thread_bodies.h"

namespace harmonica {
namespace {

using cuda_body::ThreadIndex;

__device__ inline ThreadIndex this_thread() {
  return ThreadIndex{blockIdx.x, threadIdx.x, blockDim.x, gridDim.x};
}

template <typename T, int VEC>
__global__ void gated_residual_kernel(const cuda_body::GatedResidualParams<T> params) {
  cuda_body::gated_residual_thread<T, VEC>(this_thread(), params);
}

template <typename T, int VEC>
__global__ void blend_forward_kernel(const cuda_body::BlendParams<T> params) {
  cuda_body::blend_forward_thread<T, VEC>(this_thread(), params);
}

template <typename T, int VEC>
__global__ void blend_backward_kernel(const cuda_body::BlendBackwardParams<T> params) {
  cuda_body::blend_backward_thread<T, VEC>(this_thread(), params);
}

template <typename T, int VEC>
__global__ void gather_rows_kernel(const cuda_body::GatherRowsParams<T> params) {
  cuda_body::gather_rows_thread<T, VEC>(this_thread(), params);
}

template <typename T, int VEC>
__global__ void gated_merge_kernel(const cuda_body::GatedMergeParams<T> params) {
  cuda_body::gated_merge_thread<T, VEC>(this_thread(), params);
}

// Validation that would need a host sync on CUDA is done on the device instead: a failed assert
// surfaces as "device-side assert triggered" at the next synchronisation, with this message in
// the kernel log. The CPU path raises the full TORCH_CHECK message.
template <typename acc_t>
__global__ void check_w_range_kernel(const acc_t* w, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    CUDA_KERNEL_ASSERT(w[i] >= acc_t(0) && w[i] <= acc_t(1) && "harmonica.blend: w must lie in [0, 1]");
  }
}

__global__ void check_rows_kernel(const int64_t* index, int64_t count, int64_t batch) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < count) {
    CUDA_KERNEL_ASSERT(index[j] >= 0 && index[j] < batch && "harmonica: index out of range for the batch of x");
  }
}

// slot_of_row[index[j]] = j; slot_of_row starts at -1. A duplicate or out-of-range index asserts.
__global__ void build_slot_of_row_kernel(const int64_t* index, int64_t count, int64_t batch, int32_t* slot_of_row) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < count) {
    const int64_t row = index[j];
    CUDA_KERNEL_ASSERT(row >= 0 && row < batch && "harmonica.gated_merge: index out of range for the batch of x");
    const int previous = atomicCAS(slot_of_row + row, -1, static_cast<int>(j));
    CUDA_KERNEL_ASSERT(previous == -1 && "harmonica.gated_merge: index lists a sample twice");
  }
}

template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t work_items, const Args&... args) {
  const int64_t blocks = launch::blocks_for(work_items);
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(launch::kThreadsPerBlock), 0,
           c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

cuda_body::HiddenLayout layout_of(const HiddenShape& shape, const at::Tensor& gate_2d) {
  return cuda_body::HiddenLayout{shape.numel(), shape.sample_numel(), shape.hidden, gate_2d.stride(0)};
}

at::Tensor run_gated_residual(const char* op, const GatedResidualInputs& in, const at::Tensor& out,
                              const at::Tensor* cache) {
  if (in.shape.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_residual_cuda", [&] {
    const cuda_body::GatedResidualParams<scalar_t> params{
        layout_of(in.shape, in.gate),
        in.x.const_data_ptr<scalar_t>(),
        in.gate.const_data_ptr<scalar_t>(),
        in.value.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        cache == nullptr ? nullptr : cache->mutable_data_ptr<scalar_t>()};
    const bool packable =
        launch::can_pack(in.x.scalar_type(), {params.x, params.value, params.out, params.cache_out}, 1);
    const int64_t width = launch::resolve_vector_width(op, in.x.scalar_type(), packable, 0);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      launch_kernel(gated_residual_kernel<scalar_t, decltype(vec)::value>, in.shape.numel() / width, params);
    });
  });
  return out;
}

at::Tensor cache_write_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                            const at::Tensor& cache) {
  const char* op = "harmonica.cache_write";
  return run_gated_residual(op, prepare_cache_write(op, x, gate, branch, cache, false),
                            at::empty(x.sizes(), x.options()), &cache);
}

void cache_write_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                    const at::Tensor& cache) {
  const char* op = "harmonica.cache_write_";
  run_gated_residual(op, prepare_cache_write(op, x, gate, branch, cache, true), x, &cache);
}

at::Tensor cache_read_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const char* op = "harmonica.cache_read";
  return run_gated_residual(op, prepare_cache_read(op, x, gate, cache, false), at::empty(x.sizes(), x.options()),
                            nullptr);
}

void cache_read_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const char* op = "harmonica.cache_read_";
  run_gated_residual(op, prepare_cache_read(op, x, gate, cache, true), x, nullptr);
}

void check_w_on_device(const at::Tensor& w_acc) {
  AT_DISPATCH_FLOATING_TYPES(w_acc.scalar_type(), "harmonica_check_w_cuda", [&] {
    launch_kernel(check_w_range_kernel<scalar_t>, w_acc.numel(), w_acc.const_data_ptr<scalar_t>(), w_acc.numel());
  });
}

at::Tensor blend_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh, const at::Tensor& cache,
                      const at::Tensor& w) {
  const char* op = "harmonica.blend";
  const BlendInputs in = prepare_blend(op, x, gate, fresh, cache, w);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (in.shape.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_w_on_device(in.w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_blend_cuda", [&] {
    const cuda_body::BlendParams<scalar_t> params{layout_of(in.shape, in.gate),
                                                  in.x.const_data_ptr<scalar_t>(),
                                                  in.gate.const_data_ptr<scalar_t>(),
                                                  in.fresh.const_data_ptr<scalar_t>(),
                                                  in.cache.const_data_ptr<scalar_t>(),
                                                  in.w.const_data_ptr<at::opmath_type<scalar_t>>(),
                                                  in.w_batch_stride,
                                                  out.mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(x.scalar_type(), {params.x, params.fresh, params.cache, params.out}, 1);
    const int64_t width = launch::resolve_vector_width(op, x.scalar_type(), packable, 0);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      launch_kernel(blend_forward_kernel<scalar_t, decltype(vec)::value>, in.shape.numel() / width, params);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                   const at::Tensor& fresh, const at::Tensor& cache,
                                                                   const at::Tensor& w) {
  const char* op = "harmonica.blend_backward";
  const BlendInputs in = prepare_blend(op, grad_out, gate, fresh, cache, w);
  const HiddenShape s = in.shape;
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  at::Tensor grad_fresh = at::empty(fresh.sizes(), fresh.options());
  at::Tensor partial_grad_gate;
  at::Tensor partial_grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "harmonica_blend_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packable = launch::can_pack(grad_out.scalar_type(),
                                           {in.x.const_data_ptr(), in.fresh.const_data_ptr(),
                                            in.cache.const_data_ptr(), grad_fresh.const_data_ptr()},
                                           s.hidden);
    const int64_t width = launch::resolve_vector_width(op, grad_out.scalar_type(), packable, 0);
    const launch::BlendBackwardChunking chunking = launch::blend_backward_chunking(s.batch, s.tokens, s.hidden / width);
    // Zero-initialised so an empty token range still yields zero gradients.
    partial_grad_gate = at::zeros({s.batch, chunking.chunks, s.hidden}, in.w.options());
    partial_grad_w = at::zeros({s.batch, chunking.chunks, s.hidden}, in.w.options());
    if (s.numel() == 0) {
      return;
    }
    const cuda_body::BlendBackwardParams<scalar_t> params{s.batch,
                                                          s.tokens,
                                                          s.hidden,
                                                          in.gate.stride(0),
                                                          chunking.tokens_per_chunk,
                                                          chunking.chunks,
                                                          in.x.const_data_ptr<scalar_t>(),
                                                          in.gate.const_data_ptr<scalar_t>(),
                                                          in.fresh.const_data_ptr<scalar_t>(),
                                                          in.cache.const_data_ptr<scalar_t>(),
                                                          in.w.const_data_ptr<acc_t>(),
                                                          in.w_batch_stride,
                                                          grad_fresh.mutable_data_ptr<scalar_t>(),
                                                          partial_grad_gate.mutable_data_ptr<acc_t>(),
                                                          partial_grad_w.mutable_data_ptr<acc_t>()};
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      launch_kernel(blend_backward_kernel<scalar_t, decltype(vec)::value>, s.batch * chunking.chunks * (s.hidden / width),
                    params);
    });
  });
  auto [grad_gate, grad_w] = launch::finish_blend_backward(partial_grad_gate, partial_grad_w, gate, w);
  return {grad_gate, grad_fresh, grad_w};
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  const char* op = "harmonica.gather_rows";
  const GatherRowsInputs in = prepare_gather_rows(op, x, index);
  at::Tensor out = at::empty({in.index.numel(), in.shape.tokens, in.shape.hidden}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch_kernel(check_rows_kernel, in.index.numel(), in.index.const_data_ptr<int64_t>(), in.index.numel(),
                in.shape.batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_gather_rows_cuda", [&] {
    const cuda_body::GatherRowsParams<scalar_t> params{out.numel(), in.shape.sample_numel(),
                                                       in.x.const_data_ptr<scalar_t>(),
                                                       in.index.const_data_ptr<int64_t>(),
                                                       out.mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(x.scalar_type(), {params.x, params.out}, params.sample_numel);
    const int64_t width = launch::resolve_vector_width(op, x.scalar_type(), packable, 0);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      launch_kernel(gather_rows_kernel<scalar_t, decltype(vec)::value>, out.numel() / width, params);
    });
  });
  return out;
}

at::Tensor run_gated_merge(const char* op, const GatedMergeInputs& in, const at::Tensor& cache, const at::Tensor& out) {
  if (in.shape.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const at::Tensor slot_of_row = at::full({in.shape.batch}, -1, in.index.options().dtype(at::kInt));
  launch_kernel(build_slot_of_row_kernel, in.index.numel(), in.index.const_data_ptr<int64_t>(), in.index.numel(),
                in.shape.batch, slot_of_row.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_merge_cuda", [&] {
    const cuda_body::GatedMergeParams<scalar_t> params{layout_of(in.shape, in.gate),
                                                       in.x.const_data_ptr<scalar_t>(),
                                                       in.gate.const_data_ptr<scalar_t>(),
                                                       in.branch_active.const_data_ptr<scalar_t>(),
                                                       slot_of_row.const_data_ptr<int32_t>(),
                                                       cache.mutable_data_ptr<scalar_t>(),
                                                       out.mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(in.x.scalar_type(), {params.x, params.branch_active, params.cache, params.out},
                                           in.shape.sample_numel());
    const int64_t width = launch::resolve_vector_width(op, in.x.scalar_type(), packable, 0);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      launch_kernel(gated_merge_kernel<scalar_t, decltype(vec)::value>, in.shape.numel() / width, params);
    });
  });
  return out;
}

at::Tensor gated_merge_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                            const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge";
  return run_gated_merge(op, prepare_gated_merge(op, x, gate, branch_active, index, cache, false), cache,
                         at::empty(x.sizes(), x.options()));
}

void gated_merge_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                    const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge_";
  run_gated_merge(op, prepare_gated_merge(op, x, gate, branch_active, index, cache, true), cache, x);
}

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CUDA, m) {
  m.impl("cache_write", &harmonica::cache_write_cuda);
  m.impl("cache_write_", &harmonica::cache_write_inplace_cuda);
  m.impl("cache_read", &harmonica::cache_read_cuda);
  m.impl("cache_read_", &harmonica::cache_read_inplace_cuda);
  m.impl("blend", &harmonica::blend_cuda);
  m.impl("blend_backward", &harmonica::blend_backward_cuda);
  m.impl("gather_rows", &harmonica::gather_rows_cuda);
  m.impl("gated_merge", &harmonica::gated_merge_cuda);
  m.impl("gated_merge_", &harmonica::gated_merge_inplace_cuda);
}
