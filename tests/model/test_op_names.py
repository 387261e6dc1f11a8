"""One name per op: the registry key, the reference function, the kernel, the benchmark; old names still work.

The old names (``functional.rms_norm``, ``swiglu_gate``, ``apply_rope``,
``causal_attention``, ``scratchlm.kernels.apply_rope`` and the op "loss")
are aliases: the same objects, the same registry entry.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from scratchlm.model import OP_ALIASES, OPS, TransformerLM, functional, get_op, resolve_kernels

REPO_ROOT = Path(__file__).resolve().parents[2]

# op -> its Triton kernel's name in scratchlm.kernels; only attention's is not the op's own name.
KERNELS = {
    "rmsnorm": "rmsnorm",
    "swiglu": "swiglu",
    "geglu": "geglu",
    "rope": "rope",
    "attention": "flash_attention",
    "linear_cross_entropy": "linear_cross_entropy",
}


def test_each_op_has_one_name_for_its_reference_test_and_benchmark():
    assert set(KERNELS) == set(OPS)
    for op in OPS:
        assert get_op(op, "reference") is getattr(functional, op), op
        assert (REPO_ROOT / "benchmarks" / f"bench_{op}.py").is_file(), op
        assert (REPO_ROOT / "tests" / "kernels" / f"test_{KERNELS[op]}.py").is_file(), op


@pytest.mark.parametrize(
    "old, new",
    [("rms_norm", "rmsnorm"), ("swiglu_gate", "swiglu"), ("apply_rope", "rope"), ("causal_attention", "attention")],
)
def test_the_old_reference_names_are_the_same_functions(old, new):
    assert getattr(functional, old) is getattr(functional, new)


def test_the_kernels_in_the_registry_are_the_public_ones_and_apply_rope_is_rope():
    pytest.importorskip("triton")
    kernels = importlib.import_module("scratchlm.kernels")
    assert kernels.apply_rope is kernels.rope
    assert kernels.rope is importlib.import_module("scratchlm.kernels.rope").rope
    assert callable(kernels.rope)
    for op, name in KERNELS.items():
        assert get_op(op, "triton", device="cuda") is getattr(kernels, name), op


def test_loss_is_accepted_wherever_an_op_is_named():
    assert OP_ALIASES == {"loss": "linear_cross_entropy"}
    assert get_op("loss", "torch") is get_op("linear_cross_entropy", "torch")
    resolved = resolve_kernels({"loss": "torch"}, device="cpu")
    assert list(resolved) == list(OPS)  # reported under the op's own name
    assert resolved["linear_cross_entropy"] == resolved["loss"] == resolved.get("loss") == "torch"
    assert "loss" in resolved and "softmax" not in resolved and resolved.get("softmax") is None
    with pytest.raises(KeyError):
        resolved["softmax"]
    model = TransformerLM(
        vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32, kernels={"loss": "torch"}
    )
    assert model.backends["loss"] == model.backends["linear_cross_entropy"] == "torch"
    assert model._loss is get_op("linear_cross_entropy", "torch")
    # A resolved dict goes back in as it is (the trainer passes one to TransformerLM).
    assert resolve_kernels(resolved, device="cpu") == resolved


def test_naming_one_op_by_both_names_is_an_error():
    with pytest.raises(ValueError, match="names the op 'linear_cross_entropy' twice, as 'loss' and 'linear_cross_entropy'"):
        resolve_kernels({"loss": "torch", "linear_cross_entropy": "reference"}, device="cpu")
