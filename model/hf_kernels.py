"""``apply_kernels``: scratchlm's ops inside one Hugging Face ``transformers`` model instance.

    model = transformers.AutoModelForCausalLM.from_pretrained(...)
    apply_kernels(model, kernels="triton")   # same function, scratchlm's kernels

What is patched, on the given instance only (its classes, and every other
model in the process, keep Hugging Face's code):

- every ``<Family>RMSNorm`` module: its ``forward`` becomes the ``rmsnorm`` op
  (offset 1 for Gemma, whose stored weight is the scale minus 1);
- every ``<Family>MLP``: down(gate(gate_proj x, up_proj x)) with the ``swiglu``
  or ``geglu`` op (from the config's activation) as the gate;
- every ``<Family>Attention``: the same projections, q/k norms and cache update
  as Hugging Face's forward, but the rotation is the ``rope`` op with
  ``layout="halves"`` (HF's ``rotate_half``, the first d/2 angles of HF's
  tables) and the attention is the function registered with
  ``AttentionInterface`` under ``ATTENTION_NAME``, which the instance's own
  config selects (``scratchlm.model.hf_attention``). That function runs the
  ``attention`` op (FlashAttention-2 on "triton"): causal, grouped-query,
  sliding windows, soft-capping, and packed or padded rows turned into
  ``document_ids``;
- the ``...ForCausalLM`` forward: with ``labels`` while training, the
  ``linear_cross_entropy`` op computes the loss from the final hidden states
  and the lm_head weight, so the (tokens x vocab) logits never exist; HF's
  label shift, ``ignore_index``, ``shift_labels`` and ``num_items_in_batch``
  (sum / items, as for gradient accumulation) are honoured, and Gemma 2's
  final logit soft-capping goes into the op. Without labels, in eval mode, or
  when the lm_head is no longer a bias-free ``nn.Linear`` (a PEFT adapter on
  it), HF's own forward runs and returns logits (``generate`` uses that path).

Why forwards replaced per instance (a bound method in the module's
``__dict__``) rather than new modules or patched classes: the parameters,
their names, ``state_dict``/``save_pretrained``, PEFT's adapters on the
projections and ``GradientCheckpointingLayer`` stay exactly as they were, and
two models in one process can run different code. The model's config (shared
by its submodules, and possibly by other models built from the same object)
is replaced by a private copy before its ``_attn_implementation`` is set.

Everything that could refuse is checked before anything changes: an
unsupported class or config raises ValueError naming it and leaves the model
untouched.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.model.backends import KernelsSpec, get_op, resolve_kernels
from scratchlm.model.hf_attention import ATTENTION_NAME, attention_interfaces, check_padding, register_attention

# The gate op for each MLP activation name transformers' configs use.
_GATES = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_tanh": "geglu"}


@dataclass(frozen=True)
class _Family:
    """What differs between the supported transformers families, read in one place."""

    prefix: str  # class-name prefix of the family's modules: f"{prefix}RMSNorm", f"{prefix}MLP", f"{prefix}Attention"
    module: str  # the transformers module defining them
    norm_offset: float = 0.0  # Gemma's norms scale by 1 + weight
    activation_field: str = "hidden_act"  # config field naming the MLP activation
    attention_softcap: bool = False  # the attention passes attn_logit_softcapping on (Gemma 2)
    window_from_config: bool = False  # Mistral: config.sliding_window on every layer


_LLAMA = _Family("Llama", "transformers.models.llama.modeling_llama")
_QWEN2 = _Family("Qwen2", "transformers.models.qwen2.modeling_qwen2")
_QWEN3 = _Family("Qwen3", "transformers.models.qwen3.modeling_qwen3")
_MISTRAL = _Family("Mistral", "transformers.models.mistral.modeling_mistral", window_from_config=True)
_GEMMA2 = _Family(
    "Gemma2", "transformers.models.gemma2.modeling_gemma2", norm_offset=1.0,
    activation_field="hidden_activation", attention_softcap=True,
)  # fmt: skip
_GEMMA3 = _Family(
    "Gemma3", "transformers.models.gemma3.modeling_gemma3", norm_offset=1.0, activation_field="hidden_activation"
)

# Supported model class name -> its family.
SUPPORTED_MODELS = {
    "LlamaForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _QWEN2,
    "Qwen3ForCausalLM": _QWEN3,
    "MistralForCausalLM": _MISTRAL,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": _GEMMA3,
}


def apply_kernels(model: nn.Module, kernels: KernelsSpec = "auto") -> nn.Module:
    """Make one transformers model instance compute with scratchlm's ops; returns ``model`` itself.

    ``model``: one of ``SUPPORTED_MODELS`` (a PEFT model wrapping one is
    accepted: its base model is patched). ``kernels``: as for
    ``TransformerLM(kernels=...)``, one choice for every op or a dict per op,
    resolved for the device of the model's parameters; the resolved op ->
    backend choice is kept as ``scratchlm_backends`` on the patched model.
    Applying again replaces the previous choice. Raises ValueError
    (``KernelsUnavailableError`` for Triton where it cannot run) before
    changing anything.
    """
    target = _unwrap_peft(model)
    family = _family_of(target)
    parameter = next(target.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    backends = resolve_kernels(kernels, device)
    text_model = _text_model(target)
    _check_config(text_model.config, family, type(target).__name__)
    _check_rotary(text_model, type(target).__name__)
    plan = _patch_plan(text_model, family)
    ops = {op: get_op(op, backend, device) for op, backend in backends.items()}
    register_attention()

    # Nothing below raises: the model is either patched whole or (above) untouched.
    _own_config(target)
    text_model.config._attn_implementation = ATTENTION_NAME
    for kind, module in plan:
        _PATCHERS[kind](module, family, ops)
    _patch_causal_lm(target, ops)
    target.scratchlm_backends = backends
    return model


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # PEFT's PeftModel forwards to its base model, which holds the real modules.
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__name__.startswith("Peft"):
        return get_base_model()
    return model


def _family_of(model: nn.Module) -> _Family:
    cls = type(model)
    family = SUPPORTED_MODELS.get(cls.__name__)
    if family is None or not cls.__module__.startswith("transformers.models."):
        raise ValueError(
            f"model is a {cls.__module__}.{cls.__name__}; apply_kernels supports transformers' "
            f"{', '.join(SUPPORTED_MODELS)}"
        )
    return family


def _text_model(model: nn.Module) -> nn.Module:
    """The decoder stack: ``model.model``, or the language model inside Gemma 3's multimodal model."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def _check_config(config, family: _Family, model_name: str) -> None:
    """Refuse, by name, config values the patched path would not compute as transformers does."""
    activation = getattr(config, family.activation_field, None)
    if activation not in _GATES:
        raise ValueError(
            f"{model_name} has config.{family.activation_field}={activation!r}; "
            f"apply_kernels supports the gated MLP activations {sorted(_GATES)}"
        )
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout != 0.0:
        raise ValueError(
            f"{model_name} has config.attention_dropout={dropout!r}; "
            "scratchlm's attention has no dropout (expected 0.0)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{model_name} has config.use_bidirectional_attention=True; scratchlm's attention is causal only"
        )
    if not getattr(config, "is_causal", True):
        raise ValueError(f"{model_name} has config.is_causal=False; scratchlm's attention is causal only")


def _check_rotary(text_model: nn.Module, model_name: str) -> None:
    """Refuse RoPE tables that rotate only part of each head: the rope op rotates whole heads."""
    config = text_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name, inv_freq in text_model.rotary_emb.named_buffers():
        if name.endswith("inv_freq") and 2 * inv_freq.numel() != head_dim:
            raise ValueError(
                f"{model_name}'s rotary_emb.{name} holds {inv_freq.numel()} frequencies for head_dim {head_dim}; "
                f"apply_kernels rotates whole heads (expected {head_dim // 2})"
            )


def _patch_plan(text_model: nn.Module, family: _Family) -> list[tuple[str, nn.Module]]:
    """(kind, module) for each norm, MLP and attention of the family; refuses a model that has none."""
    kinds = {f"{family.prefix}RMSNorm": "norm", f"{family.prefix}MLP": "mlp", f"{family.prefix}Attention": "attention"}
    plan = []
    for module in text_model.modules():
        cls = type(module)
        kind = kinds.get(cls.__name__)
        if kind is not None and cls.__module__ == family.module:
            plan.append((kind, module))
    found = {kind for kind, _ in plan}
    if found != set(kinds.values()):
        missing = sorted(name for name, kind in kinds.items() if kind not in found)
        raise ValueError(f"{type(text_model).__name__} holds no {missing}; expected a {family.prefix} decoder")
    return plan


def _own_config(model: nn.Module) -> None:
    """Give ``model`` and its submodules a private copy of their config (and sub-configs).

    Configs are shared objects: two models built from one config would otherwise
    both switch to this model's attention implementation.
    """
    replacements: dict[int, object] = {}

    def pair(old, new) -> None:
        replacements[id(old)] = new
        for key in getattr(old, "sub_configs", {}):
            old_sub = getattr(old, key, None)
            if old_sub is not None:
                pair(old_sub, getattr(new, key))

    pair(model.config, copy.deepcopy(model.config))
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in replacements:
            module.config = replacements[id(config)]


# --- the norms, the MLP and the attention -----------------------------------------------------


def _norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    return self.scratchlm_rmsnorm(hidden_states, self.weight, self.scratchlm_eps, offset=self.scratchlm_offset)


def _patch_norm(module: nn.Module, family: _Family, ops: dict[str, Callable]) -> None:
    # Llama-style norms call it variance_epsilon, Gemma's eps.
    eps = getattr(module, "variance_epsilon", None)
    module.scratchlm_eps = float(module.eps if eps is None else eps)
    module.scratchlm_offset = family.norm_offset
    module.scratchlm_rmsnorm = ops["rmsnorm"]
    module.forward = types.MethodType(_norm_forward, module)


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(self.scratchlm_gate(self.gate_proj(x), self.up_proj(x)))


def _patch_mlp(module: nn.Module, family: _Family, ops: dict[str, Callable]) -> None:
    module.scratchlm_gate = ops[_GATES[getattr(module.config, family.activation_field)]]
    module.forward = types.MethodType(_mlp_forward, module)


def _attention_forward(
    self: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Hugging Face's attention forward with scratchlm's RoPE; (batch, seq, hidden) in and out."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if hasattr(self, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head's features
        query, key = self.q_norm(query), self.k_norm(key)

    cos, sin = position_embeddings  # (batch, seq, head_dim): HF writes the d/2 angles twice
    half = cos.shape[-1] // 2
    cos = cos[..., :half].unsqueeze(1).contiguous()  # (batch, 1, seq, head_dim / 2), one table for all heads
    sin = sin[..., :half].unsqueeze(1).contiguous()
    query = self.scratchlm_rope(query, cos, sin, layout="halves")
    key = self.scratchlm_rope(key, cos, sin, layout="halves")

    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

    fallback = sys.modules[type(self).__module__].eager_attention_forward
    attention = attention_interfaces().get_interface(self.config._attn_implementation, fallback)
    extra = {"softcap": self.attn_logit_softcapping} if self.scratchlm_family.attention_softcap else {}
    window = getattr(self.config if self.scratchlm_family.window_from_config else self, "sliding_window", None)
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling, sliding_window=window, **extra, **kwargs,
    )  # fmt: skip
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _patch_attention(module: nn.Module, family: _Family, ops: dict[str, Callable]) -> None:
    module.scratchlm_family = family
    module.scratchlm_rope = ops["rope"]
    module.scratchlm_attention = ops["attention"]
    module.forward = types.MethodType(_attention_forward, module)


_PATCHERS = {"norm": _patch_norm, "mlp": _patch_mlp, "attention": _patch_attention}


# --- the loss ---------------------------------------------------------------------------------


def _patch_causal_lm(model: nn.Module, ops: dict[str, Callable]) -> None:
    original = type(model).forward
    # Positional argument names of HF's forward, read once (a signature bind in forward would break torch.compile).
    names = [
        name
        for name, parameter in inspect.signature(original).parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    ][1:]

    # wraps: inspect.signature (Trainer's column filter, its loss-kwargs check) sees HF's signature.
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = dict(zip(names, args))
        arguments.update(kwargs)
        _refuse_images(arguments)
        check_padding(arguments.get("attention_mask"))
        labels = arguments.get("labels")
        logits_to_keep = arguments.get("logits_to_keep", 0)
        fused = (
            labels is not None
            and self.training
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and type(self.lm_head) is nn.Linear
            and self.lm_head.bias is None
        )
        if not fused:
            return original(self, *args, **kwargs)
        return _fused_loss_forward(self, arguments)

    model.scratchlm_loss = ops["linear_cross_entropy"]
    model.forward = types.MethodType(forward, model)


def _fused_loss_forward(model: nn.Module, arguments: dict):
    """The ForCausalLM forward with labels, the loss fused with the lm_head: no logits (``logits`` is None)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = arguments.pop("labels")
    arguments.pop("logits_to_keep", None)
    return_dict = arguments.pop("return_dict", None)
    outputs = model.model(**arguments)
    hidden = outputs[0]  # (batch, seq, hidden): the final norm's output

    text_config = model.config.get_text_config()
    ignore_index = arguments.get("ignore_index", -100)
    shift_labels = arguments.get("shift_labels")
    if shift_labels is None:
        # HF's shift: position t predicts label t + 1; the last position predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    loss = model.scratchlm_loss(hidden, model.lm_head.weight, targets, ignore_index, softcap=softcap)
    num_items_in_batch = arguments.get("num_items_in_batch")
    if num_items_in_batch is not None:
        # transformers sums the batch's losses and divides by the items of the whole accumulated batch.
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * (targets != ignore_index).sum() / num_items_in_batch

    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        cache=getattr(outputs, "cache", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


def _refuse_images(arguments: dict) -> None:
    # Gemma 3's image tokens attend to each other both ways, which the causal kernel does not compute.
    for name in ("pixel_values", "mm_encoder_outputs"):
        if arguments.get(name) is not None:
            raise ValueError(
                f"{name} is given; apply_kernels patches Gemma 3's text path only (image tokens attend "
                f"bidirectionally, which scratchlm's causal attention does not compute)"
            )
    token_type_ids = arguments.get("token_type_ids")
    if token_type_ids is not None and bool(token_type_ids.any()):
        raise ValueError("token_type_ids marks image tokens; apply_kernels patches Gemma 3's text path only")

