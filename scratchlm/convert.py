"""``scratchlm convert SRC DST`` and the tokenizer lookup the commands share.

    scratchlm convert llama.gguf llama.pt          # GGUF (dequantised) -> scratchlm checkpoint
    scratchlm convert HF_DIR llama.pt              # Hugging Face folder -> scratchlm checkpoint
    scratchlm convert runs/docs exported_hf/       # scratchlm run -> Hugging Face folder

DST ending in ``.pt`` is a scratchlm checkpoint file, anything else a Hugging
Face folder (``scratchlm.model.export_hf``). A converted checkpoint carries
its tokenizer inside (``extra["tokenizer"]``, the document ``Tokenizer.save``
writes), so ``scratchlm generate --checkpoint llama.pt`` needs no
``--tokenizer``; it holds no optimizer state, so it starts fine-tuning
(``scratchlm train --init_from``) rather than resuming a run.

One convert per destination: a second one aimed at the same DST while the
first runs is refused, naming the first's pid and host (``destination_lock``).
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import torch

from scratchlm.folder_lock import RUN_LOCK_NAME, FolderLock

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_tokenizer(path: str | Path):
    """A tokenizer from any file that holds one: a scratchlm tokenizer JSON, a Hugging Face
    tokenizer.json (or the folder holding it), or a .gguf file's metadata."""
    from scratchlm.model.gguf_checkpoint import is_gguf_file
    from scratchlm.tokenizer import Tokenizer
    from scratchlm.tokenizer.json_input import read_json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer {str(path)!r} does not exist")
    if path.is_dir():
        return Tokenizer.from_hf(path)
    if is_gguf_file(path):
        return Tokenizer.from_gguf(path)
    # Not GGUF, so JSON: a scratchlm tokenizer or an HF tokenizer.json.
    document = read_json(path, f"--tokenizer {str(path)!r} (not a .gguf file)")
    if isinstance(document, dict) and "model" in document:
        return Tokenizer.from_hf(path)  # Hugging Face's tokenizer.json has a "model" section
    return Tokenizer.load(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="a .gguf file, a Hugging Face folder, or a scratchlm checkpoint or run folder")
    parser.add_argument(
        "dst", type=Path, help="a scratchlm checkpoint file (ending in .pt) or a Hugging Face folder (anything else)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="weight dtype to write (default: the source's; float32 for a quantised GGUF file)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer to bundle when SRC carries none, or to replace its own"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def destination_lock(dst: Path) -> ExitStack:
    """The locks ``scratchlm convert`` holds while it writes ``dst`` (see scratchlm/folder_lock.py).

    ``.<name>.lock`` beside DST keeps two converts from writing one
    destination; it sits in DST's folder, not inside it, because a Hugging
    Face folder is replaced as a whole at the end. When DST is a training
    run's folder, its run lock is taken too, so no live run is replaced.
    """
    stack = ExitStack()
    try:
        stack.enter_context(FolderLock(dst.parent / f".{dst.name}.lock", f"DST {str(dst)!r}", "scratchlm convert"))
        if (dst / RUN_LOCK_NAME).is_file():
            stack.enter_context(FolderLock(dst / RUN_LOCK_NAME, f"DST {str(dst)!r}", "scratchlm convert"))
    except BaseException:
        stack.close()
        raise
    return stack


def run(args: argparse.Namespace) -> int:
    """Convert SRC into DST, holding DST's lock from the first check to the last byte written."""
    with destination_lock(args.dst):
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from scratchlm.model import export_hf, load_pretrained

    dst: Path = args.dst
    to_checkpoint = dst.suffix == ".pt"
    if dst.exists() and not args.overwrite and (dst.is_file() or any(dst.iterdir())):
        raise ValueError(f"DST {str(dst)!r} exists; pass --overwrite to replace it")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    tokenizer = read_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    model, own_tokenizer = load_pretrained(
        args.src, kernels="reference", device="cpu", dtype=dtype, tokenizer=tokenizer is None
    )
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}"
        )
    if to_checkpoint:
        _write_checkpoint(model, tokenizer, args.src, dst)
    else:
        if tokenizer is None:
            raise ValueError(f"SRC {str(args.src)!r} carries no tokenizer; a Hugging Face folder needs one: pass --tokenizer")
        export_hf(model, tokenizer, dst, overwrite=args.overwrite)
    parameters = model.num_parameters()
    print(f"convert: {parameters:,} parameters ({next(model.parameters()).dtype}) -> {dst}")
    return 0


def _write_checkpoint(model, tokenizer, src: Path, dst: Path) -> None:
    from scratchlm.model.pretrained import CHECKPOINT_TOKENIZER_KEY
    from scratchlm.train.checkpoint import checkpoint_payload, write_checkpoint

    extra = {"converted_from": str(src), CHECKPOINT_TOKENIZER_KEY: None if tokenizer is None else tokenizer.to_document()}
    payload = checkpoint_payload(model.state_dict(), {}, 0, model_config=model.config.to_dict(), extra=extra)
    write_checkpoint(payload, dst)
