# Quick start: `make demo` (creates .venv, installs, runs the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean train-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dsv32 demo

# Re-train the shipped demo model (dsv32_jax/demo_model) from scratch: ~15-25 min on 2 CPU cores.
train-demo: $(VENV)/.installed
	$(PY) -m dsv32_jax.train.demo build/demo-train --install

# Test files run in parallel (one file per worker at a time: module fixtures are built once).
TEST_WORKERS ?= auto

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
