# Every target sets itself up: a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
# PyPI's Linux wheel of this release carries CUDA; pass TORCH=torch to take the newest.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: setup demo test clean

setup: $(READY)

$(READY): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(READY)
	$(BIN)/scratchlm demo

test: $(READY)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
