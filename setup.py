"""Build and packaging of harmonica: the Python package plus the harmonica._C op library.

CPU kernels are always built. CUDA kernels are built whenever this torch is a CUDA build and a CUDA
toolkit is found (no GPU needed); HARMONICA_CUDA=0 skips them for fast CPU-only iteration.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100). Install with
`pip install --no-build-isolation -e .` (build isolation would download torch again).
"""

import os
import platform
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0"


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        archs = ", ".join(
            "sm_" + arch.replace(".", "").replace("+PTX", " (+PTX)")
            for arch in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
            if arch
        )
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
    package_data={"harmonica": ["testbed/assets/**/*.safetensors", "testbed/assets/**/*.json", "testbed/assets/**/*.md"]},
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
