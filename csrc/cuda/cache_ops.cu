// CUDA kernels: each __global__ kernel runs one per-thread body of thread_bodies.h, launched on the
// current stream through the launchers of launchers.h, which the CPU simulation shares. Lean headers
// only: torch/extension.h and ATen/cuda/CUDAContext.h cost minutes of nvcc time per architecture.
//
// Nothing here synchronises with the device: values in device memory (a `w` tensor, indices) are
// validated by check kernels (device-side asserts), everything else on the host.
#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch_plan.h"
#include "launchers.h"
#include "thread_bodies.h"

namespace harmonica {
namespace {

template <typename Body, typename Params>
__global__ void run_body(const Params params) {
  Body::run(cuda_body::ThreadIndex{blockIdx.x, threadIdx.x, blockDim.x, gridDim.x}, params);
}

// Threads the current device runs at once, read once per device (device attributes: no sync).
int64_t resident_threads() {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int64_t>, kDevices> cached{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kDevices) {
    return launch::LaunchOptions{}.resident_threads;
  }
  int64_t threads = cached[device].load(std::memory_order_relaxed);
  if (threads == 0) {
    int multiprocessors = 0;
    int threads_per_multiprocessor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_multiprocessor, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    threads = static_cast<int64_t>(multiprocessors) * threads_per_multiprocessor;
    cached[device].store(threads, std::memory_order_relaxed);
  }
  return threads;
}

struct CudaBackend {
  launch::LaunchOptions options;

  template <typename Body, typename Params>
  void run(const Params& params, int64_t work_items) const {
    const launch::LaunchShape shape = launch::launch_shape(options, work_items);
    run_body<Body, Params><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The backend for the current device; the caller holds a device guard for x's device.
CudaBackend cuda_backend() {
  launch::LaunchOptions options;
  options.resident_threads = resident_threads();
  return CudaBackend{options};
}

at::Tensor cache_write_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                            const at::Tensor& cache) {
  const char* op = "harmonica.cache_write";
  const GatedResidualInputs in = prepare_cache_write(op, x, gate, branch, cache, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_residual(cuda_backend(), op, in, out, in.write_cache ? &cache : nullptr);
  return out;
}

void cache_write_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                              const at::Tensor& cache) {
  const char* op = "harmonica.cache_write_";
  const GatedResidualInputs in = prepare_cache_write(op, x, gate, branch, cache, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch::gated_residual(cuda_backend(), op, in, x, in.write_cache ? &cache : nullptr);
}

at::Tensor cache_read_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const char* op = "harmonica.cache_read";
  const GatedResidualInputs in = prepare_cache_read(op, x, gate, cache, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_residual(cuda_backend(), op, in, out, nullptr);
  return out;
}

void cache_read_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const char* op = "harmonica.cache_read_";
  const GatedResidualInputs in = prepare_cache_read(op, x, gate, cache, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch::gated_residual(cuda_backend(), op, in, x, nullptr);
}

at::Tensor blend_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh, const at::Tensor& cache,
                      const at::Tensor& w) {
  const char* op = "harmonica.blend";
  const BlendInputs in = prepare_blend(op, x, gate, fresh, cache, w, KernelSite::kDevice);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::blend(cuda_backend(), op, in, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                   const at::Tensor& fresh, const at::Tensor& cache,
                                                                   const at::Tensor& w) {
  const char* op = "harmonica.blend_backward";
  const BlendInputs in = prepare_blend(op, grad_out, gate, fresh, cache, w, KernelSite::kDevice);
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  return launch::blend_backward(cuda_backend(), op, in, gate, w);
}

// A row gather is exactly index_select, whose CUDA kernel is already bandwidth-bound and checks
// every index with a device-side assert; a kernel of our own would only duplicate it.
at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  const GatherRowsInputs in = prepare_gather_rows("harmonica.gather_rows", x, index);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return at::index_select(in.x, 0, in.index);
}

at::Tensor gated_merge_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                            const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_merge(cuda_backend(), op, in, cache, out);
  return out;
}

void gated_merge_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                              const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge_";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch::gated_merge(cuda_backend(), op, in, cache, x);
}

at::Tensor forecast_read_cuda(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                              at::ArrayRef<double> coeffs) {
  const char* op = "harmonica.forecast_read";
  const ForecastInputs in = prepare_forecast_read(op, x, gate, slots, coeffs, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::forecast<cuda_body::ForecastReadBody, false>(cuda_backend(), op, in, out);
  return out;
}

void forecast_read_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                                at::ArrayRef<double> coeffs) {
  const char* op = "harmonica.forecast_read_";
  const ForecastInputs in = prepare_forecast_read(op, x, gate, slots, coeffs, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch::forecast<cuda_body::ForecastReadBody, false>(cuda_backend(), op, in, x);
}

at::Tensor forecast_update_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                at::TensorList slots, at::ArrayRef<double> inv) {
  const char* op = "harmonica.forecast_update";
  const ForecastInputs in = prepare_forecast_update(op, x, gate, fresh, slots, inv, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::forecast<cuda_body::ForecastUpdateBody, true>(cuda_backend(), op, in, out);
  return out;
}

void forecast_update_inplace_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                  at::TensorList slots, at::ArrayRef<double> inv) {
  const char* op = "harmonica.forecast_update_";
  const ForecastInputs in = prepare_forecast_update(op, x, gate, fresh, slots, inv, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch::forecast<cuda_body::ForecastUpdateBody, true>(cuda_backend(), op, in, x);
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
  m.impl("forecast_read", &harmonica::forecast_read_cuda);
  m.impl("forecast_read_", &harmonica::forecast_read_inplace_cuda);
  m.impl("forecast_update", &harmonica::forecast_update_cuda);
  m.impl("forecast_update_", &harmonica::forecast_update_inplace_cuda);
}
