"""TransformerBlock and TransformerLM: the Llama-style decoder.

    token_ids -> token_embeddings -> layers[0..L-1] -> ln_final -> lm_head -> logits
    (with targets)                                      ln_final -> linear_cross_entropy (lm_head weight) -> mean loss

Each block is pre-norm: x + attn(ln1(x)), then x + ffn(ln2(x)). Normalising
the input of each sublayer, not its output, keeps the residual stream an
untouched sum, which is what lets deep stacks train without warmup tricks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scratchlm.model.attention import KVCache, LayerKVCache, MultiHeadSelfAttention
from scratchlm.model.backends import KernelsSpec, get_op, resolve_kernels
from scratchlm.model.config import MLP_ACTIVATIONS, ModelConfig
from scratchlm.model.layers import Embedding, Linear, RMSNorm, RotaryPositionEmbedding, SwiGLU

_DEFAULT_ROPE_THETA = 10000.0


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + ffn(ln2(x)); shape (..., seq, d_model) throughout.

    With ``post_norms`` (Gemma 2/3): x + post_attn_norm(attn(ln1(x))), then
    + post_ffn_norm(ffn(ln2(x))).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        max_seq_len: int,
        theta: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        kernels: KernelsSpec = "reference",
        num_kv_heads: int | None = None,
        norm_eps: float = 1e-5,
        rope_scaling: dict | None = None,
        rope: RotaryPositionEmbedding | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attention_scale: float | None = None,
        window: int | None = None,
        attention_softcap: float | None = None,
        norm_offset: float = 0.0,
        post_norms: bool = False,
        mlp_activation: str = "silu",
    ) -> None:
        super().__init__()
        backends = resolve_kernels(kernels, device)
        norm = dict(device=device, dtype=dtype, backend=backends["rmsnorm"], offset=norm_offset)
        self.ln1 = RMSNorm(d_model, norm_eps, **norm)
        self.attn = MultiHeadSelfAttention(
            d_model, num_heads, max_seq_len, theta, device=device, dtype=dtype, kernels=backends,
            num_kv_heads=num_kv_heads, rope_scaling=rope_scaling, rope=rope, head_dim=head_dim,
            qkv_bias=qkv_bias, qk_norm=qk_norm, norm_eps=norm_eps, scale=attention_scale, window=window,
            softcap=attention_softcap, norm_offset=norm_offset,
        )  # fmt: skip
        self.ln2 = RMSNorm(d_model, norm_eps, **norm)
        gate_op = MLP_ACTIVATIONS[mlp_activation]
        self.ffn = SwiGLU(d_model, d_ff, device=device, dtype=dtype, backend=backends[gate_op], activation=mlp_activation)
        # Gemma 2/3 also normalise each sublayer's output before adding it to the residual stream.
        self.post_attn_norm: RMSNorm | None = RMSNorm(d_model, norm_eps, **norm) if post_norms else None
        self.post_ffn_norm: RMSNorm | None = RMSNorm(d_model, norm_eps, **norm) if post_norms else None

    def forward(
        self,
        x: Tensor,
        token_positions: Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        attended = self.attn(self.ln1(x), token_positions, kv_cache, document_ids)
        if self.post_attn_norm is not None:
            attended = self.post_attn_norm(attended)
        x = x + attended
        transformed = self.ffn(self.ln2(x))
        if self.post_ffn_norm is not None:
            transformed = self.post_ffn_norm(transformed)
        return x + transformed


class TransformerLM(nn.Module):
    """A decoder-only language model: token ids (..., seq) -> next-token logits (..., seq, vocab).

    Build it from the shape arguments or from a ``ModelConfig``:

        TransformerLM(vocab_size=512, context_length=128, d_model=64, num_layers=2, num_heads=4, d_ff=192)
        TransformerLM(ModelConfig.preset("debug"), kernels="torch")

    ``kernels`` picks the implementation of the hot ops (see
    ``scratchlm.model.backends``); it is resolved here, once, and the result
    is kept in ``self.backends``, op name -> backend name (the old op name
    "loss" reads linear_cross_entropy's entry).

    The Llama-family fields of the config (``num_kv_heads``,
    ``tie_embeddings``, ``norm_eps``, ``rope_scaling``) and the Qwen/Mistral
    ones (``head_dim``, ``qkv_bias``, ``qk_norm``, ``attention_scale``,
    ``sliding_window``, ``sliding_window_layers``; each read by the
    attention only) are what pretrained checkpoints need (see
    ``scratchlm.model.load_pretrained``). With
    ``tie_embeddings`` lm_head's weight is the token embedding's Parameter
    itself: the state dict lists it under both names, and an optimizer sees
    it once.

    ``activation_checkpointing = True`` makes training forwards keep only each
    block's input and recompute the block during backward: activation memory
    drops from O(layers * activations per block) to O(layers * d_model) plus one
    block's worth, for roughly a third more compute.
    """

    activation_checkpointing: bool = False

    def __init__(
        self,
        vocab_size: int | ModelConfig | None = None,
        context_length: int | None = None,
        d_model: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        d_ff: int | None = None,
        rope_theta: float = _DEFAULT_ROPE_THETA,
        kernels: KernelsSpec = "auto",
        *,
        config: ModelConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = _build_config(
            vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta, config
        )
        self.backends = resolve_kernels(kernels, device)
        cfg = self.config
        self.token_embeddings = Embedding(cfg.vocab_size, cfg.d_model, device=device, dtype=dtype)
        # One set of RoPE tables, shared by every layer's attention; Gemma 3's sliding
        # layers share a second, at their own base and unscaled.
        rope = RotaryPositionEmbedding(
            cfg.rope_theta, cfg.head_dim, cfg.context_length, device=device, dtype=dtype,
            backend=self.backends["rope"], scaling=cfg.rope_scaling,
        )  # fmt: skip
        local_rope = rope
        if cfg.local_rope_theta is not None:
            local_rope = RotaryPositionEmbedding(
                cfg.local_rope_theta, cfg.head_dim, cfg.context_length, device=device, dtype=dtype,
                backend=self.backends["rope"],
            )  # fmt: skip
        self.layers = nn.ModuleList(
            TransformerBlock(
                cfg.d_model,
                cfg.num_heads,
                cfg.d_ff,
                cfg.context_length,
                cfg.rope_theta,
                device=device,
                dtype=dtype,
                kernels=self.backends,
                num_kv_heads=cfg.num_kv_heads,
                norm_eps=cfg.norm_eps,
                rope_scaling=cfg.rope_scaling,
                rope=rope if cfg.layer_window(index) is None else local_rope,
                head_dim=cfg.head_dim,
                qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm,
                attention_scale=cfg.attention_scale,
                window=window,
                attention_softcap=cfg.attention_softcap,
                norm_offset=cfg.norm_offset,
                post_norms=cfg.post_norms,
                mlp_activation=cfg.mlp_activation,
            )
            for index, window in enumerate(self.layer_windows())
        )
        self.ln_final = RMSNorm(
            cfg.d_model, cfg.norm_eps, device=device, dtype=dtype, backend=self.backends["rmsnorm"],
            offset=cfg.norm_offset,
        )  # fmt: skip
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, device=device, dtype=dtype)
        # Lazy: a Triton loss kernel is imported when a loss is first asked for, not to build a model for generation.
        self._loss = get_op("linear_cross_entropy", self.backends["linear_cross_entropy"], device, lazy=True)
        self.tie_weights()

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window, None where attention is full.

        A window of at least context_length never binds (no sequence is longer),
        so it is None here: such a model is a full-attention model on every backend.
        """
        cfg = self.config
        windows = [cfg.layer_window(layer) for layer in range(cfg.num_layers)]
        return [w if w is not None and w < cfg.context_length else None for w in windows]

    def tie_weights(self) -> None:
        """Make lm_head use the token embedding's Parameter when the config ties them (else nothing)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        kernels: KernelsSpec = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerLM:
        """A model whose weights are allocated but not initialised, to be filled from a checkpoint.

        Random initialisation of a billion parameters takes longer than reading
        them from disk, and would be overwritten anyway. The model is built on
        PyTorch's "meta" device (shapes only), then given uninitialised storage
        on ``device``, once; the RoPE tables are computed and the embeddings
        tied again (``to_empty`` gives every parameter new storage).
        """
        backends = resolve_kernels(kernels, device)  # checked against the real device
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model = cls(config, kernels=backends, device="meta", dtype=dtype)
        model.to_empty(device=device)
        model.tie_weights()
        for module in model.modules():
            if isinstance(module, RotaryPositionEmbedding):
                module.reset_tables()
        return model

    def forward(
        self,
        token_ids: Tensor,
        kv_cache: KVCache | None = None,
        *,
        check_ids: bool = True,
        targets: Tensor | None = None,
        ignore_index: int = -100,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """token_ids (..., seq) integer -> logits (..., seq, vocab_size), or the mean loss given ``targets``.

        With ``kv_cache``, ``token_ids`` are the tokens after the cached ones;
        the cache is extended in place. ``check_ids=False`` skips the check
        that every id is below vocab_size, which reads the ids back to the host
        and so waits for the GPU; the training loop passes it for data it has
        already checked.

        With ``targets`` (..., seq) the result is instead the scalar float32
        mean cross-entropy over the positions whose target is not
        ``ignore_index``, computed by the "linear_cross_entropy" op from the
        final hidden states and lm_head's weight (the embedding when tied):
        its "torch" and "triton" backends never form the logits. The loss goes
        through ``forward`` so that DDP, FSDP and torch.compile, which wrap
        ``forward``, see it.

        ``document_ids`` (..., seq) integer, shaped like ``token_ids`` (leading
        dims may broadcast), restricts attention to documents: a row packing
        several documents gives each position the logits it would get with
        its document alone (``document_ids_from_eos`` derives the ids from an
        end-of-text token). A document is a run of equal consecutive ids; ids
        that go down start a new document as well. Positions keep counting
        across documents: RoPE depends only on the distance between query and
        key, so a document at offset 100 attends exactly as at 0. With a
        ``kv_cache`` the ids cover every key, (..., cached + seq).
        """
        if targets is not None and kv_cache is not None:
            raise ValueError("forward got targets and a kv_cache; expected targets only for a whole sequence")
        cached = 0 if kv_cache is None else kv_cache.length
        self._check_input(token_ids, cached, kv_cache, check_ids)
        if document_ids is not None:
            _check_document_ids(document_ids, token_ids, cached)
        if targets is not None:
            self._check_targets(targets, token_ids, ignore_index, check_ids)
        # Positions are left to each attention, which numbers them cached..cached+seq-1 from its
        # cache on the host: the RoPE tables then grow to what is used without a device sync.
        x = self.token_embeddings(token_ids)  # (..., seq, d_model)
        if self.config.embedding_multiplier is not None:
            # Rounded to the embedding dtype first, as Gemma's reference code does.
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        recompute = self.activation_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, None, None, document_ids, use_reentrant=False)
            else:
                x = layer(x, None, None if kv_cache is None else kv_cache.layers[index], document_ids)
        hidden = self.ln_final(x)  # (..., seq, d_model)
        cap = self.config.final_softcap
        if targets is not None:
            if cap is not None:
                return self._loss(hidden, self.lm_head.weight, targets, ignore_index, softcap=cap)  # scalar
            return self._loss(hidden, self.lm_head.weight, targets, ignore_index)  # scalar
        logits = self.lm_head(hidden)  # (..., seq, vocab_size)
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def loss(
        self,
        token_ids: Tensor,
        targets: Tensor,
        ignore_index: int = -100,
        *,
        check_ids: bool = True,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Mean next-token cross-entropy of ``token_ids`` (..., seq) against ``targets`` (..., seq).

        Positions whose target is ``ignore_index`` count for nothing. This is
        ``self(token_ids, targets=targets)``; on the "torch" and "triton"
        backends of linear_cross_entropy the (..., seq, vocab) logits are never materialised.
        ``document_ids`` (..., seq) keeps attention inside documents (see ``forward``).
        """
        return self(
            token_ids, targets=targets, ignore_index=ignore_index, check_ids=check_ids, document_ids=document_ids
        )

    def _check_input(self, token_ids: Tensor, cached: int, kv_cache: KVCache | None, check_ids: bool) -> None:
        if not _is_integer_dtype(token_ids.dtype):
            raise ValueError(f"token_ids has dtype {token_ids.dtype}; expected an integer tensor (torch.long)")
        if token_ids.dim() == 0 or token_ids.shape[-1] == 0:
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}; expected (..., seq) with seq >= 1")
        if token_ids.numel() == 0:
            # Refused rather than answered with empty logits: no backend is asked to run on nothing,
            # and a mean loss over no positions has no value.
            raise ValueError(
                f"token_ids has shape {tuple(token_ids.shape)}, an empty batch; expected at least one sequence"
            )
        seq_len = token_ids.shape[-1]
        if cached + seq_len > self.config.context_length:
            where = f" after {cached} cached tokens" if cached else ""
            raise ValueError(
                f"token_ids has sequence length {seq_len}{where}; expected at most "
                f"context_length={self.config.context_length} tokens in total"
            )
        if kv_cache is not None and len(kv_cache.layers) != len(self.layers):
            raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers; expected {len(self.layers)}")
        # The range check reads the ids back to the host (a device sync), and a
        # data-dependent branch would split a compiled graph, so compiled models
        # skip it and rely on the embedding's own index check instead.
        if check_ids and not torch.compiler.is_compiling():
            low, high = int(token_ids.min()), int(token_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"token_ids contains id {bad}; expected ids in [0, vocab_size={self.config.vocab_size})"
                )

    def _check_targets(self, targets: Tensor, token_ids: Tensor, ignore_index: int, check_ids: bool) -> None:
        """Refuse targets of the wrong shape or type, or (unless ``check_ids`` is off) outside the vocabulary.

        The range check is made here so that every linear_cross_entropy backend refuses the
        same targets with the same message; it reads them back to the host,
        like the token id check, and is skipped with it.
        """
        if not isinstance(targets, Tensor) or not _is_integer_dtype(targets.dtype):
            kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets has type {kind}; expected an integer tensor (torch.long)")
        if tuple(targets.shape) != tuple(token_ids.shape):
            raise ValueError(
                f"targets has shape {tuple(targets.shape)}; expected token_ids' shape {tuple(token_ids.shape)}"
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index={ignore_index!r}: expected an int")
        if not check_ids or torch.compiler.is_compiling():
            return
        counted = targets[targets != ignore_index]
        if counted.numel() == 0:
            return
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"targets contains id {bad}; expected ids in [0, vocab_size={self.config.vocab_size}) "
                f"or ignore_index={ignore_index}"
            )

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache with one slot per layer, for incremental decoding."""
        return KVCache(len(self.layers), [layer.attn.window for layer in self.layers])

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix once); ``non_embedding`` leaves out the token embedding table.

        The embedding is a lookup with no FLOPs, which is why scaling laws and
        ``flops_per_token`` count without it; lm_head is a real matmul and stays
        in, also when it shares its matrix with the embedding.
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared one once
        if non_embedding and not self.config.tie_embeddings:
            total -= self.token_embeddings.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12 * L * d_model * context.

        6N: each non-embedding weight does a multiply-add (2 FLOPs) forward and
        twice that backward; with grouped-query attention N holds the smaller
        key/value projections, so GQA's savings are counted. The second term is
        attention's QK^T and AV matmuls over the full context (the PaLM
        appendix B estimate), one per query head, which GQA does not change.
        It is the numerator of MFU.
        """
        cfg = self.config
        attention_width = cfg.num_heads * cfg.head_dim  # d_model, unless head_dim is set apart
        return 6 * self.num_parameters(non_embedding=True) + 12 * cfg.num_layers * attention_width * cfg.context_length

    def extra_repr(self) -> str:
        return f"backends={self.backends}"


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_document_ids(document_ids: Tensor, token_ids: Tensor, cached: int) -> None:
    """Refuse ids that do not give one id per key position of each row (dtype and device: the attention op)."""
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor or None, got {type(document_ids).__name__}")
    keys = cached + token_ids.shape[-1]
    expected = torch.Size((*token_ids.shape[:-1], keys))
    try:
        fits = torch.broadcast_shapes(document_ids.shape, expected) == expected
    except RuntimeError:
        fits = False
    if not fits:
        where = f" ({cached} cached + {token_ids.shape[-1]} new positions)" if cached else ""
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)}; expected {tuple(expected)}{where}, one id per "
            f"position of token_ids (shape {tuple(token_ids.shape)}), or a shape that broadcasts to it"
        )


def _build_config(
    vocab_size: int | ModelConfig | None,
    context_length: int | None,
    d_model: int | None,
    num_layers: int | None,
    num_heads: int | None,
    d_ff: int | None,
    rope_theta: float,
    config: ModelConfig | None,
) -> ModelConfig:
    """The ModelConfig for either calling form of TransformerLM."""
    if isinstance(vocab_size, ModelConfig):
        if config is not None:
            raise ValueError("TransformerLM got a ModelConfig both positionally and as config=; expected one")
        config, vocab_size = vocab_size, None
    shape = dict(
        vocab_size=vocab_size,
        context_length=context_length,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
    )
    if config is not None:
        given = sorted(name for name, value in shape.items() if value is not None)
        if given:
            raise ValueError(
                f"TransformerLM got a ModelConfig and also {given}; expected one or the other "
                f"(use ModelConfig.preset(name, **overrides) or dataclasses.replace to change fields)"
            )
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config={config!r}: expected a ModelConfig")
        # Only a non-default rope_theta can be told apart from "not given".
        if rope_theta != _DEFAULT_ROPE_THETA and rope_theta != config.rope_theta:
            raise ValueError(
                f"TransformerLM got rope_theta={rope_theta} and a ModelConfig with rope_theta={config.rope_theta}; "
                f"expected the theta inside the config only"
            )
        return config
    missing = sorted(name for name, value in shape.items() if value is None)
    if missing:
        raise ValueError(f"TransformerLM is missing {missing}; expected all shape arguments or a ModelConfig")
    return ModelConfig(**shape, rope_theta=rope_theta)
