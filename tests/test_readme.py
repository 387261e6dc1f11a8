"""The README's Python example runs as written (on the demo's corpus files)."""

from __future__ import annotations

import re

from conftest import REPO_ROOT
from scratchlm.demo import write_corpus


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "demo_out")  # the files the example reads, as `make demo` leaves them
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "ModelConfig(" in printed
    assert (tmp_path / "demo_out" / "tok1024.json").is_file()
