"""Where a command may write: the checks every writing command makes before any work.

Three rules, the same for ``tokenizer train``, ``tokenize`` and ``convert``:

- a command never writes over one of its own inputs, whatever the spelling
  (``x.txt``, ``./x.txt``, a symlink or a hard link: files are compared by
  device and inode, ``os.path.samefile``), nor over a folder an input lies
  in, nor over a file inside an input folder; ``--overwrite`` does not lift this;
- an existing destination is refused unless ``--overwrite`` is given; a
  file destination that is a folder (or the reverse) is refused either way;
- the destination's folder must be one this process can write in (or be
  creatable there), so a bad path fails in a line before a model loads.

A folder destination (``convert`` to a Hugging Face folder) is replaced as a
whole, and only when it holds nothing but files scratchlm writes there
(:func:`scratchlm.model.hf_export.check_out_dir`): ``--overwrite`` never
deletes a file scratchlm did not write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def check_output(
    output: Path,
    flag: str,
    *,
    inputs: Mapping[str, Path | None],
    overwrite: bool,
    folder: bool = False,
) -> None:
    """Refuse ``output`` (given as ``flag``) before a command writes it; ValueError naming both paths.

    ``inputs`` maps each input's flag to its path (None when not given);
    ``folder`` says the command writes a folder rather than a file.
    """
    for input_flag, path in inputs.items():
        if path is not None:
            _check_not_input(output, flag, path, input_flag)
    if folder:
        from scratchlm.model.hf_export import check_out_dir

        check_out_dir(output, overwrite, name=flag)
    elif output.is_dir():
        raise ValueError(f"{flag} {str(output)!r} is a folder; expected the path of a file to write")
    elif output.exists() and not overwrite:
        raise ValueError(f"{flag} {str(output)!r} exists; pass --overwrite to replace it")
    _check_writable_parent(output, flag)


def _check_not_input(output: Path, flag: str, path: Path, input_flag: str) -> None:
    """Refuse an output that is ``path``, holds it, or is a file inside it (when ``path`` is a folder)."""
    if not path.exists() or not output.exists():
        return
    where = f"{flag} {str(output)!r}"
    if os.path.samefile(output, path):
        raise ValueError(
            f"{where} is the same file as {input_flag} {str(path)!r}; expected another path "
            f"(a command never writes over its own input, even with --overwrite)"
        )
    resolved_output, resolved_input = output.resolve(), path.resolve()
    if output.is_dir() and resolved_input.is_relative_to(resolved_output):
        raise ValueError(f"{where} holds {input_flag} {str(path)!r}; expected a folder that does not hold an input")
    if path.is_dir() and output.is_file() and any(_same_file(output, entry) for entry in path.iterdir()):
        raise ValueError(f"{where} is a file of {input_flag} {str(path)!r}; expected a path outside the input folder")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable_parent(output: Path, flag: str) -> None:
    """Refuse a destination whose nearest existing folder is a file or cannot be written in."""
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(output)!r} lies under {str(parent)!r}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(output)!r}: cannot write in folder {str(parent)!r} (permission denied or read-only)")
