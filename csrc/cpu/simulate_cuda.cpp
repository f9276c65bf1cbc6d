// Runs the per-thread bodies of the CUDA kernels (cuda/thread_bodies.h) on the CPU, one call per
// simulated (block, thread), with the launch decisions of cuda/launch_plan.h. Registered as
// CPU-only test ops harmonica::_simulate_cuda_*; tests compare them with the pure-PyTorch reference
// to check vector width, scalar tails, grid-stride coverage and gate/w/row indexing without a GPU.
#include <cstdint>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../checks.h"
#include "../cuda/launch_plan.h"
#include "../cuda/thread_bodies.h"

namespace harmonica {
namespace {

using cuda_body::ThreadIndex;

struct SimulatedLaunch {
  int64_t block_dim;
  int64_t grid_dim;
};

SimulatedLaunch simulated_launch(const char* op, int64_t block_dim, int64_t grid_dim, int64_t work_items,
                                 int64_t vector_width) {
  TORCH_CHECK(block_dim >= vector_width && block_dim <= 1024, op, ": `block_dim` must be in [vector_width, 1024] ",
              "so the scalar tail has a thread per leftover element, got ", block_dim, ".");
  TORCH_CHECK(grid_dim >= 0, op, ": `grid_dim` must be >= 0 (0 = launcher's choice), got ", grid_dim, ".");
  return SimulatedLaunch{block_dim, grid_dim == 0 ? launch::blocks_for(work_items, block_dim) : grid_dim};
}

// Every simulated thread of the launch, in block-major order.
template <typename Body>
void for_each_simulated_thread(const SimulatedLaunch& launch, const Body& body) {
  for (int64_t block = 0; block < launch.grid_dim; ++block) {
    for (int64_t thread = 0; thread < launch.block_dim; ++thread) {
      body(ThreadIndex{block, thread, launch.block_dim, launch.grid_dim});
    }
  }
}

cuda_body::HiddenLayout layout_of(const HiddenShape& shape, const at::Tensor& gate_2d) {
  return cuda_body::HiddenLayout{shape.numel(), shape.sample_numel(), shape.hidden, gate_2d.stride(0)};
}

at::Tensor simulate_gated_residual(const char* op, const GatedResidualInputs& in, const at::Tensor* cache,
                                   int64_t block_dim, int64_t grid_dim, int64_t requested_width) {
  at::Tensor out = at::empty(in.x.sizes(), in.x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_simulate_gated_residual", [&] {
    cuda_body::GatedResidualParams<scalar_t> params{
        layout_of(in.shape, in.gate),
        in.x.const_data_ptr<scalar_t>(),
        in.gate.const_data_ptr<scalar_t>(),
        in.value.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        cache == nullptr ? nullptr : cache->mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(in.x.scalar_type(),
                                           {params.x, params.value, params.out, params.cache_out}, 1);
    const int64_t width = launch::resolve_vector_width(op, in.x.scalar_type(), packable, requested_width);
    const SimulatedLaunch sim = simulated_launch(op, block_dim, grid_dim, in.shape.numel() / width, width);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      for_each_simulated_thread(sim, [&](const ThreadIndex& t) {
        cuda_body::gated_residual_thread<scalar_t, decltype(vec)::value>(t, params);
      });
    });
  });
  return out;
}

at::Tensor simulate_cache_write(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                const at::Tensor& cache, int64_t block_dim, int64_t grid_dim, int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_cache_write";
  return simulate_gated_residual(op, prepare_cache_write(op, x, gate, branch, cache, false), &cache, block_dim,
                                 grid_dim, vector_width);
}

at::Tensor simulate_cache_read(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache,
                               int64_t block_dim, int64_t grid_dim, int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_cache_read";
  return simulate_gated_residual(op, prepare_cache_read(op, x, gate, cache, false), nullptr, block_dim, grid_dim,
                                 vector_width);
}

at::Tensor simulate_blend(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                          const at::Tensor& cache, const at::Tensor& w, int64_t block_dim, int64_t grid_dim,
                          int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_blend";
  const BlendInputs in = prepare_blend(op, x, gate, fresh, cache, w);
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_simulate_blend", [&] {
    cuda_body::BlendParams<scalar_t> params{layout_of(in.shape, in.gate),
                                            in.x.const_data_ptr<scalar_t>(),
                                            in.gate.const_data_ptr<scalar_t>(),
                                            in.fresh.const_data_ptr<scalar_t>(),
                                            in.cache.const_data_ptr<scalar_t>(),
                                            in.w.const_data_ptr<at::opmath_type<scalar_t>>(),
                                            in.w_batch_stride,
                                            out.mutable_data_ptr<scalar_t>()};
    const bool packable =
        launch::can_pack(x.scalar_type(), {params.x, params.fresh, params.cache, params.out}, 1);
    const int64_t width = launch::resolve_vector_width(op, x.scalar_type(), packable, vector_width);
    const SimulatedLaunch sim = simulated_launch(op, block_dim, grid_dim, in.shape.numel() / width, width);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      for_each_simulated_thread(sim, [&](const ThreadIndex& t) {
        cuda_body::blend_forward_thread<scalar_t, decltype(vec)::value>(t, params);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simulate_blend_backward(const at::Tensor& grad_out,
                                                                       const at::Tensor& gate, const at::Tensor& fresh,
                                                                       const at::Tensor& cache, const at::Tensor& w,
                                                                       int64_t block_dim, int64_t grid_dim,
                                                                       int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_blend_backward";
  const BlendInputs in = prepare_blend(op, grad_out, gate, fresh, cache, w);
  const HiddenShape s = in.shape;
  at::Tensor grad_fresh = at::empty(fresh.sizes(), fresh.options());
  at::Tensor partial_grad_gate;
  at::Tensor partial_grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "harmonica_simulate_blend_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packable = launch::can_pack(grad_out.scalar_type(),
                                           {in.x.const_data_ptr(), in.fresh.const_data_ptr(),
                                            in.cache.const_data_ptr(), grad_fresh.const_data_ptr()},
                                           s.hidden);
    const int64_t width = launch::resolve_vector_width(op, grad_out.scalar_type(), packable, vector_width);
    const launch::BlendBackwardChunking chunking = launch::blend_backward_chunking(s.batch, s.tokens, s.hidden / width);
    partial_grad_gate = at::zeros({s.batch, chunking.chunks, s.hidden}, in.w.options());
    partial_grad_w = at::zeros({s.batch, chunking.chunks, s.hidden}, in.w.options());
    cuda_body::BlendBackwardParams<scalar_t> params{s.batch,
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
    const int64_t tasks = s.batch * chunking.chunks * (s.hidden / width);
    const SimulatedLaunch sim = simulated_launch(op, block_dim, grid_dim, tasks, width);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      for_each_simulated_thread(sim, [&](const ThreadIndex& t) {
        cuda_body::blend_backward_thread<scalar_t, decltype(vec)::value>(t, params);
      });
    });
  });
  auto [grad_gate, grad_w] = launch::finish_blend_backward(partial_grad_gate, partial_grad_w, gate, w);
  return {grad_gate, grad_fresh, grad_w};
}

at::Tensor simulate_gather_rows(const at::Tensor& x, const at::Tensor& index, int64_t block_dim, int64_t grid_dim,
                                int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_gather_rows";
  const GatherRowsInputs in = prepare_gather_rows(op, x, index);
  check_rows_in_range_cpu(op, in.index, in.shape.batch);
  at::Tensor out = at::empty({in.index.numel(), in.shape.tokens, in.shape.hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_simulate_gather_rows", [&] {
    cuda_body::GatherRowsParams<scalar_t> params{out.numel(), in.shape.sample_numel(), in.x.const_data_ptr<scalar_t>(),
                                                 in.index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(x.scalar_type(), {params.x, params.out}, params.sample_numel);
    const int64_t width = launch::resolve_vector_width(op, x.scalar_type(), packable, vector_width);
    const SimulatedLaunch sim = simulated_launch(op, block_dim, grid_dim, out.numel() / width, width);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      for_each_simulated_thread(sim, [&](const ThreadIndex& t) {
        cuda_body::gather_rows_thread<scalar_t, decltype(vec)::value>(t, params);
      });
    });
  });
  return out;
}

at::Tensor simulate_gated_merge(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                const at::Tensor& index, const at::Tensor& cache, int64_t block_dim, int64_t grid_dim,
                                int64_t vector_width) {
  const char* op = "harmonica._simulate_cuda_gated_merge";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, false);
  const at::Tensor slot_of_row = slot_of_row_cpu(op, in.index, in.shape.batch);
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_simulate_gated_merge", [&] {
    cuda_body::GatedMergeParams<scalar_t> params{layout_of(in.shape, in.gate),
                                                 in.x.const_data_ptr<scalar_t>(),
                                                 in.gate.const_data_ptr<scalar_t>(),
                                                 in.branch_active.const_data_ptr<scalar_t>(),
                                                 slot_of_row.const_data_ptr<int32_t>(),
                                                 cache.mutable_data_ptr<scalar_t>(),
                                                 out.mutable_data_ptr<scalar_t>()};
    const bool packable = launch::can_pack(x.scalar_type(), {params.x, params.branch_active, params.cache, params.out},
                                           in.shape.sample_numel());
    const int64_t width = launch::resolve_vector_width(op, x.scalar_type(), packable, vector_width);
    const SimulatedLaunch sim = simulated_launch(op, block_dim, grid_dim, in.shape.numel() / width, width);
    launch::with_vector_width<scalar_t>(width, [&](auto vec) {
      for_each_simulated_thread(sim, [&](const ThreadIndex& t) {
        cuda_body::gated_merge_thread<scalar_t, decltype(vec)::value>(t, params);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CPU, m) {
  m.impl("_simulate_cuda_cache_write", &harmonica::simulate_cache_write);
  m.impl("_simulate_cuda_cache_read", &harmonica::simulate_cache_read);
  m.impl("_simulate_cuda_blend", &harmonica::simulate_blend);
  m.impl("_simulate_cuda_blend_backward", &harmonica::simulate_blend_backward);
  m.impl("_simulate_cuda_gather_rows", &harmonica::simulate_gather_rows);
  m.impl("_simulate_cuda_gated_merge", &harmonica::simulate_gated_merge);
}
