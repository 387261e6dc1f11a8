"""Tiny Llama checkpoints written by transformers and gguf themselves, for the loader tests.

Every builder is seeded, so a test sees the same weights on every run. The
GGUF writer follows llama.cpp's convert_hf_to_gguf.py: its tensor names, its
q/k row permutation (back to Meta's adjacent pairs), its metadata keys, norms
kept in F32, and Llama 3.1 rope scaling stored as per-frequency factors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.gpt2_files import gpt2_bytes_to_unicode


def _transformers():
    return pytest.importorskip("transformers", reason="transformers builds the reference models")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SAMPLE_TEXT = "the theory of the three thrushes: they thought then the other ones were there."
# Merges that fire on SAMPLE_TEXT, so encoding exercises real BPE.
_MERGES = [
    (b"t", b"h"), (b"th", b"e"), (b" ", b"th"), (b" ", b"the"), (b"e", b"r"), (b"o", b"r"),
    (b"r", b"e"), (b"h", b"e"), (b" t", b"h"), (b"o", b"n"), (b" ", b"o"), (b"e", b"s"),
    (b"h", b"r"), (b"th", b"r"), (b"u", b"s"), (b"e", b"y"), (b"ou", b"g"), (b"o", b"u"),
]  # fmt: skip


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer: 256 bytes, a few merges, BOS and EOS."""
    vocab = {i: bytes([i]) for i in range(256)}
    for left, right in _MERGES:
        if left + right not in vocab.values():
            vocab[len(vocab)] = left + right
    merges = [pair for pair in _MERGES if all(part in vocab.values() for part in pair)]
    return Tokenizer(vocab, merges, [BOS, EOS], bos_token=BOS, eos_token=EOS)


TOKENIZER = tiny_tokenizer()
VOCAB_SIZE = TOKENIZER.vocab_size

# d_model 64 with 4 heads: head_dim 16; every width a multiple of 32 (GGUF block size).
TINY_LLAMA = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    # Large enough that logits differ by ~1 between tokens, so greedy choices are not near-ties.
    initializer_range=0.2,
    bos_token_id=TOKENIZER.special_token_ids[BOS],
    eos_token_id=TOKENIZER.special_token_ids[EOS],
)

# Llama 3.1's scaling with a short original context, so it changes the frequencies a 64-token test sees.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def hf_llama(seed: int = 0, rope_theta: float = 10000.0, rope_scaling: dict | None = None, **overrides):
    """A seeded, randomly initialised transformers LlamaForCausalLM (float32, eval, eager attention)."""
    return hf_model("llama", seed, rope_theta, rope_scaling, **overrides)


# model_type -> (config class, model class) names in transformers.
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def hf_model(model_type: str, seed: int = 0, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
             **overrides):  # fmt: skip
    """A seeded, randomly initialised transformers model of ``model_type`` (float32, eval, eager attention).

    TINY_LLAMA's shape, with ``overrides`` (Qwen2's use_sliding_window, Qwen3's head_dim, ...).
    """
    values = {**TINY_LLAMA, **overrides}
    values["rope_parameters"] = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    transformers = _transformers()
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[model_type])
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights start at 1 and biases at 0, which would hide a missing or misplaced one.
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
    return model.eval()


def save_hf_folder(model, folder: Path, *, tokenizer: Tokenizer | None = TOKENIZER, max_shard_size=None) -> Path:
    """model.save_pretrained (safetensors, sharded when max_shard_size is given) plus the tokenizer files."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if tokenizer is not None:
        tokenizer.save_hf_folder(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    """Change fields of ``folder``'s config.json in place (a malformed or unusual checkpoint)."""
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy ``generate``: exactly ``steps`` new ids, never stopped early by an eos."""
    settings = _transformers().GenerationConfig(
        do_sample=False, max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None, pad_token_id=0
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, generation_config=settings, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) :].tolist()


def token_ids(seq: int, batch: int = 2) -> torch.Tensor:
    """A fixed (batch, seq) draw of ids below VOCAB_SIZE."""
    return torch.randint(0, VOCAB_SIZE, (batch, seq), generator=torch.Generator().manual_seed(7))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A scratchlm or transformers model's logits for ``ids``, without autograd."""
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


# ------------------------------------------------------------------ GGUF, the way llama.cpp writes it


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate_half rows -> Meta's adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for rope_type llama3 (float32 frequencies, as there)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}

# Gemma 2/3 (tensor_mapping.py): HF's post_attention_layernorm follows attention there.
_GEMMA_GGUF_NAMES = {
    **_GGUF_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}

# HF model_type -> the GGUF architecture llama.cpp's converter writes (Mistral goes out as "llama").
GGUF_ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}  # fmt: skip


def gguf_name(hf_name: str, gemma: bool = False) -> str:
    names = _GEMMA_GGUF_NAMES if gemma else _GGUF_NAMES
    if hf_name in names:
        return names[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{names[rest]}"


def add_tokenizer_metadata(writer, tokenizer: Tokenizer) -> None:
    """tokenizer.ggml.* keys for a byte-level BPE ("gpt2") vocabulary, as llama.cpp writes them."""
    spelling = gpt2_bytes_to_unicode()
    specials = set(tokenizer.special_token_ids.values())
    tokens, types = [], []
    for token_id in range(tokenizer.vocab_size):
        token = tokenizer.vocab[token_id]
        if token_id in specials:
            tokens.append(token.decode("utf-8"))
            types.append(3)  # CONTROL
        else:
            tokens.append("".join(spelling[b] for b in token))
            types.append(1)  # NORMAL
    merges = [
        " ".join("".join(spelling[b] for b in part) for part in pair) for pair in tokenizer.merges
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.special_token_ids[BOS])
    writer.add_eos_token_id(tokenizer.special_token_ids[EOS])
    writer.add_add_bos_token(False)


def write_gguf(model, path: Path, qtype: str = "F32", *, tokenizer: Tokenizer | None = TOKENIZER,
               extra_metadata=None, skip=(), extra_tensors=None) -> Path:  # fmt: skip
    """``model`` (a transformers Llama, Mistral, Qwen2, Qwen3, Gemma 2 or Gemma 3 text model) as a llama.cpp GGUF file.

    As convert_hf_to_gguf.py writes them: Llama and Mistral as architecture
    "llama" with q/k rows permuted to Meta's pairs (LlamaModel), no sliding
    window key, rope.dimension_count; Qwen2 and Qwen3 as "qwen2"/"qwen3"
    (Qwen2Model, Qwen3Model) with rows in HF order, biases and q/k norms under
    their own names, and key_length/value_length when config.json states
    head_dim (TextModel); Gemma 2/3 with every norm weight plus 1, the window,
    Gemma 2's caps and Gemma 3's linear scaling (Gemma2Model, Gemma3Model). ``qtype`` is the ggml type of every matrix ("F32", "F16", "BF16", "Q8_0",
    "Q4_0", ...); 1-D norms stay F32 as llama.cpp keeps them. ``skip`` leaves
    tensors out; ``extra_tensors`` {name: float32 array or (raw bytes, ggml type)} are added;
    ``extra_metadata`` {key: value} overrides or adds llama.* keys.
    """
    import gguf

    config = model.config
    architecture = GGUF_ARCHITECTURES[config.model_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if architecture == "llama":
        writer.add_rope_dimension_count(head_dim)
    gemma = config.model_type in ("gemma2", "gemma3_text")
    if config.model_type in ("qwen3", "mistral") or gemma:  # their configs state head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gemma:  # Gemma2Model / Gemma3Model: the window and the caps; the sliding layers' base is not written
        writer.add_sliding_window(config.sliding_window)
        if config.model_type == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        else:
            rope = config.rope_parameters["full_attention"]
            if rope.get("rope_type") == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    if tokenizer is not None:
        add_tokenizer_metadata(writer, tokenizer)

    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(rope, rope["rope_theta"], head_dim))
    ggml_type = gguf.GGMLQuantizationType[qtype]
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(hf_name, gemma)
        if name in skip:
            continue
        data = tensor.detach().float().numpy()
        if gemma and name.endswith("norm.weight"):
            data = data + 1  # the converters' norm_shift: llama.cpp multiplies by the stored weight
        if architecture == "llama" and name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif architecture == "llama" and name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, config.num_key_value_heads)
        if data.ndim == 1 or ggml_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
    for name, data in (extra_tensors or {}).items():
        if isinstance(data, tuple):  # (raw bytes, ggml type)
            writer.add_tensor(name, data[0], raw_dtype=data[1])
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_state(model, qtype: str) -> dict[str, torch.Tensor]:
    """The HF model's state dict after a round trip through ``qtype`` (what a GGUF of that type holds)."""
    import gguf

    ggml_type = gguf.GGMLQuantizationType[qtype]
    state = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if data.ndim >= 2 and ggml_type != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.dequantize(gguf.quants.quantize(data, ggml_type), ggml_type)
        state[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return state
