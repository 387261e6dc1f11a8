"""load_pretrained on files that state more than they hold, or are not what their name says.

A config.json's max_position_embeddings must cost nothing until positions are
used (peak memory measured in a fresh process), a tied config beside a
different stored lm_head is warned about, and folders and files that are not
checkpoints are refused saying what they lack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from llama_fixtures import hf_llama, save_hf_folder

from scratchlm.model import PretrainedFormatError, PretrainedFormatWarning, generate_ids, load_pretrained

pytest.importorskip("transformers", reason="transformers builds the reference models")


@pytest.fixture(scope="module")
def hf_model():
    return hf_llama(seed=3)


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# A child process: generation with the model as saved, then the peak resident
# memory it took beyond what the imports had already taken (ru_maxrss, KiB on Linux).
_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import torch
    from scratchlm.model import generate_ids, load_pretrained
    torch.zeros(1)  # allocator warmed up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model, _ = load_pretrained(sys.argv[1], kernels="reference", device="cpu")
    steps = list(generate_ids(model, [[1, 2, 3]], 3, temperature=0))
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(grown, seconds, [step[0] for step in steps])
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_huge_max_position_embeddings_costs_no_memory(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "hf")
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    expected = [step[0] for step in generate_ids(model, [[1, 2, 3]], 3, temperature=0)]
    # 20 million positions: the tables alone, built up front, were 1.3 GB (4 GB at the peak, 12 s).
    edit_config(folder, max_position_embeddings=20_000_000)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown_kib, seconds, steps = result.stdout.split(maxsplit=2)
    assert int(grown_kib) < 64 * 1024, f"peak memory grew by {int(grown_kib) // 1024} MiB for a 0.2 MB model"
    assert float(seconds) < 10
    assert steps.strip() == str(expected)


def test_a_context_of_10_to_the_12_loads_and_generates(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "hf")
    edit_config(folder, max_position_embeddings=10**12)
    model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    assert model.config.context_length == 10**12
    assert len(list(generate_ids(model, [[1, 2, 3]], 3, temperature=0))) == 3


def test_layers_stated_beyond_the_file_are_refused_before_allocating(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "hf")
    edit_config(folder, num_hidden_layers=10**12)
    with pytest.raises(PretrainedFormatError, match="states 1000000000000 layers but holds tensors for 2"):
        load_pretrained(folder, kernels="reference", device="cpu")


def test_a_deeply_nested_config_is_refused_by_name(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "hf")
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(PretrainedFormatError, match=r"config\.json' nests its JSON deeper than Python's reader allows"):
        load_pretrained(folder, kernels="reference", device="cpu")


# ---- tie_word_embeddings beside a stored lm_head -----------------------------------------


def test_tied_config_with_a_different_stored_lm_head_warns(tmp_path):
    untied = hf_llama(seed=4, tie_word_embeddings=False)
    folder = save_hf_folder(untied, tmp_path / "hf")
    edit_config(folder, tie_word_embeddings=True)
    with pytest.warns(PretrainedFormatWarning, match=r"tie_word_embeddings=true but the file's 'lm_head\.weight' differs"):
        model, _ = load_pretrained(folder, kernels="reference", device="cpu")
    # As transformers does: the embedding is the output matrix.
    assert model.lm_head.weight is model.token_embeddings.weight
    assert torch.equal(model.token_embeddings.weight, untied.model.embed_tokens.weight)


def test_tied_config_with_an_equal_stored_lm_head_is_quiet(tmp_path):
    untied = hf_llama(seed=4, tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.model.embed_tokens.weight)
    folder = save_hf_folder(untied, tmp_path / "hf")
    edit_config(folder, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedFormatWarning)
        load_pretrained(folder, kernels="reference", device="cpu")


# ---- files and folders that are not what they seem ----------------------------------------


def test_a_gguf_name_on_another_file_is_called_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    torch.save({"a": torch.zeros(1)}, fake)
    with pytest.raises(PretrainedFormatError, match=r"model\.gguf' is not a GGUF file: it starts with b'PK.*not the GGUF magic"):
        load_pretrained(fake, kernels="reference", device="cpu")


def test_a_hugging_face_folder_without_config_says_so(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "hf")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds model\.safetensors, tokenizer\.json.* but no config\.json"):
        load_pretrained(folder, kernels="reference", device="cpu")


def test_a_folder_of_something_else_names_both_kinds_it_could_be(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"holds neither a config\.json \(a Hugging Face folder\) nor checkpoint_\*\.pt"):
        load_pretrained(tmp_path, kernels="reference", device="cpu")

