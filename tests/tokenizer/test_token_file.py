"""Token files: .npy arrays written atomically and read back with every header check."""

from __future__ import annotations

import numpy as np
import pytest

from scratchlm.atomic import atomic_write
from scratchlm.tokenizer.token_file import TokenFileWriter, read_token_file, token_dtype, write_token_file


@pytest.mark.parametrize(
    "vocab_size, dtype", [(1, np.uint16), (50257, np.uint16), (65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)]
)
def test_dtype_is_the_smallest_that_holds_every_id(tmp_path, vocab_size, dtype):
    assert token_dtype(vocab_size) == dtype
    path = write_token_file(tmp_path / "t.npy", [0, vocab_size - 1], vocab_size)
    loaded = np.load(path)  # a plain .npy file: numpy reads it without our code
    assert loaded.dtype == dtype and loaded.tolist() == [0, vocab_size - 1]


@pytest.mark.parametrize("vocab_size", [0, -3, 2**32 + 1, 3.5])
def test_bad_vocab_size_is_refused(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(vocab_size)


def test_streamed_writes_concatenate_and_memory_map(tmp_path):
    path = tmp_path / "t.npy"
    with TokenFileWriter(path, vocab_size=70_000) as out:
        out.write([1, 2, 3])
        out.write(np.array([], dtype=np.int64))
        out.write(np.array([[69_999, 4]]))
    tokens = read_token_file(path, vocab_size=70_000)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint32
    assert tokens.tolist() == [1, 2, 3, 69_999, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy"]


def test_empty_file_round_trips(tmp_path):
    write_token_file(tmp_path / "e.npy", [], 10)
    assert len(read_token_file(tmp_path / "e.npy", 10)) == 0
    assert np.load(tmp_path / "e.npy").shape == (0,)


@pytest.mark.parametrize("bad", [[5, 10], [-1], [0.5]])
def test_out_of_range_or_float_ids_leave_the_previous_file_untouched(tmp_path, bad):
    path = write_token_file(tmp_path / "t.npy", [7, 8, 9], 10)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="token id|integers"):
        write_token_file(path, bad, 10)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy"]


def test_exception_mid_stream_leaves_no_file(tmp_path):
    path = tmp_path / "t.npy"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        with TokenFileWriter(path, 10) as out:
            out.write([1, 2])
            raise RuntimeError("encoder crashed")
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    path = write_token_file(tmp_path / "t.npy", range(100), 1000)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_token_file(path)


def test_wrong_dtype_is_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(10, dtype=np.float32))
    np.save(tmp_path / "i.npy", np.arange(10, dtype=np.int64))
    for name in ("f.npy", "i.npy"):
        with pytest.raises(ValueError, match="expected a 1-D uint16 or uint32"):
            read_token_file(tmp_path / name)


def test_two_dimensional_array_is_refused(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="shape"):
        read_token_file(tmp_path / "m.npy")


def test_not_a_token_file_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01" * 50)
    with pytest.raises(ValueError, match="not a .npy token file"):
        read_token_file(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        read_token_file(tmp_path / "missing.npy")


def test_ids_beyond_vocab_size_are_found_by_the_scan(tmp_path):
    path = write_token_file(tmp_path / "t.npy", [1, 2, 511, 3], 512)
    assert read_token_file(path, 512).tolist() == [1, 2, 511, 3]
    with pytest.raises(ValueError, match="holds id 511, but vocab_size is 300"):
        read_token_file(path, 300)


def test_atomic_write_keeps_the_old_contents_on_error(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("first")
    with pytest.raises(KeyError):
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("second, half written")
            raise KeyError("boom")
    assert path.read_text(encoding="utf-8") == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
