"""``scratchlm train`` / ``python -m scratchlm.train``: the training CLI.

Settings come from three layers, later ones winning: TrainConfig's defaults,
a ``--config`` JSON file (an object of the same names, plain data), and the
flags given on the command line. Example::

    python -m scratchlm.train --config runs/tiny.json --learning_rate 1e-3 --resume

Packed documents with attention kept inside each one (the documents of a token
file end with an end-of-text token, here id 256, <|endoftext|> of a tokenizer
from ``scratchlm tokenizer train``)::

    python -m scratchlm.train --config runs/tiny.json --document_mask --eos_token_id 256

Several processes (data parallel; see scratchlm.train.distributed)::

    torchrun --nproc_per_node=8 -m scratchlm.train --config runs/small.json --parallel fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from scratchlm.train.config import MODEL_SHAPE_SETTINGS, TrainConfig, load_json_settings

# --resume given without a path: continue from the newest complete checkpoint in output_dir.
_RESUME_LATEST = "<output_dir>"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training flag to ``parser`` (also used for the ``scratchlm train`` subcommand).

    Flags left out do not appear in the parsed namespace at all
    (``default=SUPPRESS``), so a ``--config`` file's value is overridden only
    by a flag that was actually given.
    """
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="JSON",
        help="JSON file of settings named like these flags; flags given here override it",
    )
    for f in dataclasses.fields(TrainConfig):
        kind, help_text = f.metadata["kind"], f.metadata["help"]
        flag = f"--{f.name}"
        if f.default is dataclasses.MISSING:
            help_text += " (required, here or in --config)"
        elif f.name in MODEL_SHAPE_SETTINGS:
            help_text += " (required unless --init_from)"
        if f.name == "resume":
            parser.add_argument(
                flag, nargs="?", const=_RESUME_LATEST, default=argparse.SUPPRESS, metavar="CHECKPOINT", help=help_text
            )
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the --config file and the given flags into one TrainConfig."""
    given = vars(args)
    settings = {}
    if "config" in given:
        settings.update(load_json_settings(given["config"]))
        source = f"--config {given['config']!r}"
    else:
        source = "the flags"
    for name in TrainConfig.field_names():
        if name in given:
            settings[name] = given[name]
    kernels = settings.get("kernels")
    if isinstance(kernels, str) and kernels.lstrip().startswith("{"):
        try:
            settings["kernels"] = json.loads(kernels)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kernels={kernels!r} looks like JSON but does not parse: {e}") from e
    if settings.get("resume") == _RESUME_LATEST:
        if "output_dir" not in settings:
            raise ValueError("--resume without a path needs --output_dir to find the newest checkpoint in")
        settings["resume"] = str(Path(settings["output_dir"]))
    return TrainConfig.from_dict(settings, source=source)


def run(args: argparse.Namespace) -> int:
    """Train from parsed flags; returns a process exit code.

    0: trained to --total_iters. 2: bad input (nothing was written), or the
    output folder is in use by another run. 1: the run diverged, or the disk
    filled up. 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM): a
    signal stopped it, after a checkpoint unless Ctrl-C was pressed twice.
    Each ending is reported as one line, never a traceback.
    """
    from scratchlm.atomic import NoSpaceLeftError, disk_full_cause
    from scratchlm.train.checkpoint import CheckpointError
    from scratchlm.train.loop import train
    from scratchlm.train.stopping import TrainingStopped

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        config = config_from_args(args)
        summary = train(config, progress=True)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"scratchlm train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"scratchlm train: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if is_main:
            print(f"scratchlm train: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # The second Ctrl-C (or the first, before training had started).
        print(
            "scratchlm train: interrupted: stopped at once, without writing a checkpoint; "
            "--resume continues from the newest one in --output_dir",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    except OSError as e:
        if disk_full_cause(e) is None:
            raise
        # Our writers raise NoSpaceLeftError, which names the file; anything else could not say which.
        what = str(e) if isinstance(e, NoSpaceLeftError) else "no space left on device"
        print(
            f"scratchlm train: error: {what}; free some space, then continue with --resume "
            "(the newest complete checkpoint is intact)",
            file=sys.stderr,
        )
        return 1
    if is_main:
        print(
            f"trained to step {summary['iterations']}: val loss {summary['initial_val_loss']:.4f} -> "
            f"{summary['final_val_loss']:.4f}; checkpoint {summary['checkpoint']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scratchlm.train",
        description="Train a TransformerLM on token files (AdamW, warmup + cosine schedule, exact resume).",
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
