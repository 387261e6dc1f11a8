"""Byte-level BPE: training, encoding and decoding, and token files.

>>> from scratchlm.tokenizer import Tokenizer, encode_file, train_bpe
>>> vocab, merges = train_bpe("corpus.txt", 10_000, ["<|endoftext|>"])  # doctest: +SKIP
>>> tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])  # doctest: +SKIP
>>> tokenizer.save("tokenizer.json")  # doctest: +SKIP
>>> encode_file(tokenizer, "corpus.txt", "corpus.npy", num_processes=4)  # doctest: +SKIP

Ids 0..255 are the single bytes, then the special tokens, then merged tokens
(see :mod:`scratchlm.tokenizer.bpe`).
"""

from scratchlm.tokenizer.bpe import train_bpe
from scratchlm.tokenizer.file_encoding import encode_file
from scratchlm.tokenizer.gpt2_files import gpt2_bytes_to_unicode, load_gpt2_files, save_gpt2_files
from scratchlm.tokenizer.pretokenize import GPT2_PRETOKENIZE_PATTERN
from scratchlm.tokenizer.token_file import TokenFileWriter, read_token_file, token_dtype, write_token_file
from scratchlm.tokenizer.tokenizer import Tokenizer

__all__ = [
    "GPT2_PRETOKENIZE_PATTERN",
    "Tokenizer",
    "TokenFileWriter",
    "encode_file",
    "gpt2_bytes_to_unicode",
    "load_gpt2_files",
    "read_token_file",
    "save_gpt2_files",
    "token_dtype",
    "train_bpe",
    "write_token_file",
]
