"""Training throughput: tokens/s, MFU and peak memory per kernel backend, with and without torch.compile.

    python benchmarks/bench_train.py [--preset gpt2-small] [--context 1024] [--batch 16] [--steps 20]

Every configuration runs the real training step (``scratchlm.train.loop.Trainer``:
autocast, fused AdamW, clipping, the non-finite check) on random token ids, so
what is measured is what ``scratchlm train`` does, minus evaluation and
checkpoints. Configurations: kernels = reference, torch, triton, each eager
and compiled, one after another in this process; each starts from a fresh
model and optimizer with the CUDA caches emptied.

Per configuration, ``--warmup`` steps are taken first (compilation, autotuning,
allocator warm-up) and not timed; then ``--steps`` steps are timed one by one
and the median step time gives tokens/s. MFU uses the training FLOPs per token
(6N + 12 * L * d_model * T) over the GPU's dense bf16 peak
(``scratchlm.train.throughput``; ``--peak_tflops`` overrides). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps.

Defaults: on CUDA the gpt2-small shape (124M parameters with GPT-2's vocabulary)
at context 1024, bf16; on the CPU a smoke run of the debug preset in fp32 with
triton left out (the interpreter is for correctness, not speed). Results go to
benchmarks/results/train.json and a markdown table to train.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from scratchlm.model import OPS, ModelConfig, resolve_kernels
from scratchlm.train import TrainConfig
from scratchlm.train.distributed import Parallel
from scratchlm.train.trainer import Trainer
from scratchlm.train.throughput import peak_tflops_for

ON_CUDA = torch.cuda.is_available()
KERNELS = ("reference", "torch", "triton")


def kernels_spec(kernels: str, loss: str | None) -> str | dict[str, str]:
    """--kernels for one row: ``kernels`` for every op, linear_cross_entropy's replaced when ``loss`` is given."""
    return kernels if loss is None else {**{op: kernels for op in OPS}, "linear_cross_entropy": loss}


def build_trainer(model: ModelConfig, args, kernels: str | dict, compile_model: bool) -> Trainer:
    config = TrainConfig(
        train_data_path="<random ids>",
        val_data_path="<random ids>",
        output_dir="<none>",
        total_iters=10**6,  # a long schedule: every timed step runs at the same cost
        warmup_iters=10,
        batch_size=args.batch,
        grad_accum_steps=args.grad_accum,
        kernels=kernels,
        compile=compile_model,
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
        peak_tflops=args.peak_tflops,
        device=str(args.device),
        **{name: getattr(model, name) for name in ("vocab_size", "context_length", "d_model", "num_layers",
                                                   "num_heads", "d_ff", "rope_theta")},
    ).resolved()
    return Trainer(config, Parallel(), args.device)


def measure(model: ModelConfig, args, kernels: str, loss: str | None, compile_model: bool, data: np.ndarray) -> dict:
    row = {"kernels": kernels, "loss": loss or kernels, "compile": compile_model}
    if ON_CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(model, args, kernels_spec(kernels, loss), compile_model)
    row["precision"] = trainer.precision.name
    try:
        for _ in range(args.warmup):
            trainer.train_step(data)
        if ON_CUDA:
            torch.cuda.reset_peak_memory_stats()
        records = [trainer.train_step(data) for _ in range(args.steps)]
    finally:
        del trainer
        gc.collect()
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        row["error"] = f"{len(skipped)} of {len(records)} timed steps were skipped: {skipped[0]['skipped']}"
        return row
    ms = statistics.median(r["ms_per_step"] for r in records)
    row["ms_per_step"] = ms
    row["tokens_per_s"] = args.batch * model.context_length / (ms / 1000)
    row["loss_last"] = records[-1]["loss"]
    if "mfu" in records[0]:
        row["mfu"] = statistics.median(r["mfu"] for r in records)
    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if ON_CUDA else None
    return row


def print_table(results: dict) -> str:
    precisions = sorted({r["precision"] for r in results["rows"] if "precision" in r}) or [results["precision"]]
    lines = [
        f"Training throughput: {results['model']} at context {results['context']}, batch {results['batch']}, "
        f"{'/'.join(precisions)}, on {results['environment']['device']}",
        "",
        "| kernels | loss | compile | ms/step | tokens/s | MFU | peak memory | vs reference eager |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    baseline = next(
        (r["tokens_per_s"] for r in results["rows"] if r["kernels"] == r["loss"] == "reference" and not r["compile"]
         and "tokens_per_s" in r),
        None,
    )  # fmt: skip
    for r in results["rows"]:
        if "tokens_per_s" not in r:
            lines.append(
                f"| {r['kernels']} | {r['loss']} | {r['compile']} | {r.get('error') or r.get('skipped')} | | | | |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "n/a"
        lines.append(
            f"| {r['kernels']} | {r['loss']} | {r['compile']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu} | {memory} | {ratio} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-small" if ON_CUDA else "debug", help="ModelConfig preset")
    parser.add_argument("--context", type=int, default=1024 if ON_CUDA else 128, help="context length")
    parser.add_argument("--batch", type=int, default=16 if ON_CUDA else 4, help="windows per optimizer step")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--activation_checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--steps", type=int, default=20 if ON_CUDA else 5, help="timed steps")
    parser.add_argument("--kernels", nargs="*", default=None, help=f"subset of {list(KERNELS)}")
    parser.add_argument(
        "--losses",
        nargs="*",
        default=None,
        help=f"linear_cross_entropy (the loss) backends to run with each kernels choice, among {list(KERNELS)} "
        "(default: the kernels' own)",
    )
    parser.add_argument("--no-compile", action="store_true", help="eager configurations only")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    args.device = torch.device("cuda" if ON_CUDA else "cpu")

    model = ModelConfig.preset(args.preset, context_length=args.context)
    kernels = args.kernels or [k for k in KERNELS if ON_CUDA or k != "triton"]
    compile_choices = (False,) if args.no_compile else (False, True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, model.vocab_size, size=4_000_000, dtype=np.int64).astype(np.uint32)

    import triton

    results = {
        "model": args.preset,
        "model_config": model.to_dict(),
        "context": args.context,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "precision": args.precision,
        "activation_checkpointing": args.activation_checkpointing,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "environment": {
            "device": torch.cuda.get_device_name() if ON_CUDA else f"CPU ({os.cpu_count()} cores)",
            "peak_bf16_tflops": args.peak_tflops or peak_tflops_for(args.device),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
        },
        "rows": [],
    }
    losses = args.losses or [None]
    for name in kernels:
        for loss in losses:
            for compile_model in compile_choices:
                try:
                    resolve_kernels(kernels_spec(name, loss), args.device)
                    row = measure(model, args, name, loss, compile_model, data)
                except Exception as e:  # one failing configuration must not cost the others' numbers
                    traceback.print_exc()
                    row = {"kernels": name, "loss": loss or name, "compile": compile_model,
                           "error": f"{type(e).__name__}: {e}"[:300]}  # fmt: skip
                print(json.dumps(row), flush=True)
                results["rows"].append(row)

    table = print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all("tokens_per_s" in r for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
