// Host-side launch decisions of the CUDA kernels (vector width, grid size, blend-backward chunking,
// final reductions). Shared by cuda/cache_ops.cu and the CPU simulation in cpu/simulate_cuda.cpp so
// the simulated launch is exactly the real one.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace harmonica {
namespace launch {

constexpr int64_t kThreadsPerBlock = 256;
// Grid-stride loops make any grid correct; this cap only bounds scheduling overhead.
constexpr int64_t kMaxBlocks = 8192;
constexpr int64_t kVectorBytes = 16;

inline int64_t packed_width(at::ScalarType dtype) {
  return kVectorBytes / static_cast<int64_t>(c10::elementSize(dtype));
}

// 16-byte packs need every streamed pointer 16-byte aligned and, where a pack must stay inside one
// row (`row_numel`), the row length a multiple of the pack width. Otherwise the scalar path runs.
inline bool can_pack(at::ScalarType dtype, std::initializer_list<const void*> pointers, int64_t row_numel) {
  const int64_t width = packed_width(dtype);
  if (row_numel % width != 0) {
    return false;
  }
  for (const void* pointer : pointers) {
    if (reinterpret_cast<std::uintptr_t>(pointer) % kVectorBytes != 0) {
      return false;
    }
  }
  return true;
}

// requested: 0 = launcher's choice, 1 = scalar, packed_width = force 16-byte packs.
inline int64_t resolve_vector_width(const char* op, at::ScalarType dtype, bool packable, int64_t requested) {
  const int64_t width = packed_width(dtype);
  if (requested == 0) {
    return packable ? width : 1;
  }
  TORCH_CHECK(requested == 1 || requested == width, op, ": `vector_width` must be 0 (auto), 1 or ", width,
              " for ", dtype, ", got ", requested, ".");
  TORCH_CHECK(requested == 1 || packable, op, ": `vector_width` = ", requested,
              " needs 16-byte aligned pointers and rows that are a multiple of the pack width; these inputs are not.");
  return requested;
}

inline int64_t blocks_for(int64_t work_items, int64_t threads_per_block = kThreadsPerBlock) {
  const int64_t blocks = (work_items + threads_per_block - 1) / threads_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks));
}

// Calls fn(std::integral_constant<int, VEC>{}) for VEC in {1, 16 / sizeof(T)}.
template <typename T, typename Fn>
void with_vector_width(int64_t vector_width, Fn&& fn) {
  constexpr int kPacked = static_cast<int>(kVectorBytes / sizeof(T));
  if (vector_width == kPacked) {
    fn(std::integral_constant<int, kPacked>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

struct BlendBackwardChunking {
  int64_t tokens_per_chunk;
  int64_t chunks;
};

// Split the tokens so that about 64k threads have work (a few waves on an A100/H100) while each
// thread still sums several tokens before writing its partial gradients.
inline BlendBackwardChunking blend_backward_chunking(int64_t batch, int64_t tokens, int64_t channel_groups) {
  constexpr int64_t kTargetThreads = 65536;
  const int64_t columns = std::max<int64_t>(1, batch * channel_groups);
  const int64_t wanted_chunks = std::max<int64_t>(1, kTargetThreads / columns);
  const int64_t chunks_limit = std::max<int64_t>(1, std::min(tokens, wanted_chunks));
  const int64_t tokens_per_chunk = std::max<int64_t>(1, (tokens + chunks_limit - 1) / chunks_limit);
  const int64_t chunks = std::max<int64_t>(1, (tokens + tokens_per_chunk - 1) / tokens_per_chunk);
  return BlendBackwardChunking{tokens_per_chunk, chunks};
}

// Reduce the per-chunk partial gradients to the shapes and dtypes of gate and w.
inline std::pair<at::Tensor, at::Tensor> finish_blend_backward(const at::Tensor& partial_grad_gate,
                                                               const at::Tensor& partial_grad_w, const at::Tensor& gate,
                                                               const at::Tensor& w) {
  at::Tensor grad_gate = partial_grad_gate.sum(1).to(gate.scalar_type()).reshape(gate.sizes());
  at::Tensor grad_w_per_sample = partial_grad_w.flatten(1).sum(1);
  at::Tensor grad_w = (w.dim() == 0 ? grad_w_per_sample.sum() : grad_w_per_sample).to(w.scalar_type());
  return {grad_gate, grad_w};
}

}  // namespace launch
}  // namespace harmonica
