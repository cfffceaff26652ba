# `make setup` does ALL set-up (venv, dependencies, default model); `make demo` and `make test` run it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench gpu-wheels clean

setup: $(STAMP)
	@$(VENV)/bin/tradeoff fetch
	@$(VENV)/bin/tradeoff setup

# Reinstalls only when pyproject.toml changes. A machine whose Python already has torch (a GPU box)
# gets a venv that sees it; elsewhere the local CPU wheel torch==2.13.0 goes in before anything needs torch.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
		if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
		else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/tradeoff

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/tradeoff bench decode

# What bench/gpu.sh needs on a GPU machine that has torch and Triton but maybe not pytest: pure-Python wheels in .whl/
# (ignored by git; carry it with the working tree), the versions this venv tests with.
GPU_WHEELS := pytest pluggy iniconfig packaging
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
		$$($(PY) -c "import importlib.metadata as m; print(*(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
