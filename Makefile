# Quick start (fresh clone, Python 3.11 + git):
#   make run    create .venv, install hdmap-ad with its dependencies, run the DVC pipeline
#   make test   the full test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: run test install bench gpu-check clean-outputs

run: $(VENV)/.installed
	$(BIN)/hdmap-ad init-tracking
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/hdmap-ad show

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

bench: $(VENV)/.installed  # side by side with anomalib's Dinomaly: installs the `bench` extra
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/hdmap-ad bench $(BENCH_ARGS)

gpu-check: $(VENV)/.installed  # every CUDA path end to end, one report (docs/design.md#pipe-gpu-check); CPU: tiny shapes
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/hdmap-ad gpu-check $(GPU_CHECK_ARGS)
