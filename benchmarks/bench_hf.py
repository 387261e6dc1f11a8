"""apply_kernels on Hugging Face models: tokens/s and peak memory of a training step, unpatched vs patched.

    python benchmarks/bench_hf.py [--models llama3 gemma3] [--context 2048] [--batch 1] [--steps 2]

Rows, per model: ``unpatched`` (transformers' own path: SDPA attention, the
full (tokens, vocab) logits and its cross-entropy), ``patched-torch``
(``apply_kernels(model, "torch")``: PyTorch's fused ops and the chunked
linear cross-entropy), ``patched-triton`` (this project's kernels; CUDA only,
the interpreter's time means nothing) and ``liger`` (Liger-Kernel's
``_apply_liger_kernel_to_instance``; CUDA and liger-kernel installed, else
the row says why it was skipped).

Models: a Llama-3-shaped and a Gemma-3-shaped decoder with their real
vocabularies (128256 and 262144) and a few layers, so the lm_head and the
loss weigh what they weigh in the real models. On the CPU the widths are
small (d 256) to keep a step to seconds; on CUDA Llama 3.2 1B's and Gemma 3
1B's widths. float32 on the CPU, bfloat16 on CUDA.

One training step: forward with labels, backward, AdamW step, on random
token ids. Every row runs in its own process. ``--warmup`` steps first
(AdamW's state, allocator, imports), then the peak memory of one step above
what the process already holds (the CPU's resident-set high-water mark,
VmHWM; ``torch.cuda.max_memory_allocated`` on CUDA), then ``--steps`` timed
steps whose median gives tokens/s. Results go to benchmarks/results/hf.json
and a table is printed; ``patched / unpatched`` is the peak as a percentage
of the unpatched row of the same model.

The CPU goal: at context 2048 with Gemma's vocabulary, the patched step's
peak is at most 40% of the unpatched one's.
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
PROVIDERS = ("unpatched", "patched-torch", "patched-triton", "liger")
MEMORY_GOAL_PCT = 40.0  # patched peak / unpatched peak at Gemma's vocabulary, context 2048, on the CPU

# model -> (transformers config class, model class, fields on the CPU, fields on CUDA)
MODELS = {
    "llama3": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
        dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
        dict(vocab_size=128256, num_hidden_layers=2, rope_theta=500000.0, tie_word_embeddings=True),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
             query_pre_attn_scalar=64),
        dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
             query_pre_attn_scalar=256),
        dict(vocab_size=262144, num_hidden_layers=2, sliding_window=512,
             layer_types=["sliding_attention", "full_attention"]),
    ),
}  # fmt: skip


def skip_reason(provider: str) -> str | None:
    """Why ``provider`` cannot give a meaningful number here, or None."""
    if provider == "patched-triton" and not ON_CUDA:
        return "no CUDA device; the Triton interpreter runs the kernels in NumPy, its time says nothing"
    if provider == "liger":
        if not ON_CUDA:
            return "no CUDA device; Liger-Kernel's Triton kernels need one"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (pip install liger-kernel to compare with it)"
    return None


def build_model(name: str, provider: str) -> torch.nn.Module:
    import transformers

    config_name, model_name, cpu_fields, cuda_fields, common = MODELS[name]
    fields = {**common, **(cuda_fields if ON_CUDA else cpu_fields), "max_position_embeddings": 131072}
    config = getattr(transformers, config_name)(**fields, attn_implementation="sdpa")
    device = torch.device("cuda" if ON_CUDA else "cpu")
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    torch.manual_seed(0)
    with device:
        model = getattr(transformers, model_name)(config).to(dtype)
    if provider.startswith("patched-"):
        from scratchlm.model import apply_kernels

        apply_kernels(model, kernels=provider.removeprefix("patched-"))
    elif provider == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    return model.train()


def measure_one(name: str, provider: str, context: int, batch: int, steps: int, warmup: int) -> dict:
    """Peak memory and tokens/s of the training step of one model and provider, in this process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from process_memory import peak_memory_mib, reset_peak_memory, resident_mib

    model = build_model(name, provider)
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, context), device=device, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> tuple[float, float]:
        if ON_CUDA:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ON_CUDA:
            torch.cuda.synchronize()
        return float(loss.detach()), time.perf_counter() - started

    for _ in range(warmup):
        step()
    if ON_CUDA:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, first = step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resident_mib(os.getpid())
        reset_peak_memory()
        loss, first = step()
        peak = peak_memory_mib() - base
    seconds = statistics.median([first] + [step()[1] for _ in range(steps - 1)])
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model": name, "provider": provider, "context": context, "batch": batch, "vocab": vocab,
        "parameters": parameters, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "loss": loss, "step_ms": 1000 * seconds, "tokens_per_s": batch * context / seconds, "peak_mib": peak,
    }  # fmt: skip


def run_child(name: str, provider: str, args) -> dict:
    row = {"model": name, "provider": provider, "context": args.context, "batch": args.batch}
    reason = skip_reason(provider)
    if reason is not None:
        return {**row, "skipped": reason}
    command = [sys.executable, "-P", __file__, "--worker", name, provider, "--context", str(args.context),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {**row, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(results: list[dict]) -> None:
    """Each row's peak memory and tokens/s relative to the unpatched row of the same model."""
    unpatched = {r["model"]: r for r in results if r["provider"] == "unpatched" and "peak_mib" in r}
    for row in results:
        base = unpatched.get(row["model"])
        if base is None or "peak_mib" not in row:
            continue
        row["peak_pct_of_unpatched"] = 100 * row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]


def format_table(results: list[dict], device_name: str) -> str:
    lines = [
        f"Training step of Hugging Face models, unpatched vs apply_kernels, on {device_name}",
        "| model | provider | vocab | batch x context | dtype | step ms | tokens/s | speedup | peak MiB "
        "| peak % of unpatched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['model']} | {r['provider']} |"
        if "peak_mib" not in r:
            lines.append(f"{head} skipped: {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        pct = r.get("peak_pct_of_unpatched")
        lines.append(
            f"{head} {r['vocab']} | {r['batch']} x {r['context']} | {r['dtype']} | {r['step_ms']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r.get('speedup', 1.0):.2f}x | {r['peak_mib']:.0f} | "
            f"{'' if pct is None else f'{pct:.1f}%'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"subset of {list(MODELS)}")
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), help=f"subset of {list(PROVIDERS)}")
    parser.add_argument("--context", type=int, default=2048, help="tokens per row")
    parser.add_argument("--batch", type=int, default=4 if ON_CUDA else 1, help="rows per step")
    parser.add_argument("--steps", type=int, default=5 if ON_CUDA else 2, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2 if ON_CUDA else 1, help="untimed steps before measuring")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement process")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf.json", help="JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        name, provider = args.worker
        print(json.dumps(measure_one(name, provider, args.context, args.batch, args.steps, args.warmup)), flush=True)
        return 0
    for option, chosen, known in (("--models", args.models, MODELS), ("--providers", args.providers, PROVIDERS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"{option} {unknown}: expected among {list(known)}")

    device_name = torch.cuda.get_device_name() if ON_CUDA else f"CPU ({platform.processor() or platform.machine()})"
    results = []
    for name in args.models:
        for provider in args.providers:
            row = run_child(name, provider, args)
            print(json.dumps(row), flush=True)
            results.append(row)
    add_ratios(results)
    print(format_table(results, device_name))
    gemma = [r for r in results if r["model"] == "gemma3" and r.get("peak_pct_of_unpatched") is not None]
    if not ON_CUDA and args.context == 2048:
        for row in gemma:
            if row["provider"] != "unpatched":
                verdict = "meets" if row["peak_pct_of_unpatched"] <= MEMORY_GOAL_PCT else "MISSES"
                print(f"{row['provider']} at Gemma's vocabulary: peak {row['peak_pct_of_unpatched']:.1f}% of the "
                      f"unpatched step ({verdict} the {MEMORY_GOAL_PCT:.0f}% goal)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"device": device_name, "torch": torch.__version__, "results": results}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
