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
	$(BIN)/python -P -m pytest -q tests

# On a machine with a CUDA GPU: the whole suite with the kernels compiled (no interpreter), so
# every CUDA test runs (large shapes, tensors past 2^31 elements, training on the GPU); it fails
# rather than skip where there is no GPU. GPU_PYTHON: an interpreter that already has the
# dependencies (a GPU image that installs nothing), instead of this venv; GPU_TESTS narrows the run.
GPU_PYTHON ?= $(BIN)/python
GPU_TESTS ?= tests
.PHONY: test-gpu
test-gpu: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(READY))
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA device here (make test runs the CPU suite)')"
	env -u TRITON_INTERPRET $(GPU_PYTHON) -P -m pytest -q -p no:cacheprovider $(GPU_TESTS)

# Kernel microbenchmarks: benchmarks/bench_*.py (which `make test` never collects),
# then benchmarks/report.py turns the JSON into kernels.md and kernels.png.
# Without CUDA only small shapes and the reference/torch providers run.
# bench_tokenizer.py is a plain script: tokenizer speed vs tiktoken and HF tokenizers;
# bench_train.py too: training tokens/s, MFU and memory per kernel backend, eager and compiled;
# bench_linear_cross_entropy.py: time and peak memory of the linear_cross_entropy op (lm_head +
# cross-entropy) per backend;
# bench_hf.py: a training step of Llama-3- and Gemma-3-shaped transformers models, unpatched vs
# scratchlm.model.apply_kernels (tokens/s, peak memory).
BENCH_RESULTS := benchmarks/results
BENCH_PYTEST := -p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' --benchmark-only
BENCH_FILES := --json $(BENCH_RESULTS)/kernels.json --skips $(BENCH_RESULTS)/skipped.json
$(BENCH_READY): $(READY)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(BENCH_READY)
	$(BIN)/python -P -m pytest benchmarks $(BENCH_PYTEST) \
		--benchmark-json=$(BENCH_RESULTS)/kernels.json --skips-json=$(BENCH_RESULTS)/skipped.json
	$(BIN)/python benchmarks/report.py $(BENCH_FILES) --out-dir $(BENCH_RESULTS)
	$(BIN)/python benchmarks/bench_tokenizer.py --out $(BENCH_RESULTS)/tokenizer.json
	$(BIN)/python benchmarks/bench_train.py --out $(BENCH_RESULTS)/train.json
	$(BIN)/python benchmarks/bench_linear_cross_entropy.py --out $(BENCH_RESULTS)/linear_cross_entropy.json
	$(BIN)/python -P benchmarks/bench_hf.py --out $(BENCH_RESULTS)/hf.json

# The kernel tests (interpreter and sm_90 compilation) under Triton 3.6, the oldest Triton of the
# GPU images we run on, in a venv of their own beside .venv; `make test` (CI's budget) leaves them out.
TRITON36_VENV ?= .venv-triton36
TRITON36 ?= triton==3.6.0
TRITON36_BIN := $(TRITON36_VENV)/bin
TRITON36_READY := $(TRITON36_VENV)/.ready

.PHONY: test-triton36

# Triton 3.6 goes in before the project, which keeps it (setup.py takes any triton). A CUDA build of
# torch pins its own triton and pip would swap 3.6 for that, so 3.6 is put back, without dependencies.
$(TRITON36_READY): setup.py
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_BIN)/python -m pip install --quiet "$(TORCH)"
	$(TRITON36_BIN)/python -m pip install --quiet --no-deps "$(TRITON36)"
	$(TRITON36_BIN)/python -m pip install --quiet -e ".[dev]"
	$(TRITON36_BIN)/python -m pip install --quiet --no-deps "$(TRITON36)"
	touch $@

test-triton36: $(TRITON36_READY)
	$(TRITON36_BIN)/python -P -m pytest -q tests/kernels

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
