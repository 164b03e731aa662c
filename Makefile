# Quick start (fresh clone, Python 3.11 + git):
#   make run    create .venv, install hdmap-ad with its dependencies, run the DVC pipeline
#   make test   lint, then the full test suite (what CI runs)
# `make help` lists every target.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest workers: the suite is dominated by subprocesses (dvc, MLflow servers) that wait on I/O, so two
# workers per core pay off on the 2-core machines; set PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 4
PYTEST := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
export DVC_NO_ANALYTICS := 1

.PHONY: help run install test test-fast lint format bench gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 20

run: $(VENV)/.installed  ## install, then run the DVC pipeline on the embedded synthetic data
	$(BIN)/hdmap-ad init-tracking
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/hdmap-ad show
	@if git diff --quiet -- dvc.lock metrics/ 2>/dev/null; then \
		echo "metrics, model and dvc.lock equal the committed ones"; \
	else \
		echo "note: on another kind of CPU (or another core count) float32 rounds differently, so metrics may differ"; \
		echo "from the committed ones in the last digit and git shows dvc.lock and metrics/ as modified: expected"; \
		echo "(README, Reproducibility across CPUs). Back to the committed files: git checkout -- dvc.lock metrics/"; \
	fi

install: $(VENV)/.installed  ## create .venv and install hdmap-ad with the dev tools

test: lint  ## lint, then the full test suite with the slowest 20 tests listed (CI runs this)
	$(PYTEST) --durations=20

test-fast: $(VENV)/.installed  ## every test not marked slow: the edit-test loop (2 min 25 s idle on 2 cores)
	$(PYTEST) -m "not slow" --durations=10

lint: $(VENV)/.installed  ## ruff check and format check over src/ and tests/
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(VENV)/.installed  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

# pip prints one line per package (--progress-bar off: no bar redrawn in logs); a fresh install takes minutes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --progress-bar off pip
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	touch $@

bench: $(VENV)/.installed  ## side by side with anomalib's Dinomaly (installs the bench extra); BENCH_ARGS=...
	$(BIN)/pip install --progress-bar off -e '.[dev,bench]'
	$(BIN)/hdmap-ad bench $(BENCH_ARGS)

gpu-check: $(VENV)/.installed  ## every CUDA path end to end, one report (CPU: tiny shapes); GPU_CHECK_ARGS=...
	$(BIN)/pip install --progress-bar off -e '.[dev,bench]'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/hdmap-ad gpu-check $(GPU_CHECK_ARGS)
