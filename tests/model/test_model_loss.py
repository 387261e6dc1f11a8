"""The "linear_cross_entropy" op (old name "loss", still accepted and used here): lm_head plus cross-entropy,
per backend, against float64 logits; TransformerLM.loss.

The reference forms the (N, V) logits; "torch" is the chunked plain-PyTorch
``linear_cross_entropy_chunked``; "triton" the fused kernel. Every one must
give the loss of ``hidden @ weight.T`` and its gradients, and the chunked one
must do it holding only a chunk of logits at a time (checked on resident memory
in a subprocess).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_within_torch_error

from scratchlm.model import OP_ALIASES, OPS, ModelConfig, TransformerLM, get_op
from scratchlm.model.functional import cross_entropy

REPO_ROOT = Path(__file__).resolve().parents[2]
# Odd everything: rows (3 x 13) that no chunk size divides, d = 37, V = 101.
SHAPE = dict(lead=(3, 13), d=37, vocab=101)


def chunked():
    from scratchlm.kernels.linear_cross_entropy_chunked import linear_cross_entropy_chunked

    return linear_cross_entropy_chunked


def make_inputs(dtype=torch.float64, lead=SHAPE["lead"], d=SHAPE["d"], vocab=SHAPE["vocab"], ignored=0.0):
    hidden = torch.randn(*lead, d, dtype=torch.float64)
    weight = torch.randn(vocab, d, dtype=torch.float64) / d**0.5 * 3  # logits of a few units
    targets = torch.randint(0, vocab, lead)
    if ignored:
        targets[torch.rand(lead) < ignored] = -100
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def expected_losses(hidden, weight, targets, z_loss=0.0, ignore_index=-100):
    """Per-row float64 losses from the full logits, written independently of the code under test."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, lse - picked + z_loss * lse**2, 0.0)
    return losses, valid, h, w


def reduce(losses, valid, reduction):
    if reduction == "mean":
        return losses.sum() / valid.sum().clamp_min(1)
    return losses.sum() if reduction == "sum" else losses


def grads_of(loss, *tensors, grad_output=None):
    return torch.autograd.grad(loss, tensors, grad_output)


# ---- the registry ------------------------------------------------------------------


def test_linear_cross_entropy_is_an_op_with_three_backends():
    assert "linear_cross_entropy" in OPS and OP_ALIASES["loss"] == "linear_cross_entropy"
    from scratchlm.model import functional

    assert get_op("linear_cross_entropy", "reference") is functional.linear_cross_entropy
    assert get_op("loss", "reference") is functional.linear_cross_entropy
    assert get_op("loss", "auto", device="cpu") is functional.linear_cross_entropy
    assert callable(get_op("loss", "torch"))


# ---- float64 parity of the op, per backend -----------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_loss_op_matches_float64_logits(backend, ignored):
    hidden, weight, targets = make_inputs(ignored=ignored)
    loss = get_op("loss", backend)(hidden, weight, targets)
    losses, valid, h, w = expected_losses(hidden, weight, targets)
    expected = reduce(losses, valid, "mean")
    assert_close(loss, expected, atol=1e-12, rtol=1e-12, name=f"{backend} loss")
    # F.cross_entropy agrees, as a second opinion on the expectation itself.
    second_opinion = F.cross_entropy((h @ w.T).flatten(0, -2), targets.flatten(), ignore_index=-100)
    assert_close(expected, second_opinion.detach(), atol=1e-12, rtol=0)
    for got, want, name in zip(grads_of(loss, hidden, weight), grads_of(expected, h, w), ("d_hidden", "d_weight")):
        assert_close(got, want, atol=1e-12, rtol=1e-10, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(backend):
    hidden, weight, targets = make_inputs()
    targets.fill_(-100)
    loss = get_op("loss", backend)(hidden, weight, targets)
    assert loss.item() == 0.0
    for grad in grads_of(loss, hidden, weight):
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("chunk_rows", [1, 4, 16, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_matches_float64_for_every_reduction_chunk_and_z_loss(chunk_rows, reduction, z_loss):
    hidden, weight, targets = make_inputs(ignored=0.25)
    loss = chunked()(hidden, weight, targets, reduction=reduction, z_loss=z_loss, chunk_rows=chunk_rows)
    losses, valid, h, w = expected_losses(hidden, weight, targets, z_loss)
    expected = reduce(losses, valid, reduction)
    assert_close(loss, expected, atol=1e-12, rtol=1e-12, name="loss")
    # A non-uniform upstream gradient checks the per-row scaling of "none" (and the scalar one otherwise).
    grad_output = torch.rand_like(expected) + 0.5
    got = grads_of(loss, hidden, weight, grad_output=grad_output)
    want = grads_of(expected, h, w, grad_output=grad_output)
    for g, e, name in zip(got, want, ("d_hidden", "d_weight")):
        assert_close(g, e, atol=1e-12, rtol=1e-10, name=name)


def test_chunked_ignore_index_is_honoured_and_other_ids_count():
    hidden, weight, targets = make_inputs()
    targets[0, :5] = 7
    as_ignored = chunked()(hidden, weight, targets, ignore_index=7, reduction="none")
    assert torch.count_nonzero(as_ignored[0, :5]) == 0 and bool((as_ignored[targets != 7] > 0).all())


def test_chunked_without_gradients_keeps_no_graph():
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        loss = chunked()(hidden, weight, targets)
    assert loss.grad_fn is None
    expected = reduce(*expected_losses(hidden, weight, targets)[:2], "mean")
    assert_close(loss, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight=torch.zeros(5, 4)), r"weight has shape \(5, 4\); expected \(vocab, 37\)"),
        (dict(targets=torch.zeros(3, 12, dtype=torch.long)), r"targets has shape \(3, 12\); expected \(3, 13\)"),
        (dict(targets=torch.zeros(3, 13)), r"targets must be an integer tensor"),
        (dict(hidden=torch.zeros(3, 13, 37, dtype=torch.long)), r"hidden must be a floating-point tensor"),
        (dict(reduction="avg"), r"reduction='avg': expected one of \['mean', 'sum', 'none'\]"),
        (dict(z_loss=-1.0), r"z_loss=-1.0: expected a number >= 0"),
        (dict(chunk_rows=0), r"chunk_rows=0: expected a positive int"),
    ],
)
def test_chunked_refuses_bad_inputs_naming_them(change, message):
    hidden, weight, targets = make_inputs(torch.float32)
    arguments = {"hidden": hidden, "weight": weight, "targets": targets, **change}
    with pytest.raises(ValueError, match=message):
        chunked()(**arguments)


# ---- low precision: float32 tolerance, the three-way rule for 16-bit -------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_op_in_low_precision(backend, dtype):
    hidden64, weight64, targets = make_inputs(ignored=0.2, lead=(4, 33), d=64, vocab=257)
    hidden = hidden64.detach().to(dtype).requires_grad_()
    weight = weight64.detach().to(dtype).requires_grad_()
    loss = get_op("loss", backend)(hidden, weight, targets)
    assert loss.dtype == torch.float32
    # float64 math on the same (rounded) inputs.
    losses, valid, h, w = expected_losses(hidden, weight, targets)
    expected = reduce(losses, valid, "mean")
    got, want = (loss, *grads_of(loss, hidden, weight)), (expected, *grads_of(expected, h, w))
    if dtype == torch.float32:
        for g, e, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
            assert_close(g, e, atol=1e-5, rtol=1e-4, name=f"{backend} {name}")
        return
    # PyTorch's own in the same dtype: logits and F.cross_entropy in 16 bits.
    h16, w16 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch_loss = F.cross_entropy((h16 @ w16.T).flatten(0, -2), targets.flatten(), ignore_index=-100)
    torch_ref = (torch_loss, *grads_of(torch_loss, h16, w16))
    for g, t, e, name in zip(got, torch_ref, want, ("loss", "d_hidden", "d_weight")):
        assert_within_torch_error(g, t, e, name=f"{backend} {dtype} {name}")


# ---- Triton, when the kernel is there ------------------------------------------------------


def test_triton_loss_backend_matches_float64():
    # Triton is a dependency wherever the tests run: a kernel module that fails to import is a failure.
    importlib.import_module("scratchlm.kernels.linear_cross_entropy")
    hidden, weight, targets = make_inputs(torch.float32, ignored=0.2, lead=(2, 9), d=32, vocab=75)
    loss = get_op("loss", "triton")(hidden, weight, targets)
    losses, valid, h, w = expected_losses(hidden, weight, targets)
    expected = reduce(losses, valid, "mean")
    assert_close(loss, expected, atol=1e-5, rtol=1e-4, name="triton loss")
    for g, e, name in zip(grads_of(loss, hidden, weight), grads_of(expected, h, w), ("d_hidden", "d_weight")):
        assert_close(g, e, atol=1e-5, rtol=1e-4, name=f"triton {name}")


# ---- through the model --------------------------------------------------------------------

TINY = dict(vocab_size=97, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def tiny_model(loss_backend: str, dtype: torch.dtype = torch.float64, **fields) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(**TINY, **fields)
    kernels = {"loss": loss_backend}
    return TransformerLM(config, kernels=kernels, device="cpu", dtype=dtype)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_model_loss_is_the_loss_of_its_logits_on_every_backend(tie_embeddings):
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    targets = torch.randint(0, TINY["vocab_size"], (2, 16))
    targets[0, :3] = -100
    results = {}
    for backend in ("reference", "torch"):
        model = tiny_model(backend, tie_embeddings=tie_embeddings)
        if tie_embeddings:
            assert model.lm_head.weight is model.token_embeddings.weight
        expected = cross_entropy(model(token_ids), targets, ignore_index=-100)
        loss = model.loss(token_ids, targets)
        assert loss.dim() == 0
        assert_close(loss, expected, atol=1e-12, rtol=1e-12, name=f"{backend} model loss")
        loss.backward()
        results[backend] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in results["reference"].items():
        assert_close(results["torch"][name], grad, atol=1e-12, rtol=1e-9, name=f"grad {name}")
    # The Triton kernels take float32 (not float64): the same weights in float32, float32 tolerances.
    model = tiny_model("triton", dtype=torch.float32, tie_embeddings=tie_embeddings)
    model.load_state_dict(tiny_model("reference", tie_embeddings=tie_embeddings).state_dict())
    expected = cross_entropy(model(token_ids).double(), targets, ignore_index=-100)
    loss = model.loss(token_ids, targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5, name="triton model loss")
    loss.backward()
    for name, parameter in model.named_parameters():
        grad = results["reference"][name]
        assert_close(parameter.grad.double(), grad, atol=1e-5, rtol=1e-4, name=f"triton grad {name}")


def test_forward_without_targets_still_gives_logits_and_targets_are_checked():
    model = tiny_model("torch")
    token_ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    assert model(token_ids).shape == (2, 16, TINY["vocab_size"])
    with pytest.raises(ValueError, match=r"targets has shape \(2, 15\); expected token_ids' shape \(2, 16\)"):
        model.loss(token_ids, token_ids[:, 1:])
    with pytest.raises(ValueError, match="targets and a kv_cache"):
        model(token_ids, model.new_kv_cache(), targets=token_ids)


# ---- memory: the chunked backend holds a chunk, not the logits ----------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {benchmarks!r})
    from process_memory import peak_memory_mib, reset_peak_memory
    from scratchlm.model import get_op
    torch.set_num_threads(1)
    n, d, vocab = {n}, {d}, {vocab}
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(vocab, d) / d**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    loss_op = get_op("loss", sys.argv[1])
    loss_op(hidden[:2], weight, targets[:2]).backward()  # imports and allocator warm-up
    hidden.grad = weight.grad = None
    reset_peak_memory()
    before = peak_memory_mib()
    loss_op(hidden, weight, targets).backward()
    print(json.dumps({{"growth_mib": peak_memory_mib() - before}}))
    """
)


def peak_growth_mib(backend: str, n: int, d: int, vocab: int) -> float:
    script = _MEASURE.format(benchmarks=str(REPO_ROOT / "benchmarks"), n=n, d=d, vocab=vocab)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mib"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak resident memory is read from Linux /proc")
def test_chunked_backend_peak_memory_is_a_small_fraction_of_the_reference():
    # 4096 rows x 16384 words: 256 MiB of float32 logits, of which the reference keeps several
    # copies (about 770 MiB measured); a 32 MiB chunk is 512 rows (about 40 MiB measured).
    shape = dict(n=4096, d=32, vocab=16384)
    reference = peak_growth_mib("reference", **shape)
    chunked_growth = peak_growth_mib("torch", **shape)
    assert reference > 500, f"reference grew only {reference:.0f} MiB; the measurement is not seeing the logits"
    assert chunked_growth < 0.15 * reference, (
        f"chunked backend grew {chunked_growth:.0f} MiB, reference {reference:.0f} MiB; expected under 15%"
    )
