"""Sliding windows and soft-capping in the Triton attention kernel and its tiled PyTorch twin.

``window`` W: query i sees its last W key positions (bottom-right aligned,
itself included), combined with causal, document ids and grouped-query heads.
``softcap`` c: each score s becomes c tanh(s / c) before the softmax. The
reference is the shared float64 attention with the same mask and cap. Under
the interpreter the kernel runs 16 x 16 tiles and the twin here 8 x 16, so
windows of 1, 5, 16 and 23 keys start and end inside tiles and on their edges.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from attention_reference import DEVICE, NAMES, attention_inputs, attention_reference, torch_attention_same_dtype
from attention_reference import assert_each_within_torch_error, run_attention
from helpers import assert_close
from scratchlm.kernels.flash_attention import flash_attention_with_lse
from scratchlm.kernels.flash_attention_tiled import flash_attention_tiled, flash_attention_tiled_with_lse


def _tiled_with_lse(q, k, v, causal=True, document_ids=None, window=None, softcap=None):
    return flash_attention_tiled_with_lse(q, k, v, causal, None, 8, 16, document_ids, window, softcap)


WITH_LSE = {"triton": flash_attention_with_lse, "tiled": _tiled_with_lse}

# (q shape, Nk, K/V heads, document lengths or None, window, softcap)
CASES = {
    "window-only": ((1, 2, 37, 32), 37, None, None, 5, None),
    "softcap-only": ((1, 2, 37, 32), 37, None, None, None, 2.0),
    "window-one-key": ((1, 1, 21, 32), 21, None, None, 1, 1.5),
    "window-and-cap-cache": ((1, 2, 9, 64), 41, None, None, 16, 3.0),
    "gqa-documents": ((2, 4, 35, 32), 35, 2, [10, 17, 8], 7, 2.0),
    "more-queries-than-keys": ((1, 1, 30, 32), 19, None, None, 23, None),
    "head-dim-128": ((1, 2, 19, 128), 19, 1, None, 6, 2.5),
    "head-dim-256": ((1, 1, 18, 256), 21, None, None, 9, 4.0),
}


def _inputs(case, dtype):
    q_shape, k_len, kv_heads, lengths, window, softcap = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    q, k, v, do = attention_inputs(q_shape, k_len, dtype, kv_heads)
    ids = None
    if lengths is not None:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)
        ids = ids.expand(q_shape[0], k_len)
    return q, k, v, do, ids, window, softcap


def _run(implementation, q, k, v, do, ids, window, softcap):
    return run_attention(WITH_LSE[implementation], q, k, v, do, document_ids=ids, window=window, softcap=softcap)


@pytest.mark.parametrize("implementation", WITH_LSE)
@pytest.mark.parametrize("case", CASES)
def test_float32_and_float64_match_the_reference(implementation, case):
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 5e-5)):
        if implementation == "triton" and dtype == torch.float64:
            continue  # the Triton kernel takes 16- and 32-bit floats
        q, k, v, do, ids, window, softcap = _inputs(case, dtype)
        if q.shape[-2] > k.shape[-2] and ids is not None:
            continue
        got = _run(implementation, q, k, v, do, ids, window, softcap)
        want = attention_reference(q, k, v, do, True, None, ids, window=window, softcap=softcap)
        for g, w, name in zip(got, want, ("o", "lse", *NAMES[1:])):
            assert g.shape == w.shape and not g.isnan().any(), name
            assert_close(g, w, atol=tolerance, rtol=tolerance, name=f"{name} {dtype} ({case})")


@pytest.mark.parametrize("implementation", WITH_LSE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["window-and-cap-cache", "gqa-documents"])
def test_16_bit_within_pytorchs_own_error(implementation, case, dtype):
    q, k, v, do, ids, window, softcap = _inputs(case, dtype)
    got = _run(implementation, q, k, v, do, ids, window, softcap).without_lse()
    want = attention_reference(q, k, v, do, True, None, ids, window=window, softcap=softcap).without_lse()
    same_dtype = torch_attention_same_dtype(q, k, v, do, True, ids, window, softcap)
    assert all(g.dtype == dtype for g in got)
    assert_each_within_torch_error(got, same_dtype, want, f" {dtype} ({case})")


@pytest.mark.parametrize("implementation", WITH_LSE)
def test_a_window_wider_than_the_sequence_and_no_cap_change_nothing(implementation):
    q, k, v, do, _, _, _ = _inputs("window-only", torch.float32)
    plain = _run(implementation, q, k, v, do, None, None, None)
    wide = _run(implementation, q, k, v, do, None, 37, None)
    for g, w, name in zip(wide, plain, ("o", "lse", *NAMES[1:])):
        assert torch.equal(g, w), name


def test_tiles_outside_the_window_are_never_visited_so_cost_grows_as_n_times_w():
    # Counted through the twin: its loops are the kernel's programs and tiles.
    tiled_module = importlib.import_module("scratchlm.kernels.flash_attention_tiled")
    original = tiled_module._visible
    visits = []

    def counting_visible(*args):
        visits.append(args[:4])
        return original(*args)

    def tiles_visited(n, window):
        q = torch.randn(1, 1, n, 8, requires_grad=True)
        visits.clear()
        tiled_module._visible = counting_visible
        try:
            flash_attention_tiled(q, q, q, block_m=16, block_n=16, window=window).sum().backward()
        finally:
            tiled_module._visible = original
        return len(visits)  # forward and backward together

    # W = 32 = 2 tiles: query block b sees key tiles b-2 .. b (3 of them, 2 for the first two
    # blocks, 1 for the first); the backward visits the same (key tile, query block) pairs.
    for n in (128, 256):
        blocks = n // 16
        assert tiles_visited(n, 32) == 2 * (3 * blocks - 3)
    assert tiles_visited(256, None) == 2 * 16 * 17 // 2  # full causal: the lower triangle
    # Doubling N doubles the windowed work (less the fixed start), not quadruples it.
    assert tiles_visited(256, 32) - tiles_visited(128, 32) == 2 * 3 * 8


@pytest.mark.parametrize("implementation", WITH_LSE)
def test_keys_outside_the_window_never_reach_a_query(implementation):
    # NaN in keys and values 0..31: with W = 16, queries from 47 on see keys from 32 on only;
    # their key tiles lie wholly outside the window, so not even NaN * 0 reaches them.
    q = torch.randn(1, 1, 96, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 1, 96, 16, device=DEVICE), torch.randn(1, 1, 96, 16, device=DEVICE)
    k[..., :32, :] = float("nan")
    v[..., :32, :] = float("nan")
    o, _ = WITH_LSE[implementation](q, k, v, window=16, softcap=2.0)
    (dq,) = torch.autograd.grad(o.sum(), q)
    assert o[0, 0, :32].isnan().all() and not o[0, 0, 48:].isnan().any()
    assert not dq[0, 0, 48:].isnan().any()


@pytest.mark.parametrize("implementation", WITH_LSE)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, r"window is 0; expected None or an int >= 1"),
        ({"window": 2.0}, r"window is 2\.0; expected None or an int >= 1"),
        ({"window": True}, r"window is True"),
        ({"window": 4, "causal": False}, r"window=4 with causal=False"),
        ({"softcap": 0.0}, r"softcap is 0\.0; expected None or a finite float > 0"),
        ({"softcap": -1.0}, r"softcap is -1\.0"),
        ({"softcap": float("nan")}, r"softcap is nan"),
        ({"softcap": float("inf")}, r"softcap is inf"),
    ],
)
def test_bad_window_or_softcap_is_refused_by_name(implementation, kwargs, match):
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        WITH_LSE[implementation](q, q, q, **kwargs)
