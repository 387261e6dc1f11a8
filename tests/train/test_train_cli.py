"""The training CLI: flags, --config files, bare --resume, --help, and errors as exit code 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from scratchlm.tokenizer.token_file import write_token_file
from scratchlm.train import TrainConfig
from scratchlm.train.cli import add_arguments, build_parser, config_from_args, main

REQUIRED = [
    "--train_data_path", "train.npy", "--val_data_path", "val.npy", "--vocab_size", "64",
    "--context_length", "16", "--d_model", "32", "--num_layers", "2", "--num_heads", "4",
    "--d_ff", "64", "--total_iters", "3", "--output_dir", "out",
]  # fmt: skip


def test_every_config_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(flags) == {*TrainConfig.field_names(), "config"}
    for dest, action in flags.items():
        assert action.help and len(action.help) > 10, dest


def test_flags_parse_into_typed_config():
    args = build_parser().parse_args(
        [*REQUIRED, "--learning_rate", "1e-3", "--weight_decay", "0", "--kernels", "torch", "--device", "cpu",
         "--max_grad_norm", "0.5", "--overwrite"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.vocab_size == 64 and isinstance(config.vocab_size, int)
    assert config.learning_rate == 1e-3 and config.weight_decay == 0.0 and config.max_grad_norm == 0.5
    assert config.kernels == "torch" and config.device == "cpu" and config.overwrite is True
    assert config.resume is None and config.min_learning_rate is None  # defaults kept for the unset flags


def test_config_file_is_overridden_by_flags(tmp_path):
    settings = dict(
        train_data_path="t.npy", val_data_path="v.npy", vocab_size=64, context_length=16, d_model=32,
        num_layers=2, num_heads=4, d_ff=64, total_iters=100, output_dir="o", batch_size=8,
        kernels={"attention": "torch"},
    )  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(settings))
    config = config_from_args(build_parser().parse_args(["--config", str(path), "--batch_size", "2"]))
    assert config.batch_size == 2 and config.total_iters == 100
    assert config.kernels == {"attention": "torch"}


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lerning_rate": 1.0}))
    with pytest.raises(ValueError, match=r"unknown settings \['lerning_rate'\]"):
        config_from_args(build_parser().parse_args(["--config", str(path)]))


def test_missing_required_settings_are_named():
    with pytest.raises(ValueError, match=r"lacks required settings \['val_data_path'"):
        config_from_args(build_parser().parse_args(["--train_data_path", "t.npy"]))


def test_bare_resume_means_latest_checkpoint_in_output_dir():
    config = config_from_args(build_parser().parse_args([*REQUIRED, "--resume"]))
    assert config.resume == "out"
    config = config_from_args(build_parser().parse_args([*REQUIRED, "--resume", "elsewhere.pt"]))
    assert config.resume == "elsewhere.pt"


def test_kernels_flag_accepts_a_json_dict():
    config = config_from_args(build_parser().parse_args([*REQUIRED, "--kernels", '{"rmsnorm": "torch"}']))
    assert config.kernels == {"rmsnorm": "torch"}


def test_add_arguments_mounts_on_a_subcommand():
    top = argparse.ArgumentParser(prog="scratchlm")
    sub = top.add_subparsers(dest="command")
    add_arguments(sub.add_parser("train"))
    args = top.parse_args(["train", *REQUIRED])
    assert config_from_args(args).d_ff == 64  # the top-level parser's own "command" is ignored


def test_main_trains_and_reports(tmp_path, capsys):
    ids = np.arange(400) % 64
    write_token_file(tmp_path / "train.npy", ids, 64)
    write_token_file(tmp_path / "val.npy", ids, 64)
    argv = [a if not a.endswith((".npy", "out")) else str(tmp_path / a) for a in REQUIRED]
    assert main([*argv, "--device", "cpu", "--kernels", "reference", "--eval_batches", "1", "--batch_size", "2"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert (tmp_path / "out" / "checkpoint_00000003.pt").is_file()


def test_main_reports_bad_input_as_exit_code_2(tmp_path, capsys):
    argv = [a if not a.endswith((".npy", "out")) else str(tmp_path / a) for a in REQUIRED]
    assert main([*argv, "--device", "cpu", "--kernels", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "scratchlm train: error: --kernels='nonsense'" in err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_help_works():
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--train_data_path", "--min_learning_rate", "--resume", "--kernels", "--config", "--eval_batches"):
        assert flag in result.stdout
