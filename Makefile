# The README's two commands: `make serve` (set up, then serve the embedded demo model) and
# `make test` (set up, then lint and run the tests). Both build .venv from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (on this project's CPU machines it is a local file: no CUDA wheels are pulled).
TORCH ?= torch==2.13.0
UNSLOTH ?= 2026.10.9

.PHONY: venv serve test lint unit e2e clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,kernels,unsloth]"
	# Unsloth without its declared dependencies: they would replace torch by a CUDA build.
	$(PY) -m pip install --quiet --no-deps "unsloth==$(UNSLOTH)" "unsloth_zoo==$(UNSLOTH)"
	touch $@

serve: venv
	$(VENV)/bin/sloth-serve $(ARGS)

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q

unit: venv
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
