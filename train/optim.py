"""Optimizers written out step by step, and global gradient-norm clipping.

Both optimizers subclass ``torch.optim.Optimizer`` only for its bookkeeping
(parameter groups, ``state``, ``state_dict``/``load_state_dict``, ``zero_grad``);
every update is spelled out below.

SGD with a decaying step (per parameter, ``t`` counts that parameter's updates)::

    theta <- theta - lr / sqrt(t + 1) * g

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), in the
form ``torch.optim.AdamW`` computes, so the two agree to rounding::

    theta <- theta * (1 - lr * weight_decay)          # decay, decoupled from g
    m     <- beta1 * m + (1 - beta1) * g
    v     <- beta2 * v + (1 - beta2) * g^2
    theta <- theta - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

# Added to the norm before dividing, so an all-zero gradient never divides by zero;
# the same value torch.nn.utils.clip_grad_norm_ uses.
_CLIP_EPS = 1e-6


def _check_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent whose step shrinks as ``lr / sqrt(t + 1)``.

    ``t`` is kept per parameter in ``state[p]["t"]`` (0 before its first update),
    so a parameter that skipped steps (no gradient) is not decayed for them.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3):
        _check_non_negative("lr", lr)
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state.get("t", 0)
                p.add_(p.grad, alpha=-lr / math.sqrt(t + 1))
                state["t"] = t + 1
        return loss


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay and bias correction.

    Per parameter ``state`` holds ``step`` (int, updates so far), ``exp_avg``
    (first moment ``m``) and ``exp_avg_sq`` (second moment ``v``), the names
    ``torch.optim.AdamW`` uses. Defaults match ``torch.optim.AdamW``.

    ``foreach=True`` applies each step to all of a group's tensors at once with
    ``torch._foreach_*`` ops (a few kernel launches per group instead of a few
    per parameter, which is what matters on a GPU), with the same arithmetic.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        foreach: bool = False,
    ):
        _check_non_negative("lr", lr)
        _check_non_negative("eps", eps)
        _check_non_negative("weight_decay", weight_decay)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.foreach = bool(foreach)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            if self.foreach:
                self._update_foreach(group, params)
            else:
                for p in params:
                    self._update_one(group, p)
        return loss

    def _update_one(self, group: dict, p: torch.nn.Parameter) -> None:
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad

        # Decay first, from the parameter before this step's update (as torch does).
        p.mul_(1.0 - lr * weight_decay)
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

        # Bias correction undoes the pull of the zero-initialised moments
        # towards 0 during the first ~1/(1 - beta) steps.
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)

    def _update_foreach(self, group: dict, params: list[torch.nn.Parameter]) -> None:
        """``_update_one`` for many tensors per kernel launch: the same operations, in the same order.

        Parameters that skipped steps (no gradient) have their own bias
        correction, so the update runs once per distinct step count.
        """
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        by_step: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        for t, ps in by_step.items():
            grads = [p.grad for p in ps]
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
            torch._foreach_lerp_(ms, grads, 1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
            bias_correction1 = 1.0 - beta1**t
            bias_correction2 = 1.0 - beta2**t
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_div_(denoms, math.sqrt(bias_correction2))
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(ps, ms, denoms, value=-lr / bias_correction1)


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients taken together as one vector (0.0 when none has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    # Per-tensor norms in float32 (bf16 squares would lose precision), then the norm of norms.
    # _foreach_norm computes all of them in a few kernel launches instead of one per tensor.
    norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
    total = torch.linalg.vector_norm(norms)
    if hasattr(total, "full_tensor"):
        # Sharded (FSDP) gradients: each rank holds part of the sum; this reduces across ranks.
        total = total.full_tensor()
    return float(total)


def gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_l2_norm``.

    The norm is taken over every gradient as one long vector (not per tensor),
    so clipping keeps the update's direction. Returns the norm before clipping,
    which is what a training log wants to show. Parameters without a gradient
    are skipped.
    """
    _check_non_negative("max_l2_norm", max_l2_norm)
    parameters = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(parameters)
    if total > max_l2_norm:
        scale = max_l2_norm / (total + _CLIP_EPS)
        torch._foreach_mul_([p.grad for p in parameters], scale)
    return total
