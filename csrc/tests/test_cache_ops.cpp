// C++ unit tests, built by CMakeLists.txt and run by ctest. They check the CUDA per-thread bodies
// on the host (coverage of every element exactly once for many launch shapes, the arithmetic
// against naive loops) and the registered CPU ops through the dispatcher, including error texts.
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../cuda/thread_bodies.h"

namespace {

int failures = 0;

void expect(bool condition, const std::string& what) {
  if (!condition) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

using harmonica::cuda_body::ThreadIndex;

template <typename Body>
void for_each_thread(int64_t block_dim, int64_t grid_dim, const Body& body) {
  for (int64_t block = 0; block < grid_dim; ++block) {
    for (int64_t thread = 0; thread < block_dim; ++thread) {
      body(ThreadIndex{block, thread, block_dim, grid_dim});
    }
  }
}

// Counts how often each element is visited; every element must be visited exactly once.
struct CountingOp {
  std::vector<int>* visits;
  template <int VEC>
  void run(int64_t first) const {
    for (int k = 0; k < VEC; ++k) {
      ++(*visits)[first + k];
    }
  }
};

template <int VEC>
void test_grid_stride_covers_each_element_once() {
  for (int64_t numel : {0, 1, 3, 7, 8, 9, 255, 256, 257, 1000, 4099}) {
    for (int64_t block_dim : {8, 32, 256}) {
      for (int64_t grid_dim : {1, 2, 5, 64}) {
        std::vector<int> visits(numel, 0);
        for_each_thread(block_dim, grid_dim, [&](const ThreadIndex& t) {
          harmonica::cuda_body::grid_stride_packs<VEC>(t, numel, CountingOp{&visits});
        });
        bool once = true;
        for (int v : visits) {
          once = once && v == 1;
        }
        expect(once, "grid_stride_packs<" + std::to_string(VEC) + "> numel=" + std::to_string(numel) +
                         " block=" + std::to_string(block_dim) + " grid=" + std::to_string(grid_dim));
      }
    }
  }
}

// gated_residual_thread on Half data against a naive float loop, with a batch-strided gate and a
// row length that is not a multiple of the pack width (packs straddle rows and samples).
template <int VEC>
void test_gated_residual_thread_half() {
  const int64_t batch = 3, tokens = 5, hidden = 12, gate_stride = 20;
  const int64_t numel = batch * tokens * hidden;
  alignas(16) c10::Half x[batch * tokens * hidden];
  alignas(16) c10::Half value[batch * tokens * hidden];
  alignas(16) c10::Half out[batch * tokens * hidden];
  alignas(16) c10::Half cache[batch * tokens * hidden];
  c10::Half gate[batch * gate_stride];
  for (int64_t i = 0; i < numel; ++i) {
    x[i] = c10::Half(0.25f * static_cast<float>(i % 17) - 2.0f);
    value[i] = c10::Half(0.125f * static_cast<float>(i % 13) - 0.5f);
    out[i] = c10::Half(NAN);
    cache[i] = c10::Half(NAN);
  }
  for (int64_t i = 0; i < batch * gate_stride; ++i) {
    gate[i] = c10::Half(0.5f * static_cast<float>(i % 7) - 1.0f);
  }
  const harmonica::cuda_body::GatedResidualParams<c10::Half> params{
      {numel, tokens * hidden, hidden, gate_stride}, x, gate, value, out, cache};
  for_each_thread(32, 2, [&](const ThreadIndex& t) {
    harmonica::cuda_body::gated_residual_thread<c10::Half, VEC>(t, params);
  });
  bool correct = true;
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t b = i / (tokens * hidden), d = i % hidden;
    const float expected = static_cast<float>(x[i]) + static_cast<float>(gate[b * gate_stride + d]) *
                                                          static_cast<float>(value[i]);
    correct = correct && static_cast<float>(out[i]) == static_cast<float>(c10::Half(expected));
    correct = correct && static_cast<float>(cache[i]) == static_cast<float>(value[i]);
  }
  expect(correct, "gated_residual_thread<Half, " + std::to_string(VEC) + ">");
}

void test_blend_backward_task_sums() {
  const int64_t batch = 2, tokens = 7, hidden = 8;
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
  std::vector<float> partial_gate(batch * chunks * hidden, NAN), partial_w(batch * chunks * hidden, NAN);
  const harmonica::cuda_body::BlendBackwardParams<float> params{
      batch,           tokens,         hidden,      hidden,       tokens_per_chunk, chunks,
      grad_out.data(), gate.data(),    fresh.data(), cache.data(), w.data(),         1,
      grad_fresh.data(), partial_gate.data(), partial_w.data()};
  for_each_thread(16, 1, [&](const ThreadIndex& t) {
    harmonica::cuda_body::blend_backward_thread<float, 4>(t, params);
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
        got_w += partial_w[(b * chunks + c) * hidden + d];
      }
      correct = correct && std::abs(got_gate - expected_gate) < 1e-4;
    }
    correct = correct && std::abs(got_w - expected_w) < 1e-3;
  }
  expect(correct, "blend_backward_thread<float, 4> partial sums");
}

// ---- the registered CPU ops, through the dispatcher -------------------------------------------

at::Tensor call_cache_read(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& cache) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("harmonica::cache_read", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, gate, cache);
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

void test_error_names_the_argument() {
  const at::Tensor x = at::randn({2, 4, 8});
  std::string message;
  try {
    call_cache_read(x, at::randn({2, 9}), x);
  } catch (const c10::Error& error) {
    message = error.what_without_backtrace();
  }
  expect(message.find("`gate` must broadcast over the tokens of `x`") != std::string::npos &&
             message.find("(B, D) = (2, 8)") != std::string::npos,
         "gate error message, got: " + message);
}

}  // namespace

int main() {
  test_grid_stride_covers_each_element_once<1>();
  test_grid_stride_covers_each_element_once<4>();
  test_grid_stride_covers_each_element_once<8>();
  test_gated_residual_thread_half<1>();
  test_gated_residual_thread_half<8>();
  test_blend_backward_task_sums();
  test_cache_read_op_matches_aten();
  test_error_names_the_argument();
  if (failures == 0) {
    std::cout << "harmonica C++ tests passed\n";
  }
  return failures == 0 ? 0 : 1;
}
