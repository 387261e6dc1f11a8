#!/usr/bin/env bash
# One command for a GPU machine: the kernel tests and GPU training tests on CUDA, then the kernel
# benchmarks, then the document-masked attention benchmarks, the report of both, then the
# training throughput benchmark.
#
#   benchmarks/gpu_check.sh [COPY_TO]
#
# Writes benchmarks/results/: kernel_tests.log, bench.log, kernels.json (pytest-benchmark),
# skipped.json, documents.log, documents.json, documents_skipped.json, kernels.md,
# kernels_summary.json, kernels.png, attention.png, train.json, train.md, train_loss.json,
# train_loss.md, train.log (17 files or fewer);
# COPY_TO, when given, gets a copy of them.
# PYTHON picks the interpreter: default .venv/bin/python when it exists, else python3.
# No network is needed: when the interpreter cannot import scratchlm, the
# checkout is installed editable without dependencies (torch, triton, pytest,
# pytest-benchmark and matplotlib must already be there).
# PARTS picks what runs (default all four): "tests", "bench" (the kernel benchmarks but the
# document-masked ones), "documents" (bench_attention_documents alone, every case with
# SCRATCHLM_BENCH_REPS=quick: about 20 ms of repetitions per measurement instead of 100),
# "train" (bench_train.py); "bench" and "documents" share one report, kernels.md, over what ran.
# E.g. PARTS="documents" when one call has too little time for all.
# Exit status: the first part that failed, in the order tests, benchmarks, report, training.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=benchmarks/results
COPY_TO=${1:-}
PARTS=${PARTS:-tests bench documents train}
tests_status=0 bench_status=0 report_status=0 train_status=0
written=()  # the result files of the parts that ran, for COPY_TO
PYTEST_BENCH=(-p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' --benchmark-only)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
# Compiled kernels only: the interpreter is for machines without a GPU.
unset TRITON_INTERPRET
mkdir -p "$RESULTS"

if ! "$PYTHON" -c "import scratchlm.kernels" 2>/dev/null; then
    echo "gpu_check: installing this checkout (editable, no dependencies)"
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
fi
"$PYTHON" - <<'EOF'
import torch, triton
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (a CPU smoke run only)"
print(f"gpu_check: torch {torch.__version__}, triton {triton.__version__}, CUDA device: {device}")
EOF

if [[ " $PARTS " == *" tests "* ]]; then
    echo "gpu_check: kernel tests and GPU training tests"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels tests/train/test_training_cuda.py 2>&1 \
        | tee "$RESULTS/kernel_tests.log"
    tests_status=${PIPESTATUS[0]}
    written+=(kernel_tests.log)
fi

if [[ " $PARTS " == *" bench "* ]]; then
    echo "gpu_check: benchmarks"
    # The document-masked cases are the "documents" part's.
    rm -f "$RESULTS/kernels.json" "$RESULTS/skipped.json"
    "$PYTHON" -m pytest benchmarks "${PYTEST_BENCH[@]}" -k "not bench_attention_documents" \
        --benchmark-json="$RESULTS/kernels.json" --skips-json="$RESULTS/skipped.json" \
        2>&1 | tee "$RESULTS/bench.log"
    bench_status=${PIPESTATUS[0]}
    written+=(bench.log kernels.json skipped.json)
fi

if [[ " $PARTS " == *" documents "* ]]; then
    echo "gpu_check: document-masked attention benchmarks (quick repetitions)"
    rm -f "$RESULTS/documents.json" "$RESULTS/documents_skipped.json"
    SCRATCHLM_BENCH_REPS=quick "$PYTHON" -m pytest benchmarks/bench_attention.py "${PYTEST_BENCH[@]}" \
        -k bench_attention_documents \
        --benchmark-json="$RESULTS/documents.json" --skips-json="$RESULTS/documents_skipped.json" \
        2>&1 | tee "$RESULTS/documents.log"
    documents_status=${PIPESTATUS[0]}
    if [[ $bench_status -eq 0 ]]; then bench_status=$documents_status; fi
    written+=(documents.log documents.json documents_skipped.json)
fi

if [[ " $PARTS " == *" bench "* || " $PARTS " == *" documents "* ]]; then
    # Each part removed its own files before it ran, so what is here is this run's, or an earlier
    # call's for a part not run now (PARTS="bench", then PARTS="documents": one report of both).
    found=()  # a pytest run that failed early may have written no JSON
    for name in kernels documents; do
        if [[ -f $RESULTS/$name.json ]]; then found+=("$RESULTS/$name.json"); fi
    done
    if (( ${#found[@]} )); then
        "$PYTHON" benchmarks/report.py --json "${found[@]}" \
            --skips "$RESULTS/skipped.json" "$RESULTS/documents_skipped.json" --out-dir "$RESULTS"
        report_status=$?
    else
        echo "gpu_check: no benchmark JSON was written, so no report"
        report_status=1
    fi
    written+=(kernels.md kernels_summary.json kernels.png attention.png)
fi

if [[ " $PARTS " == *" train "* ]]; then
    echo "gpu_check: training throughput"
    "$PYTHON" benchmarks/bench_train.py --out "$RESULTS/train.json" 2>&1 | tee "$RESULTS/train.log"
    train_status=${PIPESTATUS[0]}
    # Each loss backend under the Triton kernels, eager: what not forming the logits buys.
    "$PYTHON" benchmarks/bench_train.py --kernels triton --losses reference torch triton --no-compile \
        --out "$RESULTS/train_loss.json" 2>&1 | tee -a "$RESULTS/train.log"
    loss_status=${PIPESTATUS[0]}
    if [[ $train_status -eq 0 ]]; then train_status=$loss_status; fi
    written+=(train.json train.md train_loss.json train_loss.md train.log)
fi

if [[ -n $COPY_TO ]]; then
    mkdir -p "$COPY_TO"
    for name in "${written[@]}"; do
        if [[ -f $RESULTS/$name ]]; then cp "$RESULTS/$name" "$COPY_TO/"; fi
    done
fi

echo "gpu_check: kernel tests exit $tests_status, benchmarks exit $bench_status, report exit $report_status," \
    "training benchmark exit $train_status"
for status in "$tests_status" "$bench_status" "$report_status" "$train_status"; do
    if [[ $status -ne 0 ]]; then exit "$status"; fi
done
