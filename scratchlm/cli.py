"""The `scratchlm` command: one argparse tree over the package's parts.

    scratchlm tokenizer train --input corpus.txt --vocab_size 10000 --output tok.json
    scratchlm tokenize --tokenizer tok.json --input corpus.txt --output corpus.npy
    scratchlm train --train_data_path train.npy --val_data_path val.npy ...
    scratchlm generate --checkpoint out --tokenizer tok.json --prompt "def "
    scratchlm generate --checkpoint Llama-3.2-1B/ --prompt "The capital of France is"
    scratchlm convert model.gguf model.pt
    scratchlm plot out
    scratchlm demo
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>"]


def _add_tokenizer_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a byte-level BPE tokenizer on a text file")
    p.add_argument("--input", required=True, type=Path, help="UTF-8 text file to learn merges from")
    p.add_argument("--vocab_size", required=True, type=int, help="final vocabulary size: 256 bytes + specials + merges")
    p.add_argument(
        "--special_tokens",
        nargs="*",
        default=DEFAULT_SPECIAL_TOKENS,
        help="special tokens, never split or merged across (default: <|endoftext|>)",
    )
    p.add_argument("--output", required=True, type=Path, help="where to write the tokenizer JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input)")
    p.add_argument("--num_processes", type=int, default=None, help="pre-tokenization workers (default: all cores)")
    p.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(args) -> int:
    from scratchlm.outputs import check_output
    from scratchlm.tokenizer import Tokenizer, train_bpe

    check_output(args.output, "--output", inputs={"--input": args.input}, overwrite=args.overwrite)
    _check_input_file(args.input)
    empty = _warn_if_empty(args.input, "the tokenizer will hold only the 256 bytes and the special tokens")
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens, num_processes=args.num_processes)
    if len(vocab) < args.vocab_size and not empty:
        warnings.warn(
            f"--vocab_size {args.vocab_size} is more than --input {str(args.input)!r} can reach: training stopped at "
            f"{len(vocab)} tokens after {len(merges)} merges, when no pair of adjacent tokens was left to merge"
        )
    Tokenizer(vocab, merges, args.special_tokens).save(args.output)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges -> {args.output}")
    return 0


def _check_input_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"--input {str(path)!r} is a folder; expected a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist; expected a UTF-8 text file")


def _warn_if_empty(path: Path, consequence: str) -> bool:
    """Warn that the corpus ``path`` (given as --input) holds nothing; return whether it does."""
    empty = path.is_file() and path.stat().st_size == 0
    if empty:
        warnings.warn(f"--input {str(path)!r} is empty; {consequence}")
    return empty


def _add_tokenize(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="encode a text file into a token file (.npy) for training")
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="tokenizer JSON written by `scratchlm tokenizer train`, a Hugging Face tokenizer.json (or its "
        "folder), or a .gguf file (its tokenizer)",
    )
    p.add_argument("--input", required=True, type=Path, help="UTF-8 text file to encode")
    p.add_argument("--output", required=True, type=Path, help="token file to write (.npy, uint16 or uint32 ids)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input)")
    p.add_argument("--num_processes", type=int, default=None, help="encoding workers (default: all cores)")
    p.set_defaults(func=_run_tokenize)


def _run_tokenize(args) -> int:
    from scratchlm.convert import read_tokenizer
    from scratchlm.outputs import check_output
    from scratchlm.tokenizer import encode_file

    inputs = {"--input": args.input, "--tokenizer": args.tokenizer}
    check_output(args.output, "--output", inputs=inputs, overwrite=args.overwrite)
    tokenizer = read_tokenizer(args.tokenizer)
    _check_input_file(args.input)
    _warn_if_empty(args.input, "the token file will hold no tokens")
    count = encode_file(tokenizer, args.input, args.output, num_processes=args.num_processes)
    print(f"tokenize: {count} tokens -> {args.output}")
    return 0


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a model, streamed as it is produced")
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint file written by `scratchlm train` or `scratchlm convert`, a run folder (its newest "
        "checkpoint), a Hugging Face Llama folder, or a .gguf file",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer the model's data was encoded with (scratchlm JSON, Hugging Face tokenizer.json or "
        "folder, .gguf); default: the one the checkpoint carries",
    )
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max_tokens", type=int, default=200, help="most new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 means greedy")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (1.0 disables it)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--kernels", default="auto", help="reference, torch, triton or auto")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import torch

    from scratchlm.convert import read_tokenizer
    from scratchlm.model import load_pretrained, stream

    # Every argument is checked before anything is read: a typo costs no model load.
    device = _check_generate_args(args)
    tokenizer = read_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    # With --tokenizer the checkpoint's own is not read (nor refused, if scratchlm cannot use it).
    model, own_tokenizer = load_pretrained(args.checkpoint, kernels=args.kernels, device=device, tokenizer=tokenizer is None)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r} carries no tokenizer; pass --tokenizer")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    # stream checks the tokenizer against the model (ids it cannot embed) before the prompt is echoed.
    pieces = stream(
        model,
        tokenizer,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        device=device,
        generator=generator,
    )
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _check_generate_args(args):
    """The torch.device to generate on, once --max_tokens, --temperature, --top_p, --device and --kernels are checked."""
    from scratchlm.model import resolve_kernels
    from scratchlm.model.devices import check_device
    from scratchlm.model.generation import check_sampling_args

    try:
        check_sampling_args(args.max_tokens, args.temperature, args.top_p)
    except ValueError as e:
        raise ValueError(f"--{e}") from e  # the message starts with the argument's name, the flag's without "--"
    device = check_device(args.device, "--device")
    resolve_kernels(args.kernels, device)
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {str(args.checkpoint)!r} does not exist")
    return device


def _add_convert(subparsers) -> None:
    from scratchlm import convert

    p = subparsers.add_parser(
        "convert", help="GGUF or Hugging Face -> scratchlm checkpoint (.pt), or any model -> Hugging Face folder"
    )
    convert.add_arguments(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    """``scratchlm convert``, once DST is known to be writable and none of its inputs."""
    from scratchlm import convert
    from scratchlm.outputs import check_output

    to_checkpoint = args.dst.suffix == ".pt"  # the rule convert.run applies
    inputs = {"SRC": args.src, "--tokenizer": args.tokenizer}
    check_output(args.dst, "DST", inputs=inputs, overwrite=args.overwrite, folder=not to_checkpoint)
    return convert.run(args)


def _add_train(subparsers) -> None:
    from scratchlm.train import cli as train_cli

    p = subparsers.add_parser("train", help="train a TransformerLM on token files")
    train_cli.add_arguments(p)
    p.set_defaults(func=train_cli.run)


def _add_plot(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw a run's loss, learning rate and throughput curves to a PNG")
    p.add_argument("run", type=Path, help="run folder written by `scratchlm train` (or its metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: metrics.png in the run folder)")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from scratchlm.outputs import check_output
    from scratchlm.train.plot import plot_metrics

    if args.out is not None:
        # A plot is a view of the run, redrawn at will: it replaces an earlier one, never its own input.
        metrics = args.run / "metrics.jsonl" if args.run.is_dir() else args.run
        check_output(args.out, "--out", inputs={"run": metrics}, overwrite=True)
    try:
        out = plot_metrics(args.run, args.out)
    except ImportError as e:
        print(f"scratchlm plot: error: {e}", file=sys.stderr)
        return 2
    print(f"plot: {out}")
    return 0


def _add_demo(subparsers) -> None:
    from scratchlm import demo

    p = subparsers.add_parser("demo", help="tokenizer + training + sampling end to end on text shipped with Python")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tokenizer_parser = commands.add_parser("tokenizer", help="tokenizer tools")
    _add_tokenizer_train(tokenizer_parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION"))
    _add_tokenize(commands)
    _add_train(commands)
    _add_generate(commands)
    _add_convert(commands)
    _add_plot(commands)
    _add_demo(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # A warning is one line naming the command, as errors are, not Python's two-line form.
        warnings.showwarning = partial(_show_warning, args.command)
        try:
            return args.func(args)
        except (ValueError, OSError, NotImplementedError) as error:
            # Bad input is reported as one line naming what was wrong, not a traceback;
            # OSError covers files that cannot be read or written (permissions, a full disk).
            print(f"scratchlm {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 2


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    print(f"scratchlm {command}: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(error: object) -> str:
    """The message of ``error`` on one line (a few library messages span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
