// The device launch of every CUDA op, run on the CPU: the launchers of cuda/launchers.h with a
// backend that calls the per-thread body (cuda/thread_bodies.h) once per simulated (block, thread).
// Registered as CPU-only test ops harmonica::_simulate_cuda_*; tests compare them with the
// pure-PyTorch reference to check pack widths, grid-stride coverage, launch splitting, the check
// kernels and gate/w/row indexing without a GPU. Input tensors stand for device tensors: a `w`
// tensor of shape (B,) is checked by the check kernel, not on the host (a 0-dim `w` is a host
// scalar, as it would be for a CUDA launch).
#include <cstdint>
#include <tuple>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cuda/launch_plan.h"
#include "../cuda/launchers.h"
#include "../cuda/thread_bodies.h"

namespace harmonica {
namespace {

struct SimulatedBackend {
  launch::LaunchOptions options;

  template <typename Body, typename Params>
  void run(const Params& params, int64_t work_items) const {
    const launch::LaunchShape shape = launch::launch_shape(options, work_items);
    for (uint32_t block = 0; block < shape.grid; ++block) {
      for (uint32_t thread = 0; thread < shape.block; ++thread) {
        Body::run(cuda_body::ThreadIndex{block, thread, shape.block, shape.grid}, params);
      }
    }
  }
};

// block_dim / grid_dim / vector_width / max_packs as the test ops take them (0 = the launcher's choice).
SimulatedBackend simulated(const char* op, int64_t block_dim, int64_t grid_dim, int64_t vector_width,
                           int64_t max_packs) {
  TORCH_CHECK(block_dim >= 1 && block_dim <= 1024, op, ": `block_dim` must be in [1, 1024], got ", block_dim, ".");
  TORCH_CHECK(grid_dim >= 0 && grid_dim <= launch::kMaxBlocks, op, ": `grid_dim` must be in [0, ",
              launch::kMaxBlocks, "] (0 = launcher's choice), got ", grid_dim, ".");
  TORCH_CHECK(max_packs >= 0 && max_packs <= launch::kMaxPacksPerLaunch, op,
              ": `max_packs` must be in [0, 2^31 - 1] (0 = launcher's choice), got ", max_packs, ".");
  launch::LaunchOptions options;
  options.block_dim = block_dim;
  options.grid_dim = grid_dim;
  options.vector_width = vector_width;
  if (max_packs != 0) {
    options.max_packs = max_packs;
  }
  return SimulatedBackend{options};
}

at::Tensor simulate_cache_write(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                const at::Tensor& cache, int64_t block_dim, int64_t grid_dim, int64_t vector_width,
                                int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_cache_write";
  const GatedResidualInputs in = prepare_cache_write(op, x, gate, branch, cache, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_residual(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, out,
                         in.write_cache ? &cache : nullptr);
  return out;
}

void simulate_cache_write_inplace(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                  const at::Tensor& cache, int64_t block_dim, int64_t grid_dim, int64_t vector_width,
                                  int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_cache_write_";
  const GatedResidualInputs in = prepare_cache_write(op, x, gate, branch, cache, true);
  launch::gated_residual(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, x,
                         in.write_cache ? &cache : nullptr);
}

at::Tensor simulate_cache_read(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache,
                               int64_t block_dim, int64_t grid_dim, int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_cache_read";
  const GatedResidualInputs in = prepare_cache_read(op, x, gate, cache, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_residual(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, out, nullptr);
  return out;
}

void simulate_cache_read_inplace(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache,
                                 int64_t block_dim, int64_t grid_dim, int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_cache_read_";
  const GatedResidualInputs in = prepare_cache_read(op, x, gate, cache, true);
  launch::gated_residual(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, x, nullptr);
}

at::Tensor simulate_blend(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                          const at::Tensor& cache, const at::Tensor& w, int64_t block_dim, int64_t grid_dim,
                          int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_blend";
  const BlendInputs in = prepare_blend(op, x, gate, fresh, cache, w, KernelSite::kDevice);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::blend(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simulate_blend_backward(const at::Tensor& grad_out,
                                                                       const at::Tensor& gate, const at::Tensor& fresh,
                                                                       const at::Tensor& cache, const at::Tensor& w,
                                                                       int64_t block_dim, int64_t grid_dim,
                                                                       int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_blend_backward";
  const BlendInputs in = prepare_blend(op, grad_out, gate, fresh, cache, w, KernelSite::kDevice);
  return launch::blend_backward(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, gate, w);
}

at::Tensor simulate_gated_merge(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                const at::Tensor& index, const at::Tensor& cache, int64_t block_dim, int64_t grid_dim,
                                int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_gated_merge";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::gated_merge(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, cache, out);
  return out;
}

void simulate_gated_merge_inplace(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                  const at::Tensor& index, const at::Tensor& cache, int64_t block_dim,
                                  int64_t grid_dim, int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_gated_merge_";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, true);
  launch::gated_merge(simulated(op, block_dim, grid_dim, vector_width, max_packs), op, in, cache, x);
}

at::Tensor simulate_forecast_read(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                                  at::ArrayRef<double> coeffs, int64_t block_dim, int64_t grid_dim,
                                  int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_forecast_read";
  const ForecastInputs in = prepare_forecast_read(op, x, gate, slots, coeffs, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::forecast<cuda_body::ForecastReadBody, false>(simulated(op, block_dim, grid_dim, vector_width, max_packs),
                                                       op, in, out);
  return out;
}

void simulate_forecast_read_inplace(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                                    at::ArrayRef<double> coeffs, int64_t block_dim, int64_t grid_dim,
                                    int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_forecast_read_";
  const ForecastInputs in = prepare_forecast_read(op, x, gate, slots, coeffs, true);
  launch::forecast<cuda_body::ForecastReadBody, false>(simulated(op, block_dim, grid_dim, vector_width, max_packs),
                                                       op, in, x);
}

at::Tensor simulate_forecast_update(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                    at::TensorList slots, at::ArrayRef<double> inv, int64_t block_dim,
                                    int64_t grid_dim, int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_forecast_update";
  const ForecastInputs in = prepare_forecast_update(op, x, gate, fresh, slots, inv, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch::forecast<cuda_body::ForecastUpdateBody, true>(simulated(op, block_dim, grid_dim, vector_width, max_packs),
                                                        op, in, out);
  return out;
}

void simulate_forecast_update_inplace(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                      at::TensorList slots, at::ArrayRef<double> inv, int64_t block_dim,
                                      int64_t grid_dim, int64_t vector_width, int64_t max_packs) {
  const char* op = "harmonica._simulate_cuda_forecast_update_";
  const ForecastInputs in = prepare_forecast_update(op, x, gate, fresh, slots, inv, true);
  launch::forecast<cuda_body::ForecastUpdateBody, true>(simulated(op, block_dim, grid_dim, vector_width, max_packs),
                                                        op, in, x);
}

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CPU, m) {
  m.impl("_simulate_cuda_cache_write", &harmonica::simulate_cache_write);
  m.impl("_simulate_cuda_cache_write_", &harmonica::simulate_cache_write_inplace);
  m.impl("_simulate_cuda_cache_read", &harmonica::simulate_cache_read);
  m.impl("_simulate_cuda_cache_read_", &harmonica::simulate_cache_read_inplace);
  m.impl("_simulate_cuda_blend", &harmonica::simulate_blend);
  m.impl("_simulate_cuda_blend_backward", &harmonica::simulate_blend_backward);
  m.impl("_simulate_cuda_gated_merge", &harmonica::simulate_gated_merge);
  m.impl("_simulate_cuda_gated_merge_", &harmonica::simulate_gated_merge_inplace);
  m.impl("_simulate_cuda_forecast_read", &harmonica::simulate_forecast_read);
  m.impl("_simulate_cuda_forecast_read_", &harmonica::simulate_forecast_read_inplace);
  m.impl("_simulate_cuda_forecast_update", &harmonica::simulate_forecast_update);
  m.impl("_simulate_cuda_forecast_update_", &harmonica::simulate_forecast_update_inplace);
}
