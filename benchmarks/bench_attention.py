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
skipped with PyTorch's reason), and this project's Triton kernel,
``flash_attention`` (the "attention" op's kernel, named after its algorithm).

Grouped-query attention (``bench_attention_gqa``, CUDA only) at Llama-3-8B's
attention shape: 32 query heads sharing 8 K/V heads, head_dim 128, causal,
N = 4096 and 8192 with batch x N = 16384. The FLOPs are those of 32 heads (a
shared K/V head saves memory traffic, not arithmetic). Providers: the Triton
kernel (``triton_gqa``) and SDPA with ``enable_gqa=True`` (``sdpa_gqa``),
pinned to the flash backend where that backend takes grouped heads, else
left to SDPA's own choice; each row's note names the backend that ran.

Document-masked attention (``bench_attention_documents``): a packed row holds
several documents and query i sees key j only when both lie in the same
document and j <= i (``scratchlm.kernels.documents``). N = 8192 with batch x
N = 16384 and heads x head_dim = 2048 as above, head_dim 64 and 128, and two
layouts drawn by ``common.document_layout`` (geometric lengths, seed 0, each
row filled exactly): mean document length 512 and 2048. Only the visible
(query, key) pairs are counted, the sum over documents of L (L + 1) / 2,
so the effective FLOPs are

    fwd      4 H D pairs        pairs summed over the batch rows
    fwd_bwd  3.5 x fwd          as for causal attention

the same count for every provider. Providers: the Triton kernel given
``document_ids`` (``triton``, which skips key tiles that share no document
with the query tile); the same kernel with full causal attention and no ids
(``triton_causal``: the time the mask must beat, computing every causal pair);
FlexAttention with the same document-and-causal mask (``flex``:
``torch.nn.attention.flex_attention`` compiled with ``torch.compile``, its
``BlockMask`` built once by ``create_block_mask`` outside the timed region);
SDPA given the boolean (B, 1, N, N) mask, on its own backend choice
(``sdpa_mask``); and the explicit reference with that mask (skipped past
``REFERENCE_MATRIX_LIMIT``). Without CUDA only the reference and
``sdpa_mask`` run, at small shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from common import (
    DEVICE,
    ON_CUDA,
    document_layout,
    document_lengths,
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
        return functional.attention
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


# Packed documents: (batch, heads, N, head_dim, mean document length), batch x N = TOKENS.
DOCUMENT_SHAPES = pick_shapes(
    full=[
        (TOKENS // 8192, WIDTH // head_dim, 8192, head_dim, mean_length)
        for head_dim in (64, 128)
        for mean_length in (512, 2048)
    ],
    smoke=[(2, 2, 256, 64, 32), (2, 2, 256, 64, 128)],
)
DOCUMENT_MODES = ("fwd", "fwd_bwd")
# Their own op in the results ("attention_documents"), so their own table in the report.
DOCUMENT_PROVIDERS = ("reference", "sdpa_mask", "flex", "triton_causal", "triton")
DOCUMENT_SEED = 0


def document_shape_id(shape: tuple[int, int, int, int, int]) -> str:
    batch, heads, n, head_dim, mean_length = shape
    return f"{batch}x{heads}x{n}x{head_dim}-mean{mean_length}"


def visible_pairs(lengths: list[list[int]]) -> int:
    """The (query, key) pairs document-causal attention computes: L (L + 1) / 2 per document of L tokens."""
    return sum(length * (length + 1) // 2 for row in lengths for length in row)


def document_attention_flops(heads: int, head_dim: int, pairs: int, mode: str) -> int:
    """Effective FLOPs: 4 D per visible pair and head (2 D for q . k, 2 D for p v); the causal rule for bwd."""
    forward = 4 * heads * head_dim * pairs
    return {"fwd": forward, "bwd": forward * 5 // 2, "fwd_bwd": forward * 7 // 2}[mode]


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, N, N) from ids (B, N): True where query i may see key j (same document, j <= i)."""
    from scratchlm.kernels.documents import document_mask
    from scratchlm.model.functional import causal_mask

    n = document_ids.shape[-1]
    return (document_mask(document_ids, n) & causal_mask(n, n, device=document_ids.device)).unsqueeze(1)


def takes_document_ids(function: Callable[..., torch.Tensor]) -> bool:
    """Whether ``function`` has a ``document_ids`` parameter (True where its signature cannot be read)."""
    import inspect

    try:
        return "document_ids" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True


def flex_document_attention(document_ids: torch.Tensor) -> tuple[Callable[..., torch.Tensor], str, dict]:
    """FlexAttention with the document-and-causal mask, compiled; the BlockMask is built here, untimed.

    The mask compares document numbers (``document_spans``), not raw ids, so
    it means what every scratchlm backend means: each change of id starts a document.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        pytest.skip(f"flex: torch {torch.__version__} has no torch.nn.attention.flex_attention")
    from scratchlm.kernels.documents import document_spans

    run = document_spans(document_ids)[0]  # (B, N): each position's document number in its row
    batch, n = run.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (run[b, q_idx] == run[b, kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(document_causal, B=batch, H=None, Q_LEN=n, KV_LEN=n, device=run.device)
    torch._dynamo.reset()  # a fresh compile cache per benchmark, as common.compiled does
    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask)

    blocks = "x".join(str(size) for size in block_mask.BLOCK_SIZE)
    note = (
        f"torch.compile(flex_attention, dynamic=False); the BlockMask ({blocks} blocks) is built once by "
        "create_block_mask outside the timed region"
    )
    # The share of all (query block, key block) pairs FlexAttention skips, in percent.
    return flex, note, {"flex_block_sparsity": float(block_mask.sparsity())}


def document_provider(
    provider: str, shape: tuple[int, int, int, int, int], document_ids: torch.Tensor
) -> tuple[Callable[..., torch.Tensor], str, dict]:
    """op(q, k, v) for one provider, the row's note and fields of its own; skips with the reason where it cannot run.

    Every op attends within documents and causally, except ``triton_causal``:
    full causal attention over the same N, the time the mask must beat.
    """
    from scratchlm.model import functional

    batch, heads, n, _, _ = shape
    matrix_bytes = batch * heads * n * n * 4
    if provider == "reference" and matrix_bytes > REFERENCE_MATRIX_LIMIT:
        pytest.skip(
            f"{provider}: N={n} needs a {matrix_bytes / 2**30:.0f} GiB float32 N x N score matrix "
            f"(limit {REFERENCE_MATRIX_LIMIT / 2**30:.0f} GiB)"
        )
    if provider == "reference":
        mask = document_causal_mask(document_ids)
        note = "explicit softmax with the boolean (B, 1, N, N) mask, built once outside the timed region"
        return lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, mask), note, {}
    if provider == "sdpa_mask":
        mask = document_causal_mask(document_ids)
        note = "F.scaled_dot_product_attention, its own backend choice, attn_mask the boolean (B, 1, N, N) mask"
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), note, {}
    if provider in ("triton", "triton_causal"):
        require_provider("triton")
        flash_attention = import_kernel("flash_attention", "flash_attention")
        if provider == "triton_causal":
            note = "full causal, no document_ids: computes every causal pair (the time to beat)"
            return lambda q, k, v: flash_attention(q, k, v, causal=True), note, {}
        if not takes_document_ids(flash_attention):
            pytest.skip("triton: scratchlm.kernels.flash_attention.flash_attention takes no document_ids yet")
        note = "document_ids (B, N) int32; key tiles that share no document with the query tile are skipped"
        return lambda q, k, v: flash_attention(q, k, v, causal=True, document_ids=document_ids), note, {}
    if provider == "flex":
        if not ON_CUDA:
            pytest.skip(
                "flex: no CUDA device; compiled FlexAttention would time Inductor's CPU code, not the GPU path compared"
            )
        return flex_document_attention(document_ids)
    raise ValueError(f"provider {provider!r}; expected one of {DOCUMENT_PROVIDERS}")


@pytest.mark.parametrize("mode", DOCUMENT_MODES)
@pytest.mark.parametrize("shape", DOCUMENT_SHAPES, ids=document_shape_id)
@pytest.mark.parametrize("provider", DOCUMENT_PROVIDERS)
def bench_attention_documents(benchmark, provider: str, shape: tuple[int, int, int, int, int], mode: str) -> None:
    batch, heads, n, head_dim, mean_length = shape
    document_ids = document_layout(batch, n, mean_length, seed=DOCUMENT_SEED).to(DEVICE)
    op, note, fields = document_provider(provider, shape, document_ids)
    dtype = dtype_under_test()
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
        for _ in range(3)
    )
    if mode == "fwd":
        step = forward_step(op, (q, k, v))
    else:
        step = forward_backward_step(op, (q, k, v), (q, k, v), (torch.randn_like(q),))
    run_or_skip(provider, step)
    lengths = document_lengths(document_ids)
    pairs = visible_pairs(lengths)
    documents = sum(len(row) for row in lengths)
    measure(
        benchmark,
        step,
        op="attention_documents",
        provider=provider,
        mode=mode,
        shape=shape,
        shape_label=f"{batch} x {heads} x {n} x {head_dim}, mean doc {mean_length}",
        flops=document_attention_flops(heads, head_dim, pairs, mode),
        dtype=dtype,
        note=note,
        extra={
            "batch": batch,
            "heads": heads,
            "seq_len": n,
            "head_dim": head_dim,
            "causal": True,
            "mean_document_length": mean_length,
            "documents": documents,
            "realised_mean_length": batch * n / documents,
            "visible_pairs": pairs,
            # Of the causal triangle's pairs, those the mask leaves: the most a mask-aware kernel can save.
            "causal_fraction": pairs / (batch * n * (n + 1) // 2),
            "layout": f"common.document_layout: geometric lengths, seed {DOCUMENT_SEED}",
            **fields,
        },
    )


# Sliding-window attention (Mistral, Gemma): (batch, heads, N, head_dim, window), batch x N = TOKENS.
WINDOW_SHAPES = pick_shapes(full=[(1, 16, 16384, 128, 4096)], smoke=[(1, 2, 256, 64, 64)])
WINDOW_PROVIDERS = ("flex_window", "triton_causal_full", "triton_window")


def window_pairs(n: int, window: int) -> int:
    """(query, key) pairs a causal window of ``window`` keys leaves in one N-token row."""
    return sum(min(i + 1, window) for i in range(n))


def window_provider(provider: str, n: int, window: int) -> tuple[Callable[..., torch.Tensor], str]:
    """op(q, k, v) and the row's note; skips with the reason where the provider cannot run."""
    if provider in ("triton_window", "triton_causal_full"):
        require_provider("triton")
        flash_attention = import_kernel("flash_attention", "flash_attention")
        if provider == "triton_causal_full":
            return lambda q, k, v: flash_attention(q, k, v, causal=True), "full causal: every causal pair"
        note = f"window={window}: key tiles outside every query's window are skipped"
        return lambda q, k, v: flash_attention(q, k, v, causal=True, window=window), note
    if not ON_CUDA:
        pytest.skip("flex_window: no CUDA device; compiled FlexAttention would time Inductor's CPU code")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        pytest.skip(f"flex_window: torch {torch.__version__} has no torch.nn.attention.flex_attention")

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(sliding_causal, None, None, n, n, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    note = f"torch.compile(flex_attention) with the causal window-{window} mask_mod, BlockMask built once"
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask), note


@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=lambda s: f"{shape_id(s[:4])}-w{s[4]}")
@pytest.mark.parametrize("provider", WINDOW_PROVIDERS)
def bench_attention_window(benchmark, provider: str, shape: tuple[int, int, int, int, int]) -> None:
    batch, heads, n, head_dim, window = shape
    op, note = window_provider(provider, n, window)
    dtype = dtype_under_test()
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    step = forward_backward_step(op, (q, k, v), (q, k, v), (torch.randn_like(q),))
    run_or_skip(provider, step)
    pairs = batch * window_pairs(n, window)
    measure(
        benchmark,
        step,
        op="attention_window",
        provider=provider,
        mode="fwd_bwd",
        shape=shape,
        shape_label=f"{batch} x {heads} x {n} x {head_dim}, window {window}",
        flops=document_attention_flops(heads, head_dim, pairs, "fwd_bwd"),
        dtype=dtype,
        note=note,
        extra={"batch": batch, "heads": heads, "seq_len": n, "head_dim": head_dim, "window": window,
               "visible_pairs": pairs},  # fmt: skip
    )


# Head dim 256 (Gemma): the forward against PyTorch's FlashAttention-2 backend.
HEAD_DIM_256_SHAPES = pick_shapes(full=[(4, 8, 4096, 256)], smoke=[(1, 2, 128, 256)])


@pytest.mark.parametrize("shape", HEAD_DIM_256_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ("sdpa_flash_256", "triton_256"))
def bench_attention_head_dim_256(benchmark, provider: str, shape: tuple[int, int, int, int]) -> None:
    batch, heads, n, head_dim = shape
    op = attention_provider("sdpa_flash" if provider == "sdpa_flash_256" else "triton", shape)
    dtype = dtype_under_test()
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3))
    step = forward_step(op, (q, k, v))
    run_or_skip("sdpa_flash" if provider == "sdpa_flash_256" else provider, step)
    measure(
        benchmark,
        step,
        op="attention_head_dim_256",
        provider=provider,
        mode="fwd",
        shape=shape,
        shape_label=f"{batch} x {heads} x {n} x {head_dim}",
        flops=attention_flops(batch, heads, n, head_dim, "fwd"),
        dtype=dtype,
        extra={"batch": batch, "heads": heads, "seq_len": n, "head_dim": head_dim, "causal": True},
    )
