// Per-thread bodies of the CUDA kernels: structs whose static `run(thread, params)` is a
// __host__ __device__ function of the thread's (block, thread, block_dim, grid_dim) coordinates.
// cuda/cache_ops.cu runs each as a __global__ kernel; cpu/simulate_cuda.cpp runs the very same
// function on the CPU for every simulated thread index, both through the one launcher per op in
// launchers.h, so the tests check the GPU indexing (pack width, grid stride, gate broadcast, row
// remapping, launch chunking, the check kernels) on machines without a GPU.
//
// Layout contract (enforced by the launchers): every (B, N, D) tensor is contiguous, the gate is
// (B, D) with unit channel stride and a batch stride that is a multiple of the pack width, D is a
// multiple of the pack width VEC and every pointer is aligned to a whole pack, so a pack of VEC
// elements never straddles a row and every load and store is one VEC * sizeof(T)-byte transaction.
// Index math is 32-bit and done once per pack: a launch covers fewer than 2^31 packs (the launcher
// splits larger tensors by samples).
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include "../cache_ops.h"

// `#pragma unroll` only in nvcc's device pass; g++ (also nvcc's host pass) warns about it.
#if defined(__CUDA_ARCH__)
#define HARMONICA_UNROLL _Pragma("unroll")
#else
#define HARMONICA_UNROLL
#endif

// A failed check of one entry (a `w` value, an index) inside a check kernel. On the GPU it is a
// device-side assert: reading the result on the host would cost a synchronisation. In the CPU
// simulation it raises at once, with the entry's position.
#if defined(__CUDA_ARCH__)
#define HARMONICA_CHECK_ENTRY(condition, message, position) CUDA_KERNEL_ASSERT((condition) && message)
#else
#define HARMONICA_CHECK_ENTRY(condition, message, position) \
  TORCH_CHECK(condition, message, " (entry ", position, "; a device-side assert on the GPU)")
#endif

namespace harmonica {
namespace cuda_body {

struct ThreadIndex {
  uint32_t block;
  uint32_t thread;
  uint32_t block_dim;
  uint32_t grid_dim;

  HARMONICA_HOST_DEVICE uint32_t global() const { return block * block_dim + thread; }
  HARMONICA_HOST_DEVICE uint32_t total() const { return block_dim * grid_dim; }
};

// n / divisor for a divisor fixed at launch, as a multiply-high, an add and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", PLDI 1994, with the shift
// folded for dividends below 2^31). A runtime 32-bit division is a ~20-instruction sequence on the
// GPU and a 64-bit one a subroutine call; per element they made the half-precision ops
// instruction-bound. Exact for n < 2^31 and 1 <= divisor <= 2^31.
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) {
      ++shift;
    }
    // floor(2^(32 + shift) / d) - 2^32 + 1, which fits 32 bits because 2^shift < 2 * d.
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  HARMONICA_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return (high + n) >> shift;
  }
};

// A launch's view of (B, N, D) tensors as packs of VEC = D / per_row.divisor elements.
struct PackLayout {
  uint32_t packs;             // packs in this launch (< 2^31)
  FastDivmod per_row;         // packs per row, D / VEC
  FastDivmod rows_per_sample; // N
  uint32_t per_sample;        // packs per sample, N * D / VEC
};

struct PackPosition {
  uint32_t pack;       // index of the pack in the launch; its first element is pack * VEC
  uint32_t sample;     // b, relative to the launch's first sample
  uint32_t in_sample;  // index of the pack within its sample
  uint32_t column;     // index of the pack within its row: the channels column * VEC ... + VEC - 1
};

HARMONICA_HOST_DEVICE inline PackPosition locate(const PackLayout& layout, uint32_t pack) {
  const uint32_t row = layout.per_row.div(pack);
  const uint32_t sample = layout.rows_per_sample.div(row);
  return PackPosition{pack, sample, pack - sample * layout.per_sample, pack - row * layout.per_row.divisor};
}

// Grid-stride loop over the packs of a launch: body(position) once per pack, whatever the grid.
// pack + total() < 2^32 because packs < 2^31 and a grid has fewer than 2^31 threads.
template <typename Body>
HARMONICA_HOST_DEVICE inline void for_each_pack(const ThreadIndex& t, const PackLayout& layout, const Body& body) {
  for (uint32_t pack = t.global(); pack < layout.packs; pack += t.total()) {
    body(locate(layout, pack));
  }
}

// VEC elements moved as one VEC * sizeof(T)-byte transaction (ld.global.v4 for 16 bytes).
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

// The gate pack of a position: channels column * VEC ... of sample `sample`.
template <int VEC, typename T>
HARMONICA_HOST_DEVICE inline Pack<T, VEC> load_gate(const T* gate, int64_t batch_stride, const PackPosition& at) {
  return load_pack<VEC>(gate + at.sample * batch_stride + static_cast<int64_t>(at.column) * VEC);
}

// out = x + gate * value for one pack, in the accumulation type, rounded once on store.
template <typename T, int VEC>
HARMONICA_HOST_DEVICE inline Pack<T, VEC> gated_residual_pack(const Pack<T, VEC>& x, const Pack<T, VEC>& gate,
                                                              const Pack<T, VEC>& value) {
  using acc_t = at::opmath_type<T>;
  Pack<T, VEC> out;
  HARMONICA_UNROLL
  for (int k = 0; k < VEC; ++k) {
    out.value[k] = T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), static_cast<acc_t>(gate.value[k]),
                                           static_cast<acc_t>(value.value[k])));
  }
  return out;
}

// ---- cache_write / cache_read --------------------------------------------------------------
// out = x + gate * value; with kWriteCache also cache_out <- value in the same pass. `x` and `out`
// are the same tensor for the in-place variants, so neither is __restrict__; the other tensors
// share no memory with any argument (the launcher's overlap checks).
template <typename T>
struct GatedResidualParams {
  PackLayout layout;
  const T* x;
  const T* __restrict__ gate;
  int64_t gate_batch_stride;
  const T* __restrict__ value;
  T* out;
  T* __restrict__ cache_out;
};

template <typename T, int VEC, bool kWriteCache>
struct GatedResidualBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const GatedResidualParams<T>& p) {
    for_each_pack(t, p.layout, [&](const PackPosition& at) {
      const int64_t first = static_cast<int64_t>(at.pack) * VEC;
      const Pack<T, VEC> value = load_pack<VEC>(p.value + first);
      const Pack<T, VEC> out =
          gated_residual_pack(load_pack<VEC>(p.x + first), load_gate<VEC>(p.gate, p.gate_batch_stride, at), value);
      store_pack<VEC>(p.out + first, out);
      if constexpr (kWriteCache) {
        store_pack<VEC>(p.cache_out + first, value);
      }
    });
  }
};

// ---- blend forward ---------------------------------------------------------------------------
// w in the accumulation type: read from w[sample * w_batch_stride] (stride 0 for a 0-dim tensor,
// 1 per sample), or, when w is nullptr, the launch argument w_value (a host scalar).
template <typename T>
struct BlendParams {
  using acc_t = at::opmath_type<T>;
  PackLayout layout;
  const T* __restrict__ x;
  const T* __restrict__ gate;
  int64_t gate_batch_stride;
  const T* __restrict__ fresh;
  const T* __restrict__ cache;
  const acc_t* __restrict__ w;
  int64_t w_batch_stride;
  acc_t w_value;
  T* __restrict__ out;

  HARMONICA_HOST_DEVICE acc_t weight(uint32_t sample) const {
    return w == nullptr ? w_value : w[sample * w_batch_stride];
  }
};

template <typename T, int VEC>
struct BlendBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const BlendParams<T>& p) {
    using acc_t = at::opmath_type<T>;
    for_each_pack(t, p.layout, [&](const PackPosition& at) {
      const int64_t first = static_cast<int64_t>(at.pack) * VEC;
      const Pack<T, VEC> x = load_pack<VEC>(p.x + first);
      const Pack<T, VEC> gate = load_gate<VEC>(p.gate, p.gate_batch_stride, at);
      const Pack<T, VEC> fresh = load_pack<VEC>(p.fresh + first);
      const Pack<T, VEC> cache = load_pack<VEC>(p.cache + first);
      const acc_t w = p.weight(at.sample);
      Pack<T, VEC> out;
      HARMONICA_UNROLL
      for (int k = 0; k < VEC; ++k) {
        const acc_t value =
            blend_value<acc_t>(static_cast<acc_t>(fresh.value[k]), static_cast<acc_t>(cache.value[k]), w);
        out.value[k] = T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), static_cast<acc_t>(gate.value[k]), value));
      }
      store_pack<VEC>(p.out + first, out);
    });
  }
};

// ---- blend backward --------------------------------------------------------------------------
// One task = (sample b, token chunk c, VEC consecutive channels `group`). It writes grad_fresh for
// its elements, the per-chunk partial sums of the gate gradient for its channels and of the w
// gradient over its channels, which the launcher reduces over the chunks with ATen. No atomics,
// so the result is deterministic for a fixed chunking. Consecutive tasks take consecutive channel
// groups, so a warp's loads are coalesced along D. Task indices are 32-bit (launcher).
template <typename T>
struct BlendBackwardParams {
  using acc_t = at::opmath_type<T>;
  uint32_t tasks;
  FastDivmod groups;  // D / VEC
  FastDivmod chunks;  // token chunks per sample
  int64_t tokens;
  int64_t hidden;
  int64_t tokens_per_chunk;
  const T* __restrict__ grad_out;
  const T* __restrict__ gate;
  int64_t gate_batch_stride;
  const T* __restrict__ fresh;
  const T* __restrict__ cache;
  const acc_t* __restrict__ w;  // nullptr: w_value
  int64_t w_batch_stride;
  acc_t w_value;
  T* __restrict__ grad_fresh;
  acc_t* __restrict__ partial_grad_gate;  // (samples, chunks, D)
  acc_t* __restrict__ partial_grad_w;     // (samples, chunks, D / VEC): one entry per task
};

template <typename T, int VEC>
struct BlendBackwardBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const BlendBackwardParams<T>& p) {
    using acc_t = at::opmath_type<T>;
    for (uint32_t task = t.global(); task < p.tasks; task += t.total()) {
      const uint32_t sample_chunk = p.groups.div(task);
      const uint32_t group = task - sample_chunk * p.groups.divisor;
      const uint32_t b = p.chunks.div(sample_chunk);
      const uint32_t chunk = sample_chunk - b * p.chunks.divisor;
      const int64_t channel = static_cast<int64_t>(group) * VEC;

      const acc_t w = p.w == nullptr ? p.w_value : p.w[b * p.w_batch_stride];
      const Pack<T, VEC> gate_pack = load_pack<VEC>(p.gate + b * p.gate_batch_stride + channel);
      acc_t gate[VEC];
      acc_t grad_gate[VEC];
      acc_t grad_w = acc_t(0);
      HARMONICA_UNROLL
      for (int k = 0; k < VEC; ++k) {
        gate[k] = static_cast<acc_t>(gate_pack.value[k]);
        grad_gate[k] = acc_t(0);
      }
      const int64_t token_begin = chunk * p.tokens_per_chunk;
      const int64_t token_end =
          token_begin + p.tokens_per_chunk < p.tokens ? token_begin + p.tokens_per_chunk : p.tokens;
      int64_t offset = (b * p.tokens + token_begin) * p.hidden + channel;
      for (int64_t token = token_begin; token < token_end; ++token, offset += p.hidden) {
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
          grad_w += blend_grad_w_term<acc_t>(g, gate[k], f, c);
        }
        store_pack<VEC>(p.grad_fresh + offset, grad_fresh);
      }
      const int64_t partial_offset = static_cast<int64_t>(sample_chunk) * p.hidden + channel;
      HARMONICA_UNROLL
      for (int k = 0; k < VEC; ++k) {
        p.partial_grad_gate[partial_offset + k] = grad_gate[k];
      }
      p.partial_grad_w[task] = grad_w;
    }
  }
};

// ---- gated_merge -----------------------------------------------------------------------------
// slot_of_row[b] = j if sample b was computed (branch_active[j]), -1 if it reuses its cache slot.
// branch_active is indexed by j, which is global: it is not offset for a launch's first sample.
template <typename T>
struct GatedMergeParams {
  PackLayout layout;
  const T* x;
  const T* __restrict__ gate;
  int64_t gate_batch_stride;
  const T* __restrict__ branch_active;
  const int32_t* __restrict__ slot_of_row;
  T* __restrict__ cache;  // read for reused rows, overwritten for computed rows
  T* out;                 // may be x (in-place variant)
};

template <typename T, int VEC>
struct GatedMergeBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const GatedMergeParams<T>& p) {
    for_each_pack(t, p.layout, [&](const PackPosition& at) {
      const int64_t first = static_cast<int64_t>(at.pack) * VEC;
      const int32_t slot = p.slot_of_row[at.sample];
      Pack<T, VEC> value;
      if (slot >= 0) {
        const int64_t sample_numel = static_cast<int64_t>(p.layout.per_sample) * VEC;
        value = load_pack<VEC>(p.branch_active + slot * sample_numel + static_cast<int64_t>(at.in_sample) * VEC);
        store_pack<VEC>(p.cache + first, value);
      } else {
        value = load_pack<VEC>(p.cache + first);
      }
      store_pack<VEC>(p.out + first,
                      gated_residual_pack(load_pack<VEC>(p.x + first), load_gate<VEC>(p.gate, p.gate_batch_stride, at),
                                          value));
    });
  }
};

// ---- forecast_read / forecast_update ---------------------------------------------------------
// A table of 1 to kMaxForecastSlots slots (a unit's divided differences of orders 0, 1, ...). With
// kSlots > 0 the table size is a compile-time constant: the `i < count` guards fold away and each
// order runs exactly its own loads, arithmetic and stores. The launcher instantiates those for the
// widest pack, the path of aligned tensors; narrower packs (misaligned views) take kSlots = 0, one
// kernel for every size, the size read from `count` and the guards uniform over the launch, which
// keeps the number of kernels nvcc compiles down (every size at every width: 130 kernels, +35% compile
// time of cache_ops.cu). Either way every load of a pack is issued before its first use. Parameters
// hold kMaxForecastSlots entries (unused: nullptr / 0). Slots share no memory with any argument or with
// each other (the launcher's overlap checks). Slot is `const T` for forecast_read, T for forecast_update.
template <typename T, typename Slot>
struct ForecastParams {
  using acc_t = at::opmath_type<T>;
  PackLayout layout;
  const T* x;
  const T* __restrict__ gate;
  int64_t gate_batch_stride;
  const T* __restrict__ fresh;  // forecast_update only
  Slot* __restrict__ slots[kMaxForecastSlots];
  acc_t factors[kMaxForecastSlots];  // forecast_read: count coeffs; forecast_update: count - 1 inv
  int count;                         // slots in the table
  T* out;                            // may be x (in-place variants)
};

template <int kSlots, typename Params>
HARMONICA_HOST_DEVICE inline int table_size(const Params& p) {
  return kSlots > 0 ? kSlots : p.count;
}

// out = x + gate * sum_i coeffs[i] * slots[i], the sum in the accumulation type, rounded once on store.
template <typename T, int VEC, int kSlots>
struct ForecastReadBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const ForecastParams<T, const T>& p) {
    using acc_t = at::opmath_type<T>;
    const int count = table_size<kSlots>(p);
    for_each_pack(t, p.layout, [&](const PackPosition& at) {
      const int64_t first = static_cast<int64_t>(at.pack) * VEC;
      Pack<T, VEC> slots[kMaxForecastSlots] = {};  // zeros where i >= count: never read, but defined
      HARMONICA_UNROLL
      for (int i = 0; i < kMaxForecastSlots; ++i) {
        if (i < count) {
          slots[i] = load_pack<VEC>(p.slots[i] + first);
        }
      }
      const Pack<T, VEC> x = load_pack<VEC>(p.x + first);
      const Pack<T, VEC> gate = load_gate<VEC>(p.gate, p.gate_batch_stride, at);
      Pack<T, VEC> out;
      HARMONICA_UNROLL
      for (int k = 0; k < VEC; ++k) {
        acc_t value = acc_t(0);
        HARMONICA_UNROLL
        for (int i = 0; i < kMaxForecastSlots; ++i) {
          if (i < count) {
            value = forecast_term<acc_t>(value, p.factors[i], static_cast<acc_t>(slots[i].value[k]));
          }
        }
        out.value[k] =
            T(gated_residual<acc_t>(static_cast<acc_t>(x.value[k]), static_cast<acc_t>(gate.value[k]), value));
      }
      store_pack<VEC>(p.out + first, out);
    });
  }
};

// out = x + gate * fresh; slot 0 <- fresh, slot i <- (new_{i-1} - old_{i-1}) * inv[i-1]. A thread reads
// its packs of the old differences before it writes any slot; the chain of differences stays in the
// accumulation type and each slot is rounded once, on store (slot 0 takes fresh bit for bit).
template <typename T, int VEC, int kSlots>
struct ForecastUpdateBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const ForecastParams<T, T>& p) {
    using acc_t = at::opmath_type<T>;
    const int count = table_size<kSlots>(p);
    for_each_pack(t, p.layout, [&](const PackPosition& at) {
      const int64_t first = static_cast<int64_t>(at.pack) * VEC;
      Pack<T, VEC> older[kMaxForecastSlots - 1] = {};
      HARMONICA_UNROLL
      for (int i = 0; i + 1 < kMaxForecastSlots; ++i) {
        if (i + 1 < count) {
          older[i] = load_pack<VEC>(p.slots[i] + first);
        }
      }
      const Pack<T, VEC> fresh = load_pack<VEC>(p.fresh + first);
      store_pack<VEC>(p.out + first, gated_residual_pack(load_pack<VEC>(p.x + first),
                                                         load_gate<VEC>(p.gate, p.gate_batch_stride, at), fresh));
      acc_t newer[VEC];
      HARMONICA_UNROLL
      for (int k = 0; k < VEC; ++k) {
        newer[k] = static_cast<acc_t>(fresh.value[k]);
      }
      Pack<T, VEC> pending = fresh;
      HARMONICA_UNROLL
      for (int i = 0; i < kMaxForecastSlots; ++i) {
        if (i < count) {
          store_pack<VEC>(p.slots[i] + first, pending);
        }
        if (i + 1 < count) {
          HARMONICA_UNROLL
          for (int k = 0; k < VEC; ++k) {
            newer[k] = divided_difference<acc_t>(newer[k], static_cast<acc_t>(older[i].value[k]), p.factors[i]);
            pending.value[k] = T(newer[k]);
          }
        }
      }
    });
  }
};

// ---- check kernels ---------------------------------------------------------------------------
// Validation of values that live in device memory, which the host cannot read without a
// synchronisation. Grid-stride loops, so every entry is checked whatever the launch's grid.

template <typename acc_t>
struct UnitIntervalParams {
  const acc_t* w;
  int64_t count;
};

template <typename acc_t>
struct UnitIntervalBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const UnitIntervalParams<acc_t>& p) {
    for (int64_t i = t.global(); i < p.count; i += t.total()) {
      // Written so that NaN fails too.
      HARMONICA_CHECK_ENTRY(p.w[i] >= acc_t(0) && p.w[i] <= acc_t(1), "harmonica.blend: `w` must lie in [0, 1]", i);
    }
  }
};

// The single-thread stand-in for atomicCAS(address, -1, value) in the CPU simulation, which runs
// one simulated thread at a time.
HARMONICA_HOST_DEVICE inline int32_t claim_slot(int32_t* address, int32_t value) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(address, -1, value);
#else
  const int32_t previous = *address;
  if (previous == -1) {
    *address = value;
  }
  return previous;
#endif
}

// slot_of_row[index[j]] = j for every j, slot_of_row starting at -1; an out-of-range or repeated
// index fails the check. An out-of-range entry is never written, so even with device asserts
// compiled out the merge kernel reads nothing out of bounds.
struct SlotOfRowParams {
  const int64_t* index;
  int64_t count;
  int64_t batch;
  int32_t* slot_of_row;
};

struct SlotOfRowBody {
  HARMONICA_HOST_DEVICE static void run(const ThreadIndex& t, const SlotOfRowParams& p) {
    for (int64_t j = t.global(); j < p.count; j += t.total()) {
      const int64_t row = p.index[j];
      const bool in_range = row >= 0 && row < p.batch;
      HARMONICA_CHECK_ENTRY(in_range, "harmonica.gated_merge: `index` out of range for the batch of `x`", j);
      if (in_range) {
        const int32_t previous = claim_slot(p.slot_of_row + row, static_cast<int32_t>(j));
        HARMONICA_CHECK_ENTRY(previous == -1, "harmonica.gated_merge: `index` lists a sample twice", j);
      }
    }
  }
};

}  // namespace cuda_body
}  // namespace harmonica
