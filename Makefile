# harmonica: the two commands a new user needs are `make demo` and `make test`.
# Both set everything up on first use (virtualenv, torch, the package and its C++/CUDA extension,
# Debian's Fashion-MNIST package) and only redo what changed afterwards.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.harmonica-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SOURCES := setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: setup demo test bench build-cpu ctest gpu-check gpu-wheels clean

setup: $(STAMP) fmnist

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --no-build-isolation -v -e . > $(VENV)/build.log 2>&1 || (tail -50 $(VENV)/build.log; exit 1)
	@grep -o "harmonica: building.*" $(VENV)/build.log | head -1
	touch $@

# Real Fashion-MNIST images (router training with the L2C baseline, testbed training, data tests).
fmnist:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else echo "harmonica: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist"; fi; }

demo: setup
	$(VENV)/bin/harmonica demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only -p no:cacheprovider

# The C++ unit tests (csrc/tests) through CMake and ctest, CPU only: they run the CUDA per-thread
# bodies on the host. The build log is kept for CI's warning check.
CMAKE_DIR ?= build/cmake
ctest: setup
	mkdir -p $(CMAKE_DIR)
	cmake -S . -B $(CMAKE_DIR) -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release > $(CMAKE_DIR).log 2>&1 \
	  || (tail -30 $(CMAKE_DIR).log; exit 1)
	cmake --build $(CMAKE_DIR) -j $(or $(MAX_JOBS),2) >> $(CMAKE_DIR).log 2>&1 || (tail -50 $(CMAKE_DIR).log; exit 1)
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

# Fast CPU-only rebuild while iterating on the kernels.
build-cpu:
	HARMONICA_CUDA=0 $(PY) -m pip install --no-build-isolation -e . > $(VENV)/build-cpu.log 2>&1 || (tail -50 $(VENV)/build-cpu.log; exit 1)

# The first GPU session's one command (benchmarks/gpu_check.sh): builds for the local GPU, runs the
# CUDA tests, op benchmarks and an end-to-end timing, writes $(GPU_CHECK_OUT)/report.md and .json.
# No venv: GPU_PYTHON is whatever python has CUDA torch there. Without a GPU it says so and exits 0.
GPU_PYTHON    ?= $(PYTHON)
GPU_CHECK_OUT ?= build/gpu-check
gpu-check:
	PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

# Wheels of what a GPU machine without internet lacks (its image has torch, pytest, numpy, safetensors,
# huggingface-hub ...; not diffusers), for Python 3.12 / x86-64, into .whl/ (gitignored), which
# gpu-check installs from. diffusers' other requirements are on that image; importlib_metadata is only
# imported below Python 3.8.
GPU_WHEELS   ?= diffusers==0.42.1
GPU_WHEEL_PY ?= 3.12
gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip download --quiet --no-deps --only-binary=:all: \
	  --python-version $(GPU_WHEEL_PY) --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@ls .whl

clean:
	rm -rf build *.egg-info harmonica/_C*.so $(STAMP)
