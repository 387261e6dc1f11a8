"""Reading the JSON files tokenizers come in: every way such a file can be bad is one ValueError naming it.

A truncated or corrupt file, bytes that are not UTF-8, and JSON nested deeper
than Python's recursion limit (which ``json`` reports as a RecursionError, a
crash rather than a message) all become ``ValueError("<source> ...")``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def read_json(path: str | os.PathLike, source: str) -> Any:
    """The JSON document in ``path``; ``source`` names it in errors (``"path 'tok.json'"``)."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} is not valid JSON (truncated or corrupt?): {error}") from None
    except RecursionError:
        raise ValueError(
            f"{source} nests JSON deeper than Python's recursion limit ({sys.getrecursionlimit()}); "
            "no tokenizer file does (corrupt or hostile?)"
        ) from None
