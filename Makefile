# pce_timm developer commands (GNU make).  `make test` and `make demo` work on a fresh clone: every target
# first brings .venv up to date (created on first use, reinstalled when pyproject.toml or this file change).
#
#   make venv         create / refresh .venv (+ Debian data packages when apt is usable)
#   make test         pytest (without -m slow), then timm's own model tests on every pce_* model
#   make test-slow    the tests marked slow
#   make conformance  only timm's model tests on the pce_* models (tools/timm_conformance)
#   make demo | bench | release | lint | clean
#
# Knobs: SYSTEM_PYTHON (interpreter that creates .venv), TORCH_PINS, PYTEST_ARGS, CONFORMANCE_ARGS,
#        TEST_CONFORMANCE_ARGS, DEMO_ARGS, BENCH_ARGS, RELEASE_ARGS.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := venv

SYSTEM_PYTHON ?= python3
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := dataset-fashion-mnist

VENV := .venv
PY := $(VENV)/bin/python
# The stamp's name carries a checksum of TORCH_PINS, so `make venv TORCH_PINS=...` reinstalls.
STAMP := $(VENV)/.stamp-$(word 1,$(shell printf '%s' '$(TORCH_PINS)' | cksum))
CONFORMANCE := PYTHON="$(abspath $(PY))" bash tools/timm_conformance/run
# `make test` leaves out timm's unmarked prune-at-every-feature-index test (timm's CI skips it too): it takes
# ~40% of the conformance time on 2 cores. `make conformance` runs it.
TEST_CONFORMANCE_ARGS ?= -k 'not test_prune_intermediate_layers_contract'

.PHONY: venv sysdeps test test-slow conformance demo bench lint release clean

venv: $(STAMP) sysdeps

$(PY):
	@echo "==> creating $(VENV) with $(SYSTEM_PYTHON)"
	$(SYSTEM_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
	  || { echo "error: $(SYSTEM_PYTHON) is $$($(SYSTEM_PYTHON) --version 2>&1); pce_timm needs Python >= 3.10" \
	       "(make SYSTEM_PYTHON=python3.X ...)" >&2; exit 1; }
	if ! $(SYSTEM_PYTHON) -m venv $(VENV); then
	  # Debian's python3 lacks ensurepip unless python3-venv is installed: bootstrap pip from a PyPI wheel.
	  echo "==> no ensurepip (on Debian: apt-get install python3-venv); bootstrapping pip into $(VENV) instead"
	  rm -rf $(VENV)
	  $(SYSTEM_PYTHON) -m venv --without-pip $(VENV)
	  wheels="$$(mktemp -d)"
	  trap 'rm -rf "$$wheels"' EXIT
	  $(SYSTEM_PYTHON) -m pip download -q --no-deps --only-binary :all: -d "$$wheels" pip \
	    || { echo "error: could not fetch pip; install python3-venv (or python3-pip) and retry" >&2; exit 1; }
	  $(PY) "$$(echo "$$wheels"/pip-*.whl)/pip" install -q --no-index "$$wheels"/pip-*.whl
	fi

$(STAMP): $(PY) pyproject.toml Makefile
	@echo "==> installing into $(VENV): pip, $(TORCH_PINS), -e .[dev]"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c 'import torch, torchvision, timm; print(f"    torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")'
	rm -f $(VENV)/.stamp*
	touch $@

# The demo, the release and some tests read this Debian package; without root (or password-less sudo) we only say so.
sysdeps:
	@if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
	  echo "note: no dpkg/apt-get here; skipping the Debian packages $(APT_PACKAGES) (the demo and some tests read it)"
	  exit 0
	fi
	missing=""
	for p in $(APT_PACKAGES); do
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"
	done
	if [ -z "$$missing" ]; then exit 0; fi
	if [ "$$(id -u)" = 0 ]; then sudo=""
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"
	else
	  echo "note: not root and no password-less sudo; skipping apt-get install$$missing (the demo and some tests read it)"
	  exit 0
	fi
	echo "==> apt-get install$$missing"
	if ! { $$sudo apt-get update -qq && \
	       $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; }; then
	  echo "note: apt-get install$$missing failed; continuing without them"
	fi

test: venv
	@echo "==> pytest -m 'not slow'"
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)
	echo "==> timm conformance (without test_prune_intermediate_layers_contract)"
	$(CONFORMANCE) $(TEST_CONFORMANCE_ARGS) $(CONFORMANCE_ARGS)

test-slow: venv
	@echo "==> pytest -m slow"
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

conformance: venv
	@echo "==> timm conformance"
	$(CONFORMANCE) $(CONFORMANCE_ARGS)

demo: venv
	@$(PY) scripts/demo.py $(DEMO_ARGS)

bench: venv
	@$(PY) scripts/benchmark.py $(BENCH_ARGS)

release: venv
	@$(PY) scripts/make_release.py $(RELEASE_ARGS)

lint: venv
	@echo "==> ruff check ."
	$(PY) -m ruff check .

clean:
	@echo "==> removing caches and build output (.venv is kept: rm -rf $(VENV) to rebuild it)"
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist
