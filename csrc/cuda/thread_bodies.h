// Per-thread bodies of the CUDA kernels, written as __host__ __device__ functions of the thread's
// (block, thread, block_dim, grid_dim) coordinates. The .cu file wraps each in a __global__ kernel;
// csrc/cpu/simulate_cuda.cpp runs the very same function on the CPU for every simulated thread
// index, so the tests check the GPU indexing (vector width, scalar tail, grid stride, gate
// broadcast, row remapping) on machines without a GPU.
//
// Layout contract (enforced by the launchers, see launch_plan.h): every (B, N, D) tensor is
// contiguous, the gate is (B, D) with unit channel stride and an arbitrary batch stride.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "../cache_ops.h"

// `#pragma unroll` only in nvcc's device pass; g++ (also nvcc's host pass) warns about it.
#if defined(__CUDA_ARCH__)
#define HARMONICA_UNROLL _Pragma("unroll")
#else
#define HARMONICA_UNROLL
#endif

namespace harmonica {
namespace cuda_body {

struct ThreadIndex {
  int64_t block;
  int64_t thread;
  int64_t block_dim;
  int64_t grid_dim;

  HARMONICA_HOST_DEVICE int64_t global() const { return block * block_dim + thread; }
  HARMONICA_HOST_DEVICE int64_t total() const { return block_dim * grid_dim; }
};

// VEC elements moved as one 16-byte transaction when VEC * sizeof(T) == 16 (ld.global.v4).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T value[VEC];
};

template <int VEC, typename T>
HARMONICA_HOST_DEVICE inline Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

template <int VEC, typename T>
HARMONICA_HOST_DEVICE inline void store_pack(T* ptr, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// Runs op.template run<VEC>(first_element) over all full packs with a grid-stride loop, then the
// numel % VEC leftover elements one per thread. The launchers guarantee at least VEC threads, so
// the tail never needs a loop.
template <int VEC, typename Op>
HARMONICA_HOST_DEVICE inline void grid_stride_packs(const ThreadIndex& t, int64_t numel, const Op& op) {
  const int64_t packs = numel / VEC;
  for (int64_t pack = t.global(); pack < packs; pack += t.total()) {
    op.template run<VEC>(pack * VEC);
  }
  const int64_t tail_element = packs * VEC + t.global();
  if (tail_element < numel) {
    op.template run<1>(tail_element);
  }
}

// Shape shared by all (B, N, D) ops. `sample_numel` = N * D.
struct HiddenLayout {
  int64_t numel;
  int64_t sample_numel;
  int64_t hidden;
  int64_t gate_batch_stride;

  HARMONICA_HOST_DEVICE int64_t sample_of(int64_t element) const { return element / sample_numel; }
  HARMONICA_HOST_DEVICE int64_t gate_offset(int64_t element) const {
    return sample_of(element) * gate_batch_stride + element % hidden;
  }
};

// ---- cache_write / cache_read --------------------------------------------------------------
// out = x + gate * value; when cache_out is set, cache_out <- value in the same pass.
template <typename T>
struct GatedResidualParams {
  HiddenLayout layout;
  const T* x;
  const T* gate;
  const T* value;
  T* out;        // may alias x (in-place variants)
  T* cache_out;  // nullptr for cache_read
};

template <typename T>
struct GatedResidualOp {
  using acc_t = at::opmath_type<T>;
  const GatedResidualParams<T> p;

  template <int VEC>
  HARMONICA_HOST_DEVICE void run(int64_t first) const {
    const Pack<T, VEC> x = load_pack<VEC>(p.x + first);
    const Pack<T, VEC> value = load_pack<VEC>(p.value + first);
    Pack<T, VEC> out;
    HARMONICA_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const acc_t gate = static_cast<acc_t>(p.gate[p.layout.gate_offset(first + k)]);
      out.value[k] = T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), gate,
                                             static_cast<acc_t>(value.value[k])));
    }
    store_pack<VEC>(p.out + first, out);
    if (p.cache_out != nullptr) {
      store_pack<VEC>(p.cache_out + first, value);
    }
  }
};

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void gated_residual_thread(const ThreadIndex& t, const GatedResidualParams<T>& p) {
  grid_stride_packs<VEC>(t, p.layout.numel, GatedResidualOp<T>{p});
}

// ---- blend forward ---------------------------------------------------------------------------
// w is in the accumulation type; w_batch_stride is 0 for a scalar w and 1 for a per-sample w.
template <typename T>
struct BlendParams {
  HiddenLayout layout;
  const T* x;
  const T* gate;
  const T* fresh;
  const T* cache;
  const at::opmath_type<T>* w;
  int64_t w_batch_stride;
  T* out;
};

template <typename T>
struct BlendOp {
  using acc_t = at::opmath_type<T>;
  const BlendParams<T> p;

  template <int VEC>
  HARMONICA_HOST_DEVICE void run(int64_t first) const {
    const Pack<T, VEC> x = load_pack<VEC>(p.x + first);
    const Pack<T, VEC> fresh = load_pack<VEC>(p.fresh + first);
    const Pack<T, VEC> cache = load_pack<VEC>(p.cache + first);
    Pack<T, VEC> out;
    HARMONICA_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const int64_t element = first + k;
      const acc_t gate = static_cast<acc_t>(p.gate[p.layout.gate_offset(element)]);
      const acc_t w = p.w[p.layout.sample_of(element) * p.w_batch_stride];
      const acc_t value = blend_value<acc_t>(static_cast<acc_t>(fresh.value[k]),
                                             static_cast<acc_t>(cache.value[k]), w);
      out.value[k] = T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), gate, value));
    }
    store_pack<VEC>(p.out + first, out);
  }
};

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void blend_forward_thread(const ThreadIndex& t, const BlendParams<T>& p) {
  grid_stride_packs<VEC>(t, p.layout.numel, BlendOp<T>{p});
}

// ---- blend backward --------------------------------------------------------------------------
// One task = (sample b, token chunk c, VEC consecutive channels). It writes grad_fresh for its
// elements and the per-chunk partial sums of the gate and w gradients, which the launcher reduces
// over the chunks with ATen. No atomics, so the result is deterministic for a fixed chunking.
// Consecutive tasks take consecutive channels, so a warp's loads are coalesced along D.
template <typename T>
struct BlendBackwardParams {
  using acc_t = at::opmath_type<T>;
  int64_t batch;
  int64_t tokens;
  int64_t hidden;
  int64_t gate_batch_stride;
  int64_t tokens_per_chunk;
  int64_t chunks;
  const T* grad_out;
  const T* gate;
  const T* fresh;
  const T* cache;
  const acc_t* w;
  int64_t w_batch_stride;
  T* grad_fresh;
  acc_t* partial_grad_gate;  // (batch, chunks, hidden)
  acc_t* partial_grad_w;     // (batch, chunks, hidden)
};

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void blend_backward_task(const BlendBackwardParams<T>& p, int64_t task) {
  using acc_t = at::opmath_type<T>;
  const int64_t channel_groups = p.hidden / VEC;
  const int64_t channel = (task % channel_groups) * VEC;
  const int64_t chunk = (task / channel_groups) % p.chunks;
  const int64_t b = task / (channel_groups * p.chunks);

  const acc_t w = p.w[b * p.w_batch_stride];
  acc_t gate[VEC];
  acc_t grad_gate[VEC];
  acc_t grad_w[VEC];
  HARMONICA_UNROLL
  for (int k = 0; k < VEC; ++k) {
    gate[k] = static_cast<acc_t>(p.gate[b * p.gate_batch_stride + channel + k]);
    grad_gate[k] = acc_t(0);
    grad_w[k] = acc_t(0);
  }
  const int64_t token_begin = chunk * p.tokens_per_chunk;
  const int64_t token_end =
      token_begin + p.tokens_per_chunk < p.tokens ? token_begin + p.tokens_per_chunk : p.tokens;
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t offset = (b * p.tokens + token) * p.hidden + channel;
    const Pack<T, VEC> grad_out = load_pack<VEC>(p.grad_out + offset);
    const Pack<T, VEC> fresh = load_pack<VEC>(p.fresh + offset);
    const Pack<T, VEC> cache = load_pack<VEC>(p.cache + offset);
    Pack<T, VEC> grad_fresh;
    HARMONICA_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const acc_t g = static_cast<acc_t>(grad_out.value[k]);
      const acc_t f = static_cast<acc_t>(fresh.value[k]);
      const acc_t c = static_cast<acc_t>(cache.value[k]);
      grad_fresh.value[k] = T(blend_grad_fresh<acc_t>(g, gate[k], w));
      grad_gate[k] += blend_grad_gate_term<acc_t>(g, f, c, w);
      grad_w[k] += blend_grad_w_term<acc_t>(g, gate[k], f, c);
    }
    store_pack<VEC>(p.grad_fresh + offset, grad_fresh);
  }
  const int64_t partial_offset = (b * p.chunks + chunk) * p.hidden + channel;
  HARMONICA_UNROLL
  for (int k = 0; k < VEC; ++k) {
    p.partial_grad_gate[partial_offset + k] = grad_gate[k];
    p.partial_grad_w[partial_offset + k] = grad_w[k];
  }
}

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void blend_backward_thread(const ThreadIndex& t, const BlendBackwardParams<T>& p) {
  const int64_t tasks = p.batch * p.chunks * (p.hidden / VEC);
  for (int64_t task = t.global(); task < tasks; task += t.total()) {
    blend_backward_task<T, VEC>(p, task);
  }
}

// ---- gather_rows -----------------------------------------------------------------------------
// out[j] = x[index[j]]; the index was validated by the launcher (host) or a device assert.
template <typename T>
struct GatherRowsParams {
  int64_t out_numel;
  int64_t sample_numel;
  const T* x;
  const int64_t* index;
  T* out;
};

template <typename T>
struct GatherRowsOp {
  const GatherRowsParams<T> p;

  template <int VEC>
  HARMONICA_HOST_DEVICE void run(int64_t first) const {
    // VEC > 1 only when sample_numel % VEC == 0, so a pack never straddles two samples.
    const int64_t row = first / p.sample_numel;
    const int64_t source = p.index[row] * p.sample_numel + first % p.sample_numel;
    store_pack<VEC>(p.out + first, load_pack<VEC>(p.x + source));
  }
};

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void gather_rows_thread(const ThreadIndex& t, const GatherRowsParams<T>& p) {
  grid_stride_packs<VEC>(t, p.out_numel, GatherRowsOp<T>{p});
}

// ---- gated_merge -----------------------------------------------------------------------------
// slot_of_row[b] = j if sample b was computed (branch_active[j]), -1 if it reuses its cache slot.
template <typename T>
struct GatedMergeParams {
  HiddenLayout layout;
  const T* x;
  const T* gate;
  const T* branch_active;
  const int32_t* slot_of_row;
  T* cache;  // read for reused rows, overwritten for computed rows
  T* out;    // may alias x
};

template <typename T>
struct GatedMergeOp {
  using acc_t = at::opmath_type<T>;
  const GatedMergeParams<T> p;

  template <int VEC>
  HARMONICA_HOST_DEVICE void run(int64_t first) const {
    // VEC > 1 only when N * D % VEC == 0, so the whole pack belongs to one sample and one slot.
    const int64_t sample = p.layout.sample_of(first);
    const int32_t slot = p.slot_of_row[sample];
    Pack<T, VEC> value;
    if (slot >= 0) {
      value = load_pack<VEC>(p.branch_active + slot * p.layout.sample_numel + first % p.layout.sample_numel);
      store_pack<VEC>(p.cache + first, value);
    } else {
      value = load_pack<VEC>(p.cache + first);
    }
    const Pack<T, VEC> x = load_pack<VEC>(p.x + first);
    Pack<T, VEC> out;
    HARMONICA_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const acc_t gate = static_cast<acc_t>(p.gate[p.layout.gate_offset(first + k)]);
      out.value[k] = T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), gate,
                                             static_cast<acc_t>(value.value[k])));
    }
    store_pack<VEC>(p.out + first, out);
  }
};

template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline void gated_merge_thread(const ThreadIndex& t, const GatedMergeParams<T>& p) {
  grid_stride_packs<VEC>(t, p.layout.numel, GatedMergeOp<T>{p});
}

}  // namespace cuda_body
}  // namespace harmonica
