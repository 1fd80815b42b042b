# One entry point for set-up, demo and checks. `make test` is what CI runs.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# .python-version selects 3.12 under pyenv; elsewhere use any python3 >= 3.12.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && echo python3.12 || echo python3)
PYTEST_ARGS ?=

.PHONY: setup demo test check lint typecheck pytest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml kernels/requirements.txt
	@if command -v apt-get >/dev/null && ! ldconfig -p | grep -q libnl-route-3.so.200; then \
	  echo "installing libnl-route-3-200 (needed by nsjail)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnl-route-3-200 >/dev/null; \
	fi
	@if command -v apt-get >/dev/null && ! { command -v chromium && command -v chromedriver; } >/dev/null; then \
	  echo "installing chromium and chromium-driver (JupyterLab's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"Python >= 3.12 needed, {sys.executable} is {sys.version.split()[0]}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]" -r kernels/requirements.txt
	touch $@

demo: setup
	$(BIN)/sandkernel doctor
	$(BIN)/sandkernel demo --out demo-output

lint: setup
	$(BIN)/ruff check engine tests kernels benchmarks
	$(BIN)/ruff format --check engine tests kernels benchmarks

typecheck: setup
	$(BIN)/mypy

pytest: setup
	@# A worker per core, up to 4: most of the suite waits on kernels and sockets.
	$(BIN)/pytest --ignore=tests/ray --numprocesses=auto --maxprocesses=4 $(PYTEST_ARGS)
	@# Importing Ray leaves threads and fork handlers in the process (filelock's
	@# refuses forks), which breaks the harnesses that fork: its tests get their own.
	$(BIN)/pytest tests/ray $(PYTEST_ARGS)

test: lint typecheck pytest

check: test

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
