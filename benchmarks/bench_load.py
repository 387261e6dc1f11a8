"""Loading a ~1B-parameter Llama with load_pretrained: wall time and peak resident memory per format.

    python benchmarks/bench_load.py [--layers 22] [--tmp-dir /tmp] [--out benchmarks/results/load.json]

The model is synthetic, TinyLlama-1.1B's shape by default (d_model 2048, 22
layers, d_ff 5632, 32 query / 4 key-value heads, vocabulary 32000: 1.10B
parameters). Its random weights are generated one tensor at a time and
written straight to disk, never two tensors held at once:
- a Hugging Face folder: config.json plus bfloat16 safetensors shards of
  about ``--shard-gb`` and their index (scratchlm's streaming writer);
- a GGUF file with F16 matrices and F32 norms (gguf.GGUFWriter, its tensor
  table written first and each tensor's data appended as it is made).

Each format then loads in a fresh subprocess (``load_pretrained(path,
kernels="reference", device="cpu")``, stored dtype kept), which reports the
wall time of the call and its peak resident set (VmHWM from /proc/self/status,
reset after the imports), next to the size of the weights it holds. Each
format is loaded "cold", after the files were evicted from the page cache
(posix_fadvise DONTNEED), so the disk is read, and "warm", from the page
cache, ``--repeats`` times each; the fastest time and the highest peak are
reported. The bound to check: peak - baseline <= weights + the
largest tensor (here the 32000 x 2048 embedding). To see it directly, a third
subprocess allocates and touches the same model without loading anything;
"loader_overhead_mib" is the load's peak minus that.

Temporary files (~4.4 GB with the defaults) are removed at the end unless
``--keep``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_memory import peak_memory_mib, reset_peak_memory  # noqa: E402

GIB = 1024**3


def llama_shapes(args) -> list[tuple[str, str, tuple[int, ...]]]:
    """(Hugging Face name, GGUF name, shape) of every weight, in file order."""
    d, f, v, heads, kv = args.d_model, args.d_ff, args.vocab, args.heads, args.kv_heads
    head_dim = d // heads
    shapes = [("model.embed_tokens.weight", "token_embd.weight", (v, d))]
    for i in range(args.layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        shapes += [
            (hf + "input_layernorm.weight", gg + "attn_norm.weight", (d,)),
            (hf + "self_attn.q_proj.weight", gg + "attn_q.weight", (heads * head_dim, d)),
            (hf + "self_attn.k_proj.weight", gg + "attn_k.weight", (kv * head_dim, d)),
            (hf + "self_attn.v_proj.weight", gg + "attn_v.weight", (kv * head_dim, d)),
            (hf + "self_attn.o_proj.weight", gg + "attn_output.weight", (d, heads * head_dim)),
            (hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", (d,)),
            (hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", (f, d)),
            (hf + "mlp.up_proj.weight", gg + "ffn_up.weight", (f, d)),
            (hf + "mlp.down_proj.weight", gg + "ffn_down.weight", (d, f)),
        ]
    shapes += [("model.norm.weight", "output_norm.weight", (d,)), ("lm_head.weight", "output.weight", (v, d))]
    return shapes


def random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, matrices N(0, 0.02^2): values of a plausible model, in float32."""
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def write_hf_folder(folder: Path, args) -> int:
    """config.json and bfloat16 shards of about --shard-gb; returns the bytes of weights written."""
    from scratchlm.model.safetensors_writer import SafetensorsStreamWriter

    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
        "hidden_size": args.d_model, "intermediate_size": args.d_ff, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": args.context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for hf_name, _, shape in llama_shapes(args):
        size = math.prod(shape) * 2
        if shards[-1] and shard_bytes + size > args.shard_gb * GIB:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((hf_name, shape))
        shard_bytes += size
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / name, "wb") as file:
            writer = SafetensorsStreamWriter(file, [(n, torch.bfloat16, s) for n, s in shard], {"format": "pt"})
            for tensor_name, shape in shard:
                writer.write(tensor_name, random_tensor(shape, generator).to(torch.bfloat16))
                weight_map[tensor_name] = name
                total += math.prod(shape) * 2
            writer.close()
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    return total


def write_gguf_file(path: Path, args) -> int:
    """A llama GGUF, F16 matrices and F32 norms, streamed; returns the bytes of weights written."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(args.context)
    writer.add_embedding_length(args.d_model)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.d_ff)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(args.d_model // args.heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    shapes = llama_shapes(args)
    for _, name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = torch.Generator().manual_seed(0)
    total = 0
    for _, _, shape in shapes:
        values = random_tensor(shape, generator).numpy()
        data = values if len(shape) == 1 else values.astype(np.float16)
        writer.write_tensor_data(data)
        total += data.nbytes
    writer.close()
    return total


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's clean pages from the page cache, so the next read comes from disk."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def child_allocate_only(path: str, dtype: str) -> None:
    """Run in a subprocess: allocate and touch the same model without reading it, measured."""
    import gguf  # noqa: F401  (imported as in child(), so both baselines hold the same modules)
    import safetensors  # noqa: F401

    from scratchlm.model import TransformerLM
    from scratchlm.model.pretrained import read_pretrained_config

    config = read_pretrained_config(path)
    reset_peak_memory()
    baseline = peak_memory_mib()
    model = TransformerLM.empty(config, kernels="reference", device="cpu", dtype=getattr(torch, dtype))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    print(json.dumps({"added_mib": peak_memory_mib() - baseline}))


def child(path: str) -> None:
    """Run in the subprocess: one load_pretrained call, measured; prints one JSON line."""
    import gguf  # noqa: F401  (the readers' own imports, so the baseline holds them)
    import safetensors  # noqa: F401

    from scratchlm.model import load_pretrained

    reset_peak_memory()
    baseline = peak_memory_mib()
    start = time.perf_counter()
    model, _ = load_pretrained(path, kernels="reference", device="cpu")
    seconds = time.perf_counter() - start
    peak = peak_memory_mib()
    parameters = model.num_parameters()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({
        "seconds": seconds, "baseline_mib": baseline, "peak_mib": peak, "added_mib": peak - baseline,
        "model_weights_mib": weights / 2**20, "largest_tensor_mib": largest / 2**20,
        "parameters": parameters, "dtype": str(next(model.parameters()).dtype),
    }))  # fmt: skip


def run_child(*arguments: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{arguments} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(path: Path, cold: bool, repeats: int) -> dict:
    """The fastest of ``repeats`` loads (a shared machine only ever adds delay), with every time kept."""
    runs = []
    for _ in range(repeats):
        if cold:
            evict_from_page_cache(path)
        runs.append(run_child("--child", str(path)))
    best = min(runs, key=lambda run: run["seconds"])
    peaks = {key: max(run[key] for run in runs) for key in ("peak_mib", "added_mib")}
    return {**best, **peaks, "all_seconds": [run["seconds"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help="internal: load this path and report (run in a subprocess)")
    parser.add_argument("--child-allocate", dest="child_allocate", nargs=2, metavar=("PATH", "DTYPE"),
                        help="internal: allocate PATH's model in DTYPE without loading it, and report")  # fmt: skip
    parser.add_argument("--d-model", dest="d_model", type=int, default=2048, help="hidden size")
    parser.add_argument("--layers", type=int, default=22, help="number of transformer blocks")
    parser.add_argument("--d-ff", dest="d_ff", type=int, default=5632, help="feed-forward width")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--context", type=int, default=2048, help="max_position_embeddings / context_length")
    parser.add_argument("--shard-gb", dest="shard_gb", type=float, default=1.0, help="safetensors shard size, GiB")
    parser.add_argument("--tmp-dir", dest="tmp_dir", default=None, help="where the synthetic files go")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument(
        "--repeats", type=int, default=3, help="loads per format and cache state; the fastest is reported"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "load.json"), help="JSON results")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.child_allocate:
        child_allocate_only(*args.child_allocate)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_load.", dir=args.tmp_dir))
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "shape": {k: getattr(args, k) for k in ("d_model", "layers", "d_ff", "heads", "kv_heads", "vocab", "context")},
        "formats": {},
    }
    try:
        targets = {
            "hf-bf16-safetensors": (work / "hf", write_hf_folder),
            "gguf-f16": (work / "model.gguf", write_gguf_file),
        }
        for name, (path, write) in targets.items():
            start = time.perf_counter()
            weights = write(path, args)
            written = time.perf_counter() - start
            entry = {"file_weights_gib": weights / GIB, "write_seconds": written}
            for cold in (True, False):
                entry["cold" if cold else "warm"] = measure(path, cold, args.repeats)
            dtype = entry["warm"]["dtype"].removeprefix("torch.")
            allocated = run_child("--child-allocate", str(path), dtype)["added_mib"]
            # What loading costs beyond holding the model: to compare with the largest tensor.
            entry["allocate_only_added_mib"] = allocated
            entry["loader_overhead_mib"] = max(entry[p]["added_mib"] for p in ("cold", "warm")) - allocated
            results["formats"][name] = entry
            print(f"{name}: weights {weights / GIB:.2f} GiB, written in {written:.1f} s")
            print(
                f"  the model alone (allocated, not loaded) adds {allocated:.0f} MiB; loading adds "
                f"{entry['loader_overhead_mib']:.0f} MiB more "
                f"(largest tensor {entry['warm']['largest_tensor_mib']:.0f} MiB)"
            )
            for phase in ("cold", "warm"):
                r = entry[phase]
                print(
                    f"  {phase}: {r['seconds']:.2f} s, peak RSS {r['peak_mib']:.0f} MiB "
                    f"(+{r['added_mib']:.0f} MiB over {r['baseline_mib']:.0f} MiB after imports; "
                    f"model {r['model_weights_mib']:.0f} MiB, largest tensor {r['largest_tensor_mib']:.0f} MiB)"
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
