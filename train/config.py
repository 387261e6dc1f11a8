"""``TrainConfig``: every setting of a training run, one field per CLI flag.

The same names are used by the dataclass, the ``--flags`` and the keys of a
``--config`` JSON file, and each field's help text lives here once (the CLI
reads it from the field metadata). ``TrainConfig.validate()`` checks every
field before anything is loaded or built, and errors name the flag, the value
and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Marks a setting with no default: it must come from a flag or the --config file.
_REQUIRED = dataclasses.MISSING


def _setting(default=_REQUIRED, *, kind, help: str):
    """A dataclass field carrying its CLI type and help text."""
    metadata = {"kind": kind, "help": help}
    if default is _REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # Data: token files written by `scratchlm tokenize` (see scratchlm.tokenizer.token_file).
    train_data_path: str = _setting(kind=str, help="token file (.npy) to train on")
    val_data_path: str = _setting(kind=str, help="token file (.npy) to measure validation loss on")
    # Run length and where it goes.
    total_iters: int = _setting(kind=int, help="optimizer steps in the whole run; the cosine schedule ends here")
    output_dir: str = _setting(
        kind=str, help="folder for checkpoint_<step>.pt files, metrics.jsonl and train_config.json"
    )
    # Model shape (stored in every checkpoint as the model config): required for a new
    # model, taken from the checkpoint with --init_from (given values must then agree).
    vocab_size: int | None = _setting(
        None, kind=int, help="vocabulary size; every id in the data files must be below it"
    )
    context_length: int | None = _setting(
        None,
        kind=int,
        help="tokens per training window (and the model's maximum length; with --init_from the model keeps "
        "its own, and windows may be shorter; default: the model's)",
    )
    d_model: int | None = _setting(None, kind=int, help="width of the residual stream")
    num_layers: int | None = _setting(None, kind=int, help="number of transformer blocks")
    num_heads: int | None = _setting(
        None, kind=int, help="attention heads; must divide d_model, leaving an even head size"
    )
    d_ff: int | None = _setting(None, kind=int, help="hidden width of the SwiGLU feed-forward layers")
    rope_theta: float | None = _setting(None, kind=float, help="RoPE base theta (default 10000)")
    num_kv_heads: int | None = _setting(
        None, kind=int, help="key/value heads for grouped-query attention; must divide num_heads (default num_heads)"
    )
    tie_embeddings: bool = _setting(False, kind=bool, help="let lm_head share the token embedding matrix")
    init_from: str | None = _setting(
        None,
        kind=str,
        help="fine-tune a pretrained model: a Hugging Face Llama folder, a .gguf file, or a scratchlm checkpoint or "
        "run folder; its shape replaces the model flags, its weights the random init (token files must be "
        "made with its tokenizer)",
    )
    # Packed documents: attention that stays inside each document of a window.
    document_mask: bool = _setting(
        False,
        kind=bool,
        help="keep attention inside documents: a window's documents (each ended by --eos_token_id) attend as if "
        "trained alone, in training and validation batches alike",
    )
    eos_token_id: int | None = _setting(
        None,
        kind=int,
        help="the end-of-text token id that closes each document, for --document_mask (default: the id of "
        "<|endoftext|>, else the eos token, of the tokenizer --init_from or the resumed checkpoint carries; "
        "required otherwise)",
    )
    # Optimization (AdamW with linear warmup and cosine decay).
    batch_size: int = _setting(32, kind=int, help="windows per optimizer step (default 32)")
    learning_rate: float = _setting(3e-4, kind=float, help="peak learning rate, reached after warmup (default 3e-4)")
    min_learning_rate: float | None = _setting(
        None, kind=float, help="learning rate at the end of the cosine decay (default learning_rate / 10)"
    )
    warmup_iters: int | None = _setting(
        None, kind=int, help="linear warmup steps (default 5%% of total_iters)"
    )
    weight_decay: float = _setting(0.1, kind=float, help="AdamW decoupled weight decay on matrices (default 0.1)")
    beta1: float = _setting(0.9, kind=float, help="AdamW first-moment decay (default 0.9)")
    beta2: float = _setting(0.95, kind=float, help="AdamW second-moment decay (default 0.95)")
    eps: float = _setting(1e-8, kind=float, help="AdamW epsilon (default 1e-8)")
    max_grad_norm: float = _setting(
        1.0, kind=float, help="clip the global gradient L2 norm to this; 0 turns clipping off (default 1.0)"
    )
    # Bookkeeping.
    eval_interval: int = _setting(100, kind=int, help="measure validation loss every this many steps (default 100)")
    eval_batches: int = _setting(
        10, kind=int, help="batches of fixed, evenly spaced validation windows per evaluation (default 10)"
    )
    checkpoint_interval: int = _setting(
        1000, kind=int, help="save output_dir/checkpoint_<step>.pt every this many steps, and at the end (default 1000)"
    )
    keep_checkpoints: int = _setting(
        3, kind=int, help="keep only the newest this many checkpoints; 0 keeps them all (default 3)"
    )
    log_interval: int = _setting(
        10, kind=int, help="print a log line (loss, lr, grad norm, ms/step, tokens/s, MFU) every this many steps"
    )
    seed: int = _setting(0, kind=int, help="seed for model init and batch sampling (default 0)")
    device: str | None = _setting(
        None, kind=str, help="torch device, e.g. cpu, cuda, cuda:1 (default cuda if available)"
    )
    kernels: str | dict = _setting(
        "auto",
        kind=str,
        help='kernel backend: reference, torch, triton, auto, or a JSON dict per op such as \'{"attention": "torch"}\' '
        "(default auto)",
    )
    resume: str | None = _setting(
        None,
        kind=str,
        help="continue from this checkpoint file or run folder (its newest complete checkpoint); "
        "the bare flag means output_dir",
    )
    overwrite: bool = _setting(
        False, kind=bool, help="start afresh even if output_dir already holds a run (its files are replaced)"
    )
    peak_tflops: float | None = _setting(
        None,
        kind=float,
        help="the device's peak TFLOP/s for MFU (default: looked up by GPU name; "
        "MFU is not logged on CPU unless given)",
    )
    # Throughput.
    precision: str = _setting(
        "auto", kind=str, help="fp32, bf16, fp16 (with a loss scaler) or auto: bf16 on CUDA, fp32 on CPU (default auto)"
    )
    grad_accum_steps: int = _setting(
        1, kind=int, help="split each step's batch into this many micro-batches run one after another (default 1)"
    )
    activation_checkpointing: bool = _setting(
        False, kind=bool, help="recompute each block in backward instead of storing its activations"
    )
    compile: bool = _setting(False, kind=bool, help="run the model under torch.compile")
    adamw: str = _setting(
        "auto",
        kind=str,
        help="AdamW implementation: loop (one tensor at a time), foreach (ours, batched), fused (torch's "
        "fused kernel) or auto: fused on CUDA unless --parallel fsdp, foreach otherwise (default auto)",
    )
    max_skipped_steps: int = _setting(
        10, kind=int, help="stop the run after this many non-finite steps in a row (each is skipped) (default 10)"
    )
    # Several processes (launched with torchrun).
    parallel: str = _setting(
        "none", kind=str, help="none, ddp or fsdp (FSDP2); ddp and fsdp need torchrun --nproc_per_node=N"
    )

    # ------------------------------------------------------------ conversion

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from plain data, rejecting unknown keys and naming missing required ones."""
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a JSON object of settings, got {type(values).__name__}")
        known = cls.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source} has unknown settings {unknown}; valid ones are {known}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        if values.get("init_from") is None:
            required += MODEL_SHAPE_SETTINGS
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise ValueError(
                f"{source} lacks required settings {missing}; give them as --flags or in a --config JSON file"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(load_json_settings(path), source=f"--config {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------ checks and derived values

    def resolved(self) -> "TrainConfig":
        """A validated copy with derived defaults filled in (min lr, warmup, device, resume path)."""
        self.validate()
        values = self.to_dict()
        if values["min_learning_rate"] is None:
            values["min_learning_rate"] = self.learning_rate / 10
        if values["warmup_iters"] is None:
            values["warmup_iters"] = self.total_iters // 20
        if values["device"] is None:
            values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if values["rope_theta"] is None and self.init_from is None:
            values["rope_theta"] = 10000.0
        return TrainConfig(**values)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting, its value and what was expected."""
        positive_ints = (
            "total_iters", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval",
            "log_interval", "grad_accum_steps", "max_skipped_steps",
        )  # fmt: skip
        for name in positive_ints:
            _expect_int(name, getattr(self, name), minimum=1)
        if self.init_from is None:
            missing = [name for name in MODEL_SHAPE_SETTINGS if getattr(self, name) is None]
            if missing:
                raise ValueError(f"settings {missing} are required for a new model (or give --init_from)")
        elif not isinstance(self.init_from, (str, os.PathLike)) or str(self.init_from) == "":
            raise ValueError(f"--init_from must be a path, got {self.init_from!r}")
        for name in (*MODEL_SHAPE_SETTINGS, "num_kv_heads"):
            if getattr(self, name) is not None:
                _expect_int(name, getattr(self, name), minimum=1)
        _expect_int("seed", self.seed, minimum=0)
        _expect_int("keep_checkpoints", self.keep_checkpoints, minimum=0)
        _expect_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _expect_choice("adamw", self.adamw, ("auto", "loop", "foreach", "fused"))
        _expect_choice("parallel", self.parallel, ("none", "ddp", "fsdp"))
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ValueError(
                "--precision=fp16 with --parallel=fsdp is not supported: each rank's loss scaler would see only "
                "its own shard's overflows; use --precision bf16"
            )
        if self.batch_size % self.grad_accum_steps != 0:
            raise ValueError(
                f"--batch_size={self.batch_size} must be divisible by --grad_accum_steps={self.grad_accum_steps} "
                "(the batch is split into equal micro-batches)"
            )
        if self.warmup_iters is not None:
            _expect_int("warmup_iters", self.warmup_iters, minimum=0)
            if self.warmup_iters > self.total_iters:
                raise ValueError(
                    f"--warmup_iters={self.warmup_iters} must not exceed --total_iters={self.total_iters}"
                )
        for name in ("train_data_path", "val_data_path", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or str(value) == "":
                raise ValueError(f"--{name} must be a non-empty path, got {value!r}")
        if self.d_model is not None and self.num_heads is not None:
            if self.d_model % self.num_heads != 0:
                raise ValueError(
                    f"--d_model={self.d_model} must be divisible by --num_heads={self.num_heads} "
                    "(each head gets d_model / num_heads dims)"
                )
            if (self.d_model // self.num_heads) % 2 != 0:
                raise ValueError(
                    f"--d_model / --num_heads = {self.d_model // self.num_heads} must be even: "
                    "RoPE rotates the head dims in pairs"
                )
        if self.num_kv_heads is not None and self.num_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"--num_kv_heads={self.num_kv_heads} must divide --num_heads={self.num_heads} "
                "(each key/value head serves an equal group of query heads)"
            )
        if self.rope_theta is not None:
            _expect_float("rope_theta", self.rope_theta, minimum=0.0, strict=True)
        _expect_float("learning_rate", self.learning_rate, minimum=0.0)
        if self.min_learning_rate is not None:
            _expect_float("min_learning_rate", self.min_learning_rate, minimum=0.0)
            if self.min_learning_rate > self.learning_rate:
                raise ValueError(
                    f"--min_learning_rate={self.min_learning_rate} must not exceed "
                    f"--learning_rate={self.learning_rate} (the peak)"
                )
        _expect_float("weight_decay", self.weight_decay, minimum=0.0)
        _expect_float("eps", self.eps, minimum=0.0)
        _expect_float("max_grad_norm", self.max_grad_norm, minimum=0.0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _expect_float(name, value, minimum=0.0)
            if value >= 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {value!r}")
        if self.peak_tflops is not None:
            _expect_float("peak_tflops", self.peak_tflops, minimum=0.0, strict=True)
        for name in ("overwrite", "activation_checkpointing", "compile", "tie_embeddings", "document_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{name} must be true or false, got {getattr(self, name)!r}")
        if self.eos_token_id is not None:
            _expect_int("eos_token_id", self.eos_token_id, minimum=0)
            check_eos_token_id(self.eos_token_id, self.vocab_size)
        elif self.document_mask and self.init_from is None and self.resume is None:
            raise ValueError(MISSING_EOS_TOKEN_ID)
        if self.resume is not None and (not isinstance(self.resume, (str, os.PathLike)) or str(self.resume) == ""):
            raise ValueError(f"--resume must be a checkpoint path, got {self.resume!r}")
        if not isinstance(self.kernels, (str, dict)):
            raise ValueError(f"--kernels must be a backend name or a dict per op, got {self.kernels!r}")
        if self.device is not None:
            _check_device(self.device)


# The settings that give a model its shape: required unless --init_from supplies them.
MODEL_SHAPE_SETTINGS = ["vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"]


# Without a tokenizer to look the end-of-text token up in, --document_mask needs the id.
MISSING_EOS_TOKEN_ID = (
    "--document_mask needs --eos_token_id, the id of the token that ends each document (e.g. <|endoftext|>'s); "
    "this run has no tokenizer to look it up in (only --init_from and --resume checkpoints bring one)"
)


def check_eos_token_id(eos_token_id: int, vocab_size: int | None) -> None:
    """Refuse an end-of-text id outside the vocabulary (unchecked while vocab_size is unknown)."""
    if vocab_size is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"--eos_token_id={eos_token_id} must be in [0, vocab_size={vocab_size})")


def _expect_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be an int >= {minimum}, got {value!r}")


def _expect_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name}={value!r}: expected one of {list(choices)}")


def _expect_float(name: str, value, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"--{name} must be a finite number {relation} {minimum}, got {value!r}")


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device={device!r} is not a torch device (expected e.g. cpu, cuda, cuda:0): {e}") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device!r} asks for CUDA, but torch sees no CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are present")
    elif parsed.type not in ("cpu", "mps"):
        raise ValueError(f"--device={device!r}: expected cpu or cuda[:index]")


def load_json_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``--config`` file: a JSON object of TrainConfig fields (plain data, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {str(path)!r} must hold a JSON object of settings, got {type(values).__name__}")
    return values
