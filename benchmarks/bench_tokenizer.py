"""Tokenizer speed next to tiktoken and Hugging Face ``tokenizers``, in one run.

Seven measurements, each against the library that sets its target (llama3 has none), and one opt-in:

* encode: ``Tokenizer.encode`` with GPT-2's files on python-docs.txt, one
  process, vs tiktoken's ``encode_ordinary`` built offline from the same files
  (single thread). The ids must be identical. Our time includes filling the
  pre-token cache from empty. The two alternate for ``--rounds`` rounds in
  one process (ours, tiktoken, ours, ...), and the medians and ranges are
  kept: on a shared machine one pair of runs says little, and the ratio of
  neighbouring runs moves less than either rate. Rates are given by wall
  clock and by CPU time (``time.process_time``), which other processes on
  the machine disturb less. Target: >= 0.5x tiktoken's MB/s.
* encode_file: ``encode_file`` over ``--processes`` workers on the corpus
  repeated ``--file-copies`` times, vs the same tiktoken single-thread rate.
  The file must equal the one written by one process. Target: >= 1.0x.
* train: ``train_bpe`` to ``--vocab-size`` vs HF's byte-level ``BpeTrainer``
  (same corpus, vocab size and special token). Trained twice, with one and
  with ``--processes`` workers; the merges must be equal. Target: <= 2x HF's time.
* multilingual: round trip and tiktoken agreement on multilingual.txt.
* llama3: the same GPT-2 vocabulary under the "llama3" pre-tokenizer with
  ``ignore_merges`` (Llama 3's settings) on python-docs.txt, cold, vs tiktoken
  with Llama 3's regex on the same ranks (tiktoken always takes a piece found
  whole in the vocabulary as one token, which is ignore_merges). The ids must
  be identical. No target: it shows what the Llama 3 path costs.
* qwen2: a Qwen2-style tokenizer (byte-level BPE, the "qwen2" pre-tokenizer,
  NFC) of ``--qwen-vocab-size`` tokens, trained by HF's ``BpeTrainer`` on
  both corpora, loaded with ``Tokenizer.from_hf``, vs HF ``tokenizers`` on
  python-docs.txt, single thread, cold. HF runs twice per round, on the whole
  text and with ``encode_batch`` over ~4 KB pieces cut where the qwen2 cut
  rule allows (exact, so the ids are the same); the faster counts.
  The ids must be identical. Target: >= 0.5x HF's MB/s.
* sentencepiece: the same for a Llama 2-style SentencePiece BPE of
  ``--sentencepiece-vocab-size`` tokens (``<unk>``, ``<s>``, ``</s>``, 256
  byte-fallback tokens, then trained ones; Prepend + Replace normalizer), vs
  HF on the whole text (a piece of text does not encode as its part of the
  whole there: the normalizer prepends ``▁`` to each). Target: >= 0.5x.
  Both go through :func:`measure_against_hf` (a Tokenizer, an HF tokenizer
  and a text), the hook for any further kind.
* large file (opt-in, ``--large-file-gb``): ``encode_file`` over
  ``--processes`` workers on a file of that many GB (the corpora repeated),
  for its memory: the issue asks that a 1 GB input need at most ~2 GB of RAM.
  The file is deleted afterwards.

Peak memory is the resident-set high-water mark (VmHWM), reset before each
step through /proc/self/clear_refs; worker processes report theirs through
``getrusage(RUSAGE_CHILDREN)`` (the largest child so far). For the large file,
a thread also samples the resident sets of this process and its workers
together every 50 ms, which gives the total that was really in use at once. This is a plain
script, never a test: it prints a table and writes JSON, and never fails on a
missed target.

    python benchmarks/bench_tokenizer.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scratchlm.tokenizer import (
    GPT2_PRETOKENIZE_PATTERN,
    LLAMA3_PRETOKENIZE_PATTERN,
    Tokenizer,
    encode_file,
    read_token_file,
    train_bpe,
)
from scratchlm.tokenizer.gpt2_files import decode_gpt2_token
from scratchlm.tokenizer.pretokenize import last_safe_cut
from scratchlm.tokenizer.pretokenizers import QWEN2_PRETOKENIZE_PATTERN

from process_memory import TreeMemorySampler, children_peak_memory_mib, peak_memory_mib, reset_peak_memory

EOT = "<|endoftext|>"
# The team's shared corpora live beside the repository checkout.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MIB = 1 << 20
METASPACE = "\u2581"  # SentencePiece's word marker, "▁"


def timed(function, *args, **kwargs):
    """``(result, seconds, peak MiB)`` of one call."""
    reset_peak_memory()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    return result, seconds, peak_memory_mib()


def offline_tiktoken(vocab_path: Path, merges_path: Path, pattern: str = GPT2_PRETOKENIZE_PATTERN):
    """tiktoken's GPT-2 encoding built from the local files (no download), with ``pattern`` as its regex."""
    import tiktoken

    encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
    ranks = {decode_gpt2_token(token): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={EOT: encoder[EOT]},
    )


def clocked(function, *args):
    """``(result, wall seconds, CPU seconds)`` of one call, after a garbage collection."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def spread(values: list[float]) -> dict:
    """Median and range of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def alternate(ours, theirs, text: str, megabytes: float, rounds: int, before_ours=None) -> dict:
    """Time ``ours(text)`` and ``theirs(text)`` in turn for ``rounds`` rounds; MB/s and ratios per clock.

    ``before_ours`` runs untimed before each of our runs (emptying a cache).
    The ids of the first round must be equal.
    """
    per_round: dict[str, list[float]] = {name: [] for name in (
        "scratchlm_mb_per_s", "reference_mb_per_s", "ratio", "scratchlm_cpu_mb_per_s", "reference_cpu_mb_per_s",
        "cpu_ratio")}
    identical, tokens = True, 0
    for round_index in range(rounds):
        if before_ours is not None:
            before_ours()
        our_ids, wall, cpu = clocked(ours, text)
        their_ids, their_wall, their_cpu = clocked(theirs, text)
        if round_index == 0:
            identical, tokens = our_ids == their_ids, len(our_ids)
        del our_ids, their_ids
        per_round["scratchlm_mb_per_s"].append(megabytes / wall)
        per_round["reference_mb_per_s"].append(megabytes / their_wall)
        per_round["ratio"].append(their_wall / wall)
        per_round["scratchlm_cpu_mb_per_s"].append(megabytes / cpu)
        per_round["reference_cpu_mb_per_s"].append(megabytes / their_cpu)
        per_round["cpu_ratio"].append(their_cpu / cpu)
    return {"megabytes": megabytes, "tokens": tokens, "identical": identical, "rounds": rounds,
            "per_round": per_round, **{name: spread(values) for name, values in per_round.items()}}


def measure_encode(tokenizer: Tokenizer, encoding, text: str, megabytes: float, rounds: int) -> dict:
    # Cold each round: the cache emptied, as a fresh process would start.
    timing = alternate(tokenizer.encode, encoding.encode_ordinary, text, megabytes, rounds, tokenizer._cache.clear)
    tokenizer._cache.clear()
    _, _, our_peak = timed(tokenizer.encode, text)
    _, _, their_peak = timed(encoding.encode_ordinary, text)
    return {
        "megabytes": megabytes,
        "tokens": timing["tokens"],
        "identical_to_tiktoken": timing["identical"],
        "rounds": rounds,
        # Medians over the rounds; spread (median, min, max) and per_round below hold the rest.
        "scratchlm_mb_per_s": timing["scratchlm_mb_per_s"]["median"],
        "scratchlm_peak_mib": our_peak,
        "tiktoken_mb_per_s": timing["reference_mb_per_s"]["median"],
        "tiktoken_peak_mib": their_peak,
        "ratio": timing["ratio"]["median"],
        "cpu_ratio": timing["cpu_ratio"]["median"],
        "target_ratio": 0.5,
        "spread": {name: timing[name] for name in timing["per_round"]},
        "per_round": timing["per_round"],
    }


def measure_encode_file(tokenizer: Tokenizer, corpus: Path, copies: int, processes: int, tiktoken_mb_per_s: float,
                      work_dir: Path) -> dict:
    big = work_dir / "corpus_repeated.txt"
    data = corpus.read_bytes()
    with open(big, "wb") as file:
        for _ in range(copies):
            file.write(data)
            file.write(b"\n")
    del data
    megabytes = big.stat().st_size / 1e6
    parallel_path, single_path = work_dir / "parallel.npy", work_dir / "single.npy"
    count, seconds, parent_peak = timed(encode_file, tokenizer, big, parallel_path, num_processes=processes)
    worker_peak = children_peak_memory_mib()
    _, single_seconds, single_peak = timed(encode_file, tokenizer, big, single_path, num_processes=1)
    identical = np.array_equal(read_token_file(parallel_path), read_token_file(single_path))
    return {
        "megabytes": megabytes,
        "tokens": count,
        "processes": processes,
        "identical_to_one_process": bool(identical),
        "scratchlm_seconds": seconds,
        "scratchlm_mb_per_s": megabytes / seconds,
        "parent_peak_mib": parent_peak,
        "largest_worker_peak_mib": worker_peak,
        "one_process_seconds": single_seconds,
        "one_process_mb_per_s": megabytes / single_seconds,
        "one_process_peak_mib": single_peak,
        "tiktoken_mb_per_s": tiktoken_mb_per_s,
        "ratio": (megabytes / seconds) / tiktoken_mb_per_s,
        "target_ratio": 1.0,
    }


def train_hf(corpus: Path, vocab_size: int):
    """HF tokenizers' byte-level BPE, set up like train_bpe: GPT-2 regex, all 256 bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(corpus)], trainer)
    return hf


def measure_train(corpus: Path, vocab_size: int, processes: int) -> dict:
    result = {"vocab_size": vocab_size, "processes": processes}
    (vocab, merges), seconds, peak = timed(train_bpe, corpus, vocab_size, [EOT], num_processes=processes)
    (_, merges_one), one_seconds, one_peak = timed(train_bpe, corpus, vocab_size, [EOT], num_processes=1)
    result |= {
        "merges": len(merges),
        "same_merges_for_1_and_n_processes": merges == merges_one,
        "scratchlm_seconds": seconds,
        "scratchlm_peak_mib": peak,
        "scratchlm_worker_peak_mib": children_peak_memory_mib(),
        "one_process_seconds": one_seconds,
        "one_process_peak_mib": one_peak,
    }
    try:
        hf, hf_seconds, hf_peak = timed(train_hf, corpus, vocab_size)
    except ImportError:
        return result | {"hf_tokenizers": "not installed (pip install tokenizers)"}
    return result | {
        "hf_vocab_size": hf.get_vocab_size(),
        "hf_seconds": hf_seconds,
        "hf_peak_mib": hf_peak,
        "ratio": seconds / hf_seconds,
        "target_ratio": 2.0,
    }


def measure_multilingual(tokenizer: Tokenizer, encoding, text: str, megabytes: float) -> dict:
    tokenizer._cache.clear()
    ours, seconds, _ = timed(tokenizer.encode, text)
    theirs, their_seconds, _ = timed(encoding.encode_ordinary, text)
    return {
        "megabytes": megabytes,
        "tokens": len(ours),
        "round_trips": tokenizer.decode(ours) == text,
        "identical_to_tiktoken": ours == theirs,
        "scratchlm_mb_per_s": megabytes / seconds,
        "tiktoken_mb_per_s": megabytes / their_seconds,
        "ratio": their_seconds / seconds,
    }


def measure_llama3(gpt2: Tokenizer, encoding, text: str, megabytes: float) -> dict:
    tokenizer = Tokenizer(gpt2.vocab, gpt2.merges, gpt2.special_tokens, pretokenizer="llama3", ignore_merges=True)
    ours, seconds, _ = timed(tokenizer.encode, text)
    theirs, their_seconds, _ = timed(encoding.encode_ordinary, text)
    return {
        "megabytes": megabytes,
        "tokens": len(ours),
        "identical_to_tiktoken": ours == theirs,
        "scratchlm_mb_per_s": megabytes / seconds,
        "tiktoken_mb_per_s": megabytes / their_seconds,
        "ratio": their_seconds / seconds,
    }


def measure_against_hf(tokenizer: Tokenizer, hf, text: str, rounds: int = 3, chunks: list[str] | None = None) -> dict:
    """Cold ``tokenizer.encode(text)`` vs HF ``tokenizers`` on one thread, alternating; the ids must be equal.

    HF encodes the whole text; given ``chunks`` (pieces that concatenate to
    ``text``, cut where the pre-tokenizer's cut rule allows), it also runs
    ``encode_batch`` on them and the faster of its two ways counts.
    """
    megabytes = len(text.encode("utf-8")) / 1e6
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by HF on every call: one thread from here

    def hf_whole(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    def hf_chunks(_: str) -> list[int]:
        return [i for encoding in hf.encode_batch(chunks, add_special_tokens=False) for i in encoding.ids]

    try:
        whole = alternate(tokenizer.encode, hf_whole, text, megabytes, rounds, tokenizer._cache.clear)
        best, way = whole, "whole text"
        if chunks is not None:
            assert "".join(chunks) == text
            batched = alternate(tokenizer.encode, hf_chunks, text, megabytes, rounds, tokenizer._cache.clear)
            if batched["reference_cpu_mb_per_s"]["median"] > whole["reference_cpu_mb_per_s"]["median"]:
                best, way = batched, f"encode_batch of {len(chunks)} pieces"
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    result = {
        "megabytes": megabytes,
        "tokens": best["tokens"],
        "vocab_size": tokenizer.vocab_size,
        "identical_to_hf": whole["identical"] and best["identical"],
        "rounds": rounds,
        "hf_way": way,
        "scratchlm_mb_per_s": best["scratchlm_mb_per_s"]["median"],
        "hf_mb_per_s": best["reference_mb_per_s"]["median"],
        "ratio": best["ratio"]["median"],
        "cpu_ratio": best["cpu_ratio"]["median"],
        "target_ratio": 0.5,
        "spread": {name: best[name] for name in best["per_round"]},
        "hf_whole_text_mb_per_s": whole["reference_mb_per_s"]["median"],
    }
    return result


def safe_chunks(text: str, size: int, pretokenizer: str) -> list[str]:
    """``text`` in pieces of at most about ``size`` characters, each cut where ``pretokenizer``'s rule is exact."""
    chunks, start = [], 0
    while len(text) - start > size:
        window = text[start : start + size]
        cut = last_safe_cut(window, pretokenizer=pretokenizer)
        if cut == 0:
            break  # no exact cut in a whole window: the rest stays one piece
        chunks.append(window[:cut])
        start += cut
    chunks.append(text[start:])
    return chunks


def qwen2_style_pair(corpora: list[Path], vocab_size: int, folder: Path) -> tuple[Tokenizer, object]:
    """A Qwen2-style tokenizer trained by HF on ``corpora``: (ours from its tokenizer.json, HF's)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(path) for path in corpora], trainer)
    hf.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_hf(folder), hf


def sentencepiece_style_pair(corpora: list[Path], vocab_size: int, folder: Path) -> tuple[Tokenizer, object]:
    """A Llama 2-style SentencePiece BPE of ``vocab_size`` tokens trained by HF: (ours, HF's).

    The trainer learns merges over characters in words cut before ``▁`` (as
    SentencePiece trains); the file is laid out as Llama 2's: ``<unk>``,
    ``<s>``, ``</s>``, the 256 ``<0xNN>`` byte tokens, then the trained ones.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers

    specials = ["<unk>", "<s>", "</s>"]
    fixed = len(specials) + 256
    learner = HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    # Rare characters (most CJK here) are left to the byte tokens, as in Llama 2.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - fixed, limit_alphabet=1000, show_progress=False)
    learner.train([str(path) for path in corpora], trainer)
    model = json.loads(learner.to_str())["model"]
    vocab = {token: index for index, token in enumerate(specials)} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(METASPACE), normalizers.Replace(" ", METASPACE)])
    hf.decoder = decoders.Sequence([
        decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    hf.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    hf.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_hf(folder), hf


def measure_large_file(tokenizer: Tokenizer, corpora: list[Path], gigabytes: float, processes: int,
                       work_dir: Path) -> dict:
    big = work_dir / "large_input.txt"
    output = work_dir / "large_output.npy"
    target = int(gigabytes * 1e9)
    try:
        with open(big, "wb") as file:
            written = 0
            while written < target:
                for corpus in corpora:
                    data = corpus.read_bytes()
                    file.write(data + b"\n")
                    written += len(data) + 1
        megabytes = big.stat().st_size / 1e6
        with TreeMemorySampler() as sampler:
            count, seconds, parent_peak = timed(encode_file, tokenizer, big, output, num_processes=processes)
        return {
            "megabytes": megabytes,
            "tokens": count,
            "processes": processes,
            "scratchlm_seconds": seconds,
            "scratchlm_mb_per_s": megabytes / seconds,
            "parent_peak_mib": parent_peak,
            "largest_worker_peak_mib": children_peak_memory_mib(),
            "sampled_peak_total_mib": sampler.peak_total_mib,
            "sampled_peak_workers_mib": sampler.peak_children_mib,
            "target_total_mib": 2048.0,  # the issue: a 1 GB input needs at most ~2 GB, and memory must not grow with size
        }
    finally:
        big.unlink(missing_ok=True)
        output.unlink(missing_ok=True)


def print_table(results: dict) -> None:
    rows = [("step", "ours", "reference", "ratio", "target", "met", "check", "peak MiB")]
    encode = results["encode"]
    rows.append((
        f"encode, median of {encode['rounds']} (MB/s)", f"{encode['scratchlm_mb_per_s']:.2f}",
        f"{encode['tiktoken_mb_per_s']:.2f} tiktoken",
        f"{encode['ratio']:.2f}x ({encode['spread']['ratio']['min']:.2f}-{encode['spread']['ratio']['max']:.2f}),"
        f" CPU {encode['cpu_ratio']:.2f}x", ">= 0.5x", str(encode["ratio"] >= 0.5),
        f"ids equal: {encode['identical_to_tiktoken']}", f"{encode['scratchlm_peak_mib']:.0f}",
    ))
    if "encode_file" in results:
        big = results["encode_file"]
        rows.append((
            f"encode_file x{big['processes']} (MB/s)", f"{big['scratchlm_mb_per_s']:.2f}",
            f"{big['tiktoken_mb_per_s']:.2f} tiktoken", f"{big['ratio']:.2f}x", ">= 1.0x", str(big["ratio"] >= 1.0),
            f"same as 1 proc: {big['identical_to_one_process']}",
            f"{big['parent_peak_mib']:.0f} + {big['largest_worker_peak_mib']:.0f}/worker",
        ))
    if "train" in results:
        train = results["train"]
        hf = f"{train['hf_seconds']:.1f} HF" if "hf_seconds" in train else "n/a"
        ratio = f"{train['ratio']:.2f}x" if "ratio" in train else "n/a"
        rows.append((
            f"train {train['vocab_size']} (s)", f"{train['scratchlm_seconds']:.1f}", hf, ratio, "<= 2.0x",
            str(train.get("ratio", float("inf")) <= 2.0),
            f"merges same: {train['same_merges_for_1_and_n_processes']}", f"{train['scratchlm_peak_mib']:.0f}",
        ))
    if "large_file" in results:
        large = results["large_file"]
        rows.append((
            f"large file {large['megabytes'] / 1000:.2f} GB x{large['processes']} (MiB)",
            f"{large['sampled_peak_total_mib']:.0f}", "", "", f"<= {large['target_total_mib']:.0f}",
            str(large["sampled_peak_total_mib"] <= large["target_total_mib"]),
            f"{large['scratchlm_mb_per_s']:.1f} MB/s",
            f"{large['parent_peak_mib']:.0f} + {large['largest_worker_peak_mib']:.0f}/worker",
        ))
    multi = results["multilingual"]
    rows.append((
        "multilingual (MB/s)", f"{multi['scratchlm_mb_per_s']:.2f}", f"{multi['tiktoken_mb_per_s']:.2f} tiktoken",
        f"{multi['ratio']:.2f}x", "exact", str(multi["round_trips"] and multi["identical_to_tiktoken"]),
        f"round trip: {multi['round_trips']}, ids equal: {multi['identical_to_tiktoken']}", "",
    ))
    llama3 = results["llama3"]
    rows.append((
        "llama3 preset (MB/s)", f"{llama3['scratchlm_mb_per_s']:.2f}", f"{llama3['tiktoken_mb_per_s']:.2f} tiktoken",
        f"{llama3['ratio']:.2f}x", "", "", f"ids equal: {llama3['identical_to_tiktoken']}", "",
    ))
    for key, name in (("qwen2", "qwen2-style"), ("sentencepiece", "sentencepiece-style")):
        if key in results:
            kind = results[key]
            rows.append((
                f"{name} {kind['vocab_size'] // 1000}k (MB/s)", f"{kind['scratchlm_mb_per_s']:.2f}",
                f"{kind['hf_mb_per_s']:.2f} HF 1 thread", f"{kind['ratio']:.2f}x", ">= 0.5x",
                str(kind["ratio"] >= 0.5), f"ids equal: {kind['identical_to_hf']}", "",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SCRATCHLM_DATA", DEFAULT_DATA_DIR)),
                        help="folder holding python-docs.txt, multilingual.txt, gpt2_vocab.json, gpt2_merges.txt")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes for encode_file and train_bpe (default: all cores)")
    parser.add_argument("--file-copies", type=int, default=4,
                        help="encode_file runs on python-docs.txt repeated this many times")
    parser.add_argument("--vocab-size", type=int, default=10_000, help="vocabulary size for the training comparison")
    parser.add_argument("--rounds", type=int, default=7,
                        help="alternating rounds (ours, tiktoken) for the GPT-2 encode comparison")
    parser.add_argument("--hf-rounds", type=int, default=3,
                        help="alternating rounds (ours, HF) for the qwen2- and sentencepiece-style comparisons")
    parser.add_argument("--qwen-vocab-size", type=int, default=150_000,
                        help="vocabulary size of the Qwen2-style tokenizer trained for the comparison with HF")
    parser.add_argument("--sentencepiece-vocab-size", type=int, default=32_000,
                        help="vocabulary size of the Llama 2-style SentencePiece tokenizer for the comparison with HF")
    parser.add_argument("--skip-hf-kinds", action="store_true",
                        help="leave out the qwen2- and sentencepiece-style comparisons with HF tokenizers")
    parser.add_argument("--skip-train", action="store_true", help="leave out the (slowest) training comparison")
    parser.add_argument("--skip-encode-file", action="store_true", help="leave out the encode_file comparison")
    parser.add_argument("--large-file-gb", type=float, default=0.0,
                        help="also encode_file a file of this many GB (the corpora repeated) and report its total "
                             "memory; off by default (1 GB takes ~1-2 minutes)")
    parser.add_argument("--large-file-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder for the large file and its token file (both deleted afterwards)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tokenizer.json",
                        help="where to write the JSON results")
    args = parser.parse_args()

    corpus = args.data_dir / "python-docs.txt"
    needed = [corpus, args.data_dir / "multilingual.txt", args.data_dir / "gpt2_vocab.json",
              args.data_dir / "gpt2_merges.txt"]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        print(f"--data-dir {str(args.data_dir)!r} lacks {missing}; nothing to measure", file=sys.stderr)
        return

    import tiktoken
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "tiktoken": tiktoken.__version__,
        }
    }
    try:
        import tokenizers
        results["machine"]["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass

    tokenizer = Tokenizer.from_files(args.data_dir / "gpt2_vocab.json", args.data_dir / "gpt2_merges.txt", [EOT])
    encoding = offline_tiktoken(args.data_dir / "gpt2_vocab.json", args.data_dir / "gpt2_merges.txt")

    raw = corpus.read_bytes()
    results["encode"] = measure_encode(tokenizer, encoding, raw.decode("utf-8"), len(raw) / 1e6, args.rounds)
    raw = (args.data_dir / "multilingual.txt").read_bytes()
    results["multilingual"] = measure_multilingual(tokenizer, encoding, raw.decode("utf-8"), len(raw) / 1e6)
    raw = corpus.read_bytes()
    llama3_encoding = offline_tiktoken(
        args.data_dir / "gpt2_vocab.json", args.data_dir / "gpt2_merges.txt", LLAMA3_PRETOKENIZE_PATTERN
    )
    results["llama3"] = measure_llama3(tokenizer, llama3_encoding, raw.decode("utf-8"), len(raw) / 1e6)
    del raw
    if not args.skip_encode_file:
        with tempfile.TemporaryDirectory() as work_dir:
            results["encode_file"] = measure_encode_file(
                tokenizer, corpus, args.file_copies, args.processes,
                results["encode"]["tiktoken_mb_per_s"], Path(work_dir),
            )
    if args.large_file_gb > 0:
        with tempfile.TemporaryDirectory(dir=args.large_file_dir) as work_dir:
            results["large_file"] = measure_large_file(
                tokenizer, [corpus, args.data_dir / "multilingual.txt"], args.large_file_gb, args.processes,
                Path(work_dir),
            )
    if not args.skip_train:
        results["train"] = measure_train(corpus, args.vocab_size, args.processes)

    # Last: what these leave resident would raise the peaks measured after them.
    if not args.skip_hf_kinds:
        corpora = [corpus, args.data_dir / "multilingual.txt"]
        text = corpus.read_text(encoding="utf-8")
        with tempfile.TemporaryDirectory() as folder:
            ours, hf = qwen2_style_pair(corpora, args.qwen_vocab_size, Path(folder))
            results["qwen2"] = measure_against_hf(ours, hf, text, args.hf_rounds, safe_chunks(text, 4096, "qwen2"))
        del ours, hf
        with tempfile.TemporaryDirectory() as folder:
            ours, hf = sentencepiece_style_pair(corpora, args.sentencepiece_vocab_size, Path(folder))
            results["sentencepiece"] = measure_against_hf(ours, hf, text, args.hf_rounds)
        del ours, hf, text

    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
