// Per-element arithmetic of the cache ops, shared by the CPU kernels, the CUDA kernels and the
// CPU simulation of the CUDA threads, so the arithmetic the GPU runs is the one the CPU tests check.
//
// Every function is a template over the accumulation type F: `float`/`double` on the GPU and in the
// simulated threads, `at::vec::Vectorized<float>` in the CPU kernels. Inputs are always converted
// to F (float32 for half/bfloat16) before any arithmetic, so half precision only rounds on store.
#pragma once

#if defined(__CUDACC__)
#define HARMONICA_HOST_DEVICE __host__ __device__
#else
#define HARMONICA_HOST_DEVICE
#endif

namespace harmonica {

// x + gate * value: the adaLN-Zero gated residual add. `value` is the fresh branch output or the
// cached one; the gate is recomputed every step, which is why the cache stores the pre-gate value.
template <typename F>
HARMONICA_HOST_DEVICE inline F gated_residual(const F& x, const F& gate, const F& value) {
  return x + gate * value;
}

// The soft branch output used while training the router: w * fresh + (1 - w) * cache.
// Written as two products (not cache + w * (fresh - cache)) so w == 1 returns `fresh` exactly and
// w == 0 returns `cache` exactly, which is what the reference and the inference path assume.
template <typename F>
HARMONICA_HOST_DEVICE inline F blend_value(const F& fresh, const F& cache, const F& w) {
  return w * fresh + (F(1) - w) * cache;
}

// Gradients of out = x + gate * blend_value(fresh, cache, w) for one element. d out / d x == 1, so
// grad_x is grad_out itself and never needs a kernel.
template <typename F>
HARMONICA_HOST_DEVICE inline F blend_grad_fresh(const F& grad_out, const F& gate, const F& w) {
  return grad_out * gate * w;
}

// One token's contribution to d loss / d gate[b, d] (summed over the tokens by the caller).
template <typename F>
HARMONICA_HOST_DEVICE inline F blend_grad_gate_term(const F& grad_out, const F& fresh, const F& cache, const F& w) {
  return grad_out * blend_value(fresh, cache, w);
}

// One element's contribution to d loss / d w[b] (summed over tokens and channels by the caller).
template <typename F>
HARMONICA_HOST_DEVICE inline F blend_grad_w_term(const F& grad_out, const F& gate, const F& fresh, const F& cache) {
  return grad_out * gate * (fresh - cache);
}

// ---- forecasting (harmonica/cache/forecast.py has the formula) ----------------------------------
// A skipped branch served by a forecast reads the unit's Newton divided differences D_0..D_m (its
// slots) and serves sum_i coeff_i * D_i; a compute refreshes them: D_0 = fresh, then order by order
// D_i = (D_{i-1}^new - D_{i-1}^old) * inv_{i-1}. The running sum and the chain of differences stay in
// F between terms and orders, so a half-precision slot is rounded once, on store.

// The most slots one forecast op reads or writes: orders 0..4 (harmonica.schedule.MAX_ORDER + 1).
constexpr int kMaxForecastSlots = 5;

// sum + coeff * difference: one Newton term added to the forecast (the first term is 0 + ...).
template <typename F>
HARMONICA_HOST_DEVICE inline F forecast_term(const F& sum, const F& coeff, const F& difference) {
  return sum + coeff * difference;
}

// The divided difference of the next order from the new and the old one of this order.
template <typename F>
HARMONICA_HOST_DEVICE inline F divided_difference(const F& newer, const F& older, const F& inv_distance) {
  return (newer - older) * inv_distance;
}

}  // namespace harmonica
