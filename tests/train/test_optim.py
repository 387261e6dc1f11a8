"""SGD against its formula by hand, AdamW against torch.optim.AdamW, clipping against torch."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from scratchlm.train import SGD, AdamW, gradient_clipping


def _quadratic_grads(params, targets):
    # A loss whose gradient differs per element, so every state entry matters.
    loss = sum(((p - t) ** 2 * (1 + i)).sum() for i, (p, t) in enumerate(zip(params, targets)))
    loss.backward()


def test_sgd_follows_lr_over_sqrt_t_plus_one():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    expected = p.detach().clone()
    opt = SGD([p], lr=0.5)
    for t in range(4):
        grad = torch.randn(5, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        expected = expected - 0.5 / math.sqrt(t + 1) * grad
        assert_close(p.detach(), expected, atol=1e-14, rtol=0, name=f"sgd step {t}")
    assert opt.state[p]["t"] == 4


def test_sgd_counts_steps_per_parameter():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = SGD([a, b], lr=1.0)
    a.grad = torch.ones(2)
    opt.step()  # b has no grad: untouched, its t stays 0
    b.grad = torch.ones(2)
    a.grad = torch.ones(2)
    opt.step()
    assert opt.state[a]["t"] == 2 and opt.state[b]["t"] == 1
    assert torch.equal(b.detach(), torch.zeros(2))  # first step of b: full lr / sqrt(1)
    assert_close(a.detach(), torch.tensor([-1 / math.sqrt(2)] * 2), atol=1e-7, rtol=0, name="a")


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_adamw_matches_torch_over_many_steps(dtype, atol):
    torch.manual_seed(2)
    shapes = [(7, 3), (3,), (2, 4, 5)]
    init = [torch.randn(s, dtype=dtype) for s in shapes]
    targets = [torch.randn(s, dtype=dtype) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    kwargs = dict(lr=3e-2, betas=(0.85, 0.97), eps=1e-6, weight_decay=0.2)
    opt_ours = AdamW(ours, **kwargs)
    opt_theirs = torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for step in range(12):
        for opt, params in ((opt_ours, ours), (opt_theirs, theirs)):
            opt.zero_grad()
            _quadratic_grads(params, targets)
            opt.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a.detach(), b.detach(), atol=atol, rtol=0, name=f"param {i} after step {step + 1}")
    for a, b in zip(ours, theirs):
        state, ref = opt_ours.state[a], opt_theirs.state[b]
        assert state["step"] == 12
        assert_close(state["exp_avg"], ref["exp_avg"], atol=atol, rtol=0, name="exp_avg")
        assert_close(state["exp_avg_sq"], ref["exp_avg_sq"], atol=atol, rtol=0, name="exp_avg_sq")


def test_adamw_weight_decay_is_decoupled():
    # With a zero gradient Adam's update is 0, so only decay moves the weight: p * (1 - lr * wd).
    p = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.05), dtype=torch.float64), atol=1e-15, rtol=0, name="p")


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)


@pytest.mark.parametrize("fraction_of_norm", [0.001, 0.75, 0.999, 1.5, 1e4])
def test_gradient_clipping_matches_torch(fraction_of_norm):
    torch.manual_seed(3)
    shapes = [(4, 5), (5,), (3, 3)]
    grads = [torch.randn(s) for s in shapes]
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    max_norm = fraction_of_norm * norm
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    frozen = torch.nn.Parameter(torch.zeros(2))  # no grad: skipped, not an error
    total = gradient_clipping([*ours, frozen], max_norm)
    expected_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert total == pytest.approx(float(expected_total), rel=1e-6)
    for p, q in zip(ours, theirs):
        assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-6, name="clipped grad")
    after = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])))
    if fraction_of_norm < 1:
        assert after == pytest.approx(max_norm, rel=1e-5)
    else:
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads))


def test_adamw_foreach_takes_the_loop_steps_bit_for_bit():
    shapes = [(5, 7), (7,), (3, 2, 4)]
    runs = {}
    for foreach in (False, True):
        params = [
            torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
            for i, shape in enumerate(shapes)
        ]
        optimizer = AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
        for step in range(6):
            for i, p in enumerate(params):
                # The middle parameter gets no gradient on even steps, so step counts differ per parameter.
                skip = i == 1 and step % 2 == 0
                p.grad = None if skip else torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            optimizer.step()
        runs[foreach] = [p.detach().clone() for p in params]
        assert optimizer.state[params[1]]["step"] == 3 and optimizer.state[params[0]]["step"] == 6
    for loop_value, foreach_value in zip(runs[False], runs[True]):
        assert torch.equal(loop_value, foreach_value)
