# The README's two commands: `make demo` and `make test`. Both do all set-up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch pinned for the CPU-only development machine (a CPU wheel lies on its disk);
# the package itself asks for a range so that GPU users get their CUDA build.
TORCH_PIN ?= torch==2.13.0
# pillow-simd builds from source; AVX2 where the CPU has it.
SIMD_CC := $(shell grep -q avx2 /proc/cpuinfo 2>/dev/null && echo "cc -mavx2" || echo cc)
DALI := $(shell [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ] && echo "nvidia-dali-cuda120")
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast demo bench bench-publish ffcv-env gpu-path gpu-check gpu-fault clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test,demo]" $(DALI)
	@# Last: anything depending on Pillow (matplotlib, scikit-image) pulls plain Pillow back.
	$(PIP) uninstall -q -y pillow pillow-simd
	CC="$(SIMD_CC)" $(PIP) install -q --no-cache-dir --no-binary :all: pillow-simd
	$(VENV)/bin/alexprep info
	touch $@

test: setup
	$(VENV)/bin/pytest -q tests

# About a minute on 2 cores: every module imported, and one behavioural test of each
# (tests/conftest.py, FAST_TESTS). `make test` is the whole suite, what CI runs.
test-fast: setup
	$(VENV)/bin/pytest -q -m fast tests

demo: setup
	$(VENV)/bin/alexprep demo

# Every benchmark in --quick mode (more than half an hour on 2 cores: benchmarks/README.md).
# Results go to the git-ignored benchmarks/out/; `make bench-publish` copies them into the
# tracked benchmarks/results/ and remakes the documents' tables from them
# (benchmarks/tables.py). FFCV's contenders need `make ffcv-env` (tried here; where it
# cannot be made, they record why and are skipped).
bench: setup
	-@$(MAKE) --no-print-directory ffcv-env
	$(PY) -m benchmarks.run_all --quick

bench-publish:
	$(PY) -m benchmarks.run_all --publish-only
	$(PY) -m benchmarks.tables --write

# FFCV in its own venv (never in .venv): it pins its own numba and builds from source
# against system OpenCV and libturbojpeg (apt, as root, where pkg-config lacks them).
# The log of the last attempt is benchmarks/.ffcv-venv.log, which the benchmarks cite.
FFCV_VENV := benchmarks/.ffcv-venv
FFCV_LOG := benchmarks/.ffcv-venv.log
ffcv-env: $(FFCV_VENV)/.done

$(FFCV_VENV)/.done:
	@set -o pipefail; { \
	  pkg-config --exists opencv4 libturbojpeg 2>/dev/null \
	    || { [ "$$(id -u)" = 0 ] && apt-get update -q \
	         && apt-get install -y -q libturbojpeg0-dev libopencv-dev pkg-config; } \
	    || { echo "FFCV needs system opencv4 and libturbojpeg (pkg-config) and apt-get could not install them"; exit 1; }; \
	  rm -rf $(FFCV_VENV) && $(PYTHON) -m venv $(FFCV_VENV) \
	  && $(FFCV_VENV)/bin/pip install -q numpy numba opencv-python-headless pillow "$(TORCH_PIN)" \
	  && $(FFCV_VENV)/bin/pip install -q --no-build-isolation ffcv \
	  && $(FFCV_VENV)/bin/python benchmarks/ffcv_side.py version; \
	} > $(FFCV_LOG) 2>&1 || { echo "ffcv-env failed: see $(FFCV_LOG)"; tail -3 $(FFCV_LOG); exit 1; }
	touch $@

# The GPU check (benchmarks/GPU.md): one run of every GPU path, JSON in OUT. Needs no .venv
# (a lent GPU machine has none, and no network): alexprep is imported through symlinks in
# build/gpu-path. Uses .venv's python where there is one, unless PYTHON=... is given.
OUT ?= build/gpu-check
ifeq ($(origin PYTHON),command line)
GPU_PY := $(PYTHON)
else
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
endif
GPU_PATH = PYTHONPATH="$(CURDIR)/build/gpu-path$${PYTHONPATH:+:$$PYTHONPATH}"
gpu-path:
	mkdir -p build/gpu-path/alexprep
	for d in imagenet_prep model cli; do ln -sfn ../../../$$d build/gpu-path/alexprep/$$d; done

gpu-check: gpu-path
	$(GPU_PATH) $(GPU_PY) benchmarks/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)

# The CUDA fault hunt (benchmarks/cuda_fault.py): each suspect configuration in its own
# process, failures again under compute-sanitizer. GPU_FAULT_ARGS="--only a,b" for a subset.
gpu-fault: gpu-path
	$(GPU_PATH) $(GPU_PY) benchmarks/cuda_fault.py --out "$(OUT)" $(GPU_FAULT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
