// Op schemas of the harmonica library. Always compiled, so a CPU-only build still defines every op;
// the kernels are registered per device in cpu/cache_ops.cpp and cuda/cache_ops.cu.
#include <Python.h>

#include <cstdint>

#include <torch/library.h>

// Defined by setup.py / CMakeLists.txt when cuda/cache_ops.cu is part of the build.
#ifndef HARMONICA_WITH_CUDA
#define HARMONICA_WITH_CUDA 0
#endif

namespace harmonica {
int64_t last_level_cache_bytes();  // cpu/cache_ops.cpp
}

extern "C" {
// `import harmonica._C` only needs to load this shared object so the static registrations below
// run; all ops are reached through torch.ops.harmonica. The module only says what was built and
// what the CPU kernels assume: `built_with_cuda` is 1 when the CUDA kernels are registered (whether
// or not a GPU is present); `last_level_cache_bytes` is the cache size above a quarter of which
// the CPU kernels write around the cache (non-temporal stores).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "harmonica C++/CUDA ops; use torch.ops.harmonica or harmonica.ops", -1,
      nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  const long cache_bytes = static_cast<long>(harmonica::last_level_cache_bytes());
  if (module != nullptr && (PyModule_AddIntConstant(module, "built_with_cuda", HARMONICA_WITH_CUDA) != 0 ||
                            PyModule_AddIntConstant(module, "last_level_cache_bytes", cache_bytes) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(harmonica, m) {
  // out = x + gate * branch, and cache <- branch in the same pass (a step that computes the branch).
  m.def("cache_write(Tensor x, Tensor gate, Tensor branch, Tensor(a!) cache) -> Tensor");
  // The in-place variants return nothing: functionalization (torch.compile, opcheck) rejects
  // custom ops whose outputs alias inputs. The Python wrappers return x.
  m.def("cache_write_(Tensor(a!) x, Tensor gate, Tensor branch, Tensor(b!) cache) -> ()");
  // out = x + gate * cache (a step that skips the branch).
  m.def("cache_read(Tensor x, Tensor gate, Tensor cache) -> Tensor");
  m.def("cache_read_(Tensor(a!) x, Tensor gate, Tensor cache) -> ()");
  // out = x + gate * (w * fresh + (1 - w) * cache): the soft forward used to train the router. w is
  // 0-dim or (B,) on x's device, or a 0-dim CPU tensor (a host scalar, checked on the host).
  m.def("blend(Tensor x, Tensor gate, Tensor fresh, Tensor cache, Tensor w) -> Tensor");
  // (grad_gate, grad_fresh, grad_w) of blend in one pass; grad_x is grad_out and cache gets none.
  // grad_w is on grad_out's device (also for a 0-dim CPU w, which would otherwise cost a copy back).
  m.def("blend_backward(Tensor grad_out, Tensor gate, Tensor fresh, Tensor cache, Tensor w) -> (Tensor, Tensor, Tensor)");
  // x[index] for a per-sample schedule: the samples whose branch is computed this step.
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  // Rows in `index` take branch_active (and refresh their cache slot), the others read the cache.
  m.def("gated_merge(Tensor x, Tensor gate, Tensor branch_active, Tensor index, Tensor(a!) cache) -> Tensor");
  m.def("gated_merge_(Tensor(a!) x, Tensor gate, Tensor branch_active, Tensor index, Tensor(b!) cache) -> ()");
  // Forecasting (harmonica/cache/forecast.py): a skipped branch served from a unit's divided
  // differences, out = x + gate * sum_i coeffs[i] * slots[i] (one coefficient per slot, 1 to 5); and a
  // compute that refreshes them in the same pass as out = x + gate * fresh: slots[0] <- fresh,
  // slots[i] <- (new slots[i-1] - old slots[i-1]) * inv[i-1] (len(inv) == len(slots) - 1). Coefficients
  // and inverse distances are plan constants (Python floats): no device read, and torch.compile
  // sees them as constants.
  m.def("forecast_read(Tensor x, Tensor gate, Tensor[] slots, float[] coeffs) -> Tensor");
  m.def("forecast_read_(Tensor(a!) x, Tensor gate, Tensor[] slots, float[] coeffs) -> ()");
  m.def("forecast_update(Tensor x, Tensor gate, Tensor fresh, Tensor(a!)[] slots, float[] inv) -> Tensor");
  m.def("forecast_update_(Tensor(a!) x, Tensor gate, Tensor fresh, Tensor(b!)[] slots, float[] inv) -> ()");

  // Test hooks (CPU only): the CUDA launcher of the op (cuda/launchers.h) with every simulated
  // (block, thread) of each launch run on the CPU. block_dim and grid_dim shape the 1-D launches
  // (grid_dim == 0: the launcher's grid); vector_width == 0 takes the launcher's pack width, a
  // power of two forces that width (an error if the pointers or shape do not allow it); max_packs
  // (0: the launcher's 2^31 - 1) caps the packs per launch, splitting the batch into several launches.
  // The `_` variants are the in-place launches (x is the output).
  m.def("_simulate_cuda_cache_write(Tensor x, Tensor gate, Tensor branch, Tensor(a!) cache, int block_dim, "
        "int grid_dim, int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_cache_write_(Tensor(a!) x, Tensor gate, Tensor branch, Tensor(b!) cache, int block_dim, "
        "int grid_dim, int vector_width, int max_packs=0) -> ()");
  m.def("_simulate_cuda_cache_read(Tensor x, Tensor gate, Tensor cache, int block_dim, int grid_dim, "
        "int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_cache_read_(Tensor(a!) x, Tensor gate, Tensor cache, int block_dim, int grid_dim, "
        "int vector_width, int max_packs=0) -> ()");
  m.def("_simulate_cuda_blend(Tensor x, Tensor gate, Tensor fresh, Tensor cache, Tensor w, int block_dim, "
        "int grid_dim, int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_blend_backward(Tensor grad_out, Tensor gate, Tensor fresh, Tensor cache, Tensor w, "
        "int block_dim, int grid_dim, int vector_width, int max_packs=0) -> (Tensor, Tensor, Tensor)");
  m.def("_simulate_cuda_gated_merge(Tensor x, Tensor gate, Tensor branch_active, Tensor index, Tensor(a!) cache, "
        "int block_dim, int grid_dim, int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_gated_merge_(Tensor(a!) x, Tensor gate, Tensor branch_active, Tensor index, "
        "Tensor(b!) cache, int block_dim, int grid_dim, int vector_width, int max_packs=0) -> ()");
  m.def("_simulate_cuda_forecast_read(Tensor x, Tensor gate, Tensor[] slots, float[] coeffs, int block_dim, "
        "int grid_dim, int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_forecast_read_(Tensor(a!) x, Tensor gate, Tensor[] slots, float[] coeffs, int block_dim, "
        "int grid_dim, int vector_width, int max_packs=0) -> ()");
  m.def("_simulate_cuda_forecast_update(Tensor x, Tensor gate, Tensor fresh, Tensor(a!)[] slots, float[] inv, "
        "int block_dim, int grid_dim, int vector_width, int max_packs=0) -> Tensor");
  m.def("_simulate_cuda_forecast_update_(Tensor(a!) x, Tensor gate, Tensor fresh, Tensor(b!)[] slots, float[] inv, "
        "int block_dim, int grid_dim, int vector_width, int max_packs=0) -> ()");
}
