"""Reading and writing tokenizers in every format: the methods ``Tokenizer`` inherits.

* scratchlm's own JSON (:meth:`TokenizerFiles.save`, :meth:`TokenizerFiles.load`,
  and the document itself, :meth:`TokenizerFiles.to_document`); format in
  :mod:`scratchlm.tokenizer.saved_format`;
* GPT-2's ``encoder.json`` and merges files (:meth:`TokenizerFiles.from_files`);
* Hugging Face ``tokenizer.json`` (:meth:`TokenizerFiles.from_hf`, :meth:`TokenizerFiles.save_hf`);
* llama.cpp's GGUF metadata (:meth:`TokenizerFiles.from_gguf`).

Every reader builds the tokenizer through the constructor, so whatever a file
says passes the same checks as arguments given by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchlm.atomic import atomic_write
from scratchlm.tokenizer.gguf_vocab import gguf_tokenizer_arguments, read_gguf_tokenizer_fields
from scratchlm.tokenizer.gpt2_files import load_gpt2_files, save_gpt2_files
from scratchlm.tokenizer.hf_files import save_hf_folder, save_hf_tokenizer
from scratchlm.tokenizer.hf_reader import read_hf_tokenizer
from scratchlm.tokenizer.json_input import read_json
from scratchlm.tokenizer.saved_format import tokenizer_arguments, tokenizer_document

if TYPE_CHECKING:
    from scratchlm.tokenizer.tokenizer import Tokenizer


class TokenizerFiles:
    """File formats of :class:`~scratchlm.tokenizer.tokenizer.Tokenizer` (a mixin: ``self`` is a Tokenizer)."""

    def _constructor_arguments(self) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` that build an equal tokenizer (for worker processes)."""
        args = (self.vocab, self.merges, self.special_token_ids)
        kwargs = {
            "pretokenizer": self.pretokenizer,
            "ignore_merges": self.ignore_merges,
            "bos_token": self.bos_id,
            "eos_token": self.eos_id,
            "add_bos": self.add_bos,
            "unk_token": self.unk_id,
            "fuse_unk": self.fuse_unk,
            "normalizer": self.normalizer,
            "add_eos": self.add_eos,
            "pad_token": self.pad_id,
            "nonspecial_tokens": self.nonspecial_tokens,
            "lstrip_tokens": self.lstrip_tokens,
            "rstrip_tokens": self.rstrip_tokens,
            "merge_ranks": self.merge_ranks,
        }
        return args, kwargs | self._sentencepiece_settings()

    def _sentencepiece_settings(self) -> dict[str, Any]:
        """The SentencePiece keywords, when set (none for byte-level BPE, so its files stay as they were)."""
        if self.metaspace is None:
            return {}
        return {
            "metaspace": self.metaspace,
            "metaspace_split": self.metaspace_split,
            "byte_fallback": self.byte_fallback,
            "decoder": self.decoder,
        }

    def to_document(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes (format in :mod:`scratchlm.tokenizer.saved_format`), as a dict."""
        return tokenizer_document(
            self.vocab,
            self.merges,
            self.special_token_ids,
            pretokenizer=self.pretokenizer,
            ignore_merges=self.ignore_merges,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            add_bos=self.add_bos,
            unk_id=self.unk_id,
            fuse_unk=self.fuse_unk,
            normalizer=self.normalizer,
            add_eos=self.add_eos,
            pad_id=self.pad_id,
            nonspecial_tokens=self.nonspecial_tokens,
            lstrip_tokens=self.lstrip_tokens,
            rstrip_tokens=self.rstrip_tokens,
            merge_ranks=self.merge_ranks,
            **self._sentencepiece_settings(),
        )

    @classmethod
    def from_document(cls, document: Any, source: str = "document") -> "Tokenizer":
        """The tokenizer of a document from :meth:`to_document` (either format version).

        ``source`` names it in error messages.
        """
        args, kwargs = tokenizer_arguments(document, source)
        try:
            return cls(*args, **kwargs)
        except ValueError as error:  # e.g. "special_tokens": 5: say which file
            raise ValueError(f"{source}: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON (format in :mod:`scratchlm.tokenizer.tokenizer`), atomically."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as file:
            json.dump(self.to_document(), file, ensure_ascii=False, indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer written by :meth:`save` (either format version)."""
        source = f"path {str(path)!r}"
        return cls.from_document(read_json(path, source), source)

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json`` (a file, or the folder holding it).

        Byte-level BPE with a pre-tokenizer that is one of the presets, or
        SentencePiece-style BPE (Llama 2, TinyLlama, Mistral, Gemma: ``metaspace``
        and ``byte_fallback`` set from the file); bos/eos come from ``tokenizer_config.json`` beside it and from the
        post-processor, ``unk_token`` and ``fuse_unk`` from the BPE model. A
        vocabulary may lack single bytes, as real ones do. Anything this class cannot reproduce exactly is
        refused with a ValueError naming the field and value; the rules are
        in :mod:`scratchlm.tokenizer.hf_reader`. Ids are the file's own.

        >>> llama = Tokenizer.from_hf("Llama-3.2-1B/")  # doctest: +SKIP
        >>> llama.pretokenizer, llama.ignore_merges, llama.bos_id, llama.add_bos  # doctest: +SKIP
        ('llama3', True, 128000, True)
        """
        vocab, merges, special_tokens, kwargs = read_hf_tokenizer(path)
        try:
            return cls(vocab, merges, special_tokens, **kwargs)
        except ValueError as error:  # e.g. a byte missing from the vocabulary: say which file
            file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
            raise ValueError(f"{str(file)!r}: {error}") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer stored in a llama.cpp GGUF file's metadata.

        Reads the ``tokenizer.ggml.*`` fields with the ``gguf`` package (see
        :func:`scratchlm.tokenizer.gguf_vocab.read_gguf_tokenizer_fields`) and
        builds the tokenizer with :meth:`from_gguf_fields`.

        >>> Tokenizer.from_gguf("Llama-3.2-1B-Q4_K_M.gguf").pretokenizer  # doctest: +SKIP
        'llama3'

        SentencePiece files (``tokenizer.ggml.model`` ``"llama"``: Llama 2,
        Mistral, Gemma) load in SentencePiece mode with llama.cpp's ids (see
        :mod:`scratchlm.tokenizer.gguf_spm`):

        >>> Tokenizer.from_gguf("llama-2-7b.Q4_K_M.gguf").metaspace  # doctest: +SKIP
        'prepend'
        """
        return cls.from_gguf_fields(read_gguf_tokenizer_fields(path), source=f"GGUF file {str(path)!r}")

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], source: str = "GGUF metadata") -> "Tokenizer":
        """Build a tokenizer from GGUF tokenizer metadata already read into plain Python values.

        ``fields`` maps GGUF keys (``"tokenizer.ggml.model"``, ``"tokenizer.ggml.tokens"``,
        ...) to strings, ints, bools and lists; the rules are in
        :mod:`scratchlm.tokenizer.gguf_vocab`. ``source`` names them in errors.
        """
        vocab, merges, special_tokens, kwargs = gguf_tokenizer_arguments(fields, source)
        try:
            return cls(vocab, merges, special_tokens, **kwargs)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_files(
        cls,
        vocab_filepath: str | os.PathLike,
        merges_filepath: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
    ) -> "Tokenizer":
        """Load GPT-2-style files: ``encoder.json`` (token -> id) and the merges text file.

        >>> gpt2 = Tokenizer.from_files("gpt2_vocab.json", "gpt2_merges.txt", ["<|endoftext|>"])  # doctest: +SKIP
        >>> gpt2.encode("Hello world<|endoftext|>")  # doctest: +SKIP
        [15496, 995, 50256]
        """
        vocab, merges = load_gpt2_files(vocab_filepath, merges_filepath)
        return cls(vocab, merges, special_tokens)

    def save_gpt2_files(self, vocab_filepath: str | os.PathLike, merges_filepath: str | os.PathLike) -> None:
        """Write GPT-2-style ``encoder.json`` and merges files, which :meth:`from_files` reads back.

        The special tokens are in ``encoder.json`` but not marked special
        there: pass them again to :meth:`from_files`.

        >>> tokenizer.save_gpt2_files("encoder.json", "vocab.bpe")  # doctest: +SKIP
        >>> Tokenizer.from_files("encoder.json", "vocab.bpe", tokenizer.special_tokens)  # doctest: +SKIP
        """
        if self.metaspace is not None:
            raise ValueError(
                f"GPT-2's files hold byte-level BPE; this tokenizer is SentencePiece-style (metaspace="
                f"{self.metaspace!r}): use save or save_hf"
            )
        save_gpt2_files(self.vocab, self.merges, vocab_filepath, merges_filepath)

    def save_hf(self, path: str | os.PathLike) -> Path:
        """Write a ``tokenizer.json`` for Hugging Face ``tokenizers`` (see :mod:`scratchlm.tokenizer.hf_files`).

        It holds the pre-tokenizer, ``ignore_merges`` and, when ``add_bos`` or
        ``add_eos``, a post-processor that adds ``bos_id`` / ``eos_id``; :meth:`from_hf` reads it back.
        HF's BPE cannot tie two merges: with ``merge_ranks`` set, the merges
        are written in list order, and HF's ids differ from these wherever two
        tied merges compete in a word (HF takes the one listed first, this
        tokenizer and llama.cpp the leftmost).
        """
        return save_hf_tokenizer(path, self.vocab, self.merges, self.special_token_ids, **self._hf_settings(),
                                 eos_id=self.eos_id, add_eos=self.add_eos)

    def save_hf_folder(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos) into ``directory``.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` then gives
        the ids of :meth:`encode` (with ``add_special_tokens=False``, or with
        it when ``add_bos`` is False).
        """
        return save_hf_folder(directory, self.vocab, self.merges, self.special_token_ids, **self._hf_settings(),
                              eos_id=self.eos_id, add_eos=self.add_eos, pad_id=self.pad_id)

    def _hf_settings(self) -> dict[str, Any]:
        return {
            "pretokenizer": self.pretokenizer,
            "ignore_merges": self.ignore_merges,
            "bos_id": self.bos_id,
            "add_bos": self.add_bos,
            "unk_id": self.unk_id,
            "fuse_unk": self.fuse_unk,
            "normalizer": self.normalizer,
            "nonspecial_tokens": self.nonspecial_tokens,
            "lstrip_tokens": self.lstrip_tokens,
            "rstrip_tokens": self.rstrip_tokens,
        } | self._sentencepiece_settings()
