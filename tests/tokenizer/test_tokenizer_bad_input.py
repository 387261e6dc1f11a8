"""Bad tokenizer input gets one clear ValueError naming the file or argument, never a crash deep inside."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scratchlm.tokenizer import Tokenizer

BYTES = {i: bytes([i]) for i in range(256)}


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("reader", ["load", "from_hf", "from_files"])
def test_json_nested_beyond_the_recursion_limit_is_refused_by_name(tmp_path, reader):
    path = tmp_path / ("tokenizer.json" if reader == "from_hf" else "deep.json")
    path.write_text(_deep_json(200_000), encoding="utf-8")
    with pytest.raises(ValueError, match=r"deep(\.json)?'? nests JSON deeper than Python's recursion limit|tokenizer\.json' nests JSON deeper"):
        if reader == "from_files":
            (tmp_path / "merges.txt").write_text("", encoding="utf-8")
            Tokenizer.from_files(path, tmp_path / "merges.txt")
        else:
            getattr(Tokenizer, reader)(path)


def test_the_cli_reports_such_a_tokenizer_in_one_line(tmp_path):
    (tmp_path / "deep.json").write_text(_deep_json(200_000), encoding="utf-8")
    (tmp_path / "in.txt").write_text("hello", encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "scratchlm", "tokenize", "--tokenizer", str(tmp_path / "deep.json"),
         "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "nests JSON deeper" in run.stderr
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("special_tokens", [5, "<|endoftext|>", [5], None])
def test_wrongly_typed_special_tokens_in_a_saved_file_name_the_file(tmp_path, special_tokens):
    document = Tokenizer(BYTES, [], ["<|endoftext|>"]).to_document()
    document["special_tokens"] = special_tokens
    (tmp_path / "t.json").write_text(json.dumps(document), encoding="utf-8")
    if special_tokens is None:
        assert Tokenizer.load(tmp_path / "t.json").special_tokens == []
        return
    with pytest.raises(ValueError, match=r"^path '.*t\.json': special_tokens must"):
        Tokenizer.load(tmp_path / "t.json")


def test_special_tokens_given_by_hand():
    assert Tokenizer(BYTES, [], ("<a>", "<b>")).special_tokens == ["<a>", "<b>"]
    assert Tokenizer(BYTES, [], iter(["<a>"])).special_tokens == ["<a>"]
    with pytest.raises(ValueError, match="special_tokens must be a list of strings, a mapping text -> id, or None; got '<a>'"):
        Tokenizer(BYTES, [], "<a>")
    with pytest.raises(ValueError, match="special_tokens must hold non-empty strings, got 5"):
        Tokenizer(BYTES, [], [5])


def test_a_lone_surrogate_is_named_at_its_position_in_the_text():
    tokenizer = Tokenizer(BYTES, [], ["<s>"])
    for text, position in [("ab\ud800cd", 2), ("<s>hello wor\udfffld", 12), ("\ud800", 0)]:
        with pytest.raises(UnicodeEncodeError, match=rf"in position {position}: surrogates not allowed") as error:
            tokenizer.encode(text)
        assert error.value.object == text


def test_decode_takes_tensors_and_arrays_of_ids():
    tokenizer = Tokenizer(BYTES, [])
    assert tokenizer.decode(torch.tensor([72, 105])) == "Hi"
    assert tokenizer.decode(np.array([72, 105], dtype=np.int32)) == "Hi"
    assert tokenizer.decode([np.int64(72), 105]) == "Hi"
    with pytest.raises(ValueError, match=r"token id 300 is not in the vocabulary \(ids are 0\.\.255\)"):
        tokenizer.decode(torch.tensor([72, 300]))
    with pytest.raises(ValueError, match="ids must be one-dimensional; got a single id 5"):
        tokenizer.decode(torch.tensor(5))
    with pytest.raises(ValueError, match=r"ids must be a flat sequence of ints; got \[72, 105\] \(list\)"):
        tokenizer.decode(torch.tensor([[72, 105]]))
