"""apply_kernels in use: Trainer, PEFT LoRA, gradient checkpointing, generate, torch.compile, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_tiny_models as tiny
from scratchlm.model import apply_kernels
from scratchlm.model.hf_kernels import ATTENTION_NAME

ATOL = 1e-4


def _train_with_trainer(model: torch.nn.Module, out_dir) -> dict[str, torch.Tensor]:
    rows = []
    for seed in range(8):
        batch = tiny.padded_batch(seed)
        rows.append({key: value[seed % 2] for key, value in batch.items()})
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
        data_seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_steps_reach_the_unpatched_weights(tmp_path) -> None:
    # Gradient accumulation (2 micro-batches per step) makes the Trainer pass num_items_in_batch.
    reference = tiny.model("gemma2")
    patched = apply_kernels(tiny.twin(reference, "gemma2"), kernels="torch")
    start = {name: p.detach().clone() for name, p in reference.named_parameters()}
    expected = _train_with_trainer(reference, tmp_path / "reference")
    trained = _train_with_trainer(patched, tmp_path / "patched")
    assert any(not torch.equal(expected[name], start[name]) for name in start)
    for name, weight in trained.items():
        torch.testing.assert_close(weight, expected[name], atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")


def test_lora_adapters_on_the_projections_train_the_same() -> None:
    peft = pytest.importorskip("peft", reason="peft is in the dev extras")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    reference = tiny.model("qwen3")
    twin = tiny.twin(reference, "qwen3")
    reference = peft.get_peft_model(reference, peft.LoraConfig(**lora))
    # Adapters added after patching; their B matrices start at 0, so give them weights that matter.
    patched = peft.get_peft_model(apply_kernels(twin, kernels="torch"), peft.LoraConfig(**lora))
    patched.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for (name, p), (_, q) in zip(reference.named_parameters(), patched.named_parameters()):
            if "lora_B" in name:
                p.normal_(std=0.1)
                q.copy_(p)
    batch = tiny.padded_batch()
    got, expected = _grads(patched, batch), _grads(reference, batch)
    assert any("lora_B" in name for name in got)
    _assert_same(got, expected)
    # And the other order: a PEFT model patched afterwards (its base model is what gets patched).
    again = apply_kernels(peft.get_peft_model(tiny.model("qwen3"), peft.LoraConfig(**lora)), kernels="torch")
    again.load_state_dict(reference.state_dict())
    assert again.get_base_model().config._attn_implementation == ATTENTION_NAME
    _assert_same(_grads(again, batch), expected)


def test_gradient_checkpointing() -> None:
    reference = tiny.model("mistral")
    patched = apply_kernels(tiny.twin(reference, "mistral"), kernels="torch")
    batch = tiny.padded_batch()
    expected = _grads(reference, batch)
    # transformers 5 renamed it; the old name warns.
    enable = getattr(patched, "activation_checkpointing_enable", None) or patched.gradient_checkpointing_enable
    enable()
    assert patched.model.layers[0].gradient_checkpointing
    _assert_same(_grads(patched, batch), expected)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_generate_uses_the_logits_path_and_the_cache(family: str) -> None:
    # Left-padded prompts, then one token at a time through the KV cache (windowed layers included).
    reference = tiny.model(family)
    patched = apply_kernels(tiny.twin(reference, family), kernels="torch")
    prompts = tiny.padded_batch()
    attention_mask = prompts["attention_mask"].clone()
    attention_mask[1] = 1  # generate pads on the left
    attention_mask[0, :5] = 0
    inputs = {"input_ids": prompts["input_ids"][:, :20], "attention_mask": attention_mask[:, :20]}
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference.eval()
    patched.eval()
    expected = reference.generate(**inputs, **settings, output_logits=True, return_dict_in_generate=True)
    got = patched.generate(**inputs, **settings, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=ATOL, rtol=ATOL)


def test_flattened_rows_with_cu_seq_lens() -> None:
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True): one row, documents given by cu_seq_lens.
    reference = tiny.model("llama")
    patched = apply_kernels(tiny.twin(reference, "llama"), kernels="torch")
    packed = tiny.packed_batch()
    row = {key: packed[key][:1] for key in ("input_ids", "position_ids", "labels")}
    expected = _grads(reference, {**row, "use_cache": False})
    boundaries = torch.tensor([0, 13, tiny.SEQ], dtype=torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=27, max_length_k=27)
    # Without position_ids only cu_seq_lens can tell the documents apart.
    got = _grads(patched, {"input_ids": row["input_ids"], "labels": row["labels"], **flash_kwargs})
    _assert_same(got, expected)


def test_torch_compile() -> None:
    reference = tiny.model("gemma3")
    patched = apply_kernels(tiny.twin(reference, "gemma3"), kernels="torch")
    batch = tiny.padded_batch()
    expected = _grads(reference, batch)
    compiled = torch.compile(patched, backend="aot_eager")
    loss = compiled(**batch).loss
    loss.backward()
    got = {"loss": loss.detach(), **{n: p.grad for n, p in patched.named_parameters() if p.grad is not None}}
    _assert_same(got, expected)


def test_gemma3_multimodal_language_model() -> None:
    text = tiny.config("gemma3")
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=299,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.Gemma3ForConditionalGeneration(config).float()
    patched = transformers.Gemma3ForConditionalGeneration(config).float()
    patched.load_state_dict(reference.state_dict())
    apply_kernels(patched, kernels="torch")
    language_model = patched.model.language_model
    assert language_model.config._attn_implementation == ATTENTION_NAME
    assert patched.model.vision_tower.config._attn_implementation == "eager"
    batch = tiny.padded_batch()
    _assert_same(_grads(patched, batch), _grads(reference, batch))
    with pytest.raises(ValueError, match="pixel_values"):
        patched(**batch, pixel_values=torch.zeros(2, 3, 28, 28))


def test_save_pretrained_and_deepcopy(tmp_path) -> None:
    # The checkpoint is transformers' own (same keys, no trace of the patch); a copy is patched on its own.
    patched = apply_kernels(tiny.model("llama"), kernels="torch")
    patched.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != ATTENTION_NAME
    assert all(torch.equal(value, patched.state_dict()[name]) for name, value in loaded.state_dict().items())
    copied = copy.deepcopy(patched)
    mlp = copied.model.layers[0].mlp
    assert copied.forward.__self__ is copied and mlp.forward.__self__ is mlp
    batch = tiny.padded_batch()
    _assert_same(_grads(copied, batch), _grads(patched, batch))


def _snapshot(model: torch.nn.Module) -> tuple:
    forwards = tuple(m.__dict__.get("forward") for m in model.modules())
    state = {name: value.clone() for name, value in model.state_dict().items()}
    return model.config, model.config._attn_implementation, forwards, state


def _assert_untouched(model: torch.nn.Module, before: tuple) -> None:
    config, implementation, forwards, state = before
    assert model.config is config and config._attn_implementation == implementation
    assert tuple(m.__dict__.get("forward") for m in model.modules()) == forwards
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def _partial_rotary_llama() -> torch.nn.Module:
    # No supported family rotates part of a head today; a table of 4 of 8 frequencies stands in for one.
    model = tiny.model("llama")
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq[:4]
    return model


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)), "GPT2LMHead"),
        (lambda: transformers.LlamaModel(tiny.config("llama")), "LlamaModel"),
        (lambda: tiny.model("llama", hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda: tiny.model("mistral", attention_dropout=0.1), "attention_dropout=0.1"),
        (lambda: tiny.model("gemma3", use_bidirectional_attention=True), "use_bidirectional_attention"),
        (_partial_rotary_llama, "holds 4 frequencies for head_dim 16"),
    ],
)
def test_refusals_leave_the_model_untouched(build, message: str) -> None:
    model = build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_kernels(model, kernels="torch")
    _assert_untouched(model, before)


def test_unknown_kernels_refused_before_any_change() -> None:
    model = tiny.model("llama")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="kernels"):
        apply_kernels(model, kernels="fast")
    with pytest.raises(ValueError, match="unknown ops"):
        apply_kernels(model, kernels={"layernorm": "torch"})
    _assert_untouched(model, before)


def test_padding_between_tokens_is_refused() -> None:
    model = apply_kernels(tiny.model("llama"), kernels="torch")
    batch = tiny.padded_batch()
    batch["attention_mask"][1, 10] = 0
    with pytest.raises(ValueError, match="padding between tokens"):
        model(**batch)
