#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "cache_ops.h"

namespace harmonica {
namespace {

HiddenShape check_hidden_states(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, op, ": `", name, "` must be a (B, N, D) hidden-state tensor, got shape ", t.sizes(),
              "; reshape it to (batch, tokens, channels) before calling.");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": `", name,
              "` must be float32, float16, bfloat16 or float64, got ", t.scalar_type(), ".");
  return HiddenShape{t.size(0), t.size(1), t.size(2)};
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name, "` is on ",
              ref.device(), "; move it with ", name, ".to(", ref_name, ".device).");
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(), " but `",
              ref_name, "` has dtype ", ref.scalar_type(), "; hidden states, gate and cache must share one dtype, ",
              "convert with ", name, ".to(", ref_name, ".dtype).");
}

// Same shape, dtype and device as `ref`.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  check_same_device(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": `", name, "` must have the shape of `", ref_name, "` ", ref.sizes(),
              ", got ", t.sizes(), ".");
}

void check_writable(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` is written in place and must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes(), "; allocate it with torch.empty_like(x) or pass ", name,
              ".contiguous() and use the returned tensor.");
}

at::Tensor prepare_gate(const char* op, const at::Tensor& gate, const at::Tensor& x, const HiddenShape& shape) {
  check_same_device(op, "gate", gate, "x", x);
  check_same_dtype(op, "gate", gate, "x", x);
  const bool is_2d = gate.dim() == 2 && gate.size(0) == shape.batch && gate.size(1) == shape.hidden;
  const bool is_3d =
      gate.dim() == 3 && gate.size(0) == shape.batch && gate.size(1) == 1 && gate.size(2) == shape.hidden;
  TORCH_CHECK(is_2d || is_3d, op, ": `gate` must broadcast over the tokens of `x` ", x.sizes(),
              ", i.e. have shape (B, D) = (", shape.batch, ", ", shape.hidden, ") or (B, 1, D) = (", shape.batch,
              ", 1, ", shape.hidden, "), got ", gate.sizes(),
              "; pass the adaLN gate of this block (e.g. gate_msa) with one row per sample.");
  at::Tensor gate_2d = is_3d ? gate.select(1, 0) : gate;
  if (gate_2d.stride(1) != 1 && shape.hidden > 1) {
    gate_2d = gate_2d.contiguous();
  }
  return gate_2d;
}

struct PreparedW {
  at::Tensor w;
  bool on_host;
  double value;
  bool needs_device_check;
};

// `w` in the accumulation type. On the host, every value is checked here (no device memory is read,
// so this never synchronises); device-resident values are left to the device launcher's check kernel.
PreparedW prepare_w(const char* op, const at::Tensor& w, const at::Tensor& x, const HiddenShape& shape,
                    KernelSite site) {
  // A 0-dim CPU tensor is a host scalar, as ATen treats it: the device kernels take its value as a
  // launch argument. Anything else must live where x does.
  const bool host_scalar = w.dim() == 0 && w.device().is_cpu();
  if (!host_scalar) {
    TORCH_CHECK(w.device() == x.device(), op, ": `w` is on ", w.device(), " but `x` is on ", x.device(),
                "; pass w on x's device, or one weight as a Python float or a 0-dim CPU tensor (checked and "
                "passed to the kernel by value, without a device synchronisation).");
  }
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": `w` must be a floating-point tensor, got ",
              w.scalar_type(), "; pass torch.sigmoid(logits).");
  TORCH_CHECK(w.dim() == 0 || (w.dim() == 1 && w.size(0) == shape.batch), op,
              ": `w` must be a 0-dim tensor or have shape (B,) = (", shape.batch, ",), got ", w.sizes(),
              "; use w.reshape(()) for one weight or one weight per sample.");
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor w_acc = w.to(acc_type).contiguous();
  const bool check_on_host = host_scalar || (w_acc.device().is_cpu() && site == KernelSite::kCpu);
  double value = 0;
  if (check_on_host) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "harmonica_check_w", [&] {
      const scalar_t* data = w_acc.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < w_acc.numel(); ++i) {
        TORCH_CHECK(data[i] >= 0 && data[i] <= 1, op, ": `w` must lie in [0, 1] (a sigmoid routing weight), got ",
                    data[i], " at position ", i, "; pass torch.sigmoid(logits) or clamp it.");
      }
      value = host_scalar ? static_cast<double>(data[0]) : 0.0;
    });
  }
  return PreparedW{std::move(w_acc), host_scalar, value, !check_on_host};
}

// Byte range [begin, end) spanned by a tensor's elements (strides are never negative in torch).
struct ByteRange {
  std::uintptr_t begin;
  std::uintptr_t end;
};

ByteRange byte_range(const at::Tensor& t) {
  if (t.numel() == 0) {
    return {0, 0};
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto begin = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<std::uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

struct Named {
  const char* name;
  const at::Tensor& tensor;
};

// A tensor the op writes must share no memory with any other argument. With an overlap, the result
// depends on the order in which elements are read and written, which differs between the CPU
// kernels (row by row) and the GPU (packs in any order, concurrently): ATen refuses the same
// aliasing. The conservative byte-range test may also refuse interleaved strided views that touch
// no common element; the fix is the same.
void check_no_overlap(const char* op, const Named& written, c10::ArrayRef<Named> others) {
  const ByteRange w = byte_range(written.tensor);
  for (const Named& other : others) {
    if (other.tensor.device() != written.tensor.device()) {
      continue;
    }
    const ByteRange o = byte_range(other.tensor);
    TORCH_CHECK(w.begin >= o.end || o.begin >= w.end, op, ": `", written.name, "` is written by this op and shares ",
                "memory with `", other.name, "`; the result would depend on the order in which the kernel reads and ",
                "writes elements. Pass a `", written.name, "` of its own (e.g. torch.empty_like(x)) or ", other.name,
                ".clone().");
  }
}

at::Tensor prepare_index(const char* op, const at::Tensor& index, const at::Tensor& x, int64_t max_rows) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": `index` must be int64, got ", index.scalar_type(),
              "; build it with torch.tensor(rows, dtype=torch.long, device=x.device).");
  TORCH_CHECK(index.dim() == 1, op, ": `index` must be 1-D (one row number per computed sample), got shape ",
              index.sizes(), ".");
  check_same_device(op, "index", index, "x", x);
  TORCH_CHECK(index.size(0) <= max_rows, op, ": `index` has ", index.size(0), " entries but `x` has only ",
              max_rows, " samples; each sample may appear at most once.");
  return index.contiguous();
}

// "slots[0]", "slots[1]", ...: the names the errors give each slot.
std::vector<std::string> slot_names(size_t count) {
  std::vector<std::string> names;
  names.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    names.push_back("slots[" + std::to_string(i) + "]");
  }
  return names;
}

// `others` followed by slots[first], slots[first + 1], ... under their names.
std::vector<Named> and_slots(std::vector<Named> others, const std::vector<std::string>& names, at::TensorList slots,
                             size_t first = 0) {
  for (size_t i = first; i < slots.size(); ++i) {
    others.push_back({names[i].c_str(), slots[i]});
  }
  return others;
}

// A forecast table has 1 to kMaxForecastSlots slots (orders 0 to kMaxForecastSlots - 1), and
// `factors_name` gives `expected` finite factors for it.
void check_forecast_table(const char* op, at::TensorList slots, const char* factors_name, at::ArrayRef<double> factors,
                          size_t expected, const char* per) {
  TORCH_CHECK(!slots.empty() && slots.size() <= static_cast<size_t>(kMaxForecastSlots), op,
              ": `slots` must hold 1 to ", kMaxForecastSlots, " tensors (divided differences of orders 0 to ",
              kMaxForecastSlots - 1, "), got ", slots.size(), ".");
  TORCH_CHECK(factors.size() == expected, op, ": `", factors_name, "` has ", factors.size(), " entries for ",
              slots.size(), " slots; pass ", per, " (", expected, ").");
  for (size_t i = 0; i < factors.size(); ++i) {
    // A non-finite factor would fill every slot or output with inf/NaN, silently: two computes at
    // the same position (a zero distance) is the usual cause.
    TORCH_CHECK(std::isfinite(factors[i]), op, ": `", factors_name, "[", i, "]` = ", factors[i],
                " is not finite; the forecast plan divides by the distances between a unit's computes, which must "
                "be distinct positions.");
  }
}

}  // namespace

GatedResidualInputs prepare_cache_write(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                        const at::Tensor& branch, const at::Tensor& cache, bool x_in_place) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_like(op, "branch", branch, "x", x);
  check_like(op, "cache", cache, "x", x);
  check_writable(op, "cache", cache);
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  // Refreshing a slot from itself is the one aliasing that is well defined: nothing to copy.
  const bool branch_is_cache = same_view(branch, cache);
  if (branch_is_cache) {
    check_no_overlap(op, {"cache", cache}, {{"x", x}, {"gate", gate}});
  } else {
    check_no_overlap(op, {"cache", cache}, {{"x", x}, {"gate", gate}, {"branch", branch}});
  }
  if (x_in_place) {
    check_writable(op, "x", x);
    check_no_overlap(op, {"x", x}, {{"gate", gate}, {"branch", branch}, {"cache", cache}});
  }
  return GatedResidualInputs{shape, x.contiguous(), std::move(gate_2d), branch.contiguous(), !branch_is_cache};
}

GatedResidualInputs prepare_cache_read(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                       const at::Tensor& cache, bool x_in_place) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_like(op, "cache", cache, "x", x);
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  if (x_in_place) {
    check_writable(op, "x", x);
    check_no_overlap(op, {"x", x}, {{"gate", gate}, {"cache", cache}});
  }
  return GatedResidualInputs{shape, x.contiguous(), std::move(gate_2d), cache.contiguous(), false};
}

BlendInputs prepare_blend(const char* op, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& fresh,
                          const at::Tensor& cache, const at::Tensor& w, KernelSite site) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_like(op, "fresh", fresh, "x", x);
  check_like(op, "cache", cache, "x", x);
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  PreparedW prepared = prepare_w(op, w, x, shape, site);
  const int64_t w_batch_stride = prepared.w.dim() == 0 ? 0 : 1;
  return BlendInputs{shape,
                     x.contiguous(),
                     std::move(gate_2d),
                     fresh.contiguous(),
                     cache.contiguous(),
                     std::move(prepared.w),
                     w_batch_stride,
                     prepared.on_host,
                     prepared.value,
                     prepared.needs_device_check};
}

ForecastInputs prepare_forecast_read(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     at::TensorList slots, at::ArrayRef<double> coeffs, bool x_in_place) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_forecast_table(op, slots, "coeffs", coeffs, slots.size(), "one coefficient per slot read");
  const std::vector<std::string> names = slot_names(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    check_like(op, names[i].c_str(), slots[i], "x", x);
  }
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  if (x_in_place) {
    check_writable(op, "x", x);
    check_no_overlap(op, {"x", x}, and_slots({{"gate", gate}}, names, slots));
  }
  std::vector<at::Tensor> contiguous_slots;
  for (const at::Tensor& slot : slots) {
    contiguous_slots.push_back(slot.contiguous());
  }
  return ForecastInputs{shape,           x.contiguous(), std::move(gate_2d), at::Tensor(), std::move(contiguous_slots),
                        coeffs.vec()};
}

ForecastInputs prepare_forecast_update(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                       const at::Tensor& fresh, at::TensorList slots, at::ArrayRef<double> inv,
                                       bool x_in_place) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_like(op, "fresh", fresh, "x", x);
  check_forecast_table(op, slots, "inv", inv, slots.size() - (slots.empty() ? 0 : 1),
                       "one inverse distance per order above 0, len(slots) - 1");
  const std::vector<std::string> names = slot_names(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    check_like(op, names[i].c_str(), slots[i], "x", x);
    check_writable(op, names[i].c_str(), slots[i]);
  }
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  // Every slot is written: it must share memory with no argument and no other slot (each pair once).
  for (size_t i = 0; i < slots.size(); ++i) {
    check_no_overlap(op, {names[i].c_str(), slots[i]},
                     and_slots({{"x", x}, {"gate", gate}, {"fresh", fresh}}, names, slots, i + 1));
  }
  if (x_in_place) {
    check_writable(op, "x", x);
    check_no_overlap(op, {"x", x}, and_slots({{"gate", gate}, {"fresh", fresh}}, names, slots));
  }
  return ForecastInputs{shape, x.contiguous(), std::move(gate_2d), fresh.contiguous(), slots.vec(), inv.vec()};
}

GatherRowsInputs prepare_gather_rows(const char* op, const at::Tensor& x, const at::Tensor& index) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  at::Tensor index_c = prepare_index(op, index, x, /*max_rows=*/INT64_MAX);
  return GatherRowsInputs{shape, x.contiguous(), std::move(index_c)};
}

GatedMergeInputs prepare_gated_merge(const char* op, const at::Tensor& x, const at::Tensor& gate,
                                     const at::Tensor& branch_active, const at::Tensor& index,
                                     const at::Tensor& cache, bool x_in_place) {
  const HiddenShape shape = check_hidden_states(op, "x", x);
  check_like(op, "cache", cache, "x", x);
  check_writable(op, "cache", cache);
  if (x_in_place) {
    check_writable(op, "x", x);
  }
  at::Tensor index_c = prepare_index(op, index, x, shape.batch);
  check_same_device(op, "branch_active", branch_active, "x", x);
  check_same_dtype(op, "branch_active", branch_active, "x", x);
  TORCH_CHECK(branch_active.dim() == 3 && branch_active.size(0) == index_c.size(0) &&
                  branch_active.size(1) == shape.tokens && branch_active.size(2) == shape.hidden,
              op, ": `branch_active` must have shape (len(index), N, D) = (", index_c.size(0), ", ", shape.tokens, ", ",
              shape.hidden, "), got ", branch_active.sizes(),
              "; compute the branch on gather_rows(h, index) so it has one row per entry of `index`.");
  at::Tensor gate_2d = prepare_gate(op, gate, x, shape);
  check_no_overlap(op, {"cache", cache}, {{"x", x}, {"gate", gate}, {"branch_active", branch_active}, {"index", index}});
  if (x_in_place) {
    check_no_overlap(op, {"x", x},
                     {{"gate", gate}, {"branch_active", branch_active}, {"index", index}, {"cache", cache}});
  }
  return GatedMergeInputs{shape, x.contiguous(), std::move(gate_2d), branch_active.contiguous(), std::move(index_c)};
}

at::Tensor slot_of_row_cpu(const char* op, const at::Tensor& index, int64_t batch) {
  TORCH_CHECK(index.device().is_cpu(), op, ": internal error, slot_of_row_cpu needs a CPU index.");
  at::Tensor slots = at::empty({batch}, index.options().dtype(at::kInt));
  int32_t* slot = slots.data_ptr<int32_t>();
  std::fill(slot, slot + batch, -1);
  const int64_t* rows = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    const int64_t row = rows[j];
    TORCH_CHECK(row >= 0 && row < batch, op, ": `index[", j, "]` = ", row, " is out of range for a batch of ",
                batch, " samples; valid rows are 0..", batch - 1, ".");
    TORCH_CHECK(slot[row] < 0, op, ": `index` lists sample ", row, " twice (positions ", slot[row], " and ", j,
                "); each computed sample must appear once, e.g. use torch.unique(index).");
    slot[row] = static_cast<int32_t>(j);
  }
  return slots;
}

void check_rows_in_range_cpu(const char* op, const at::Tensor& index, int64_t batch) {
  const int64_t* rows = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    TORCH_CHECK(rows[j] >= 0 && rows[j] < batch, op, ": `index[", j, "]` = ", rows[j],
                " is out of range for `x` with ", batch, " samples; valid rows are 0..", batch - 1, ".");
  }
}

}  // namespace harmonica
