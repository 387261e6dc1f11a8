"""The README's Python examples run as written."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import REPO_ROOT
from scratchlm.demo import write_corpus


def _python_blocks() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def test_readme_has_the_llama_hf_api_and_kernel_examples():
    blocks = _python_blocks()
    assert len(blocks) == 4, "update these tests when README examples are added or removed"
    assert "load_pretrained" in blocks[0] and "apply_kernels" in blocks[1]
    assert "TransformerLM" in blocks[2] and "scratchlm.kernels" in blocks[3]


def test_readme_llama_example_runs(tmp_path, monkeypatch, capsys):
    from llama_fixtures import hf_llama, save_hf_folder

    from scratchlm.model import load_pretrained

    monkeypatch.chdir(tmp_path)
    save_hf_folder(hf_llama(num_key_value_heads=2), tmp_path / "Llama-3.2-1B")  # a tiny stand-in
    exec(compile(_python_blocks()[0], "README.md", "exec"), {"__name__": "readme_example"})
    assert "num_kv_heads=2" in capsys.readouterr().out
    original, _ = load_pretrained(tmp_path / "Llama-3.2-1B", kernels="reference", device="cpu")
    copy, tokenizer = load_pretrained(tmp_path / "llama-copy", kernels="reference", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), copy.state_dict().values()))
    assert tokenizer is not None


def test_readme_hf_kernels_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from llama_fixtures import hf_llama, save_hf_folder

    monkeypatch.chdir(tmp_path)
    save_hf_folder(hf_llama(num_key_value_heads=2), tmp_path / "Llama-3.2-1B")  # a tiny stand-in
    example = _python_blocks()[1]
    assert "max_steps=1000" in example
    namespace = {"__name__": "readme_example"}
    exec(compile(example.replace("max_steps=1000", "max_steps=2"), "README.md", "exec"), namespace)
    assert namespace["model"].scratchlm_backends  # patched, and two Trainer steps ran on it
    assert (tmp_path / "out").is_dir()


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "demo_out")  # the files the example reads, as `make demo` leaves them
    exec(compile(_python_blocks()[2], "README.md", "exec"), {"__name__": "readme_example"})
    assert "ModelConfig(" in capsys.readouterr().out
    assert (tmp_path / "demo_out" / "tok1024.json").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel example allocates on a CUDA device")
def test_readme_kernel_example_runs():
    namespace = {"__name__": "readme_example"}
    exec(compile(_python_blocks()[3], "README.md", "exec"), namespace)
    assert namespace["q_rotated"].shape == namespace["q"].shape
    assert namespace["x"].grad is not None and namespace["w"].grad is not None
