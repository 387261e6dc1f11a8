"""The linear_cross_entropy op (lm_head plus cross-entropy): time and peak memory of forward + backward, per backend.

    python benchmarks/bench_linear_cross_entropy.py [--shapes quick|full] [--repeats 3] [--providers reference ...]

The op was called "loss" before (the registry still accepts that name); this
benchmark was bench_loss.py and wrote results/loss.json.

Providers: ``reference`` (the full (N, V) logits, then the cross-entropy of
``scratchlm.model.functional``), ``reference-compiled`` (the same under
torch.compile, which fuses the elementwise work but still forms the logits),
``torch`` (the chunked plain-PyTorch ``linear_cross_entropy_chunked``) and
``triton`` (the fused kernel ``linear_cross_entropy``, CUDA only).

Every measurement runs in its own process, so one provider's allocations and
caches cannot hide in another's numbers: on the CPU the peak is the growth of
the resident-set high-water mark (VmHWM) during one forward + backward, on
CUDA ``torch.cuda.max_memory_allocated`` over the same, both above what the
inputs already hold. Time is the median of ``--repeats`` runs after a warm-up
(the compiled provider warms up on the full shape, so compilation is not
timed). TFLOP/s counts the three matmuls, 6 N d V FLOPs.

Shapes: "quick" (the default on the CPU) is N=8192, d=256, V=50257 in
float32, the shape of the memory goal (the chunked backend's peak <= 5% of
the reference's); "full" (the default on CUDA) is N = 8192 and 16384 at
d=768, V=50257, and on CUDA also d=4096, V=128256, in bf16 on CUDA. Each
shape set also runs its first shape at each d with Gemma 2's final
soft-cap (logits z become 30 tanh(z / 30) before the cross-entropy), whose
tanh and its derivative every provider adds to the same matmuls; the
ratios compare rows of the same shape and cap. Results go to
benchmarks/results/linear_cross_entropy.json, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ON_CUDA = torch.cuda.is_available()
PROVIDERS = ("reference", "reference-compiled", "torch", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEMMA2_FINAL_SOFTCAP = 30.0  # Gemma 2's final_logit_softcapping


def shapes_for(kind: str) -> list[tuple[int, int, int, str, float | None]]:
    """(N, d, V, dtype, final soft-cap or None) rows of one shape set: each d's first shape also with the cap."""
    if kind == "quick":
        rows = [(8192, 256, 50257, "float32")]
    else:
        dtype = "bfloat16" if ON_CUDA else "float32"
        rows = [(8192, 768, 50257, dtype), (16384, 768, 50257, dtype)]
        if ON_CUDA:
            rows += [(8192, 4096, 128256, "bfloat16"), (16384, 4096, 128256, "bfloat16")]
    first_at_each_d: dict[int, tuple[int, int, int, str]] = {}
    for row in rows:
        first_at_each_d.setdefault(row[1], row)
    return [(*row, None) for row in rows] + [(*row, GEMMA2_FINAL_SOFTCAP) for row in first_at_each_d.values()]


# ---------------------------------------------------------------- one measurement (in a child process)


def linear_cross_entropy_function(provider: str):
    from scratchlm.model import get_op
    from scratchlm.model.functional import linear_cross_entropy

    if provider == "reference":
        return linear_cross_entropy
    if provider == "reference-compiled":
        return torch.compile(linear_cross_entropy)
    return get_op("linear_cross_entropy", provider)


def measure_one(
    provider: str, n: int, d: int, vocab: int, dtype_name: str, softcap: float | None, repeats: int
) -> dict:
    """Time and peak memory of forward + backward of one provider at one shape (and cap), in this process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from process_memory import peak_memory_mib, reset_peak_memory, resident_mib

    device = torch.device("cuda" if ON_CUDA else "cpu")
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, d, device=device, dtype=dtype, generator=generator) / d**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device, generator=generator)
    loss_fn = linear_cross_entropy_function(provider)

    def step() -> tuple[float, float]:
        hidden.grad = weight.grad = None
        if ON_CUDA:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = loss_fn(hidden, weight, targets, softcap=softcap)
        loss.backward()
        if ON_CUDA:
            torch.cuda.synchronize()
        return float(loss.detach()), time.perf_counter() - started

    # Warm-up: the compiled provider on the full shape (compilation); the others on a few rows (imports).
    if provider == "reference-compiled" or ON_CUDA:
        step()
    else:
        loss_fn(hidden[:64], weight, targets[:64], softcap=softcap).backward()
    hidden.grad = weight.grad = None

    # Peak memory over one run, above what the inputs hold.
    if ON_CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_value, first = step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resident_mib(os.getpid())
        reset_peak_memory()
        loss_value, first = step()
        peak = peak_memory_mib() - base
    times = [first] + [step()[1] for _ in range(repeats - 1)]
    seconds = statistics.median(times)
    return {
        "provider": provider,
        "n": n,
        "d": d,
        "vocab": vocab,
        "dtype": dtype_name,
        "softcap": softcap,
        "loss": loss_value,
        "ms": 1000 * seconds,
        "tflops": 6 * n * d * vocab / seconds / 1e12,
        "peak_mib": peak,
    }


# ---------------------------------------------------------------- the driver


def run_child(provider: str, shape: tuple[int, int, int, str, float | None], repeats: int, timeout: float) -> dict:
    n, d, vocab, dtype, softcap = shape
    command = [sys.executable, __file__, "--worker", provider, str(n), str(d), str(vocab), dtype, str(softcap),
               "--repeats", str(repeats)]  # fmt: skip
    row = {"provider": provider, "n": n, "d": d, "vocab": vocab, "dtype": dtype, "softcap": softcap}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {**row, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(row: dict) -> tuple:
    return row["n"], row["d"], row["vocab"], row["dtype"], row.get("softcap")


def add_ratios(results: list[dict]) -> None:
    """Each row's time and peak as a fraction of the eager reference at the same shape and cap."""
    reference = {_case(r): r for r in results if r["provider"] == "reference" and "error" not in r}
    for row in results:
        base = reference.get(_case(row))
        if base is None or "error" in row:
            continue
        row["time_vs_reference"] = row["ms"] / base["ms"]
        row["peak_pct_of_reference"] = 100 * row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None


def format_table(results: list[dict], device_name: str) -> str:
    lines = [
        f"linear_cross_entropy forward+backward on {device_name}",
        "| provider | N | d | V | dtype | soft-cap | ms | TFLOP/s | peak MiB | time / ref | peak % of ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cap = "" if r.get("softcap") is None else f"{r['softcap']:g}"
        shape = f"| {r['provider']} | {r['n']} | {r['d']} | {r['vocab']} | {r['dtype']} | {cap} |"
        if "error" in r:
            lines.append(f"{shape} error: {r['error'][:80]} | | | | |")
            continue
        pct = r.get("peak_pct_of_reference")
        ratio = r.get("time_vs_reference")
        lines.append(
            f"{shape} {r['ms']:.1f} | {r['tflops']:.3f} | {r['peak_mib']:.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if pct is None else f'{pct:.1f}%'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("quick", "full"), default="full" if ON_CUDA else "quick",
                        help="quick: N=8192, d=256, V=50257 float32 (CPU default); full: d=768 and on CUDA d=4096")  # fmt: skip
    parser.add_argument("--providers", nargs="*", default=None, help=f"subset of {list(PROVIDERS)}")
    parser.add_argument("--repeats", type=int, default=5 if ON_CUDA else 1, help="timed runs per measurement")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per measurement process")
    default_out = Path(__file__).parent / "results" / "linear_cross_entropy.json"
    parser.add_argument("--out", type=Path, default=default_out, help="JSON file")
    parser.add_argument("--worker", nargs=6, metavar=("PROVIDER", "N", "D", "V", "DTYPE", "SOFTCAP"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()

    if args.worker:
        provider, n, d, vocab, dtype, softcap = args.worker
        cap = None if softcap == "None" else float(softcap)
        print(json.dumps(measure_one(provider, int(n), int(d), int(vocab), dtype, cap, args.repeats)), flush=True)
        return 0

    providers = args.providers or [p for p in PROVIDERS if ON_CUDA or p != "triton"]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"--providers {unknown}: expected among {list(PROVIDERS)}")
    device_name = torch.cuda.get_device_name() if ON_CUDA else f"CPU ({platform.processor() or platform.machine()})"
    results = []
    for shape in shapes_for(args.shapes):
        for provider in providers:
            row = run_child(provider, shape, args.repeats, args.timeout)
            print(json.dumps(row), flush=True)
            results.append(row)
    add_ratios(results)
    table = format_table(results, device_name)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"device": device_name, "torch": torch.__version__, "shapes": args.shapes, "results": results}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
