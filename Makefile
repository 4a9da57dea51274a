# pce_timm developer commands (GNU make).  `make test` and `make demo` work on a fresh clone: every target
# first brings .venv up to date (created on first use, reinstalled when pyproject.toml or this file change).
#
#   make venv         create / refresh .venv (+ Debian data packages when apt is usable)
#   make test         pytest (without -m slow), then timm's own model tests on every pce_* model
#   make test-min     the same pytest run (and ruff) in .venv-min: TORCH_PINS plus exactly the lowest versions
#                     pyproject.toml allows (each `>=X` installed as `==X`), so the declared floors stay true
#   make test-slow    the tests marked slow
#   make conformance  only timm's model tests on the pce_* models (tools/timm_conformance)
#   make demo | bench | release | lint | clean
#
# Knobs: SYSTEM_PYTHON (interpreter that creates .venv), TORCH_PINS, PYTEST_ARGS, CONFORMANCE_ARGS,
#        TEST_CONFORMANCE_ARGS, DEMO_ARGS, BENCH_ARGS, RELEASE_ARGS, MIN_OVERRIDES (test-min: pins that replace
#        derived ones, e.g. MIN_OVERRIDES='timm==1.0.20' to try a lower floor before declaring it).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := venv

SYSTEM_PYTHON ?= python3
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := dataset-fashion-mnist labelme-examples

VENV := .venv
PY := $(VENV)/bin/python
# The stamp's name carries a checksum of TORCH_PINS, so `make venv TORCH_PINS=...` reinstalls.
STAMP := $(VENV)/.stamp-$(word 1,$(shell printf '%s' '$(TORCH_PINS)' | cksum))
CONFORMANCE := PYTHON="$(abspath $(PY))" bash tools/timm_conformance/run
# `make test` leaves out timm's unmarked prune-at-every-feature-index test (timm's CI skips it too): it takes
# ~40% of the conformance time on 2 cores. `make conformance` runs it.
TEST_CONFORMANCE_ARGS ?= -k 'not test_prune_intermediate_layers_contract'

.PHONY: venv sysdeps test test-min test-slow conformance demo bench lint release clean

venv: $(STAMP) sysdeps

# $(call create_venv,DIR): a venv with pip in DIR. Debian's python3 lacks ensurepip unless python3-venv is
# installed: then pip is bootstrapped from a PyPI wheel.
define create_venv
echo "==> creating $(1) with $(SYSTEM_PYTHON)"
$(SYSTEM_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: $(SYSTEM_PYTHON) is $$($(SYSTEM_PYTHON) --version 2>&1); pce_timm needs Python >= 3.10" \
       "(make SYSTEM_PYTHON=python3.X ...)" >&2; exit 1; }
if ! $(SYSTEM_PYTHON) -m venv $(1); then
  echo "==> no ensurepip (on Debian: apt-get install python3-venv); bootstrapping pip into $(1) instead"
  rm -rf $(1)
  $(SYSTEM_PYTHON) -m venv --without-pip $(1)
  wheels="$$(mktemp -d)"
  trap 'rm -rf "$$wheels"' EXIT
  $(SYSTEM_PYTHON) -m pip download -q --no-deps --only-binary :all: -d "$$wheels" pip \
    || { echo "error: could not fetch pip; install python3-venv (or python3-pip) and retry" >&2; exit 1; }
  $(1)/bin/python "$$(echo "$$wheels"/pip-*.whl)/pip" install -q --no-index "$$wheels"/pip-*.whl
fi
endef

$(PY):
	@$(call create_venv,$(VENV))

$(STAMP): $(PY) pyproject.toml Makefile
	@echo "==> installing into $(VENV): pip, $(TORCH_PINS), -e .[dev,transformers,onnx]"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev,transformers,onnx]'
	$(PY) -c 'import torch, torchvision, timm; print(f"    torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")'
	rm -f $(VENV)/.stamp*
	touch $@

# test-min: a separate venv with TORCH_PINS and, for every other dependency of [project] and the dev extra,
# exactly the floor pyproject.toml declares. Rebuilt from scratch whenever pyproject.toml, this file,
# TORCH_PINS or MIN_OVERRIDES change, so nothing newer lingers. pce_timm goes in with --no-deps: nothing
# is re-resolved after the floors are installed, and `pip check` confirms they fit together.
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_OVERRIDES ?=
MIN_STAMP := $(MIN_VENV)/.stamp-$(word 1,$(shell printf '%s' '$(TORCH_PINS) $(MIN_OVERRIDES)' | cksum))

# Prints the floors as pins: `name>=X` -> `name==X`; argv[1]: TORCH_PINS (their packages are left to them),
# argv[2]: MIN_OVERRIDES. A dependency without a `>=` floor is an error: test-min could not test it.
define MIN_PINS_PY
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10: the TOML parser pip itself uses
    from pip._vendor import tomli as tomllib
key = lambda name: re.sub(r'[-_.]+', '-', name).lower()
name_of = lambda req: re.match(r'[A-Za-z0-9_.-]+', req).group(0)
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
left_alone = {key(name_of(pin)) for pin in sys.argv[1].split()}
overrides = {key(name_of(pin)): pin for pin in sys.argv[2].split()}
pins, unpinnable = {}, []
for req in project['dependencies'] + project['optional-dependencies']['dev']:
    req = req.split(';')[0].strip()
    name = name_of(req)
    if key(name) in left_alone:
        continue
    floor = re.search(r'>=\s*([^,\s]+)', req)
    if floor is None:
        unpinnable.append(req)
    pins[key(name)] = overrides.get(key(name)) or f'{name}=={floor.group(1) if floor else "?"}'
if unpinnable:
    sys.exit('test-min: no >= floor declared for: ' + ', '.join(unpinnable))
print('\n'.join(pins.values()))
endef
export MIN_PINS_PY

$(MIN_STAMP): pyproject.toml Makefile
	@rm -rf $(MIN_VENV)
	$(call create_venv,$(MIN_VENV))
	echo "==> installing into $(MIN_VENV): pip, $(TORCH_PINS), the declared floors, -e . --no-deps"
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q $(TORCH_PINS)
	$(MIN_PY) -c "$$MIN_PINS_PY" '$(TORCH_PINS)' '$(MIN_OVERRIDES)' > $(MIN_VENV)/floors.txt
	sed 's/^/    /' $(MIN_VENV)/floors.txt
	$(MIN_PY) -m pip install -q $(TORCH_PINS) -r $(MIN_VENV)/floors.txt
	$(MIN_PY) -m pip install -q --no-deps -e .
	$(MIN_PY) -m pip check
	touch $@

# The fast tests log to CSV only: this writes TensorBoard events the way the trainer's default tracker does.
define TENSORBOARD_SMOKE_PY
import tempfile
from torch.utils.tensorboard import SummaryWriter
with tempfile.TemporaryDirectory() as logs:
    writer = SummaryWriter(logs)
    writer.add_hparams({'lr': 0.1, 'model': 'pce_resnet18'}, {'top1': 0.5})
    writer.add_scalar('train/loss', 1.0, 0)
    writer.close()
endef
export TENSORBOARD_SMOKE_PY

test-min: $(MIN_STAMP) sysdeps
	@echo "==> pytest -m 'not slow' on the declared floors ($(MIN_VENV))"
	$(MIN_PY) -m pytest -m 'not slow' $(PYTEST_ARGS)
	echo "==> TensorBoard logging (the track extra's floor)"
	$(MIN_PY) -c "$$TENSORBOARD_SMOKE_PY"
	echo "==> ruff check . (the dev extra's floor)"
	$(MIN_PY) -m ruff check .

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
	@echo "==> removing caches and build output (the venvs are kept: rm -rf $(VENV) $(MIN_VENV) to rebuild them)"
	find . \( -path ./$(VENV) -o -path ./$(MIN_VENV) \) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist
