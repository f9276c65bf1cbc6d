// C++ unit tests, built by CMakeLists.txt and run by ctest (`make ctest`, part of CI). They check the
// index math and the CUDA per-thread bodies on the host (fast division against the hardware's, every
// pack visited exactly once for many launch shapes, the arithmetic against naive loops) and the
// registered CPU ops through the dispatcher, including error texts.
#include <cmath>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../cuda/launch_plan.h"
#include "../cuda/thread_bodies.h"

namespace {

int failures = 0;

void expect(bool condition, const std::string& what) {
  if (!condition) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

using harmonica::cuda_body::FastDivmod;
using harmonica::cuda_body::PackLayout;
using harmonica::cuda_body::PackPosition;
using harmonica::cuda_body::ThreadIndex;

template <typename Body>
void for_each_thread(uint32_t block_dim, uint32_t grid_dim, const Body& body) {
  for (uint32_t block = 0; block < grid_dim; ++block) {
    for (uint32_t thread = 0; thread < block_dim; ++thread) {
      body(ThreadIndex{block, thread, block_dim, grid_dim});
    }
  }
}

void test_fast_division_matches_the_hardware() {
  std::mt19937 random(7);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 3000; ++d) {
    divisors.push_back(d);
  }
  for (uint32_t d : {4095u, 4096u, 4097u, 65535u, 65536u, 1000003u, (1u << 30) - 1, 1u << 30, (1u << 31) - 1, 1u << 31}) {
    divisors.push_back(d);
  }
  bool exact = true;
  for (uint32_t d : divisors) {
    const FastDivmod fast(d);
    std::vector<uint32_t> dividends = {0, 1, d - 1, d, d + 1, (1u << 31) - 1, (1u << 31) - 2};
    for (int i = 0; i < 64; ++i) {
      dividends.push_back(random() & 0x7fffffffu);
      dividends.push_back(static_cast<uint32_t>(random() % (4u * d + 1)));
    }
    for (uint32_t n : dividends) {
      if (n < (1u << 31) && fast.div(n) != n / d) {
        exact = false;
        std::cerr << "  " << n << " / " << d << ": " << fast.div(n) << " != " << n / d << "\n";
      }
    }
  }
  expect(exact, "FastDivmod::div == n / d for n < 2^31");
}

// Every pack of a launch is visited exactly once, with the position naive division gives, for any
// grid (grid-stride loop) and layout.
void test_every_pack_is_visited_once_where_it_lies() {
  struct Case {
    uint32_t samples, tokens, per_row;
  };
  for (const Case c : {Case{1, 1, 1}, Case{3, 5, 1}, Case{7, 3, 4}, Case{2, 16, 144}, Case{5, 1, 9}}) {
    const uint32_t per_sample = c.tokens * c.per_row;
    const PackLayout layout{c.samples * per_sample, FastDivmod(c.per_row), FastDivmod(c.tokens), per_sample};
    for (uint32_t block_dim : {1u, 32u, 256u}) {
      for (uint32_t grid_dim : {1u, 3u, 64u}) {
        std::vector<int> visits(layout.packs, 0);
        bool placed = true;
        for_each_thread(block_dim, grid_dim, [&](const ThreadIndex& t) {
          harmonica::cuda_body::for_each_pack(t, layout, [&](const PackPosition& at) {
            ++visits[at.pack];
            placed = placed && at.sample == at.pack / per_sample && at.in_sample == at.pack % per_sample &&
                     at.column == at.pack % c.per_row;
          });
        });
        bool once = true;
        for (int v : visits) {
          once = once && v == 1;
        }
        expect(once && placed, "for_each_pack samples=" + std::to_string(c.samples) + " tokens=" +
                                   std::to_string(c.tokens) + " per_row=" + std::to_string(c.per_row) +
                                   " block=" + std::to_string(block_dim) + " grid=" + std::to_string(grid_dim));
      }
    }
  }
}

// GatedResidualBody on Half data against a naive float loop, with a batch-strided gate.
template <int VEC>
void test_gated_residual_body_half() {
  constexpr int64_t batch = 3, tokens = 5, hidden = 16, gate_stride = 24;
  constexpr int64_t numel = batch * tokens * hidden;
  alignas(16) c10::Half x[numel];
  alignas(16) c10::Half value[numel];
  alignas(16) c10::Half out[numel];
  alignas(16) c10::Half cache[numel];
  alignas(16) c10::Half gate[batch * gate_stride];
  for (int64_t i = 0; i < numel; ++i) {
    x[i] = c10::Half(0.25f * static_cast<float>(i % 17) - 2.0f);
    value[i] = c10::Half(0.125f * static_cast<float>(i % 13) - 0.5f);
    out[i] = c10::Half(NAN);
    cache[i] = c10::Half(NAN);
  }
  for (int64_t i = 0; i < batch * gate_stride; ++i) {
    gate[i] = c10::Half(0.5f * static_cast<float>(i % 7) - 1.0f);
  }
  const uint32_t per_row = hidden / VEC;
  const PackLayout layout{static_cast<uint32_t>(numel / VEC), FastDivmod(per_row), FastDivmod(tokens),
                          static_cast<uint32_t>(tokens * per_row)};
  const harmonica::cuda_body::GatedResidualParams<c10::Half> params{layout, x, gate, gate_stride, value, out, cache};
  for_each_thread(32, 2, [&](const ThreadIndex& t) {
    harmonica::cuda_body::GatedResidualBody<c10::Half, VEC, true>::run(t, params);
  });
  bool correct = true;
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t b = i / (tokens * hidden), d = i % hidden;
    const float expected = static_cast<float>(x[i]) + static_cast<float>(gate[b * gate_stride + d]) *
                                                          static_cast<float>(value[i]);
    correct = correct && static_cast<float>(out[i]) == static_cast<float>(c10::Half(expected));
    correct = correct && static_cast<float>(cache[i]) == static_cast<float>(value[i]);
  }
  expect(correct, "GatedResidualBody<Half, " + std::to_string(VEC) + ", write>");
}

// ForecastReadBody and ForecastUpdateBody on Half data against naive float loops, for a table of
// kSlots slots: the sum and the chain of differences in float, each result rounded once. kBodySlots is
// the bodies' template argument: kSlots (size known at compile time) or 0 (size read from the params).
template <int VEC, int kSlots, int kBodySlots>
void test_forecast_bodies_half() {
  constexpr int64_t batch = 2, tokens = 3, hidden = 16, gate_stride = 24;
  constexpr int64_t numel = batch * tokens * hidden;
  const float coeffs[harmonica::kMaxForecastSlots] = {1.0f, -2.5f, 6.0f, -0.75f, 12.0f};
  const float inv[harmonica::kMaxForecastSlots] = {0.5f, -0.25f, 2.0f, -4.0f, 0.0f};
  alignas(16) c10::Half x[numel];
  alignas(16) c10::Half fresh[numel];
  alignas(16) c10::Half out[numel];
  alignas(16) c10::Half gate[batch * gate_stride];
  alignas(16) c10::Half slots[kSlots][numel];
  alignas(16) c10::Half old_slots[kSlots][numel];
  for (int64_t i = 0; i < numel; ++i) {
    x[i] = c10::Half(0.25f * static_cast<float>(i % 17) - 2.0f);
    fresh[i] = c10::Half(0.125f * static_cast<float>(i % 13) - 0.5f);
    for (int s = 0; s < kSlots; ++s) {
      slots[s][i] = old_slots[s][i] = c10::Half(0.0625f * static_cast<float>((i + 5 * s) % 11) - 0.25f);
    }
  }
  for (int64_t i = 0; i < batch * gate_stride; ++i) {
    gate[i] = c10::Half(0.5f * static_cast<float>(i % 7) - 1.0f);
  }
  const uint32_t per_row = hidden / VEC;
  const PackLayout layout{static_cast<uint32_t>(numel / VEC), FastDivmod(per_row), FastDivmod(tokens),
                          static_cast<uint32_t>(tokens * per_row)};
  harmonica::cuda_body::ForecastParams<c10::Half, const c10::Half> read{};
  harmonica::cuda_body::ForecastParams<c10::Half, c10::Half> update{};
  read.layout = update.layout = layout;
  read.x = update.x = x;
  read.gate = update.gate = gate;
  read.gate_batch_stride = update.gate_batch_stride = gate_stride;
  update.fresh = fresh;
  for (int s = 0; s < kSlots; ++s) {
    read.slots[s] = old_slots[s];
    update.slots[s] = slots[s];
    read.factors[s] = coeffs[s];
    update.factors[s] = inv[s];
  }
  read.count = update.count = kSlots;
  read.out = update.out = out;
  bool correct = true;
  for_each_thread(32, 2, [&](const ThreadIndex& t) {
    harmonica::cuda_body::ForecastReadBody<c10::Half, VEC, kBodySlots>::run(t, read);
  });
  for (int64_t i = 0; i < numel; ++i) {
    float value = 0;
    for (int s = 0; s < kSlots; ++s) {
      value += coeffs[s] * static_cast<float>(old_slots[s][i]);
    }
    const float g = static_cast<float>(gate[(i / (tokens * hidden)) * gate_stride + i % hidden]);
    // The float results may differ in their last bit (fused multiply-adds), which moves the one
    // rounding to half by at most one half ulp (2^-10 relative).
    const float expected = static_cast<float>(x[i]) + g * value;
    correct = correct && std::abs(static_cast<float>(out[i]) - expected) <= std::ldexp(1.0f, -10) * std::abs(expected);
  }
  const std::string args = std::to_string(VEC) + ", " + std::to_string(kBodySlots) + "> with " +
                           std::to_string(kSlots) + " slots";
  expect(correct, "ForecastReadBody<Half, " + args);
  for_each_thread(32, 2, [&](const ThreadIndex& t) {
    harmonica::cuda_body::ForecastUpdateBody<c10::Half, VEC, kBodySlots>::run(t, update);
  });
  correct = true;
  for (int64_t i = 0; i < numel; ++i) {
    const float g = static_cast<float>(gate[(i / (tokens * hidden)) * gate_stride + i % hidden]);
    correct = correct && static_cast<float>(out[i]) ==
                             static_cast<float>(c10::Half(static_cast<float>(x[i]) + g * static_cast<float>(fresh[i])));
    float newer = static_cast<float>(fresh[i]);
    correct = correct && static_cast<float>(slots[0][i]) == newer;
    for (int s = 1; s < kSlots; ++s) {
      newer = (newer - static_cast<float>(old_slots[s - 1][i])) * inv[s - 1];  // the chain stays in float
      correct = correct && static_cast<float>(slots[s][i]) == static_cast<float>(c10::Half(newer));
    }
  }
  expect(correct, "ForecastUpdateBody<Half, " + args);
}

void test_blend_backward_body_sums() {
  const int64_t batch = 2, tokens = 7, hidden = 8;
  constexpr int VEC = 4;
  const int64_t numel = batch * tokens * hidden;
  std::vector<float> grad_out(numel), fresh(numel), cache(numel), grad_fresh(numel);
  std::vector<float> gate(batch * hidden), w = {0.25f, 0.75f};
  for (int64_t i = 0; i < numel; ++i) {
    grad_out[i] = static_cast<float>(i % 5) - 2.0f;
    fresh[i] = static_cast<float>(i % 3);
    cache[i] = static_cast<float>(i % 4) * 0.5f;
  }
  for (int64_t i = 0; i < batch * hidden; ++i) {
    gate[i] = static_cast<float>(i % 6) * 0.25f - 0.5f;
  }
  const int64_t tokens_per_chunk = 3, chunks = 3;  // the last chunk is short (7 = 3 + 3 + 1)
  const int64_t groups = hidden / VEC;
  std::vector<float> partial_gate(batch * chunks * hidden, NAN), partial_w(batch * chunks * groups, NAN);
  const harmonica::cuda_body::BlendBackwardParams<float> params{
      static_cast<uint32_t>(batch * chunks * groups),
      FastDivmod(static_cast<uint32_t>(groups)),
      FastDivmod(static_cast<uint32_t>(chunks)),
      tokens,
      hidden,
      tokens_per_chunk,
      grad_out.data(),
      gate.data(),
      hidden,
      fresh.data(),
      cache.data(),
      w.data(),
      1,
      0.0f,
      grad_fresh.data(),
      partial_gate.data(),
      partial_w.data()};
  for_each_thread(16, 1, [&](const ThreadIndex& t) {
    harmonica::cuda_body::BlendBackwardBody<float, VEC>::run(t, params);
  });
  bool correct = true;
  for (int64_t b = 0; b < batch; ++b) {
    double expected_w = 0, got_w = 0;
    for (int64_t d = 0; d < hidden; ++d) {
      double expected_gate = 0, got_gate = 0;
      for (int64_t n = 0; n < tokens; ++n) {
        const int64_t i = (b * tokens + n) * hidden + d;
        const double g = gate[b * hidden + d];
        expected_gate += grad_out[i] * (w[b] * fresh[i] + (1 - w[b]) * cache[i]);
        expected_w += grad_out[i] * g * (fresh[i] - cache[i]);
        correct = correct && std::abs(grad_fresh[i] - grad_out[i] * g * w[b]) < 1e-6;
      }
      for (int64_t c = 0; c < chunks; ++c) {
        got_gate += partial_gate[(b * chunks + c) * hidden + d];
      }
      correct = correct && std::abs(got_gate - expected_gate) < 1e-4;
    }
    for (int64_t k = 0; k < chunks * groups; ++k) {
      got_w += partial_w[b * chunks * groups + k];
    }
    correct = correct && std::abs(got_w - expected_w) < 1e-3;
  }
  expect(correct, "BlendBackwardBody<float, 4> partial sums");
}

void test_widest_pack_follows_alignment_and_rows() {
  alignas(16) static float data[64];
  using harmonica::launch::widest_pack;
  expect(widest_pack<float>(64, {data}, {64}) == 4, "aligned float32: 16-byte packs");
  expect(widest_pack<float>(64, {data + 2}, {64}) == 2, "8-byte aligned float32: 2-element packs");
  expect(widest_pack<float>(64, {data + 1}, {64}) == 1, "4-byte aligned float32: single elements");
  expect(widest_pack<float>(6, {data}, {6}) == 2, "rows of 6 float32: 2-element packs");
  expect(widest_pack<float>(64, {data}, {6}) == 2, "gate batch stride 6: 2-element packs");
  expect(widest_pack<c10::Half>(64, {reinterpret_cast<c10::Half*>(data + 2)}, {64}) == 4,
         "8-byte aligned half: 4-element packs");
}

// ---- the registered CPU ops, through the dispatcher -------------------------------------------

at::Tensor call_cache_read(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("harmonica::cache_read", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, gate, cache);
}

void call_cache_write_inplace(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& branch,
                              const at::Tensor& cache) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("harmonica::cache_write_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(x, gate, branch, cache);
}

void test_cache_read_op_matches_aten() {
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    const at::Tensor x = at::randn({3, 7, 13}).to(dtype);
    const at::Tensor cache = at::randn({3, 7, 13}).to(dtype);
    const at::Tensor gate = at::randn({3, 13}).to(dtype);
    const at::Tensor expected =
        (x.to(at::kDouble) + gate.to(at::kDouble).unsqueeze(1) * cache.to(at::kDouble)).to(dtype);
    const double tolerance = dtype == at::kBFloat16 ? 1e-2 : 1e-6;
    expect(at::allclose(call_cache_read(x, gate, cache), expected, tolerance, tolerance),
           std::string("cache_read op vs ATen for ") + c10::toString(dtype));
  }
}

template <typename Call>
std::string error_of(const Call& call) {
  try {
    call();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  }
  return "";
}

void test_errors_name_the_argument() {
  const at::Tensor x = at::randn({2, 4, 8});
  const std::string gate_message = error_of([&] { call_cache_read(x, at::randn({2, 9}), x); });
  expect(gate_message.find("`gate` must broadcast over the tokens of `x`") != std::string::npos &&
             gate_message.find("(B, D) = (2, 8)") != std::string::npos,
         "gate error message, got: " + gate_message);
  const at::Tensor slot = at::randn({2, 4, 8});
  const std::string overlap_message = error_of([&] { call_cache_write_inplace(slot, at::randn({2, 8}), x, slot); });
  expect(overlap_message.find("`cache` is written by this op and shares memory with `x`") != std::string::npos,
         "overlap error message, got: " + overlap_message);
  static const auto forecast_update =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("harmonica::forecast_update", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                            at::ArrayRef<double>)>();
  const at::Tensor other = at::randn({2, 4, 8});
  const std::string slots_message =
      error_of([&] { forecast_update.call(x, at::randn({2, 8}), other, {slot, at::randn({2, 4, 8}), slot}, {0.5, 2.0}); });
  expect(slots_message.find("`slots[0]` is written by this op and shares memory with `slots[2]`") != std::string::npos,
         "slot overlap error message, got: " + slots_message);
}

}  // namespace

int main() {
  test_fast_division_matches_the_hardware();
  test_every_pack_is_visited_once_where_it_lies();
  test_gated_residual_body_half<1>();
  test_gated_residual_body_half<4>();
  test_gated_residual_body_half<8>();
  test_forecast_bodies_half<1, 1, 0>();
  test_forecast_bodies_half<4, 3, 0>();
  test_forecast_bodies_half<4, 5, 0>();
  test_forecast_bodies_half<8, 1, 1>();
  test_forecast_bodies_half<8, 2, 2>();
  test_forecast_bodies_half<8, 5, 5>();
  test_blend_backward_body_sums();
  test_widest_pack_follows_alignment_and_rows();
  test_cache_read_op_matches_aten();
  test_errors_name_the_argument();
  if (failures == 0) {
    std::cout << "harmonica C++ tests passed\n";
  }
  return failures == 0 ? 0 : 1;
}
