"""transformers' attention-function interface on scratchlm's "attention" op (used by ``apply_kernels``).

``scratchlm_attention`` is registered with ``AttentionInterface`` under
``ATTENTION_NAME``, with flash-attention's mask format in
``AttentionMaskInterface``: ``create_causal_mask`` then hands over the 2-D
padding mask (None when nothing is padded), never a 4-D one, and the function
turns padding, packed ``position_ids`` and ``cu_seq_lens_k`` into the op's
``document_ids``. A model selects it through its config's
``_attn_implementation``; registering is global, selecting is per model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.model.backends import get_op

ATTENTION_NAME = "scratchlm"


def attention_interfaces():
    """transformers' registry of attention functions (``ALL_ATTENTION_FUNCTIONS``), imported when first needed."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def register_attention() -> None:
    """Register ``scratchlm_attention`` and its mask format under ``ATTENTION_NAME`` (global, idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, scratchlm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)


def check_padding(attention_mask: Tensor | None) -> None:
    """Refuse a 2-D padding mask with padding between tokens: documents cannot express its holes.

    Called once per model forward (it reads the mask on the host), not per layer.
    """
    if attention_mask is None or attention_mask.dim() != 2 or torch.compiler.is_compiling():
        return
    mask = attention_mask.bool()
    # A row may start with padding and end with padding, but hold one run of tokens.
    runs = mask[:, 0].int() + (mask[:, 1:] & ~mask[:, :-1]).sum(-1)
    if bool((runs > 1).any()):
        raise ValueError(
            "attention_mask has padding between tokens of one row; scratchlm's attention expects left or "
            "right padding (one run of 1s per row)"
        )


def scratchlm_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function interface on scratchlm's "attention" op.

    query (batch, heads, q_seq, d), key/value (batch, kv_heads, k_seq, d) ->
    (batch, q_seq, heads, d) and no attention weights, as flash attention
    returns them. The op is the module's ``scratchlm_attention`` (set by
    ``apply_kernels``; the "auto" backend on a module it did not patch).
    """
    if dropout:
        raise ValueError(f"dropout={dropout!r}: scratchlm's attention has no dropout; expected 0.0")
    attend = getattr(module, "scratchlm_attention", None) or get_op("attention", "auto", query.device)
    document_ids = _document_ids(attention_mask, position_ids, cu_seq_lens_k, query, key)
    options = {"document_ids": document_ids, "scale": scaling, "window": sliding_window, "softcap": softcap}
    out = attend(query, key, value, **{name: value for name, value in options.items() if value is not None})
    return out.transpose(1, 2), None


def _document_ids(
    attention_mask: Tensor | None, position_ids: Tensor | None, cu_seq_lens_k: Tensor | None, query: Tensor, key: Tensor
) -> Tensor | None:
    """int32 (batch, k_seq) document ids for the attention op, or None for plain causal rows.

    - a 2-D padding mask (1 = token): its runs are documents, so the real tokens
      (one run: left or right padding, see ``check_padding``) see only each other; the padding
      positions form their own documents, whose outputs nothing reads;
    - ``cu_seq_lens_k`` (flattened packed rows, as HF's flash path takes them):
      document i spans positions cu[i] .. cu[i+1] - 1;
    - packed ``position_ids`` without a cache (q_seq == k_seq): a new document
      wherever a position is not its predecessor + 1, the rule transformers'
      own masks use (``find_packed_sequence_indices``).
    """
    batch, k_len = key.shape[0], key.shape[-2]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, k_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; scratchlm's attention expects the 2-D "
                f"padding mask ({batch}, {k_len}) (custom 4-D masks need another attention implementation)"
            )
        mask = attention_mask.bool()
        changes = (mask[:, 1:] != mask[:, :-1]).to(torch.int32).cumsum(-1, dtype=torch.int32)
        return F.pad(changes, (1, 0))
    if cu_seq_lens_k is not None:
        if batch != 1:
            raise ValueError(
                f"cu_seq_lens_k is given for a batch of {batch} rows; expected the flattened (1, tokens) layout"
            )
        positions = torch.arange(k_len, device=key.device)
        ids = torch.searchsorted(cu_seq_lens_k[1:].to(key.device, torch.int64), positions, right=True)
        return ids.to(torch.int32).unsqueeze(0)
    if position_ids is None or position_ids.shape[-1] != k_len or query.shape[-2] != k_len:
        return None
    positions = position_ids.expand(batch, -1)
    starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1
    ids = starts.to(torch.int32).cumsum(-1, dtype=torch.int32)
    if not torch.compiler.is_compiling() and not bool(ids[:, -1].any()):
        return None  # one document per row: the plain causal path
    return ids
