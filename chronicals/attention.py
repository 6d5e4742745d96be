"""Attention for packed rows: causal within each document, never across documents.

Hugging Face's sdpa path isolates packed documents only when `position_ids` are given,
`attention_mask` is None and `use_cache=False`, and then it materialises a dense (B, 1, S, S) mask.
The mask rules out the flash kernel and the cost stays S^2 per row whatever the documents are. This
module registers an attention implementation, `chronicals_varlen`, with transformers'
`AttentionInterface` that takes the document boundaries the packer computed
(`cu_seq_lens_q`, from `PackedBatch.model_inputs()`) and runs variable-length attention over them,
so the cost is sum(len_i^2) over the documents of a row.

    use_packed_attention(model)  # or from_config(..., attn_implementation=PACKED_ATTENTION)
    loss = model(**packed.model_inputs(device), use_cache=False).loss

Implementations, chosen per call from the query tensor (`implementation(query)`), stated here once:
- "flash-varlen": CUDA, fp16/bf16, head_dim a multiple of 8 and <= 256. PyTorch's own flash
  kernel (`aten._flash_attention_forward` with cumulative sequence lengths: the kernel under
  `torch.nn.attention.varlen`, whose public wrapper changed signature between torch 2.11 and 2.13;
  the aten op did not). GQA runs natively (no repeat of K/V), autograd comes from the op's
  derivative, and it traces under `torch.compile` without graph breaks.
- "reference": everything else (CPU, fp32). sdpa over each row with a block-diagonal causal mask
  built from `cu_seq_lens_q` on the device (`searchsorted`, no host sync, compiles). Cost S^2 per
  row: it is the correctness path, not a fast one.
- "chronicals": logit soft-capping (Gemma-2's `softcap`) or attention sinks (gpt-oss's and
  Granite-SWA's `s_aux`: a learned logit per head in the softmax's sum), which neither PyTorch
  kernel computes: `chronicals::attention` (chronicals/ops/attention.py; its Triton kernel on CUDA)
  over the documents, given to it as positions restarting at each boundary.

Boundaries come from the packer, never from the model inputs: deriving them from `position_ids`
needs `nonzero` (a host sync and a graph break per forward). Without `cu_seq_lens_q`, or with an
`attention_mask` or a KV cache, the function raises rather than attend across documents.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The public varlen wrapper's signature differs between torch 2.11 and 2.13; the flash kernel
# under it is reached through chronicals' adapter for private attention kernels.
from chronicals._torch_private import flash_attention_varlen
from chronicals.ops import attention as ops

PACKED_ATTENTION: Final = "chronicals_varlen"

# Flash kernel limits in PyTorch's build (sm80+): head_dim a multiple of 8, at most 256.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def implementation(query: Tensor, softcap: float | None = None, sinks: bool = False) -> str:
    """'flash-varlen', 'chronicals' or 'reference' for a query tensor (B, H, S, D); see the module
    docstring."""
    if softcap is not None or sinks:
        return "chronicals"
    head_dim = query.shape[-1]
    if (
        query.device.type == "cuda"
        and query.dtype in _FLASH_DTYPES
        and head_dim % 8 == 0
        and head_dim <= _FLASH_MAX_HEAD_DIM
    ):
        return "flash-varlen"
    return "reference"


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention within each segment of packed rows.

    query: (B, Hq, S, D), key/value: (B, Hk, S, D) with Hq a multiple of Hk (GQA), as HF attention
    functions receive them (value's head dim may be smaller: multi-head latent attention, run
    with zero channels added to value and sliced off the output); cu_seqlens: (N + 1,) int32
    boundaries over the B * S flattened tokens (0 first, B * S last, every row boundary among
    them). `sliding_window` w: a token sees the w
    most recent tokens of its document, itself included (HF's convention); `softcap` c: scores
    become c * tanh(scores / c); `sinks` (Hq,): each head's sink logit joins every query's
    softmax and attends to nothing. Returns (B, S, Hq, Dv), HF's layout for attention outputs,
    in query's dtype.
    """
    _check_shapes(query, key, value, cu_seqlens)
    value_dim = value.shape[-1]
    if value_dim < query.shape[-1]:
        value = F.pad(value, (0, query.shape[-1] - value_dim))
        return varlen_attention(query, key, value, cu_seqlens, scale=scale,
                                sliding_window=sliding_window, softcap=softcap,
                                sinks=sinks)[..., :value_dim]
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"varlen_attention: sliding_window must be >= 1. Got {sliding_window}.")
    name = implementation(query, softcap, sinks is not None)
    if name == "chronicals":
        b, _, s, _ = query.shape
        out = ops.attention(query, key, value, _restarting_positions(cu_seqlens, b, s),
                            scale=scale, window=sliding_window, softcap=softcap, sinks=sinks)
        return out.transpose(1, 2)
    if name == "flash-varlen":
        return _flash_varlen(query, key, value, cu_seqlens, scale, sliding_window)
    return _reference_varlen(query, key, value, cu_seqlens, scale, sliding_window)


def packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The `chronicals_varlen` attention function, with the signature of transformers'
    `AttentionInterface` functions. Needs `cu_seq_lens_q` (passed to the model as a keyword,
    e.g. from `PackedBatch.model_inputs()`); `cu_seq_lens_k`, if given, must be the same boundaries
    (self-attention: keys are the query tokens); `s_aux`, the attention sinks of gpt-oss and
    Granite-SWA, one logit per query head. Other keyword arguments from the model (position_ids,
    max_length_q/k, use_cache, ...) are not used."""
    if cu_seq_lens_q is None:
        raise ValueError(
            f"{PACKED_ATTENTION}: needs the document boundaries `cu_seq_lens_q` as a keyword "
            f"argument of the model call (e.g. model(**packed.model_inputs(device), "
            f"use_cache=False) with packed = chronicals.pack(...)). Without them it cannot keep "
            f"documents apart. For unpacked batches and generation, switch back with "
            f"model.set_attn_implementation('sdpa')."
        )
    if attention_mask is not None:
        raise ValueError(
            f"{PACKED_ATTENTION}: got an attention_mask; packed rows are delimited by "
            f"cu_seq_lens_q and their pad slots are segments of their own. Pass no attention_mask."
        )
    if key.shape[-2] != query.shape[-2]:
        raise ValueError(
            f"{PACKED_ATTENTION}: keys cover {key.shape[-2]} positions but queries "
            f"{query.shape[-2]}; a KV cache is in use. Call the model with use_cache=False."
        )
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and (
        cu_seq_lens_k.shape != cu_seq_lens_q.shape
    ):
        raise ValueError(
            f"{PACKED_ATTENTION}: cu_seq_lens_k {tuple(cu_seq_lens_k.shape)} must equal "
            f"cu_seq_lens_q {tuple(cu_seq_lens_q.shape)} (self-attention over packed rows)."
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{PACKED_ATTENTION}: supports causal (decoder) attention only.")
    if dropout:
        raise ValueError(
            f"{PACKED_ATTENTION}: attention dropout is not supported. Got dropout={dropout}; set "
            f"config.attention_dropout = 0.0."
        )
    out = varlen_attention(
        query, key, value, cu_seq_lens_q, scale=scaling, sliding_window=sliding_window,
        softcap=softcap, sinks=kwargs.get("s_aux"),
    )
    return out, None


@functools.cache
def register_packed_attention() -> str:
    """Register `chronicals_varlen` with transformers' AttentionInterface (once) and return the
    name. It has no entry in the mask interface, so models build no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    return PACKED_ATTENTION


def use_packed_attention(model: nn.Module) -> None:
    """Switch a transformers model to `chronicals_varlen` attention. Every later forward needs
    `cu_seq_lens_q` and use_cache=False; `model.set_attn_implementation('sdpa')` switches back."""
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"use_packed_attention: expected a transformers PreTrainedModel. Got "
            f"{type(model).__name__}."
        )
    model.set_attn_implementation(register_packed_attention())
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(
            f"use_packed_attention: {type(model).__name__} kept attention "
            f"{model.config._attn_implementation!r}; it does not dispatch through "
            f"transformers' AttentionInterface."
        )


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor) -> None:
    if (query.ndim != 4 or key.ndim != 4 or value.shape[:3] != key.shape[:3]
            or value.shape[-1] > key.shape[-1]):
        raise ValueError(
            f"varlen_attention: expected query (B, Hq, S, D), key (B, Hk, S, D) and value "
            f"(B, Hk, S, Dv), Dv <= D. Got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}."
        )
    b, hq, s, d = query.shape
    if key.shape[0] != b or key.shape[2] != s or key.shape[3] != d or hq % key.shape[1]:
        raise ValueError(
            f"varlen_attention: key/value {tuple(key.shape)} do not match query "
            f"{tuple(query.shape)} (same B, S, D; query heads a multiple of key heads)."
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"varlen_attention: cu_seqlens must be a 1-D int32 tensor of N + 1 >= 2 boundaries. "
            f"Got shape {tuple(cu_seqlens.shape)} of {cu_seqlens.dtype}."
        )
    if cu_seqlens.device != query.device:
        raise ValueError(
            f"varlen_attention: cu_seqlens is on {cu_seqlens.device} but query on {query.device}."
        )


def _flash_varlen(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scale: float | None,
    sliding_window: int | None,
) -> Tensor:
    b, hq, s, d = query.shape
    # (B, H, S, D) -> (B * S, H, D). HF's q/k/v are transposed views of (B, S, H, D) projections,
    # so for k and v this is free; q after RoPE may need one copy.
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, key.shape[1], d)
    # max_q = max_k = S, the row length, rather than the longest document: the kernel only sizes
    # its grid with it (tiles past a document's end exit at once), and a constant keeps
    # torch.compile from specialising on, and recompiling for, every batch's longest document.
    # Cost on an H200 (8 x 2048 rows, 14/2 heads, d 64, fwd+bwd): 0.889 ms vs 0.863 ms with the
    # exact bound on log-normal batches (3%); the empty tiles matter more for rows of many short
    # documents (rows of 128-token documents: 0.58 ms, against 1.12 ms for one 2048 per row).
    out = flash_attention_varlen(q, k, v, cu_seqlens, s, scale, sliding_window)
    return out.view(b, s, hq, d)


def _segments(cu_seqlens: Tensor, batch: int, seq: int) -> tuple[Tensor, Tensor]:
    """The flat token indices (B * S,) and each one's segment index. right=True: a token at a
    boundary starts the next segment."""
    tokens = torch.arange(batch * seq, device=cu_seqlens.device, dtype=torch.int32)
    return tokens, torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def _restarting_positions(cu_seqlens: Tensor, batch: int, seq: int) -> Tensor:
    """(B, S) positions that restart at 0 at every boundary: the segments as
    `chronicals::attention` reads documents."""
    tokens, segment = _segments(cu_seqlens, batch, seq)
    return (tokens - cu_seqlens[segment]).view(batch, seq)


def _reference_varlen(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scale: float | None,
    sliding_window: int | None,
) -> Tensor:
    b, hq, s, _ = query.shape
    # Segments never straddle rows, so comparing them per row is enough.
    segment = _segments(cu_seqlens, b, s)[1].view(b, s)
    pos = torch.arange(s, device=query.device)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (pos[:, None] >= pos[None, :])
    if sliding_window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < sliding_window)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed[:, None], scale=scale,
        enable_gqa=key.shape[1] != hq,
    )
    return out.transpose(1, 2)
