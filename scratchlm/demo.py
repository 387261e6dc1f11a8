"""`scratchlm demo`: the whole pipeline, end to end, on text every Python ships with.

1. Corpus: CPython's documentation topics (``pydoc_data.topics``, ~465 KB of
   English and code), one document per topic, joined by ``<|endoftext|>``;
   every tenth topic is held out for validation.
2. Tokenizer: byte-level BPE trained on the training split.
3. Token files: both splits encoded to ``.npy`` token files.
4. Training: a small TransformerLM, validation loss measured before and after
   (``--document_mask``: attention kept inside each topic).
5. Sampling: three prompts continued by the trained model.

The defaults finish in a few minutes on a 2-core CPU and use the GPU when
there is one. The last line printed is
``demo: val loss A -> B, checkpoint at PATH``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>"]
PROMPTS = ["The", "To create a class,", "If the exception"]
# One topic in ten goes to validation: ~8 documents, ~10% of the text.
VALIDATION_EVERY = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=Path("demo_out"), help="where corpus, tokenizer, token files and checkpoint go")
    parser.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--total_iters", type=int, default=400, help="training steps")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    parser.add_argument("--context_length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max_tokens", type=int, default=60, help="tokens generated per sample")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split-independent parts: init, batches, sampling")
    parser.add_argument(
        "--document_mask",
        action="store_true",
        help="train with attention kept inside each topic (documents end at <|endoftext|>, whose id the demo's "
        "tokenizer knows)",
    )


def write_corpus(output_dir: Path) -> tuple[Path, Path]:
    """Write the training and validation splits of the documentation topics."""
    from pydoc_data.topics import topics

    separator = SPECIAL_TOKENS[0]
    documents = [topics[name].strip() for name in sorted(topics)]
    val_docs = documents[::VALIDATION_EVERY]
    train_docs = [doc for i, doc in enumerate(documents) if i % VALIDATION_EVERY]
    output_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = output_dir / "train.txt", output_dir / "val.txt"
    train_path.write_text(separator.join(train_docs), encoding="utf-8")
    val_path.write_text(separator.join(val_docs), encoding="utf-8")
    return train_path, val_path


def run(args: argparse.Namespace) -> int:
    from scratchlm.model import decode
    from scratchlm.tokenizer import Tokenizer, encode_file, train_bpe
    from scratchlm.train import TrainConfig, load_model, train
    from scratchlm.train.stopping import TrainingStopped

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out: Path = args.output_dir
    started = time.perf_counter()

    train_txt, val_txt = write_corpus(out)
    print(f"[1/5] corpus: {train_txt} ({train_txt.stat().st_size:,} bytes), {val_txt} ({val_txt.stat().st_size:,} bytes)")

    vocab, merges = train_bpe(train_txt, args.vocab_size, SPECIAL_TOKENS)
    tokenizer = Tokenizer(vocab, merges, SPECIAL_TOKENS)
    tokenizer_path = out / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    print(f"[2/5] tokenizer: {len(vocab)} tokens -> {tokenizer_path} ({time.perf_counter() - started:.1f}s)")

    train_npy, val_npy = out / "train.npy", out / "val.npy"
    n_train = encode_file(tokenizer, train_txt, train_npy)
    n_val = encode_file(tokenizer, val_txt, val_npy)
    print(f"[3/5] token files: {n_train:,} training and {n_val:,} validation tokens ({time.perf_counter() - started:.1f}s)")

    config = TrainConfig(
        train_data_path=str(train_npy),
        val_data_path=str(val_npy),
        vocab_size=len(vocab),
        context_length=args.context_length,
        d_model=128,
        num_layers=4,
        num_heads=4,
        d_ff=384,
        batch_size=args.batch_size,
        learning_rate=3e-3,
        min_learning_rate=3e-4,
        weight_decay=0.1,
        max_grad_norm=1.0,
        warmup_iters=max(1, args.total_iters // 20),
        total_iters=args.total_iters,
        eval_interval=max(1, args.total_iters // 4),
        eval_batches=8,
        checkpoint_interval=args.total_iters,
        output_dir=str(out / "run"),
        seed=args.seed,
        device=device,
        overwrite=True,  # the demo is meant to be run again and again
        document_mask=args.document_mask,
        eos_token_id=tokenizer.special_token_ids[SPECIAL_TOKENS[0]] if args.document_mask else None,
    )
    masking = f", attention within documents (<|endoftext|> = {config.eos_token_id})" if args.document_mask else ""
    print(
        f"[4/5] training on {device}: {config.total_iters} steps of {config.batch_size}x{config.context_length} "
        f"tokens{masking}"
    )
    try:
        summary = train(config)
    except TrainingStopped as stopped:
        # Ctrl-C or SIGTERM: the run is saved and resumable; the demo ends here, in one line.
        print(f"demo: training {stopped}", file=sys.stderr)
        return stopped.exit_code

    model = load_model(summary["checkpoint"], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = decode(
        model, tokenizer, PROMPTS, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, device=device, generator=generator
    )
    print("[5/5] samples:")
    for prompt, sample in zip(PROMPTS, samples):
        print(f"--- {prompt!r}\n{prompt}{sample}\n")
    print(f"demo took {time.perf_counter() - started:.0f}s")
    print(f"demo: val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f}, checkpoint at {summary['checkpoint']}")
    return 0
