"""``load_pretrained``: one entry point for every kind of saved model.

    model, tokenizer = load_pretrained("Llama-3.2-1B/")            # Hugging Face folder
    model, tokenizer = load_pretrained("Qwen3-0.6B/")              # ... of any known family (model/families.py)
    model, tokenizer = load_pretrained("gemma-3-4b-it/")           # ... the language model beside a vision tower
    model, tokenizer = load_pretrained("llama-3.2-1b.Q4_0.gguf")   # llama.cpp GGUF file (llama, qwen2, qwen3)
    model, tokenizer = load_pretrained("runs/tinystories/")        # scratchlm run (newest checkpoint)

What ``path`` is decides the reader: a folder with config.json is a Hugging
Face checkpoint (:mod:`scratchlm.model.hf_checkpoint`), a file starting with
the GGUF magic is a GGUF file (:mod:`scratchlm.model.gguf_checkpoint`),
anything else is a scratchlm checkpoint file or run folder, read like
``scratchlm.train.load_model`` does (``torch.load(weights_only=True)``, which
never runs code from the file). No reader executes anything it loads.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from scratchlm.model.backends import KernelsSpec
from scratchlm.model.config import ModelConfig
from scratchlm.model.devices import check_device
from scratchlm.model.gguf_checkpoint import GGUF_MAGIC, is_gguf_file, read_gguf_config, read_gguf_file
from scratchlm.model.hf_checkpoint import (
    CONFIG_FILE,
    PICKLE_WEIGHTS,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    config_from_hf,
    load_hf_folder,
    read_json,
)
from scratchlm.model.transformer import TransformerLM
from scratchlm.model.weight_loading import PretrainedFormatError, WeightFiller, allocate, check_plan

HF_TOKENIZER_FILE = "tokenizer.json"
# Where a scratchlm checkpoint keeps its tokenizer: checkpoint["extra"][CHECKPOINT_TOKENIZER_KEY]
# holds the document Tokenizer.save writes, as plain data.
CHECKPOINT_TOKENIZER_KEY = "tokenizer"
# The files a scratchlm run folder holds, one per saved step (train/checkpoint.py names them).
RUN_CHECKPOINTS = "checkpoint_*.pt"


def load_pretrained(
    path: str | os.PathLike,
    kernels: KernelsSpec = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: bool = True,
) -> tuple[TransformerLM, Any]:
    """Load a model and its tokenizer from a Hugging Face folder, a GGUF file or a scratchlm checkpoint.

    Returns ``(model, tokenizer)``: the model in eval mode on ``device``
    (default: CUDA when available, else CPU), its hot ops resolved once from
    ``kernels``; the tokenizer is a ``scratchlm.tokenizer.Tokenizer``, or None
    when the checkpoint carries none. ``dtype`` None keeps the stored float
    dtype (float32 for a quantised GGUF file, whose weights are dequantised
    as they load).

    The tokenizer is read first: one scratchlm cannot use (SentencePiece or
    Unigram, as in Llama 2 and TinyLlama) is refused before any weight is
    read. ``tokenizer=False`` skips it and returns None in its place, for
    the weights alone (with a tokenizer of your own, or none).

    Raises ``FileNotFoundError`` for a missing path and
    ``PretrainedFormatError`` (a ValueError) for anything it cannot load,
    before reading any weight when the headers already tell.
    """
    path = Path(path)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: expected None or a floating-point torch.dtype")
    device = check_device(device)  # a device this machine lacks is named now, not deep in the first allocation
    kind = _kind(path)
    if kind == "hf":
        found = _hf_tokenizer(path) if tokenizer else None
        return load_hf_folder(path, kernels, device, dtype), found
    if kind == "gguf":
        return read_gguf_file(path, kernels, device, dtype, partial(_gguf_tokenizer, path) if tokenizer else None)
    model, found = _load_scratchlm_checkpoint(path, kernels, device, dtype)
    return model, found if tokenizer else None


def read_pretrained_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig ``load_pretrained(path)`` would build, from headers only where the format allows.

    Hugging Face: config.json; GGUF: the metadata (and the small rope_freqs
    tensor); a scratchlm checkpoint stores its config inside the one pickle-free
    file, which is read whole.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "hf":
        config_path = path / CONFIG_FILE
        return config_from_hf(read_json(config_path), repr(str(config_path)))
    if kind == "gguf":
        return read_gguf_config(path)
    return _read_scratchlm_checkpoint(path)[1]


def _kind(path: Path) -> str:
    """"hf", "gguf" or "scratchlm": which reader ``path`` needs."""
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return "hf"
        _check_run_folder(path)
        return "scratchlm"
    if is_gguf_file(path):
        return "gguf"
    if path.suffix.lower() == ".gguf":
        raise PretrainedFormatError(
            f"path {str(path)!r} is not a GGUF file: it starts with {_first_bytes(path)!r}, "
            f"not the GGUF magic {GGUF_MAGIC!r} (a wrong or damaged download?)"
        )
    if path.name in PICKLE_WEIGHTS or path.suffix == ".safetensors":
        raise PretrainedFormatError(
            f"path {str(path)!r} is a single weights file; "
            f"pass the Hugging Face folder holding it and its {CONFIG_FILE}"
        )
    return "scratchlm"


def _check_run_folder(folder: Path) -> None:
    """Refuse, saying what it lacks, a folder that is neither a Hugging Face folder nor a scratchlm run.

    FileNotFoundError, as for any other missing file: a folder of Hugging Face
    weights without its config.json, or one with no checkpoint at all.
    """
    hf_files = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE, HF_TOKENIZER_FILE, *PICKLE_WEIGHTS)
        or entry.suffix == ".safetensors"
    )
    if hf_files:
        raise FileNotFoundError(
            f"folder {str(folder)!r} holds {', '.join(hf_files)} but no {CONFIG_FILE}; "
            f"a Hugging Face folder needs the config.json it was saved with"
        )
    if not any(folder.glob(RUN_CHECKPOINTS)):
        raise FileNotFoundError(
            f"folder {str(folder)!r} holds neither a {CONFIG_FILE} (a Hugging Face folder) nor "
            f"{RUN_CHECKPOINTS} files (a scratchlm run); expected one of those"
        )


def _first_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(len(GGUF_MAGIC))
    except OSError:
        return b""


# ------------------------------------------------------------------ scratchlm checkpoints


def _read_scratchlm_checkpoint(path: Path) -> tuple[str, ModelConfig, dict]:
    """(name for errors, model config, whole payload) of a checkpoint file or a run's newest one."""
    # train/ imports model/, so the import stays inside the function.
    from scratchlm.train.checkpoint import CheckpointError, read_file_or_newest

    file, payload = read_file_or_newest(path)
    source = repr(str(file))
    stored = payload.get("model_config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {source} stores no model config to rebuild the model from")
    try:
        return source, ModelConfig.from_dict(stored), payload
    except ValueError as e:
        raise CheckpointError(f"checkpoint {source} has an unusable model config: {e}") from e


def _load_scratchlm_checkpoint(path: Path, kernels, device, dtype) -> tuple[TransformerLM, Any]:
    from scratchlm.train.checkpoint import CheckpointError

    source, config, payload = _read_scratchlm_checkpoint(path)
    state = payload["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {source} holds no model state dict of tensors")
    if config.tie_embeddings:
        state = {name: value for name, value in state.items() if name != "lm_head.weight"}
    check_plan({name: (name, tuple(value.shape)) for name, value in state.items()}, config, f"checkpoint {source}")

    embedding = state["token_embeddings.weight"]
    model = allocate(config, kernels, device, dtype or embedding.dtype)
    filler = WeightFiller(model, f"checkpoint {source}")
    for name, value in state.items():
        filler.fill(name, value)
    filler.finish()
    return model, _checkpoint_tokenizer(payload.get("extra"), source)


# ------------------------------------------------------------------ tokenizers


def _hf_tokenizer(folder: Path) -> Any:
    if not (folder / HF_TOKENIZER_FILE).is_file():
        return None
    from scratchlm.tokenizer import Tokenizer

    return Tokenizer.from_hf(folder)


def _gguf_tokenizer(path: Path, metadata: dict[str, Any]) -> Any:
    """The tokenizer in a GGUF file's metadata, None when it has none."""
    if "tokenizer.ggml.model" not in metadata:
        return None
    from scratchlm.tokenizer import Tokenizer

    return Tokenizer.from_gguf_fields(metadata, source=f"GGUF file {str(path)!r}")


def _checkpoint_tokenizer(extra: Any, source: str) -> Any:
    """The tokenizer saved inside a scratchlm checkpoint's "extra" dict, or None."""
    document = extra.get(CHECKPOINT_TOKENIZER_KEY) if isinstance(extra, dict) else None
    if document is None:
        return None
    if not isinstance(document, dict):
        raise PretrainedFormatError(
            f"checkpoint {source} has extra[{CHECKPOINT_TOKENIZER_KEY!r}] of type {type(document).__name__}; "
            f"expected the JSON document Tokenizer.save writes"
        )
    from scratchlm.tokenizer import Tokenizer

    try:
        return Tokenizer.from_document(document, source=f"checkpoint {source} extra[{CHECKPOINT_TOKENIZER_KEY!r}]")
    except (ValueError, KeyError, TypeError) as e:
        raise PretrainedFormatError(f"checkpoint {source} holds a tokenizer that does not load: {e}") from e
