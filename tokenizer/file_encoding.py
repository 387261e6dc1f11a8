"""Encoding a whole text file into a token file, streaming, in parallel if asked.

The file is cut into byte ranges of about 1 MiB at safe cut points of the
tokenizer's pre-tokenizer (see :func:`scratchlm.tokenizer.pretokenize.is_safe_cut`
and :mod:`scratchlm.tokenizer.pretokenizers`), each range is encoded on
its own, and the ids are written in file order through
:class:`~scratchlm.tokenizer.token_file.TokenFileWriter`. Because every cut is
safe, the output equals ``tokenizer.encode(whole file)`` for any number of
processes, and memory stays at a few ranges per process whatever the file size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scratchlm.tokenizer.pretokenize import read_text_range, safe_byte_ranges
from scratchlm.tokenizer.sentencepiece import next_stream_cut_in_file
from scratchlm.tokenizer.token_file import TokenFileWriter, token_dtype
from scratchlm.tokenizer.tokenizer import Tokenizer

# Text per task: large enough that handing ranges to workers costs little
# (~1% of encoding time), small enough to keep memory flat.
_RANGE_BYTES = 1 << 20
# Ranges in flight per worker: enough to keep every worker busy while the
# parent writes, few enough to bound memory.
_RANGES_IN_FLIGHT_PER_PROCESS = 2

# Each worker process builds its own Tokenizer once (see _init_worker).
_worker_tokenizer: Tokenizer | None = None


def encode_file(
    tokenizer: Tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_processes: int | None = None,
) -> int:
    """Encode the UTF-8 text file ``input_path`` into the token file ``output_path``.

    The output is a ``.npy`` array of ``uint16`` ids when the tokenizer's
    ``vocab_size`` is at most 65,536, else ``uint32``, written atomically.
    ``num_processes`` workers encode in parallel (default: 1); the ids are the
    same as ``tokenizer.encode(text)`` for any number. The text is read exactly
    as stored: no newline translation. Returns the number of ids written.

    >>> encode_file(tokenizer, "train.txt", "train.npy", num_processes=4)  # doctest: +SKIP
    2654321
    """
    if num_processes is None:
        num_processes = 1
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int or None, got {num_processes!r}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input_path {str(input_path)!r} is not a file")
    input_path = str(input_path)
    dtype = token_dtype(tokenizer.vocab_size)
    if tokenizer.lstrip_tokens or tokenizer.rstrip_tokens:
        # The byte-range cuts do not know the whitespace these tokens take: one range, the whole file.
        ranges = [(0, os.path.getsize(input_path))]
    elif tokenizer.metaspace is None:
        ranges = safe_byte_ranges(input_path, _RANGE_BYTES, tokenizer.special_tokens, tokenizer.pretokenizer)
    else:
        ranges = _sentencepiece_ranges(tokenizer, input_path)

    with TokenFileWriter(Path(output_path), tokenizer.vocab_size) as writer:
        if num_processes == 1:
            for start, end in ranges:
                writer.write(_encode_range(tokenizer, input_path, start, end, dtype))
        else:
            # Everything that decides the ids (pre-tokenizer, ignore_merges, special ids) goes along.
            state = tokenizer._constructor_arguments()
            context = multiprocessing.get_context()
            with context.Pool(num_processes, initializer=_init_worker, initargs=(state,)) as pool:
                # A sliding window of async results, consumed in file order.
                in_flight: deque = deque()
                limit = num_processes * _RANGES_IN_FLIGHT_PER_PROCESS
                for start, end in ranges:
                    in_flight.append(pool.apply_async(_encode_range_in_worker, (input_path, start, end, dtype)))
                    if len(in_flight) >= limit:
                        writer.write(in_flight.popleft().get())
                while in_flight:
                    writer.write(in_flight.popleft().get())
        return writer.count


def _sentencepiece_ranges(tokenizer: Tokenizer, path: str) -> Iterator[tuple[int, int]]:
    """Byte ranges of about ``_RANGE_BYTES`` cut where a SentencePiece-style tokenizer allows (one range if nowhere).

    The cuts are those of ``encode_iterable`` (see
    :meth:`scratchlm.tokenizer.sentencepiece.SentencePieceBPE.stream_cut_pattern`):
    each range after the first goes on a segment, so it is encoded without a ▁ put first.
    """
    size = os.path.getsize(path)
    pattern = tokenizer._sentencepiece.stream_cut_pattern_bytes()
    special = [token.encode("utf-8") for token in tokenizer.special_tokens]
    start = 0
    with open(path, "rb") as file:
        while start < size:
            cut = None
            if pattern is not None and start + _RANGE_BYTES < size:
                cut = next_stream_cut_in_file(file, start + _RANGE_BYTES, special, pattern)
            end = size if cut is None else cut
            yield start, end
            start = end


def _encode_range(tokenizer: Tokenizer, path: str, start: int, end: int, dtype: np.dtype) -> np.ndarray:
    """Encode bytes ``[start, end)`` of ``path``; ids as a compact array."""
    text = read_text_range(path, start, end)
    # A range after the first continues a segment cut there (this matters only to SentencePiece-style BPE).
    ids = tokenizer._encode(text, continuing=start > 0)
    # A narrow array crosses the process boundary faster than a list of ints.
    return np.asarray(ids, dtype=dtype)


def _init_worker(state: tuple) -> None:
    global _worker_tokenizer
    args, kwargs = state
    _worker_tokenizer = Tokenizer(*args, **kwargs)


def _encode_range_in_worker(path: str, start: int, end: int, dtype: np.dtype) -> np.ndarray:
    assert _worker_tokenizer is not None, "worker used without _init_worker"
    return _encode_range(_worker_tokenizer, path, start, end, dtype)
