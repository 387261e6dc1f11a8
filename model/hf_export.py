"""``export_hf``: write a TransformerLM as a Hugging Face folder of its family.

The family is the one whose format states the model's config (see
``families.family_of``): Gemma 3 with post-norms and q/k norms, Gemma 2 with
post-norms, Qwen3 with q/k norms, Qwen2 with q/k/v biases, Mistral with a
window on every layer, Llama otherwise.

    out_dir/config.json              hyper-parameters (model_type llama, qwen2, qwen3, mistral, gemma2 or gemma3_text)
    out_dir/generation_config.json   bos/eos ids
    out_dir/model.safetensors        weights, q/k rows in HF's rotate_half order
    out_dir/tokenizer.json           } Tokenizer.save_hf_folder, when a tokenizer is given:
    out_dir/tokenizer_config.json    } the generic fast tokenizer, with bos/eos

The folder appears whole or not at all: everything is written into a hidden
temporary sibling, flushed to disk, and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from scratchlm.model.hf_checkpoint import CONFIG_FILE, WEIGHTS_FILE, scratchlm_to_hf_name
from scratchlm.model.safetensors_writer import SafetensorsStreamWriter
from scratchlm.model.transformer import TransformerLM
from scratchlm.model.families import FamilyError, family_of
from scratchlm.model.weight_loading import adjacent_to_half_split_rows, expected_shapes, rotary_row_heads

GENERATION_CONFIG_FILE = "generation_config.json"
# Everything an export writes: the only names a folder may hold for --overwrite to replace it.
EXPORTED_FILES = frozenset(
    {CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"}
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_config(model: TransformerLM, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """The config.json contents for ``model``.

    RoPE is written both ways: rope_theta and rope_scaling at the top level
    (transformers < 5, llama.cpp's converter) and rope_parameters
    (transformers >= 5); both describe the same rotation.
    """
    cfg = model.config
    dtype = model.token_embeddings.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"model weights are {dtype}; expected one of {list(_DTYPE_NAMES)} to export")
    try:
        family = family_of(cfg)
        window_fields = family.write_window(cfg)
        family_fields = family.write_fields(cfg)
    except FamilyError as e:
        raise ValueError(f"export_hf: {e}") from e
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None
    rope_parameters: dict[str, Any] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(cfg.rope_theta)}
    if family.local_rope:
        # Gemma 3: one RoPE per layer type (transformers >= 5), and rope_local_base_freq before that.
        local_theta = float(cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta)
        rope_parameters = {
            "full_attention": rope_parameters,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }
        family_fields["rope_local_base_freq"] = local_theta
    elif cfg.local_rope_theta is not None and cfg.local_rope_theta != cfg.rope_theta:
        raise ValueError(
            f"export_hf: ModelConfig.local_rope_theta={cfg.local_rope_theta}: only Gemma 3's format has a second RoPE base"
        )
    return {
        "architectures": [family.hf_architecture],
        "model_type": family.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": family.hidden_act,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
        **window_fields,
        **family_fields,
    }


def _write_json(path: Path, document: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2, ensure_ascii=False)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())


def _write_weights(model: TransformerLM, path: Path) -> None:
    """model.safetensors, one tensor at a time; q/k rows reordered to rotate_half order."""
    cfg = model.config
    state = model.state_dict()
    names = list(expected_shapes(cfg))  # lm_head left out when tied, as transformers saves it
    hf_names = {name: scratchlm_to_hf_name(name, cfg.post_norms) for name in names}
    entries = [(hf_names[name], state[name].dtype, tuple(state[name].shape)) for name in names]
    with open(path, "wb") as file:
        writer = SafetensorsStreamWriter(file, entries, {"format": "pt"})
        for name in names:
            tensor = state[name].detach()
            heads = rotary_row_heads(name, cfg)
            if heads is not None:
                tensor = adjacent_to_half_split_rows(tensor, heads)
            writer.write(hf_names[name], tensor)
        writer.close()
        file.flush()
        os.fsync(file.fileno())


def check_out_dir(out_dir: Path, overwrite: bool, *, name: str = "out_dir", written: frozenset[str] = frozenset()) -> None:
    """Refuse an ``out_dir`` that is a file, or a non-empty folder unless ``overwrite``.

    Even with ``overwrite`` the folder must hold only what an export writes
    (``EXPORTED_FILES``, plus ``written``: the names this export did write).
    The folder is replaced as a whole, so anything else in it would be
    deleted: a file of the user's, or another model's shards and index
    (which transformers would otherwise read in preference to
    model.safetensors, were the folder updated file by file).
    """
    where = f"{name}={str(out_dir)!r}" if name == "out_dir" else f"{name} {str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{where} exists and is not a folder; expected a folder to write the model into")
    entries = sorted(entry.name for entry in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        flag = "overwrite=True" if name == "out_dir" else "--overwrite"
        raise ValueError(f"{where} exists and is not empty; pass {flag} to replace it")
    foreign = [entry for entry in entries if entry not in EXPORTED_FILES | written]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{where} holds {shown}, which an export does not write; expected an empty folder or an earlier "
            f"export (replacing the folder would delete them): remove them or choose another folder"
        )


def export_hf(model: TransformerLM, tokenizer: Any, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``, unless None) as a Hugging Face folder of its family; returns its path.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` gives the
    same logits, and ``AutoTokenizer.from_pretrained(out_dir)`` the same ids.
    An existing non-empty ``out_dir`` is refused unless ``overwrite``, and is
    then replaced as a whole only once the new folder is complete; a folder
    holding anything an export does not write is refused even then (see
    ``check_out_dir``).
    """
    if not isinstance(model, TransformerLM):
        raise ValueError(f"model is {type(model).__name__}; expected a TransformerLM")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    bos_id = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    config = hf_config(model, bos_id, eos_id)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_json(staging / CONFIG_FILE, config)
        _write_json(
            staging / GENERATION_CONFIG_FILE,
            {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False},
        )
        _write_weights(model, staging / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save_hf_folder(staging)  # tokenizer.json and tokenizer_config.json
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is an ordinary one
        if out_dir.exists():
            # Again: something may have appeared meanwhile.
            check_out_dir(out_dir, overwrite, written=frozenset(entry.name for entry in staging.iterdir()))
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
