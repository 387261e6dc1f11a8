"""apply_kernels: a patched transformers model computes what the unpatched one does.

The unpatched twin runs transformers' own eager path (its masks, its
rotate_half, its loss); the patched one scratchlm's ops on the "torch" and
"triton" (interpreter) backends. Float32 throughout, so 1e-4 is a tight bound.
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.model import apply_kernels
from scratchlm.model.hf_kernels import ATTENTION_NAME
import hf_tiny_models as tiny

ATOL = 1e-4


def _loss_and_grads(model: torch.nn.Module, batch: dict, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def _assert_same_training_step(reference, patched, batch, **extra) -> None:
    expected_loss, expected_grads = _loss_and_grads(reference, batch, **extra)
    loss, grads = _loss_and_grads(patched, batch, **extra)
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=ATOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")


BATCHES = {"padded": tiny.padded_batch, "packed": tiny.packed_batch}


def _assert_same_logits(reference, patched, batch) -> None:
    # Padding positions' logits are nobody's output (each attention implementation fills them its own way).
    real = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)
    torch.testing.assert_close(_logits(patched, batch)[real], _logits(reference, batch)[real], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", list(BATCHES))
@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_torch_backend_matches_transformers(family: str, case: str) -> None:
    reference = tiny.model(family)
    patched = apply_kernels(tiny.twin(reference, family), kernels="torch")
    batch = BATCHES[case]()
    _assert_same_training_step(reference, patched, batch)
    _assert_same_logits(reference, patched, batch)


@pytest.mark.parametrize(("family", "case"), [("gemma2", "padded"), ("qwen3", "packed")])
def test_reference_backend_matches_transformers(family: str, case: str) -> None:
    # "auto" on the CPU: the written-out reference ops.
    reference = tiny.model(family)
    patched = apply_kernels(tiny.twin(reference, family), kernels="reference")
    assert set(patched.scratchlm_backends.values()) == {"reference"}
    batch = BATCHES[case]()
    _assert_same_training_step(reference, patched, batch)
    _assert_same_logits(reference, patched, batch)


# The interpreter runs a training step in ~15 s, so each family difference is covered once: GQA, padding,
# soft-capped attention and logits, windows, 1 + w norms and GeGLU (Gemma 2); SwiGLU, q/k norms and windows
# on packed rows (Qwen3); two RoPE tables and windows on packed rows (Gemma 3).
@pytest.mark.parametrize(("family", "case"), [("gemma2", "padded"), ("qwen3", "packed"), ("gemma3", "packed")])
def test_triton_backend_matches_transformers(family: str, case: str) -> None:
    reference = tiny.model(family)
    patched = apply_kernels(tiny.twin(reference, family), kernels="triton")
    _assert_same_training_step(reference, patched, BATCHES[case]())


def test_num_items_in_batch_divides_the_summed_loss() -> None:
    # Gradient accumulation: transformers sums the losses and divides by the items of all micro-batches.
    reference = tiny.model("gemma2")
    patched = apply_kernels(tiny.twin(reference, "gemma2"), kernels="torch")
    _assert_same_training_step(reference, patched, tiny.padded_batch(), num_items_in_batch=torch.tensor(101))


def test_the_patch_is_per_instance() -> None:
    reference = tiny.model("llama")
    patched = apply_kernels(tiny.twin(reference, "llama"), kernels="torch")
    # Built from one config object, yet the unpatched model keeps transformers' attention and forwards.
    assert reference.config._attn_implementation == "eager"
    assert patched.config._attn_implementation == ATTENTION_NAME
    assert patched.scratchlm_backends["attention"] == "torch" and not hasattr(reference, "scratchlm_backends")
    assert all(m.config is patched.config for m in patched.modules() if "config" in m.__dict__)
    assert "forward" not in reference.model.layers[0].self_attn.__dict__
    assert "forward" not in reference.__dict__
    assert type(patched) is type(reference)
    assert patched.state_dict().keys() == reference.state_dict().keys()
    # The unpatched model still returns logits with labels in training (the patched one does not form them).
    reference.train()
    patched.train()
    batch = tiny.padded_batch()
    assert reference(**batch).logits is not None
    assert patched(**batch).logits is None
    # In eval mode labels take transformers' logits path on the patched modules: logits and loss both.
    reference.eval()
    patched.eval()
    with torch.no_grad():
        expected, got = reference(**batch), patched(**batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=ATOL)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=ATOL, rtol=ATOL)


def _step_outputs(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Loss, logits and every gradient."""
    loss, grads = _loss_and_grads(model, batch)
    return {"loss": loss, "logits": _logits(model, batch), **grads}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_error_within_twice_transformers_own(dtype: torch.dtype) -> None:
    # The three-way rule: against float64 transformers, the patched model's error in a 16-bit dtype is at
    # most twice transformers' own error in that dtype (relative norms, per output and gradient).
    exact = tiny.model("gemma2").double()
    own = tiny.twin(exact, "gemma2").to(dtype)
    patched = apply_kernels(tiny.twin(exact, "gemma2").to(dtype), kernels="torch")
    # Packed rows, not padded ones: transformers' float64 eager attention turns fully masked padding rows into NaN.
    batch = tiny.packed_batch()
    expected = _step_outputs(exact, batch)
    own_outputs, patched_outputs = _step_outputs(own, batch), _step_outputs(patched, batch)
    for name, value in expected.items():
        scale = value.norm().clamp_min(1e-12)
        own_error = (own_outputs[name].double() - value).norm() / scale
        patched_error = (patched_outputs[name].double() - value).norm() / scale
        assert patched_error <= 2 * own_error + 1e-6, f"{name}: {patched_error:.3g} vs transformers' {own_error:.3g}"
