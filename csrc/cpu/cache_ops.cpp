// CPU kernels: one pass over memory per op, at::vec::Vectorized over the channel dimension and
// at::parallel_for over (sample, token) rows. half/bfloat16 are widened to float32 for the math.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cache_ops.h"
#include "../checks.h"
#include "../cuda/launch_plan.h"

// The row loops must compile to straight-line vector code: an outlined load, store or chunk body is a
// call per 16 elements whose vector results travel through memory, which halves their speed.
#if defined(__GNUC__)
#define HARMONICA_ALWAYS_INLINE inline __attribute__((always_inline))
#define HARMONICA_INLINE_LAMBDA __attribute__((always_inline))
#else
#define HARMONICA_ALWAYS_INLINE inline
#define HARMONICA_INLINE_LAMBDA
#endif

namespace harmonica {

// Size of the last-level cache, read once from Linux sysfs (the CPUID-based sysconf value is wrong
// on some VMs, e.g. 320 MB for a 32 MB L3); 32 MiB when unknown. harmonica.cpp exposes it to Python
// as harmonica._C.last_level_cache_bytes, for the tests and benchmarks.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    for (const char* path : {"/sys/devices/system/cpu/cpu0/cache/index3/size",
                             "/sys/devices/system/cpu/cpu0/cache/index2/size"}) {
      if (std::FILE* file = std::fopen(path, "r")) {
        long long kib = 0;
        const bool parsed = std::fscanf(file, "%lldK", &kib) == 1;
        std::fclose(file);
        if (parsed && kib > 0) {
          return static_cast<int64_t>(kib) * 1024;
        }
      }
    }
    return int64_t(32) << 20;
  }();
  return bytes;
}

namespace {

using at::vec::Vectorized;

// A run of up to kWidth elements of scalar_t held as two vectors of the accumulation type, which
// is exactly one Vectorized<scalar_t> for half/bfloat16.
template <typename scalar_t>
struct AccPair {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = 2 * Vec::size();

  Vec lo;
  Vec hi;

  // Called with count == kWidth from the main loop of for_each_chunk, where the partial-load
  // branches fold away once inlined.
  HARMONICA_ALWAYS_INLINE static AccPair load(const scalar_t* data, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (count == kWidth) {
        return {Vec::loadu(data), Vec::loadu(data + Vec::size())};
      }
      const int64_t lo_count = std::min<int64_t>(count, Vec::size());
      const Vec hi = count > Vec::size() ? Vec::loadu(data + Vec::size(), count - Vec::size()) : Vec(acc_t(0));
      return {Vec::loadu(data, lo_count), hi};
    } else {
      static_assert(Vectorized<scalar_t>::size() == kWidth, "reduced type must widen into two vectors");
      const Vectorized<scalar_t> packed =
          count == kWidth ? Vectorized<scalar_t>::loadu(data) : Vectorized<scalar_t>::loadu(data, count);
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(packed);
      return {lo, hi};
    }
  }

  HARMONICA_ALWAYS_INLINE void store(scalar_t* data, int64_t count) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (count == kWidth) {
        lo.store(data);
        hi.store(data + Vec::size());
        return;
      }
      lo.store(data, static_cast<int>(std::min<int64_t>(count, Vec::size())));
      if (count > Vec::size()) {
        hi.store(data + Vec::size(), static_cast<int>(count - Vec::size()));
      }
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(data, static_cast<int>(count));
    }
  }

  // Whether full chunks are worth streaming: a float32/float64 chunk fills a whole 64-byte line with
  // two back-to-back vector stores. A half/bfloat16 chunk is half a line, the two halves written by
  // separate loop iterations, and streaming them measured slower than normal stores (bfloat16 blend,
  // DiT-XL/2 B=16: 1.25 ms vs 1.02 ms), so reduced types are never streamed.
  static constexpr bool kStreamable = std::is_same_v<scalar_t, acc_t> && (kWidth * sizeof(scalar_t)) % 64 == 0;

  // A full chunk to a 32-byte aligned address with non-temporal stores (see stream_output).
  HARMONICA_ALWAYS_INLINE void stream(scalar_t* data) const {
    static_assert(kStreamable, "only whole-line chunks are streamed");
#if defined(__AVX2__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(data, lo);
      _mm256_stream_ps(data + Vec::size(), hi);
    } else {
      _mm256_stream_pd(data, lo);
      _mm256_stream_pd(data + Vec::size(), hi);
    }
#else
    store(data, kWidth);
#endif
  }
};

// Stores a chunk produced inside for_each_chunk: full chunks of a streamed float32/float64 row go
// around the cache, the partial chunk at the end of a row is a normal store.
template <bool kStream, typename Pair, typename Count>
HARMONICA_ALWAYS_INLINE void store_chunk(const Pair& value, typename Pair::scalar_type* data, Count count) {
  if constexpr (kStream && Pair::kStreamable && !std::is_same_v<Count, int64_t>) {
    value.stream(data);
  } else {
    value.store(data, count);
  }
}

// Calls body(d, count) for the channels [d, d + count) of a row, in chunks of kWidth. Full chunks
// pass count as a compile-time constant, so the loads and stores in their instantiation of the body
// are plain vector moves; only the last chunk of a row whose width is not a multiple of kWidth takes
// the partial path. Bodies are HARMONICA_INLINE_LAMBDA (see HARMONICA_ALWAYS_INLINE).
template <int64_t kWidth, typename Body>
HARMONICA_ALWAYS_INLINE void for_each_chunk(int64_t hidden, const Body& body) {
  int64_t d = 0;
  for (; d + kWidth <= hidden; d += kWidth) {
    body(d, std::integral_constant<int64_t, kWidth>{});
  }
  if (d < hidden) {
    body(d, hidden - d);
  }
}

// The gate in the accumulation type: half/bfloat16 gates are widened once per call (B x D
// elements) instead of once per token, which is a quarter of the conversions of the row loops.
at::Tensor gate_in_acc_type(const at::Tensor& gate_2d) {
  const at::ScalarType acc_type = at::toOpMathType(gate_2d.scalar_type());
  return gate_2d.scalar_type() == acc_type ? gate_2d : gate_2d.to(acc_type);
}

// Copies one cache row, with non-temporal stores when `stream` (see written_around_cache). Callers
// must issue finish_streaming_stores() before the parallel region ends. Source and target never
// overlap: the ops refuse aliasing slots, and a slot refreshed from itself is not copied at all.
void copy_row(void* target, const void* source, int64_t bytes, bool stream) {
  if (!stream) {
    std::memcpy(target, source, bytes);
    return;
  }
  char* out = static_cast<char*>(target);
  const char* in = static_cast<const char*>(source);
#if defined(__AVX2__)
  constexpr int64_t kLine = 32;
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(out) % kLine);
  const int64_t head = std::min<int64_t>(bytes, misalignment == 0 ? 0 : kLine - misalignment);
  std::memmove(out, in, head);
  int64_t done = head;
  for (; done + kLine <= bytes; done += kLine) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + done),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + done)));
  }
  std::memmove(out + done, in + done, bytes - done);
#else
  std::memmove(out, in, bytes);
#endif
}

void finish_streaming_stores() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// Rows per parallel task: enough elements per task that thread hand-off is negligible.
int64_t grain_rows(int64_t hidden) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, hidden));
}

// Whether a tensor the op writes goes around the cache (non-temporal stores): when it is more than a
// quarter of the last-level cache, the rule glibc's memcpy applies to large copies. Written while the
// op reads two or three inputs of the same size, such a tensor is mostly evicted before anything reads
// it again, so caching it only adds a read-for-ownership of every line: a third more DRAM traffic
// (measured: cache_read 1.8x -> 2.3x over eager for a 19 MB output). A smaller cache slot is read
// again a whole forward pass later and may or may not still be cached then, which the op cannot see;
// streaming costs more when it is (a non-temporal store first evicts the cached line: a 2.4 MB
// cache_write_ took 253 us instead of 128 on a slot in cache) than it saves when it is not (128 us
// instead of 200 on a slot cycled through 56), so smaller targets, slots and outputs alike, are
// written through the cache.
bool written_around_cache(const at::Tensor& target) {
  return static_cast<int64_t>(target.nbytes()) > last_level_cache_bytes() / 4;
}

// In-place outputs were just read by the op itself, so they are in cache: never streamed.
bool stream_output(const at::Tensor& x, const at::Tensor& out) {
  return !out.is_same(x) && written_around_cache(out);
}

// fn(std::true_type) or fn(std::false_type): a runtime flag as a compile-time one.
template <typename Fn>
HARMONICA_ALWAYS_INLINE void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Whether full chunks of a written row can be non-temporal vector stores, which need a 32-byte
// aligned row start.
HARMONICA_ALWAYS_INLINE bool row_streams(bool stream, const void* row) {
  return stream && reinterpret_cast<std::uintptr_t>(row) % 32 == 0;
}

// Calls row_fn(std::true_type) for a row of a streamed output whose start is 32-byte aligned,
// row_fn(std::false_type) otherwise.
template <typename RowFn>
HARMONICA_ALWAYS_INLINE void with_row_streaming(bool stream_out, const void* row, const RowFn& row_fn) {
  with_flag(row_streams(stream_out, row), row_fn);
}

// Asks for the cache line 2 KB ahead of `data` into L2. Applied to the operand that usually comes
// from far away (DRAM or a remote L3 slice): the cache slot read by cache_read, blend and the cached
// rows of gated_merge (in cache_write it is the fresh branch output, already cached, where the hint
// costs nothing). The hardware prefetchers restart at every 4 KB page, and a DiT row (1152 channels,
// 4.5 KB in float32) crosses one in most rows. Measured with the slot cycled through 128 MB of slots
// (benchmarks/, cold slot, two runs each): cache_read_ DiT-XL/2 B=2 1.48-1.53x -> 1.64-1.67x over
// eager, bfloat16 B=16 2.2-2.6x -> 4.4-4.8x; hot-slot rows unchanged within noise. Past the end of a
// tensor it is harmless (a prefetch never faults).
HARMONICA_ALWAYS_INLINE void prefetch_ahead(const void* data) {
#if defined(__GNUC__)
  constexpr int64_t kDistanceBytes = 2048;
  __builtin_prefetch(static_cast<const char*>(data) + kDistanceBytes, /*rw=*/0, /*locality=*/2);
#endif
}

// out_row = x_row + gate_row * value_row over one row of `hidden` channels.
template <bool kStream, typename scalar_t>
void gated_residual_row(const scalar_t* x, const at::opmath_type<scalar_t>* gate, const scalar_t* value,
                        scalar_t* out, int64_t hidden) {
  using Pair = AccPair<scalar_t>;
  using GatePair = AccPair<at::opmath_type<scalar_t>>;
  for_each_chunk<Pair::kWidth>(hidden, [&](int64_t d, auto count) HARMONICA_INLINE_LAMBDA {
    const Pair xv = Pair::load(x + d, count);
    const GatePair gv = GatePair::load(gate + d, count);
    prefetch_ahead(value + d);
    const Pair vv = Pair::load(value + d, count);
    store_chunk<kStream>(Pair{gated_residual(xv.lo, gv.lo, vv.lo), gated_residual(xv.hi, gv.hi, vv.hi)}, out + d,
                         count);
  });
}

template <typename scalar_t>
void gated_residual_kernel(const GatedResidualInputs& in, scalar_t* out, scalar_t* cache_out, bool stream_out,
                           bool stream_cache) {
  const HiddenShape s = in.shape;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const at::opmath_type<scalar_t>* gate = gate_acc.const_data_ptr<at::opmath_type<scalar_t>>();
  const scalar_t* value = in.value.const_data_ptr<scalar_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  at::parallel_for(0, s.batch * s.tokens, grain_rows(s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * s.hidden;
      const auto* gate_row = gate + (row / s.tokens) * gate_stride;
      with_row_streaming(stream_out, out + offset, [&](auto stream) {
        gated_residual_row<decltype(stream)::value>(x + offset, gate_row, value + offset, out + offset, s.hidden);
      });
      if (cache_out != nullptr) {
        copy_row(cache_out + offset, value + offset, s.hidden * sizeof(scalar_t), stream_cache);
      }
    }
    finish_streaming_stores();
  });
}

at::Tensor run_gated_residual(const GatedResidualInputs& in, const at::Tensor& out, const at::Tensor* cache_out) {
  if (in.shape.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_residual_cpu", [&] {
    gated_residual_kernel<scalar_t>(in, out.mutable_data_ptr<scalar_t>(),
                                    cache_out == nullptr ? nullptr : cache_out->mutable_data_ptr<scalar_t>(),
                                    stream_output(in.x, out),
                                    cache_out != nullptr && written_around_cache(*cache_out));
  });
  return out;
}

at::Tensor cache_write_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                           const at::Tensor& cache) {
  const GatedResidualInputs in = prepare_cache_write("harmonica.cache_write", x, gate, branch, cache, false);
  return run_gated_residual(in, at::empty(x.sizes(), x.options()), in.write_cache ? &cache : nullptr);
}

void cache_write_inplace_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                                   const at::Tensor& cache) {
  const GatedResidualInputs in = prepare_cache_write("harmonica.cache_write_", x, gate, branch, cache, true);
  run_gated_residual(in, x, in.write_cache ? &cache : nullptr);
}

at::Tensor cache_read_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const GatedResidualInputs in = prepare_cache_read("harmonica.cache_read", x, gate, cache, false);
  return run_gated_residual(in, at::empty(x.sizes(), x.options()), nullptr);
}

void cache_read_inplace_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  const GatedResidualInputs in = prepare_cache_read("harmonica.cache_read_", x, gate, cache, true);
  run_gated_residual(in, x, nullptr);
}

// ---- blend ---------------------------------------------------------------------------------------

// out_row = x_row + gate_row * blend_value(fresh_row, cache_row, w) over one row.
template <bool kStream, typename scalar_t>
void blend_row(const scalar_t* x, const at::opmath_type<scalar_t>* gate, const scalar_t* fresh, const scalar_t* cache,
               const Vectorized<at::opmath_type<scalar_t>>& wv, scalar_t* out, int64_t hidden) {
  using Pair = AccPair<scalar_t>;
  using GatePair = AccPair<at::opmath_type<scalar_t>>;
  for_each_chunk<Pair::kWidth>(hidden, [&](int64_t d, auto count) HARMONICA_INLINE_LAMBDA {
    const Pair xv = Pair::load(x + d, count);
    const GatePair gv = GatePair::load(gate + d, count);
    const Pair fv = Pair::load(fresh + d, count);
    prefetch_ahead(cache + d);
    const Pair cv = Pair::load(cache + d, count);
    store_chunk<kStream>(Pair{gated_residual(xv.lo, gv.lo, blend_value(fv.lo, cv.lo, wv)),
                              gated_residual(xv.hi, gv.hi, blend_value(fv.hi, cv.hi, wv))},
                         out + d, count);
  });
}

template <typename scalar_t>
void blend_kernel(const BlendInputs& in, scalar_t* out, bool stream_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const HiddenShape s = in.shape;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const acc_t* gate = gate_acc.const_data_ptr<acc_t>();
  const scalar_t* fresh = in.fresh.const_data_ptr<scalar_t>();
  const scalar_t* cache = in.cache.const_data_ptr<scalar_t>();
  const acc_t* w = in.w.const_data_ptr<acc_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  at::parallel_for(0, s.batch * s.tokens, grain_rows(s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.tokens;
      const Vectorized<acc_t> wv(w[b * in.w_batch_stride]);
      const acc_t* gate_row = gate + b * gate_stride;
      const int64_t offset = row * s.hidden;
      with_row_streaming(stream_out, out + offset, [&](auto stream) {
        blend_row<decltype(stream)::value>(x + offset, gate_row, fresh + offset, cache + offset, wv, out + offset,
                                           s.hidden);
      });
    }
    finish_streaming_stores();
  });
}

at::Tensor blend_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh, const at::Tensor& cache,
                     const at::Tensor& w) {
  const BlendInputs in = prepare_blend("harmonica.blend", x, gate, fresh, cache, w, KernelSite::kCpu);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (in.shape.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "harmonica_blend_cpu", [&] {
    blend_kernel<scalar_t>(in, out.mutable_data_ptr<scalar_t>(), stream_output(in.x, out));
  });
  return out;
}

// One task per (sample, token chunk); the chunk count is fixed (not tied to the thread count) so
// the summation order, and therefore the result, does not depend on the machine.
constexpr int64_t kBackwardChunks = 16;

template <typename scalar_t>
void blend_backward_kernel(const BlendInputs& in, int64_t tokens_per_chunk, int64_t chunks, scalar_t* grad_fresh,
                           at::opmath_type<scalar_t>* partial_grad_gate, at::opmath_type<scalar_t>* partial_grad_w) {
  using Pair = AccPair<scalar_t>;
  using AccPairT = AccPair<at::opmath_type<scalar_t>>;
  using Vec = typename Pair::Vec;
  using acc_t = typename Pair::acc_t;
  const HiddenShape s = in.shape;
  const scalar_t* grad_out = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const acc_t* gate = gate_acc.const_data_ptr<acc_t>();
  const scalar_t* fresh = in.fresh.const_data_ptr<scalar_t>();
  const scalar_t* cache = in.cache.const_data_ptr<scalar_t>();
  const acc_t* w = in.w.const_data_ptr<acc_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  at::parallel_for(0, s.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t chunk = task % chunks;
      const Vec wv(w[b * in.w_batch_stride]);
      const acc_t* gate_row = gate + b * gate_stride;
      acc_t* grad_gate_row = partial_grad_gate + task * s.hidden;
      std::fill(grad_gate_row, grad_gate_row + s.hidden, acc_t(0));
      Vec grad_w_acc(acc_t(0));
      const int64_t token_end = std::min(s.tokens, (chunk + 1) * tokens_per_chunk);
      for (int64_t token = chunk * tokens_per_chunk; token < token_end; ++token) {
        const int64_t offset = (b * s.tokens + token) * s.hidden;
        for_each_chunk<Pair::kWidth>(s.hidden, [&](int64_t d, auto count) HARMONICA_INLINE_LAMBDA {
          // Partial loads zero the unused lanes, so they add exactly 0 to the sums below.
          const Pair gov = Pair::load(grad_out + offset + d, count);
          const AccPairT gv = AccPairT::load(gate_row + d, count);
          const Pair fv = Pair::load(fresh + offset + d, count);
          const Pair cv = Pair::load(cache + offset + d, count);
          Pair{blend_grad_fresh(gov.lo, gv.lo, wv), blend_grad_fresh(gov.hi, gv.hi, wv)}.store(
              grad_fresh + offset + d, count);
          AccPairT gate_acc = AccPairT::load(grad_gate_row + d, count);
          gate_acc.lo = gate_acc.lo + blend_grad_gate_term(gov.lo, fv.lo, cv.lo, wv);
          gate_acc.hi = gate_acc.hi + blend_grad_gate_term(gov.hi, fv.hi, cv.hi, wv);
          gate_acc.store(grad_gate_row + d, count);
          grad_w_acc = grad_w_acc + blend_grad_w_term(gov.lo, gv.lo, fv.lo, cv.lo) +
                       blend_grad_w_term(gov.hi, gv.hi, fv.hi, cv.hi);
        });
      }
      acc_t lanes[Vec::size()];
      grad_w_acc.store(lanes);
      acc_t grad_w_sum = 0;
      for (int64_t lane = 0; lane < Vec::size(); ++lane) {
        grad_w_sum += lanes[lane];
      }
      partial_grad_w[task] = grad_w_sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                  const at::Tensor& fresh, const at::Tensor& cache,
                                                                  const at::Tensor& w) {
  const BlendInputs in = prepare_blend("harmonica.blend_backward", grad_out, gate, fresh, cache, w, KernelSite::kCpu);
  const HiddenShape s = in.shape;
  const int64_t tokens_per_chunk =
      std::max<int64_t>(1, (s.tokens + kBackwardChunks - 1) / kBackwardChunks);
  const int64_t chunks = s.tokens == 0 ? 1 : (s.tokens + tokens_per_chunk - 1) / tokens_per_chunk;
  at::Tensor grad_fresh = at::empty(fresh.sizes(), fresh.options());
  const auto acc_options = in.w.options();
  at::Tensor partial_grad_gate = at::empty({s.batch, chunks, s.hidden}, acc_options);
  at::Tensor partial_grad_w = at::empty({s.batch, chunks}, acc_options);
  if (s.numel() == 0) {
    partial_grad_gate.zero_();
    partial_grad_w.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "harmonica_blend_backward_cpu",
                                    [&] {
                                      blend_backward_kernel<scalar_t>(
                                          in, tokens_per_chunk, chunks, grad_fresh.mutable_data_ptr<scalar_t>(),
                                          partial_grad_gate.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                          partial_grad_w.mutable_data_ptr<at::opmath_type<scalar_t>>());
                                    });
  }
  auto [grad_gate, grad_w] = launch::finish_blend_backward(partial_grad_gate, partial_grad_w, gate, w);
  return {grad_gate, grad_fresh, grad_w};
}

// ---- per-sample selection --------------------------------------------------------------------

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index) {
  const GatherRowsInputs in = prepare_gather_rows("harmonica.gather_rows", x, index);
  check_rows_in_range_cpu("harmonica.gather_rows", in.index, in.shape.batch);
  const int64_t rows = in.index.numel();
  at::Tensor out = at::empty({rows, in.shape.tokens, in.shape.hidden}, x.options());
  const int64_t row_bytes = in.shape.sample_numel() * static_cast<int64_t>(x.element_size());
  const char* source = static_cast<const char*>(in.x.const_data_ptr());
  char* target = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* row_index = in.index.const_data_ptr<int64_t>();
  // Tasks are 256 KB pieces of a sample, not whole samples, so every thread takes part even when
  // one sample is gathered (a PixArt-1024 sample is 19 MB).
  constexpr int64_t kPieceBytes = 1 << 18;
  const int64_t piece_bytes = std::max<int64_t>(1, std::min(row_bytes, kPieceBytes));
  const int64_t pieces_per_row = row_bytes == 0 ? 0 : (row_bytes + piece_bytes - 1) / piece_bytes;
  at::parallel_for(0, rows * pieces_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task / pieces_per_row;
      const int64_t offset = (task % pieces_per_row) * piece_bytes;
      std::memcpy(target + j * row_bytes + offset, source + row_index[j] * row_bytes + offset,
                  std::min(piece_bytes, row_bytes - offset));
    }
  });
  return out;
}

template <typename scalar_t>
void gated_merge_kernel(const GatedMergeInputs& in, const int32_t* slot_of_row, scalar_t* cache, scalar_t* out,
                        bool stream_out, bool stream_cache) {
  const HiddenShape s = in.shape;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const at::opmath_type<scalar_t>* gate = gate_acc.const_data_ptr<at::opmath_type<scalar_t>>();
  const scalar_t* branch_active = in.branch_active.const_data_ptr<scalar_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  at::parallel_for(0, s.batch * s.tokens, grain_rows(s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.tokens;
      const int64_t offset = row * s.hidden;
      const int32_t slot = slot_of_row[b];
      const scalar_t* value =
          slot >= 0 ? branch_active + (slot * s.tokens + row % s.tokens) * s.hidden : cache + offset;
      with_row_streaming(stream_out, out + offset, [&](auto stream) {
        gated_residual_row<decltype(stream)::value>(x + offset, gate + b * gate_stride, value, out + offset, s.hidden);
      });
      if (slot >= 0) {
        copy_row(cache + offset, value, s.hidden * sizeof(scalar_t), stream_cache);
      }
    }
    finish_streaming_stores();
  });
}

at::Tensor run_gated_merge(const char* op, const GatedMergeInputs& in, const at::Tensor& cache, const at::Tensor& out) {
  const at::Tensor slot_of_row = slot_of_row_cpu(op, in.index, in.shape.batch);
  if (in.shape.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_gated_merge_cpu", [&] {
    gated_merge_kernel<scalar_t>(in, slot_of_row.const_data_ptr<int32_t>(), cache.mutable_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), stream_output(in.x, out),
                                 written_around_cache(cache));
  });
  return out;
}

at::Tensor gated_merge_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                           const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, false);
  return run_gated_merge(op, in, cache, at::empty(x.sizes(), x.options()));
}

void gated_merge_inplace_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch_active,
                                   const at::Tensor& index, const at::Tensor& cache) {
  const char* op = "harmonica.gated_merge_";
  const GatedMergeInputs in = prepare_gated_merge(op, x, gate, branch_active, index, cache, true);
  run_gated_merge(op, in, cache, x);
}

// ---- forecast_read / forecast_update -------------------------------------------------------------

// The factors (coefficients or inverse distances) as vectors of the accumulation type; a float32
// computation rounds them to float32 first, as ATen does with a Python scalar.
template <typename acc_t, int kCount>
std::array<Vectorized<acc_t>, kCount> factor_vectors(const std::vector<double>& factors) {
  std::array<Vectorized<acc_t>, kCount> vectors;
  for (int i = 0; i < kCount; ++i) {
    vectors[i] = Vectorized<acc_t>(static_cast<acc_t>(factors[i]));
  }
  return vectors;
}

// out_row = x_row + gate_row * sum_i coeffs[i] * slot_rows[i] over one row.
template <bool kStream, int kSlots, typename scalar_t>
void forecast_read_row(const scalar_t* x, const at::opmath_type<scalar_t>* gate,
                       const std::array<const scalar_t*, kSlots>& slots,
                       const std::array<Vectorized<at::opmath_type<scalar_t>>, kSlots>& coeffs, scalar_t* out,
                       int64_t hidden) {
  using Pair = AccPair<scalar_t>;
  using GatePair = AccPair<at::opmath_type<scalar_t>>;
  using Vec = typename Pair::Vec;
  for_each_chunk<Pair::kWidth>(hidden, [&](int64_t d, auto count) HARMONICA_INLINE_LAMBDA {
    const Pair xv = Pair::load(x + d, count);
    const GatePair gv = GatePair::load(gate + d, count);
    Pair value{Vec(0), Vec(0)};
    for (int i = 0; i < kSlots; ++i) {
      prefetch_ahead(slots[i] + d);
      const Pair sv = Pair::load(slots[i] + d, count);
      value = Pair{forecast_term(value.lo, coeffs[i], sv.lo), forecast_term(value.hi, coeffs[i], sv.hi)};
    }
    store_chunk<kStream>(Pair{gated_residual(xv.lo, gv.lo, value.lo), gated_residual(xv.hi, gv.hi, value.hi)},
                         out + d, count);
  });
}

template <typename scalar_t, int kSlots>
void forecast_read_kernel(const ForecastInputs& in, scalar_t* out, bool stream_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const HiddenShape s = in.shape;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const acc_t* gate = gate_acc.const_data_ptr<acc_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  std::array<const scalar_t*, kSlots> slots;
  for (int i = 0; i < kSlots; ++i) {
    slots[i] = in.slots[i].const_data_ptr<scalar_t>();
  }
  const auto coeffs = factor_vectors<acc_t, kSlots>(in.factors);
  at::parallel_for(0, s.batch * s.tokens, grain_rows(s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * s.hidden;
      std::array<const scalar_t*, kSlots> slot_rows;
      for (int i = 0; i < kSlots; ++i) {
        slot_rows[i] = slots[i] + offset;
      }
      with_row_streaming(stream_out, out + offset, [&](auto stream) {
        forecast_read_row<decltype(stream)::value, kSlots>(x + offset, gate + (row / s.tokens) * gate_stride,
                                                           slot_rows, coeffs, out + offset, s.hidden);
      });
    }
    finish_streaming_stores();
  });
}

// Calls kernel(scalar_t{}, std::integral_constant<int, slots>{}) for the dtype and table size of the
// inputs (nothing for empty tensors).
template <typename Kernel>
void dispatch_forecast(const ForecastInputs& in, const Kernel& kernel) {
  if (in.shape.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "harmonica_forecast_cpu", [&] {
    launch::with_slot_count(static_cast<int64_t>(in.slots.size()), [&](auto slots) { kernel(scalar_t{}, slots); });
  });
}

void run_forecast_read(const ForecastInputs& in, const at::Tensor& out) {
  dispatch_forecast(in, [&](auto zero, auto slots) {
    using scalar_t = decltype(zero);
    forecast_read_kernel<scalar_t, decltype(slots)::value>(in, out.mutable_data_ptr<scalar_t>(),
                                                           stream_output(in.x, out));
  });
}

// out_row = x_row + gate_row * fresh_row, and the slot rows refreshed: slot 0 takes fresh, slot i the
// divided difference of the new and the old row of slot i - 1, each old row read before it is
// overwritten (chunk by chunk), the chain kept in the accumulation type.
template <bool kStreamOut, bool kStreamSlots, int kSlots, typename scalar_t>
void forecast_update_row(const scalar_t* x, const at::opmath_type<scalar_t>* gate, const scalar_t* fresh,
                         const std::array<scalar_t*, kSlots>& slots,
                         const std::array<Vectorized<at::opmath_type<scalar_t>>, kSlots - 1>& inv, scalar_t* out,
                         int64_t hidden) {
  using Pair = AccPair<scalar_t>;
  using GatePair = AccPair<at::opmath_type<scalar_t>>;
  for_each_chunk<Pair::kWidth>(hidden, [&](int64_t d, auto count) HARMONICA_INLINE_LAMBDA {
    const Pair xv = Pair::load(x + d, count);
    const GatePair gv = GatePair::load(gate + d, count);
    const Pair fv = Pair::load(fresh + d, count);
    store_chunk<kStreamOut>(Pair{gated_residual(xv.lo, gv.lo, fv.lo), gated_residual(xv.hi, gv.hi, fv.hi)}, out + d,
                            count);
    Pair newer = fv;
    for (int i = 0; i + 1 < kSlots; ++i) {
      prefetch_ahead(slots[i] + d);
      const Pair older = Pair::load(slots[i] + d, count);
      store_chunk<kStreamSlots>(newer, slots[i] + d, count);
      newer = Pair{divided_difference(newer.lo, older.lo, inv[i]), divided_difference(newer.hi, older.hi, inv[i])};
    }
    store_chunk<kStreamSlots>(newer, slots[kSlots - 1] + d, count);
  });
}

template <typename scalar_t, int kSlots>
void forecast_update_kernel(const ForecastInputs& in, scalar_t* out, bool stream_out, bool stream_slots) {
  using acc_t = at::opmath_type<scalar_t>;
  const HiddenShape s = in.shape;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const at::Tensor gate_acc = gate_in_acc_type(in.gate);
  const acc_t* gate = gate_acc.const_data_ptr<acc_t>();
  const int64_t gate_stride = gate_acc.stride(0);
  const scalar_t* fresh = in.fresh.const_data_ptr<scalar_t>();
  std::array<scalar_t*, kSlots> slots;
  for (int i = 0; i < kSlots; ++i) {
    slots[i] = in.slots[i].mutable_data_ptr<scalar_t>();
  }
  const auto inv = factor_vectors<acc_t, kSlots - 1>(in.factors);
  at::parallel_for(0, s.batch * s.tokens, grain_rows(s.hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * s.hidden;
      std::array<scalar_t*, kSlots> slot_rows;
      bool slots_stream = stream_slots;
      for (int i = 0; i < kSlots; ++i) {
        slot_rows[i] = slots[i] + offset;
        slots_stream = row_streams(slots_stream, slot_rows[i]);
      }
      with_flag(row_streams(stream_out, out + offset), [&](auto stream_out_row) {
        with_flag(slots_stream, [&](auto stream_slot_rows) {
          forecast_update_row<decltype(stream_out_row)::value, decltype(stream_slot_rows)::value, kSlots>(
              x + offset, gate + (row / s.tokens) * gate_stride, fresh + offset, slot_rows, inv, out + offset,
              s.hidden);
        });
      });
    }
    finish_streaming_stores();
  });
}

void run_forecast_update(const ForecastInputs& in, const at::Tensor& out) {
  dispatch_forecast(in, [&](auto zero, auto slots) {
    using scalar_t = decltype(zero);
    forecast_update_kernel<scalar_t, decltype(slots)::value>(in, out.mutable_data_ptr<scalar_t>(),
                                                             stream_output(in.x, out),
                                                             written_around_cache(in.slots[0]));
  });
}

at::Tensor forecast_read_cpu(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                             at::ArrayRef<double> coeffs) {
  const ForecastInputs in = prepare_forecast_read("harmonica.forecast_read", x, gate, slots, coeffs, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_forecast_read(in, out);
  return out;
}

void forecast_read_inplace_cpu(const at::Tensor& x, const at::Tensor& gate, at::TensorList slots,
                               at::ArrayRef<double> coeffs) {
  run_forecast_read(prepare_forecast_read("harmonica.forecast_read_", x, gate, slots, coeffs, true), x);
}

at::Tensor forecast_update_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                               at::TensorList slots, at::ArrayRef<double> inv) {
  const ForecastInputs in = prepare_forecast_update("harmonica.forecast_update", x, gate, fresh, slots, inv, false);
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_forecast_update(in, out);
  return out;
}

void forecast_update_inplace_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                                 at::TensorList slots, at::ArrayRef<double> inv) {
  run_forecast_update(prepare_forecast_update("harmonica.forecast_update_", x, gate, fresh, slots, inv, true), x);
}

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CPU, m) {
  m.impl("cache_write", &harmonica::cache_write_cpu);
  m.impl("cache_write_", &harmonica::cache_write_inplace_cpu);
  m.impl("cache_read", &harmonica::cache_read_cpu);
  m.impl("cache_read_", &harmonica::cache_read_inplace_cpu);
  m.impl("blend", &harmonica::blend_cpu);
  m.impl("blend_backward", &harmonica::blend_backward_cpu);
  m.impl("gather_rows", &harmonica::gather_rows_cpu);
  m.impl("gated_merge", &harmonica::gated_merge_cpu);
  m.impl("gated_merge_", &harmonica::gated_merge_inplace_cpu);
  m.impl("forecast_read", &harmonica::forecast_read_cpu);
  m.impl("forecast_read_", &harmonica::forecast_read_inplace_cpu);
  m.impl("forecast_update", &harmonica::forecast_update_cpu);
  m.impl("forecast_update_", &harmonica::forecast_update_inplace_cpu);
}
