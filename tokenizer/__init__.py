"""Byte-level BPE: training, encoding and decoding, and token files.

>>> from scratchlm.tokenizer import Tokenizer, encode_file, train_bpe
>>> vocab, merges = train_bpe("corpus.txt", 10_000, ["<|endoftext|>"])  # doctest: +SKIP
>>> tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])  # doctest: +SKIP
>>> tokenizer.save("tokenizer.json")  # doctest: +SKIP
>>> encode_file(tokenizer, "corpus.txt", "corpus.npy", num_processes=4)  # doctest: +SKIP

Ids 0..255 are the single bytes, then the special tokens, then merged tokens
(see :mod:`scratchlm.tokenizer.bpe`).

Pretrained tokenizers of the Llama family (byte-level BPE) load from their
own files, keeping their ids, pre-tokenizer (a preset of
:mod:`scratchlm.tokenizer.pretokenizers`) and bos/eos:

>>> llama = Tokenizer.from_hf("Llama-3.2-1B/")  # tokenizer.json (+ tokenizer_config.json)  # doctest: +SKIP
>>> llama = Tokenizer.from_gguf("Llama-3.2-1B-Q4_K_M.gguf")  # llama.cpp metadata  # doctest: +SKIP
"""

from scratchlm.tokenizer.bpe import train_bpe
from scratchlm.tokenizer.file_encoding import encode_file
from scratchlm.tokenizer.gguf_vocab import GGUF_PRETOKENIZERS, read_gguf_tokenizer_fields
from scratchlm.tokenizer.gpt2_files import gpt2_bytes_to_unicode, load_gpt2_files, save_gpt2_files
from scratchlm.tokenizer.pretokenizers import (
    GPT2_PRETOKENIZE_PATTERN,
    LLAMA3_PRETOKENIZE_PATTERN,
    PRETOKENIZERS,
    PreTokenizer,
)
from scratchlm.tokenizer.token_file import TokenFileWriter, read_token_file, token_dtype, write_token_file
from scratchlm.tokenizer.tokenizer import Tokenizer

__all__ = [
    "GGUF_PRETOKENIZERS",
    "GPT2_PRETOKENIZE_PATTERN",
    "LLAMA3_PRETOKENIZE_PATTERN",
    "PRETOKENIZERS",
    "PreTokenizer",
    "Tokenizer",
    "TokenFileWriter",
    "encode_file",
    "gpt2_bytes_to_unicode",
    "load_gpt2_files",
    "read_gguf_tokenizer_fields",
    "read_token_file",
    "save_gpt2_files",
    "token_dtype",
    "train_bpe",
    "write_token_file",
]
