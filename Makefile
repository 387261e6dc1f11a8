# Every target sets itself up: a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
# PyPI's Linux wheel of this release carries CUDA; pass TORCH=torch to take the newest.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
READY := $(VENV)/.ready
BENCH_READY := $(VENV)/.bench-ready

.PHONY: setup demo test bench clean

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

# Kernel microbenchmarks: benchmarks/bench_*.py (which `make test` never collects),
# then benchmarks/report.py turns the JSON into kernels.md and kernels.png.
# Without CUDA only small shapes and the reference/torch providers run.
# bench_tokenizer.py is a plain script: tokenizer speed vs tiktoken and HF tokenizers;
# bench_train.py too: training tokens/s, MFU and memory per kernel backend, eager and compiled;
# bench_loss.py: time and peak memory of the loss op (lm_head + cross-entropy) per backend.
BENCH_RESULTS := benchmarks/results
BENCH_PYTEST := -p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' --benchmark-only
BENCH_FILES := --json $(BENCH_RESULTS)/kernels.json --skips $(BENCH_RESULTS)/skipped.json
$(BENCH_READY): $(READY)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(BENCH_READY)
	$(BIN)/python -m pytest benchmarks $(BENCH_PYTEST) \
		--benchmark-json=$(BENCH_RESULTS)/kernels.json --skips-json=$(BENCH_RESULTS)/skipped.json
	$(BIN)/python benchmarks/report.py $(BENCH_FILES) --out-dir $(BENCH_RESULTS)
	$(BIN)/python benchmarks/bench_tokenizer.py --out $(BENCH_RESULTS)/tokenizer.json
	$(BIN)/python benchmarks/bench_train.py --out $(BENCH_RESULTS)/train.json
	$(BIN)/python benchmarks/bench_loss.py --out $(BENCH_RESULTS)/loss.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
