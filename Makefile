# harmonica: the two commands a new user needs are `make demo` and `make test`.
# Both set everything up on first use (virtualenv, torch, the package and its C++/CUDA extension,
# Debian's Fashion-MNIST package) and only redo what changed afterwards.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.harmonica-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SOURCES := setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: setup demo test bench build-cpu ctest clean

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

# Fast CPU-only rebuild while iterating on the kernels.
build-cpu:
	HARMONICA_CUDA=0 $(PY) -m pip install --no-build-isolation -e . > $(VENV)/build-cpu.log 2>&1 || (tail -50 $(VENV)/build-cpu.log; exit 1)

clean:
	rm -rf build *.egg-info harmonica/_C*.so $(STAMP)
