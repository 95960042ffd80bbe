# The README's two commands: `make serve` (set up, then serve the embedded demo model) and
# `make test` (set up, then lint, type-check and run the tests). Both build .venv from the
# project's own files; the versions of torch, transformers and Unsloth come from versions.env.
include versions.env

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (on this project's CPU machines it is a local file: no CUDA wheels are pulled).
TORCH ?= torch==$(TORCH_CPU_VERSION)

.PHONY: venv serve test lint typecheck unit e2e clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml versions.env
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,kernels,unsloth]" "transformers==$(TRANSFORMERS_VERSION)"
	# Unsloth without its declared dependencies: they would replace torch by a CUDA build.
	$(PY) -m pip install --quiet --no-deps "unsloth==$(UNSLOTH_VERSION)" "unsloth_zoo==$(UNSLOTH_VERSION)"
	touch $@

# One torch thread unless OMP_NUM_THREADS says otherwise: the demo model gains nothing from more, and
# on a busy few-core machine spinning intra-op threads made answers 15-30x slower.
serve: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/sloth-serve $(ARGS)

lint: venv
	$(PY) -m ruff check .

# mypy reads its settings (the checked packages: sloth_serve, sloth_kernels) from pyproject.toml and
# finds them through links to server/ and kernels/ (it cannot follow the editable install's import hook).
typecheck: venv
	bash scripts/import_names.sh $(VENV)/import-names
	MYPYPATH=$(VENV)/import-names $(PY) -m mypy

# Test files are spread over TEST_JOBS processes (pytest-xdist), a file's tests kept together so its
# server fixtures start once; CI's machine has 2 cores.
TEST_JOBS ?= 2

test: venv lint typecheck
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

unit: venv
	$(PY) -m pytest -q tests/unit

e2e: venv
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
