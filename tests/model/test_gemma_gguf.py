"""Gemma 2 and Gemma 3 from GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them.

The writer (llama_fixtures.write_gguf) stores every norm weight plus 1, names
the post-norms post_attention_norm / post_ffw_norm, and writes the window,
Gemma 2's caps and Gemma 3's linear scaling; what llama.cpp fixes in code
instead (the sliding pattern, Gemma 3's local base 10000, the attention scale
from the head dimension) is matched by the source models' configs here.
Each file is read by scratchlm and by transformers' own GGUF loader; the
"transformers" variants use the values that loader assumes for what the file
does not state (caps 50/30, query_pre_attn_scalar 256), so both readers must
agree with the model the file was written from.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from llama_fixtures import TINY_LLAMA, VOCAB_SIZE, write_gguf

from scratchlm.model import generate_ids, load_pretrained

transformers = pytest.importorskip("transformers", reason="transformers builds the reference models")
pytest.importorskip("gguf")

ATOL, RTOL = 1e-4, 1e-4
WINDOW, SEQ = 8, 40
SHAPE = {key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")}
SLIDING = [f"{kind}_attention" for kind in ("sliding",) * 5 + ("full", "sliding")]

# name -> (config class, config keyword arguments, whether transformers' GGUF loader reads the file faithfully)
VARIANTS = {
    # query_pre_attn_scalar = head_dim as llama.cpp assumes (below 27B); caps that bite, read from the file.
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               query_pre_attn_scalar=16, attn_logit_softcapping=3.0, final_logit_softcapping=2.0), False),
    "gemma2-transformers": ("Gemma2Config", dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0), True),
    # 7 layers: 5 sliding, 1 full, 1 sliding (llama.cpp's pattern of 6); linear scaling on the full layer.
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               query_pre_attn_scalar=16, layer_types=SLIDING,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), False),
    "gemma3-transformers": ("Gemma3TextConfig", dict(num_hidden_layers=7, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, layer_types=SLIDING,
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
                            True),
}  # fmt: skip


def gemma_model(variant: str):
    config_name, kwargs, _ = VARIANTS[variant]
    config = getattr(transformers, config_name)(**SHAPE, sliding_window=WINDOW, **kwargs)
    torch.manual_seed(len(variant))
    model_class = transformers.Gemma2ForCausalLM if "2" in config_name else transformers.Gemma3ForCausalLM
    model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # around 0 (scale 1 + w): a missing or doubled +1 shows
                param.copy_(0.5 * torch.randn_like(param))
    return model.eval()


def token_ids(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, seq), generator=torch.Generator().manual_seed(7))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_logits_match_the_source_model_and_transformers_gguf_reader(variant, tmp_path):
    hf = gemma_model(variant)
    path = write_gguf(hf, tmp_path / f"{variant}.gguf")
    ours, _ = load_pretrained(path, kernels="reference", device="cpu", tokenizer=False)
    config = hf.config
    assert ours.config.norm_offset == 1.0 and ours.config.post_norms and ours.config.tie_embeddings
    assert ours.config.sliding_window == WINDOW
    assert ours.config.sliding_window_layers == tuple(
        i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"
    )
    assert ours.config.attention_softcap == getattr(config, "attn_logit_softcapping", None)
    assert ours.config.final_softcap == getattr(config, "final_logit_softcapping", None)
    ids = token_ids()
    assert_close(logits(ours, ids), logits(hf, ids), atol=ATOL, rtol=RTOL, name=f"{variant} vs its source model")
    if VARIANTS[variant][2]:
        pytest.importorskip("accelerate", reason="transformers reads GGUF weights only with accelerate installed")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert theirs.config.model_type == config.model_type
        assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL, name=f"{variant} vs transformers")


def test_gguf_gemma3_greedy_decoding_with_the_kv_cache(tmp_path):
    from llama_fixtures import hf_greedy

    hf = gemma_model("gemma3")
    ours, _ = load_pretrained(write_gguf(hf, tmp_path / "g3.gguf"), kernels="torch", device="cpu", tokenizer=False)
    prompt = token_ids(seq=5)[0].tolist()
    steps = 20
    assert [step[0] for step in generate_ids(ours, [prompt], steps, temperature=0)] == hf_greedy(hf, prompt, steps)
