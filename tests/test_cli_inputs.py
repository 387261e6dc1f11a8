"""The `scratchlm` command on bad input, run as a user runs it: a fresh process per command.

Every refusal exits non-zero with one line on stderr naming the argument,
the value and what was expected, and no traceback; no command writes over
one of its own inputs, and none replaces an existing destination without
--overwrite. Warnings are one line too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llama_fixtures import TOKENIZER, hf_llama, save_hf_folder

from scratchlm.cli import main

CORPUS = "the cat sat on the mat. the dog sat on the log.<|endoftext|>" * 20


def scratchlm(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh Python, as a user runs it (about two seconds, mostly importing torch)."""
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=180
    )


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr holding every fragment, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


def warning_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if ": warning: " in line]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_file(tmp_path) -> Path:
    path = tmp_path / "tok.json"
    TOKENIZER.save(path)
    return path


@pytest.fixture(scope="module")
def hf_model():
    return hf_llama(seed=5)


@pytest.fixture
def hf_dir(tmp_path, hf_model) -> Path:
    return save_hf_folder(hf_model, tmp_path / "hf")


# ---- no command writes over its own input ------------------------------------------


def test_tokenizer_train_refuses_to_write_over_its_corpus(corpus):
    before = corpus.read_bytes()
    result = scratchlm("tokenizer", "train", "--input", corpus, "--vocab_size", "300", "--output", corpus, "--overwrite")
    assert_refused(result, "--output", "is the same file as --input", "even with --overwrite")
    assert corpus.read_bytes() == before


def test_tokenize_refuses_a_hard_link_or_another_spelling_of_an_input(tmp_path, corpus, tokenizer_file):
    link = tmp_path / "link.txt"
    os.link(corpus, link)
    before = corpus.read_bytes()
    result = scratchlm("tokenize", "--tokenizer", tokenizer_file, "--input", corpus, "--output", link, "--overwrite")
    assert_refused(result, f"--output {str(link)!r} is the same file as --input {str(corpus)!r}")
    assert corpus.read_bytes() == before
    # ../here/tok.json from the folder is tok.json: the tokenizer survives.
    saved = tokenizer_file.read_bytes()
    other_spelling = f"../{tmp_path.name}/tok.json"
    command = ("tokenize", "--tokenizer", "tok.json", "--input", "corpus.txt", "--output", other_spelling, "--overwrite")
    result = scratchlm(*command, cwd=tmp_path)
    assert_refused(result, f"--output {other_spelling!r} is the same file as --tokenizer 'tok.json'")
    assert tokenizer_file.read_bytes() == saved


def test_convert_refuses_to_write_over_its_source(tmp_path, hf_dir):
    checkpoint = tmp_path / "model.pt"
    assert main(["convert", str(hf_dir), str(checkpoint)]) == 0  # setting up, in this process
    before = checkpoint.read_bytes()
    assert_refused(scratchlm("convert", checkpoint, checkpoint, "--overwrite"), "DST", "is the same file as SRC")
    assert checkpoint.read_bytes() == before
    assert_refused(scratchlm("convert", hf_dir, hf_dir, "--overwrite"), "is the same file as SRC")
    assert (hf_dir / "model.safetensors").is_file()


# ---- existing destinations ------------------------------------------------------------


def test_every_writing_command_refuses_an_existing_destination_without_overwrite(tmp_path, corpus, tokenizer_file, hf_dir):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    commands = [
        ("tokenizer", "train", "--input", corpus, "--vocab_size", "300", "--output", taken),
        ("tokenize", "--tokenizer", tokenizer_file, "--input", corpus, "--output", taken),
        ("convert", hf_dir, taken.with_suffix(".pt")),
    ]
    taken.with_suffix(".pt").write_text("keep me")
    for command in commands:
        destination = command[-1]
        assert_refused(scratchlm(*command), f"{str(destination)!r} exists; pass --overwrite to replace it")
        assert destination.read_text() == "keep me"
    # --overwrite replaces a file destination.
    assert main([*map(str, commands[1]), "--overwrite"]) == 0
    assert taken.read_bytes().startswith(b"\x93NUMPY")


def test_a_folder_where_a_file_goes_is_refused(tmp_path, corpus, tokenizer_file, hf_dir):
    folder = tmp_path / "out.npy"
    folder.mkdir()
    result = scratchlm("tokenize", "--tokenizer", tokenizer_file, "--input", corpus, "--output", folder, "--overwrite")
    assert_refused(result, f"--output {str(folder)!r} is a folder; expected the path of a file to write")
    # convert's .pt destination is a file too, even when a folder of that name exists and is empty.
    pt_folder = tmp_path / "x.pt"
    pt_folder.mkdir()
    assert_refused(scratchlm("convert", hf_dir, pt_folder), f"DST {str(pt_folder)!r} is a folder")
    assert list(pt_folder.iterdir()) == []


def test_a_destination_under_a_file_is_refused(corpus, tokenizer_file):
    result = scratchlm("tokenize", "--tokenizer", tokenizer_file, "--input", corpus, "--output", corpus / "ids.npy")
    assert_refused(result, "--output", "lies under", "which is a file, not a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes in read-only folders")
def test_an_unwritable_destination_folder_is_refused(tmp_path, corpus, tokenizer_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = scratchlm("tokenize", "--tokenizer", tokenizer_file, "--input", corpus, "--output", locked / "ids.npy")
        assert_refused(result, "--output", "cannot write in folder")
    finally:
        locked.chmod(0o700)


def test_overwrite_on_a_folder_replaces_an_export_but_never_foreign_files(tmp_path, hf_dir):
    out = tmp_path / "exported"
    assert main(["convert", str(hf_dir), str(out)]) == 0
    assert_refused(scratchlm("convert", hf_dir, out), "DST", "exists and is not empty; pass --overwrite")
    assert main(["convert", str(hf_dir), str(out), "--overwrite"]) == 0  # only its own files: replaced
    (out / "notes.txt").write_text("mine")
    assert_refused(scratchlm("convert", hf_dir, out, "--overwrite"), "holds notes.txt, which an export does not write")
    assert (out / "notes.txt").read_text() == "mine"


# ---- generate: arguments before the model, devices, checkpoints that are not ------------------


@pytest.fixture
def garbage_checkpoint(tmp_path) -> Path:
    """A file no reader accepts: a refusal that mentions it proves the model was read first."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--temperature", "nan", "--temperature=nan: expected a finite number >= 0"),
        ("--top_p", "0", "--top_p=0.0: expected a number in (0, 1]"),
        ("--max_tokens", "-5", "--max_tokens=-5: expected an int >= 0"),
        ("--device", "cuda:99", "--device='cuda:99': cuda:99 is not available; this machine has"),
    ],
)
def test_generate_checks_its_arguments_before_loading(garbage_checkpoint, flag, value, expected):
    assert_refused(scratchlm("generate", "--checkpoint", garbage_checkpoint, flag, value), expected)


def test_a_deeply_nested_config_json_is_refused_by_name(tmp_path, hf_dir):
    (hf_dir / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    result = scratchlm("generate", "--checkpoint", hf_dir, "--device", "cpu", "--max_tokens", "2")
    assert_refused(result, "config.json' nests its JSON deeper than Python's reader allows")


def test_a_gguf_that_is_not_gguf_is_called_so(tmp_path):
    fake = tmp_path / "model.gguf"
    torch.save({"weights": torch.zeros(2)}, fake)
    result = scratchlm("generate", "--checkpoint", fake, "--device", "cpu")
    assert_refused(result, f"path {str(fake)!r} is not a GGUF file", "not the GGUF magic b'GGUF'")


def test_a_hugging_face_folder_without_config_json_says_what_it_lacks(hf_dir):
    (hf_dir / "config.json").unlink()
    result = scratchlm("generate", "--checkpoint", hf_dir, "--device", "cpu")
    assert_refused(result, "holds model.safetensors", "but no config.json")


# ---- generate: tokenizer and model sizes ------------------------------------------------


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_text(tmp_path):
    small = hf_llama(seed=5, vocab_size=TOKENIZER.vocab_size - 10)
    folder = save_hf_folder(small, tmp_path / "small")  # carries the full TOKENIZER
    result = scratchlm("generate", "--checkpoint", folder, "--prompt", "the theory", "--device", "cpu")
    assert_refused(result, f"vocab_size {TOKENIZER.vocab_size})", f"the model embeds only {TOKENIZER.vocab_size - 10} ids")


def test_a_model_padded_past_its_tokenizer_generates_only_the_tokenizers_ids(tmp_path):
    padded = hf_llama(seed=5, vocab_size=TOKENIZER.vocab_size + 13)
    with torch.no_grad():
        # The padding rows dominate: +/- a big multiple of one hidden direction, so one of
        # them is the argmax at every step unless sampling leaves them out.
        padded.model.norm.weight.fill_(1.0)
        padded.lm_head.weight[TOKENIZER.vocab_size :] = 0
        padded.lm_head.weight[TOKENIZER.vocab_size, 0] = 1000.0
        padded.lm_head.weight[TOKENIZER.vocab_size + 1, 0] = -1000.0
    folder = save_hf_folder(padded, tmp_path / "padded")
    result = scratchlm(
        "generate", "--checkpoint", folder, "--prompt", "the theory", "--max_tokens", "12", "--temperature", "0",
        "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("the theory") and len(result.stdout) > len("the theory\n")


def test_tied_embeddings_beside_a_different_lm_head_warn_in_one_line(tmp_path):
    folder = save_hf_folder(hf_llama(seed=6, tie_word_embeddings=False), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    result = scratchlm("generate", "--checkpoint", folder, "--max_tokens", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    (line,) = warning_lines(result)
    assert line.startswith("scratchlm generate: warning: ") and "tie_word_embeddings=true" in line


# ---- warnings: input accepted but surely not meant ---------------------------------------


def test_an_empty_corpus_warns_for_tokenizer_train_and_tokenize(tmp_path, tokenizer_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = scratchlm("tokenizer", "train", "--input", empty, "--vocab_size", "300", "--output", tmp_path / "t.json")
    assert result.returncode == 0
    assert warning_lines(result) == [
        f"scratchlm tokenizer: warning: --input {str(empty)!r} is empty; "
        f"the tokenizer will hold only the 256 bytes and the special tokens"
    ]
    result = scratchlm("tokenize", "--tokenizer", tokenizer_file, "--input", empty, "--output", tmp_path / "ids.npy")
    assert result.returncode == 0
    assert warning_lines(result) == [
        f"scratchlm tokenize: warning: --input {str(empty)!r} is empty; the token file will hold no tokens"
    ]


def test_a_vocab_size_the_corpus_cannot_reach_warns_where_it_stopped(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abab abab")
    result = scratchlm("tokenizer", "train", "--input", short, "--vocab_size", "1000", "--output", tmp_path / "t.json")
    assert result.returncode == 0
    (line,) = warning_lines(result)
    assert "--vocab_size 1000 is more than --input" in line and "training stopped at" in line
    stopped_at = json.loads((tmp_path / "t.json").read_text())
    assert str(len(stopped_at["vocab"])) + " tokens" in line


def test_plot_never_draws_over_the_metrics_it_reads(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": step, "loss": 4.0 - step / 10, "lr": 1e-3, "grad_norm": 1.0}) for step in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["plot", str(run), "--out", str(run / "metrics.jsonl")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("scratchlm plot: error: --out") and "metrics.jsonl" in error
    assert (run / "metrics.jsonl").read_bytes() == before
