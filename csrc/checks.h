// Input validation and normalisation shared by the CPU kernels, the CUDA kernels and the simulated
// CUDA threads. Every failure is a TORCH_CHECK naming the op, the argument, the expected and the
// received value, and the fix. Everything here runs on the host and reads no device memory, so none
// of it synchronises with a GPU.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace harmonica {

struct HiddenShape {
  int64_t batch;
  int64_t tokens;
  int64_t hidden;

  int64_t sample_numel() const { return tokens * hidden; }
  int64_t numel() const { return batch * tokens * hidden; }
};

// Where the op's kernels run, which decides what can be validated on the host: the CPU kernels read
// their inputs on the host anyway, so every value is checked there; a device launch (CUDA, or its
// CPU simulation, which stands in for it) can check values on the host only when they are already
// there (a 0-dim CPU `w`), and checks the rest with its check kernels.
enum class KernelSite { kCpu, kDevice };

// Read-only inputs are made contiguous (a copy only when the caller passed a strided view);
// in-place targets must already be contiguous. `gate` is returned as a (B, D) view with unit
// channel stride, keeping the batch stride of chunked adaLN outputs without a copy. Every tensor
// the op writes must share no memory with any other argument (see check_no_overlap in checks.cpp).
struct GatedResidualInputs {
  HiddenShape shape;
  at::Tensor x;
  at::Tensor gate;
  at::Tensor value;
  // cache_write only: false when `branch` is the cache slot itself (a slot refreshed from itself),
  // where writing the slot would copy every element onto itself.
  bool write_cache;
};

// cache_write / cache_write_: `cache` is overwritten with `branch`.
GatedResidualInputs prepare_cache_write(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                        const at::Tensor& branch, const at::Tensor& cache, bool x_in_place);

// cache_read / cache_read_.
GatedResidualInputs prepare_cache_read(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                       const at::Tensor& cache, bool x_in_place);

struct BlendInputs {
  HiddenShape shape;
  at::Tensor x;  // grad_out for the backward
  at::Tensor gate;
  at::Tensor fresh;
  at::Tensor cache;
  at::Tensor w;  // contiguous, accumulation dtype, 0-dim or (B,); on the CPU when w_on_host
  int64_t w_batch_stride;
  // `w` is a 0-dim CPU tensor, checked on the host and passed to a device kernel by value (its
  // value, read on the host, is w_value) instead of being read from device memory.
  bool w_on_host;
  double w_value;
  // `w` lives where the kernels run and has not been range-checked yet: the device launcher checks
  // it with a check kernel.
  bool w_needs_device_check;
};

BlendInputs prepare_blend(const char* op, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                          const at::Tensor& cache, const at::Tensor& w, KernelSite site);

// forecast_read / forecast_read_ and forecast_update / forecast_update_ (harmonica/cache/forecast.py).
// Read-only slots are made contiguous; written slots must be. `factors` are the Newton coefficients
// (one per slot read) or the inverse distances (one per written slot after the first), all finite.
struct ForecastInputs {
  HiddenShape shape;
  at::Tensor x;
  at::Tensor gate;
  at::Tensor fresh;  // forecast_update only
  std::vector<at::Tensor> slots;
  std::vector<double> factors;
};

// x + gate * sum_i coeffs[i] * slots[i], one coefficient per slot, 1 to kMaxForecastSlots slots.
ForecastInputs prepare_forecast_read(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     at::TensorList slots, at::ArrayRef<double> coeffs, bool x_in_place);

// x + gate * fresh, and the slots refreshed: slots[0] <- fresh, slots[i] <- (new_{i-1} - old_{i-1}) * inv[i-1].
// len(slots) == len(inv) + 1, at most kMaxForecastSlots; every slot is written, so none may share
// memory with any other argument or slot.
ForecastInputs prepare_forecast_update(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                       const at::Tensor& fresh, at::TensorList slots, at::ArrayRef<double> inv,
                                       bool x_in_place);

struct GatherRowsInputs {
  HiddenShape shape;
  at::Tensor x;
  at::Tensor index;  // contiguous int64
};

GatherRowsInputs prepare_gather_rows(const char* op, const at::Tensor& x, const at::Tensor& index);

struct GatedMergeInputs {
  HiddenShape shape;
  at::Tensor x;
  at::Tensor gate;
  at::Tensor branch_active;
  at::Tensor index;  // contiguous int64
};

GatedMergeInputs prepare_gated_merge(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     const at::Tensor& branch_active, const at::Tensor& index,
                                     const at::Tensor& cache, bool x_in_place);

// Host-side map sample -> position in `index` (-1 when absent). Raises on out-of-range or
// duplicate entries. Used by the CPU kernels; a device launch builds the same map with a check
// kernel (cuda/thread_bodies.h, SlotOfRowBody).
at::Tensor slot_of_row_cpu(const char* op, const at::Tensor& index, int64_t batch);

// Raises unless every gather index lies in [0, batch). CPU tensors only.
void check_rows_in_range_cpu(const char* op, const at::Tensor& index, int64_t batch);

}  // namespace harmonica
