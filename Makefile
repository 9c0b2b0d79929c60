# Quick start: `make demo` (creates .venv, installs, runs the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean train-demo gpu-venv gpu-compile notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,serve]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dsv32 demo

# Execute notebooks/*.ipynb under a Jupyter kernel of the venv and keep their outputs (and the hash
# of the code that made them, which tests/test_notebooks.py checks); NB=01_generate.ipynb: one.
notebooks: $(VENV)/.installed
	$(PY) notebooks/run.py $(NB)

# Re-train the shipped demo model (dsv32_jax/demo_model) from scratch, then its MTP layer:
# ~20-40 min on 2 CPU cores (19 min measured).
train-demo: $(VENV)/.installed
	$(PY) -m dsv32_jax.train.demo build/demo-train --install

# The H100 program without an H100 (benchmarks/deviceless.py): XLA's GPU compiler for a deviceless
# CUDA target needs jax 0.11.2 (the GPU machines' version; no Python 3.11 wheels), so it runs in
# its own Python 3.12 venv with the CUDA plugin, ptxas (nvcc wheel) and nvdisasm.
GPU_VENV ?= .venv-gpu
# the first python3.12 that runs (a pyenv shim on PATH may not, without PYENV_VERSION)
GPU_PYTHON ?= $(shell for p in $$(command -v python3.12) $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && echo "$$p" && break; done)
GPU_WHEELS := jax==0.11.2 jaxlib==0.11.2 jax-cuda12-pjrt==0.11.2 jax-cuda12-plugin==0.11.2 \
	nvidia-cuda-nvcc-cu12==12.9.86 nvidia-cuda-nvdisasm==13.5.37

$(GPU_VENV)/.installed: pyproject.toml
	@test -n "$(GPU_PYTHON)" || { echo "gpu-venv: no python3.12 (on PATH or in ~/.pyenv/versions)"; exit 1; }
	rm -rf $(GPU_VENV)
	$(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_WHEELS) -e .
	touch $@

gpu-venv: $(GPU_VENV)/.installed

# Compile every kernel case and the released-width programs for an H100 (--target h200: H200) ->
# benchmarks/out/deviceless.{json,md} and the "Compiled for H100, no GPU" section of RESULTS.md.
gpu-compile: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python -m benchmarks.deviceless $(ARGS)

# Test files run in parallel (one file per worker at a time: module fixtures are built once);
# --durations=25: the CI log lists the slowest tests.
TEST_WORKERS ?= auto

# The GPU venv first (tests/test_deviceless.py compiles for an H100 with it): if it cannot be built
# the gates skip with one line, and fail under CI=true.
test: $(VENV)/.installed
	@$(MAKE) --no-print-directory gpu-venv > $(GPU_VENV).log 2>&1 || echo "make test: could not \
	build $(GPU_VENV) (see $(GPU_VENV).log): the deviceless H100 gates will skip (fail with CI=true)"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf $(VENV) $(GPU_VENV) $(GPU_VENV).log build *.egg-info
