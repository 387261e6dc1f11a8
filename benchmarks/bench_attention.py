"""Causal attention, softmax(q k^T / sqrt(D)) v, over (batch, heads, N, head_dim): TFLOP/s.

Attention is compute-bound, so it is measured in TFLOP/s from FLOPs counted by
formula, the convention of the FlashAttention papers (B batch, H heads, N
queries = keys, D head_dim):

    fwd      4 B H N^2 D        two matrix products, Q K^T and P V, of 2 B H N^2 D each
             / 2 when causal    half the score matrix is masked and need not be computed
    bwd      2.5 x fwd          five products (S again, dV, dP, dQ, dK) against the forward's two
    fwd_bwd  3.5 x fwd

The same count is used for every provider, so TFLOP/s compares them on equal
work: a provider that computes the masked half anyway shows a lower number.

Shapes follow the FlashAttention-2 paper's benchmark: batch x N = 16384 tokens
and heads x head_dim = 2048 (a model width of 2048), head_dim 64 and 128,
N from 512 to 16384. Providers: the explicit reference (skipped where its
float32 N x N matrix would pass ``REFERENCE_MATRIX_LIMIT``), PyTorch's
``scaled_dot_product_attention`` pinned to each backend in turn with
``torch.nn.attention.sdpa_kernel`` (those this torch build or GPU lacks are
skipped with PyTorch's reason), and this project's Triton kernel.

Grouped-query attention (``bench_attention_gqa``, CUDA only) at Llama-3-8B's
attention shape: 32 query heads sharing 8 K/V heads, head_dim 128, causal,
N = 4096 and 8192 with batch x N = 16384. The FLOPs are those of 32 heads (a
shared K/V head saves memory traffic, not arithmetic). Providers: the Triton
kernel (``triton_gqa``) and SDPA with ``enable_gqa=True`` (``sdpa_gqa``),
pinned to the flash backend where that backend takes grouped heads, else
left to SDPA's own choice; each row's note names the backend that ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from common import (
    DEVICE,
    ON_CUDA,
    dtype_under_test,
    forward_backward_step,
    forward_step,
    import_kernel,
    measure,
    pick_shapes,
    require_provider,
    shape_id,
)

ATTENTION_MODES = ("fwd", "bwd", "fwd_bwd")
# PyTorch's SDPA backends by provider name; "math" is its unfused C++ composite.
SDPA_BACKENDS = {
    "sdpa_math": "MATH",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
ATTENTION_PROVIDERS = ("reference", *SDPA_BACKENDS, "triton")

TOKENS = 16384  # batch x N
WIDTH = 2048  # heads x head_dim
# Above this the unfused providers are skipped: their B x H x N x N score matrix
# in float32, 8 GiB here, is held several times over (scores, exp, weights, and
# what autograd saves), which is most of an 80 GB GPU.
REFERENCE_MATRIX_LIMIT = 8 * 2**30

SHAPES = pick_shapes(
    full=[
        (TOKENS // n, WIDTH // head_dim, n, head_dim)
        for head_dim in (64, 128)
        for n in (512, 1024, 2048, 4096, 8192, 16384)
    ],
    smoke=[(2, 4, 128, 64), (1, 4, 256, 64)],
)


# Llama-3-8B's attention: (batch, query heads, K/V heads, N, head_dim), batch x N = TOKENS.
GQA_SHAPES = pick_shapes(
    full=[(TOKENS // n, 32, 8, n, 128) for n in (4096, 8192)],
    smoke=[(2, 8, 2, 256, 128)],
)
GQA_MODES = ("fwd", "fwd_bwd")
# Names of their own: the report plots every attention row by provider against
# N, and these rows must not join the lines of the equal-heads benchmark.
GQA_PROVIDERS = ("sdpa_gqa", "triton_gqa")


def attention_flops(batch: int, heads: int, n: int, head_dim: int, mode: str, causal: bool = True) -> int:
    forward = 4 * batch * heads * n * n * head_dim // (2 if causal else 1)
    return {"fwd": forward, "bwd": forward * 5 // 2, "fwd_bwd": forward * 7 // 2}[mode]


def attention_provider(provider: str, shape: tuple[int, int, int, int]) -> Callable[..., torch.Tensor]:
    """op(q, k, v) -> causal attention, for one provider; skips with the reason where it cannot run."""
    from scratchlm.model import functional

    batch, heads, n, _ = shape
    matrix_bytes = batch * heads * n * n * 4
    if provider in ("reference", "sdpa_math") and matrix_bytes > REFERENCE_MATRIX_LIMIT:
        pytest.skip(
            f"{provider}: N={n} needs a {matrix_bytes / 2**30:.0f} GiB float32 N x N score matrix "
            f"(limit {REFERENCE_MATRIX_LIMIT / 2**30:.0f} GiB)"
        )
    if provider == "reference":
        return functional.causal_attention
    if provider == "triton":
        require_provider("triton")
        flash_attention = import_kernel("flash_attention", "flash_attention")
        return lambda q, k, v: flash_attention(q, k, v, causal=True)
    if provider != "sdpa_math" and not ON_CUDA:
        pytest.skip(f"{provider}: no CUDA device; on the CPU only the reference and SDPA's math backend run")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        pytest.skip(f"{provider}: torch {torch.__version__} has no torch.nn.attention.sdpa_kernel")
    backend = getattr(SDPBackend, SDPA_BACKENDS[provider], None)
    if backend is None:
        pytest.skip(f"{provider}: torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[provider]}")

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The backend is chosen in the forward; autograd then records that backend's backward.
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def backward_step(
    outputs: torch.Tensor, wrt: Sequence[torch.Tensor], grad_outputs: torch.Tensor
) -> Callable[[], None]:
    """The backward alone, through the graph of one forward kept alive between repetitions."""

    def step() -> None:
        torch.autograd.grad(outputs, wrt, grad_outputs, retain_graph=True)

    return step


def run_or_skip(provider: str, run: Callable[[], object]) -> object:
    """Call ``run`` once; skip the benchmark when it runs out of memory or a pinned SDPA backend refuses.

    SDPA raises RuntimeError ("No available kernel", with warnings saying why)
    when a pinned backend cannot take the shape, dtype or GPU. Any other
    provider's error is a real one and is left to fail the benchmark.
    """
    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider}: out of GPU memory at this shape")
    except RuntimeError as error:
        if not provider.startswith("sdpa_"):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        pytest.skip(f"{provider}: this backend cannot run this shape here ({first_line})")


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
def bench_attention(benchmark, provider: str, shape: tuple[int, int, int, int], mode: str) -> None:
    op = attention_provider(provider, shape)
    dtype = dtype_under_test()
    batch, heads, n, head_dim = shape
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3))
    if mode == "fwd":
        step = forward_step(op, (q, k, v))
    else:
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
        do = torch.randn_like(q)
        if mode == "bwd":
            outputs = run_or_skip(provider, lambda: op(q, k, v))
            step = backward_step(outputs, (q, k, v), do)
        else:
            step = forward_backward_step(op, (q, k, v), (q, k, v), (do,))
    run_or_skip(provider, step)
    measure(
        benchmark,
        step,
        op="attention",
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{batch} x {heads} x {n} x {head_dim}",
        flops=attention_flops(batch, heads, n, head_dim, mode),
        dtype=dtype,
        extra={"batch": batch, "heads": heads, "seq_len": n, "head_dim": head_dim, "causal": True},
    )


def sdpa_backend_chosen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The backend SDPA picks for causal grouped-query attention on these inputs, by its own
    (private) chooser; a plain statement where this torch does not expose it."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=True)).name
    except (AttributeError, ImportError, RuntimeError, TypeError, ValueError):
        return "not reported by this torch"


def gqa_step(
    op: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str
) -> Callable[[], None]:
    """The timed callable: op's forward, or its forward and the gradients of q, k and v."""
    if mode == "fwd":
        return forward_step(op, (q, k, v))
    return forward_backward_step(op, (q, k, v), (q, k, v), (torch.randn_like(q),))


@pytest.mark.parametrize("mode", GQA_MODES)
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", GQA_PROVIDERS)
def bench_attention_gqa(benchmark, provider: str, shape: tuple[int, int, int, int, int], mode: str) -> None:
    batch, q_heads, kv_heads, n, head_dim = shape
    if not ON_CUDA:
        pytest.skip(f"{provider}: grouped-query attention is benchmarked on CUDA only (no CUDA device here)")
    dtype = dtype_under_test()
    q = torch.randn(batch, q_heads, n, head_dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, n, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    for tensor in (q, k, v):
        tensor.requires_grad_(mode != "fwd")
    if provider == "triton_gqa":
        require_provider("triton")
        flash_attention = import_kernel("flash_attention", "flash_attention")
        step = gqa_step(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v, mode)
        note = "k and v read in place by the query heads of each group"
    else:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            pytest.skip(f"{provider}: torch {torch.__version__} has no torch.nn.attention.sdpa_kernel")

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k, v)

        step = gqa_step(sdpa_flash, q, k, v, mode)
        note = "enable_gqa=True, FLASH_ATTENTION backend (pinned)"
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            pass  # not a refusal: run_or_skip below meets it again and skips with the reason
        except RuntimeError as error:
            refusal = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            step = gqa_step(sdpa, q, k, v, mode)
            note = (
                f"enable_gqa=True, SDPA's own choice: {sdpa_backend_chosen(q, k, v)} "
                f"(FLASH_ATTENTION refused these inputs: {refusal})"
            )
    run_or_skip(provider, step)
    measure(
        benchmark,
        step,
        op="attention_gqa",
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{batch} x {q_heads}/{kv_heads} x {n} x {head_dim}",
        flops=attention_flops(batch, q_heads, n, head_dim, mode),
        dtype=dtype,
        note=note,
        extra={
            "batch": batch,
            "heads": q_heads,
            "kv_heads": kv_heads,
            "seq_len": n,
            "head_dim": head_dim,
            "causal": True,
        },
    )
