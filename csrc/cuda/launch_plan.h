// Host-side launch decisions of the device kernels (pack width, grid size, splitting a launch into
// 32-bit-indexable pieces, blend-backward chunking, final reductions), used by the one launcher per
// op in launchers.h, which both the CUDA build and the CPU simulation run. The CPU kernels use
// finish_blend_backward only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "../checks.h"
#include "thread_bodies.h"

namespace harmonica {
namespace launch {

constexpr int64_t kThreadsPerBlock = 256;
// Grid-stride loops make any grid correct; this cap only bounds scheduling overhead.
constexpr int64_t kMaxBlocks = 8192;
constexpr int64_t kVectorBytes = 16;
// Pack and task indices are 32-bit: a launch covers at most 2^31 - 1 packs (cuda_body::FastDivmod needs
// dividends below 2^31).
constexpr int64_t kMaxPacksPerLaunch = (int64_t{1} << 31) - 1;

// How a launch is shaped. The CUDA build uses the defaults (resident_threads from the device); the
// CPU simulation's test ops override them to reach every code path with small tensors.
struct LaunchOptions {
  int64_t block_dim = kThreadsPerBlock;
  int64_t grid_dim = 0;         // 0: enough blocks for the work, at most kMaxBlocks
  int64_t vector_width = 0;     // 0: the widest pack the inputs allow
  int64_t max_packs = kMaxPacksPerLaunch;  // at most this many packs (or backward tasks) per launch
  int64_t resident_threads = 65536;        // threads the device runs at once (blend_backward's chunking)
};

struct LaunchShape {
  uint32_t grid;
  uint32_t block;
};

inline LaunchShape launch_shape(const LaunchOptions& options, int64_t work_items) {
  int64_t grid = options.grid_dim;
  if (grid == 0) {
    grid = std::max<int64_t>(1, std::min<int64_t>((work_items + options.block_dim - 1) / options.block_dim, kMaxBlocks));
  }
  return LaunchShape{static_cast<uint32_t>(grid), static_cast<uint32_t>(options.block_dim)};
}

template <typename T>
constexpr int kMaxPack = static_cast<int>(kVectorBytes / sizeof(T));

// The widest power-of-two pack (at most 16 bytes) such that every pointer is aligned to a whole pack
// and the row length and every batch stride (in elements) are multiples of it: a pack then never
// straddles a row and each load is one transaction. An 8-byte-aligned bfloat16 view gets 4-element
// packs instead of falling back to single elements.
template <typename T>
int64_t widest_pack(int64_t row, c10::ArrayRef<const void*> pointers, std::initializer_list<int64_t> strides) {
  int64_t width = kMaxPack<T>;
  const auto fits = [&](int64_t w) {
    if (row % w != 0) {
      return false;
    }
    for (const void* pointer : pointers) {
      if (pointer != nullptr && reinterpret_cast<std::uintptr_t>(pointer) % (w * sizeof(T)) != 0) {
        return false;
      }
    }
    for (int64_t stride : strides) {
      if (stride % w != 0) {
        return false;
      }
    }
    return true;
  };
  while (width > 1 && !fits(width)) {
    width /= 2;
  }
  return width;
}

// options.vector_width == 0 takes the widest pack; the simulation may ask for a narrower power of two.
template <typename T>
int64_t choose_pack(const char* op, const LaunchOptions& options, int64_t widest) {
  const int64_t requested = options.vector_width;
  if (requested == 0) {
    return widest;
  }
  TORCH_CHECK(requested > 0 && requested <= kMaxPack<T> && (requested & (requested - 1)) == 0, op,
              ": `vector_width` must be 0 (auto) or a power of two up to ", kMaxPack<T>, " for this dtype, got ",
              requested, ".");
  TORCH_CHECK(requested <= widest, op, ": `vector_width` = ", requested, " needs ", requested * sizeof(T),
              "-byte aligned pointers and rows (and gate batch strides) that are a multiple of the pack width; ",
              "these inputs allow at most ", widest, ".");
  return requested;
}

// Calls fn(std::integral_constant<int, VEC>{}) for VEC == width, a power of two up to kMaxPack<T>.
template <typename T, int VEC = kMaxPack<T>, typename Fn>
void with_pack_width(int64_t width, Fn&& fn) {
  if constexpr (VEC == 1) {
    fn(std::integral_constant<int, 1>{});
  } else {
    if (width == VEC) {
      fn(std::integral_constant<int, VEC>{});
    } else {
      with_pack_width<T, VEC / 2>(width, std::forward<Fn>(fn));
    }
  }
}

// Calls fn(std::integral_constant<int, N>{}) for N == count, 1 <= count <= kMaxForecastSlots (checked
// by prepare_forecast_*): the forecast kernels, device and CPU, are compiled per table size, so each
// keeps every slot pointer and factor in registers and runs exactly its order's loads and stores.
template <int N = 1, typename Fn>
void with_slot_count(int64_t count, Fn&& fn) {
  if constexpr (N == kMaxForecastSlots) {
    fn(std::integral_constant<int, N>{});
  } else if (count == N) {
    fn(std::integral_constant<int, N>{});
  } else {
    with_slot_count<N + 1>(count, std::forward<Fn>(fn));
  }
}

// Calls fn(first_sample, layout) for consecutive runs of whole samples of at most max_packs packs each
// (one run for any tensor below 32 GiB of 16-byte packs).
template <typename Fn>
void for_each_launch(const char* op, const HiddenShape& shape, int64_t vec, int64_t max_packs, Fn&& fn) {
  const int64_t per_row = shape.hidden / vec;
  const int64_t per_sample = shape.tokens * per_row;
  TORCH_CHECK(per_sample <= max_packs, op, ": one sample of ", shape.tokens, " x ", shape.hidden,
              " elements is too large for 32-bit pack indices; split the tokens into several calls.");
  const int64_t samples_per_launch = max_packs / per_sample;
  for (int64_t first = 0; first < shape.batch; first += samples_per_launch) {
    const int64_t samples = std::min(samples_per_launch, shape.batch - first);
    fn(first, cuda_body::PackLayout{static_cast<uint32_t>(samples * per_sample),
                                    cuda_body::FastDivmod(static_cast<uint32_t>(per_row)),
                                    cuda_body::FastDivmod(static_cast<uint32_t>(shape.tokens)),
                                    static_cast<uint32_t>(per_sample)});
  }
}

struct BlendBackwardChunking {
  int64_t tokens_per_chunk;
  int64_t chunks;
};

// Split the tokens so that about twice the threads the device holds at once have work (every
// multiprocessor stays busy through the tail of the launch), while each thread sums at least
// kMinTokens tokens: each chunk writes partial sums of D floats per sample, which a chunk of one
// token would make as large as the gradient itself.
inline BlendBackwardChunking blend_backward_chunking(int64_t batch, int64_t tokens, int64_t channel_groups,
                                                     int64_t resident_threads) {
  constexpr int64_t kMinTokens = 4;
  const int64_t columns = std::max<int64_t>(1, batch * channel_groups);
  const int64_t wanted_chunks = std::max<int64_t>(1, 2 * resident_threads / columns);
  const int64_t chunks_limit = std::max<int64_t>(1, std::min({wanted_chunks, (tokens + kMinTokens - 1) / kMinTokens}));
  const int64_t tokens_per_chunk = std::max<int64_t>(1, (tokens + chunks_limit - 1) / chunks_limit);
  const int64_t chunks = std::max<int64_t>(1, (tokens + tokens_per_chunk - 1) / tokens_per_chunk);
  return BlendBackwardChunking{tokens_per_chunk, chunks};
}

// Reduce the per-chunk partial gradients to the shapes and dtypes of gate and w. grad_w stays on the
// device of the partials (a 0-dim CPU w's gradient is moved by the autograd wrapper, only when asked).
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
