"""Build and packaging of harmonica: the Python package plus the harmonica._C op library.

CPU kernels are always built. CUDA kernels are built whenever this torch is a CUDA build and a CUDA
toolkit is found (no GPU needed); HARMONICA_CUDA=0 skips them for fast CPU-only iteration.
Architectures: TORCH_CUDA_ARCH_LIST when set; else, with a GPU visible, torch's own detection (the
visible GPUs' architectures, PTX for the newest); else DEFAULT_CUDA_ARCHS, Turing to Blackwell with PTX
for newer GPUs. The build prints which. Install with `pip install --no-build-isolation -e .` (build
isolation would download torch again).
"""

import os
import platform
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# Built when no GPU is visible (a wheel, CI, a login node): Turing (T4), Ampere (A100, A10/RTX 30xx),
# Ada (L4, RTX 40xx), Hopper (H100/H200), Blackwell (B200, RTX 50xx), plus PTX of the newest, which
# the driver compiles for any later GPU. Read by CMakeLists.txt too.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# CUDA toolkits before 12.8 cannot compile Blackwell code: Hopper + PTX is the newest they reach.
DEFAULT_CUDA_ARCHS_BEFORE_12_8 = "7.5;8.0;8.6;8.9;9.0+PTX"


def _real_cuda_home() -> str | None:
    """The toolkit root whose bin/nvcc is the compiler itself.

    torch guesses CUDA_HOME as the grandparent of the `nvcc` on PATH, which is wrong when that nvcc
    is a wrapper script (e.g. /usr/local/bin/nvcc). Resolve it before torch.utils.cpp_extension is
    imported, because that module reads CUDA_HOME once at import time.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        if (Path(candidate) / "bin" / "nvcc").is_file() and (Path(candidate) / "include" / "cuda_runtime.h").is_file():
            return str(Path(candidate).resolve())
    return None


def _describe_archs(arch_list: str) -> str:
    return ", ".join(
        "sm_" + arch.replace(".", "").replace("+PTX", " (+PTX)") for arch in arch_list.replace(" ", ";").split(";") if arch
    )


def _cuda_archs(torch) -> str:
    """Decide the architectures (leaving TORCH_CUDA_ARCH_LIST unset means torch detects the visible
    GPUs) and say which and why."""
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit and explicit != "native":
        return f"{_describe_archs(explicit)} (TORCH_CUDA_ARCH_LIST)"
    if torch.cuda.is_available():
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)  # "native" means the same detection
        gpus = sorted({(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                       for i in range(torch.cuda.device_count())})
        found = "; ".join(f"{name}, sm_{major}{minor}" for name, (major, minor) in gpus)
        return f"the visible GPUs as torch detects them ({found}; + PTX of the newest)"
    cuda = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    archs = DEFAULT_CUDA_ARCHS if cuda >= (12, 8) else DEFAULT_CUDA_ARCHS_BEFORE_12_8
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return f"{_describe_archs(archs)} (no GPU visible: the default list; set TORCH_CUDA_ARCH_LIST for fewer)"


def _extension_modules():
    cuda_home = _real_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths

    sources = [
        "csrc/harmonica.cpp",
        "csrc/checks.cpp",
        "csrc/autograd.cpp",
        "csrc/cpu/cache_ops.cpp",
        "csrc/cpu/simulate_cuda.cpp",
    ]
    # torch's headers as system headers: their own warnings (e.g. `#pragma unroll` in at::vec under
    # g++) are not ours to fix, while every warning in csrc/ stays visible. GCC drops the -I copy
    # of a directory that is also given with -isystem.
    torch_system_includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", *torch_system_includes]
    link_flags = []
    if torch._C.has_openmp:
        # at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`
        # compiled into this extension; without -fopenmp the pragma is dropped and every CPU kernel
        # runs on one thread. The libgomp linked here is the one torch has already loaded (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cpu_isa = "generic"
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("HARMONICA_CPU_AVX2", "1") != "0":
        # at::vec::Vectorized only uses SIMD registers when CPU_CAPABILITY_AVX2 is defined and the
        # compiler may emit AVX2/FMA/F16C; the generic fallback is several times slower than eager
        # PyTorch (whose kernels are dispatched to AVX2/AVX-512 at run time). Every x86-64 CPU since
        # 2013 (Haswell, Zen) has AVX2; build with HARMONICA_CPU_AVX2=0 for older ones.
        cpu_isa = "AVX2"
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]

    if os.environ.get("HARMONICA_CUDA", "1") == "0":
        with_cuda, reason = False, "HARMONICA_CUDA=0"
    elif not torch.version.cuda:
        with_cuda, reason = False, f"torch {torch.__version__} is a CPU build"
    elif not cuda_home:
        with_cuda, reason = False, "no CUDA toolkit found (set CUDA_HOME)"
    else:
        with_cuda, reason = True, ""

    if with_cuda:
        archs = _cuda_archs(torch)
        nvcc_flags = [
            "-O3",
            "-Xcompiler=-Wall",
            # Show the diagnostic number with every nvcc warning so it can be fixed, not hidden.
            "-Xcudafe=--display_error_number",
            *torch_system_includes,
        ]
        extension = CUDAExtension(
            "harmonica._C",
            sources + ["csrc/cuda/cache_ops.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            define_macros=[("HARMONICA_WITH_CUDA", "1")],
        )
        print(
            f"harmonica: building harmonica._C with CPU ({cpu_isa}) + CUDA kernels for {archs} "
            f"(CUDA_HOME={cuda_home})"
        )
    else:
        extension = CppExtension(
            "harmonica._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
        print(f"harmonica: building harmonica._C with CPU ({cpu_isa}) kernels only ({reason})")

    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()

setup(
    name="harmonica",
    version="0.1.0",
    description="Learned feature caching (HarmoniCa) for Diffusion Transformers, with fused C++/CUDA cache ops",
    python_requires=">=3.10",
    packages=find_packages(include=["harmonica", "harmonica.*"]),
    # package_data alone (no include_package_data): the asset folders are not Python packages, and
    # include_package_data makes setuptools warn about each of them on every build.
    package_data={"harmonica": ["testbed/assets/**/*.safetensors", "testbed/assets/**/*.json", "testbed/assets/**/*.md",
                              "testbed/assets/**/*.png"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch",
        "diffusers>=0.30",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scipy",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["harmonica=harmonica.cli:main"]},
    zip_safe=False,
)
