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

.PHONY: setup test demo bench gpu-check clean
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

demo: setup
	$(VENV)/bin/alexprep demo

# Every benchmark in --quick mode (under ~10 minutes on 2 cores); results in benchmarks/results/.
bench: setup
	$(PY) benchmarks/run_all.py --quick

# The GPU check (benchmarks/GPU.md): one run of every GPU path, JSON in OUT. Needs no .venv
# (a lent GPU machine has none, and no network): alexprep is imported through symlinks in
# build/gpu-path. Uses .venv's python where there is one, unless PYTHON=... is given.
OUT ?= build/gpu-check
ifeq ($(origin PYTHON),command line)
GPU_PY := $(PYTHON)
else
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
endif
gpu-check:
	mkdir -p build/gpu-path/alexprep
	for d in imagenet_prep model cli; do ln -sfn ../../../$$d build/gpu-path/alexprep/$$d; done
	PYTHONPATH="$(CURDIR)/build/gpu-path$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PY) benchmarks/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
