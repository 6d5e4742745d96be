"""Causal attention over rows of packed documents: `chronicals::attention`.

    out[b, h, i] = sum_j p_ij v[b, h', j],   p_i = softmax_j(cap(scale * q[b, h, i] . k[b, h', j]))

(cap(s) = c * tanh(s / c) with a logit softcap c > 0, Gemma-2's; the identity without) over the
keys j of the query's own document with j <= i (and i - j < window when a sliding window is
given), h' = h // (Hq / Hk) (GQA/MQA: K/V heads are shared, never repeated). A document is a
maximal run of consecutive `position_ids` (transformers' packed-sequence rule: a new document starts
where a position is not its predecessor's plus one); without position_ids every row is one document.
With attention sinks (gpt-oss: one learned logit per query head, `sinks` (Hq,)), the softmax's sum
also holds exp(sink[h]): the sink takes its share of each query's probability and attends to
nothing. The sinks get their gradient.

Inputs are transformers' attention layout: q (B, Hq, S, D), k and v (B, Hk, S, D), usually
transposed views of (B, S, H, D) projections. The output is (B, Hq, S, D) laid out as (B, S, Hq, D)
in memory, so transformers' `transpose(1, 2).contiguous()` after attention is free. Softmax
statistics (log-sum-exp) are fp32; the output comes back in q's dtype.

Kernels, chosen from what the graph says of the batch (static: the same choice in the forward and
the backward, and at every call of a compiled graph), stated here once and named by `kernel()`:
- "cudnn": CUDA, one document per row (no position_ids), no window, no softcap, head_dim <= 128:
  cuDNN's fused attention with its causal mask (`aten._scaled_dot_product_cudnn_attention`), the
  kernel `scaled_dot_product_attention` picks on Hopper for an unmasked causal call. Fastest
  measured on H100 at every model shape in benchmarks/bench_attention.py.
- "flash-varlen": CUDA, packed rows or sliding windows, no softcap (head_dim up to 256):
  PyTorch's flash kernel over document boundaries `cu_seqlens`, computed on the device from
  position_ids.
- "triton": CUDA with a logit softcap (Gemma-2) or attention sinks (gpt-oss), which neither
  PyTorch kernel computes: Chronicals' own kernels (chronicals/ops/attention_triton.py), which
  take every case above.
- "reference": CPU: masked `scaled_dot_product_attention` (chronicals/reference.py), the numerics
  oracle of the tests. There is no fallback from a kernel to it.
`forced_kernel(name)` runs another kernel that takes the inputs (benchmarks; and the tests run
"triton" on CPU tensors through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from chronicals import reference
from chronicals._torch_private import (
    cudnn_attention_backward,
    cudnn_attention_forward,
    flash_attention_backward,
    flash_attention_forward,
    version,
)
from chronicals.ops import attention_triton
from chronicals.ops._launch import empty_token_major, interpreter_on

KERNELS = ("cudnn", "flash-varlen", "triton", "reference")
_HALF = (torch.float16, torch.bfloat16)
_CUDNN_MAX_HEAD_DIM = 128
_FLASH_MAX_HEAD_DIM = 256


_forced: str | None = None


def kernel(q: Tensor, packed: bool, window: int, softcap: float = 0.0,
           sinks: bool = False) -> str:
    """The kernel `attention` runs for a query tensor (B, Hq, S, D) of this device, dtype and head
    dim; `packed`: position_ids are given; `window`: sliding window (0: none); `softcap`: logit
    cap (0: none); `sinks`: sink logits are given."""
    if _forced is not None:
        return _forced
    if q.device.type != "cuda":
        return "reference"
    if softcap or sinks:
        return "triton"
    if not packed and window == 0 and q.shape[-1] <= _CUDNN_MAX_HEAD_DIM:
        return "cudnn"
    return "flash-varlen"


@contextlib.contextmanager
def forced_kernel(name: str) -> Iterator[None]:
    """Run `name` for every attention call inside (forward and backward); it raises for inputs
    the kernel does not take. "triton" on CPU tensors needs TRITON_INTERPRET=1."""
    global _forced
    if name not in KERNELS:
        raise ValueError(f"forced_kernel: expected one of {KERNELS}. Got {name!r}.")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _check_kernel(name: str, q: Tensor, packed: bool, window: int, softcap: float,
                  sinks: bool) -> None:
    """A forced kernel must take the inputs: raise, never compute something else."""
    cuda = q.device.type == "cuda"
    if name == "reference":
        return
    if name == "triton":
        if not cuda and not interpreter_on():
            raise ValueError("attention: the triton kernel runs on CUDA, or on CPU tensors with "
                             "TRITON_INTERPRET=1.")
        return
    why = None
    if not cuda:
        why = "CUDA tensors"
    elif softcap or sinks:
        why = "no softcap and no sinks"
    elif name == "cudnn" and (packed or window or q.shape[-1] > _CUDNN_MAX_HEAD_DIM):
        why = f"one document per row, no window, head_dim <= {_CUDNN_MAX_HEAD_DIM}"
    if why:
        raise ValueError(f"attention: the {name} kernel takes {why}; got {q.device.type} "
                         f"tensors, packed={packed}, window={window}, softcap={softcap}, "
                         f"sinks={sinks}, head_dim {q.shape[-1]}.")


def unsupported(q: Tensor, k: Tensor) -> str | None:
    """Why no kernel takes these inputs on their device, or None."""
    d = q.shape[-1]
    if q.device.type == "cuda" and (q.dtype not in _HALF or d % 8 or d > _FLASH_MAX_HEAD_DIM):
        return (
            f"the CUDA kernels take float16/bfloat16 with head_dim a multiple of 8 up to "
            f"{_FLASH_MAX_HEAD_DIM}; got {q.dtype}, head_dim {d}"
        )
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads"
    return None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None, window: int,
                  softcap: float, sinks: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention: expected q (B, Hq, S, D) and k, v (B, Hk, S, D). Got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(
            f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (same B, S, D)."
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}.")
    if position_ids is not None and (
        position_ids.dim() != 2 or position_ids.shape[1] != s
        or position_ids.shape[0] not in (1, b) or position_ids.is_floating_point()
    ):
        raise ValueError(
            f"attention: position_ids must be integers of shape ({b}, {s}) or (1, {s}). Got "
            f"{tuple(position_ids.shape)} of {position_ids.dtype}."
        )
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0: none). Got {window}.")
    if softcap < 0:
        raise ValueError(f"attention: softcap must be >= 0 (0: none). Got {softcap}.")
    if sinks is not None and (sinks.shape != (q.shape[1],) or not sinks.is_floating_point()
                              or sinks.device != q.device):
        raise ValueError(
            f"attention: sinks must be one float logit per query head, shape ({q.shape[1]},) on "
            f"{q.device}. Got {tuple(sinks.shape)} of {sinks.dtype} on {sinks.device}."
        )
    why = unsupported(q, k)
    if why:
        raise ValueError(f"attention: {why}.")
    packed, has_sinks = position_ids is not None, sinks is not None
    _check_kernel(kernel(q, packed, window, softcap, has_sinks), q, packed, window, softcap,
                  has_sinks)


def _document_starts(position_ids: Tensor, batch: int) -> Tensor:
    """(B, S) bool: a document starts at each row's first token and where a position is not its
    predecessor's plus one."""
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def document_bounds(position_ids: Tensor, batch: int) -> Tensor:
    """cu_seqlens (int32, documents + 1) over the batch * S flattened tokens. One host sync (the
    document count)."""
    starts = _document_starts(position_ids, batch)
    bounds = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.full((1,), starts.numel(), dtype=bounds.dtype, device=bounds.device)
    return torch.cat([bounds, end]).to(torch.int32)


def document_spans(position_ids: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Each token's document as (start, end) int32 (B, S) indices within its row (end: one past
    its last token), for the triton kernel. Device-side, no host sync."""
    new = _document_starts(position_ids, batch)
    seq = new.shape[1]
    idx = torch.arange(seq, device=new.device, dtype=torch.int32).expand_as(new)
    start = torch.where(new, idx, 0).cummax(-1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx + 1, seq).flip(-1).cummin(-1).values.flip(-1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


# The last packed batch's documents: (position_ids, its version, batch, {form: documents}).
_last_documents: tuple[Tensor, int, int, dict] | None = None


def _documents(position_ids: Tensor, batch: int, form: str, compute):
    """`compute(position_ids, batch)`, memoised: every attention layer of a step, forward and
    backward, gets the same position_ids tensor, so its documents are found once and reused while
    it is that same tensor, unchanged in place."""
    global _last_documents
    last = _last_documents
    if not (last is not None and last[0] is position_ids and last[1] == version(position_ids)
            and last[2] == batch):
        last = _last_documents = (position_ids, version(position_ids), batch, {})
    if form not in last[3]:
        last[3][form] = compute(position_ids, batch)
    return last[3][form]


def _cu_seqlens(position_ids: Tensor | None, batch: int, seq: int, device: torch.device
                ) -> Tensor:
    """`document_bounds` for the flash kernel (a host sync, once per position_ids tensor). Rows
    without position_ids are one document each: their bounds need no sync."""
    if position_ids is None:
        return torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
    return _documents(position_ids, batch, "cu_seqlens", document_bounds)


def _spans(position_ids: Tensor | None, batch: int) -> tuple[Tensor, Tensor] | None:
    """`document_spans` for the triton kernel (no host sync), once per position_ids tensor; None
    for rows that are one document each."""
    if position_ids is None:
        return None
    return _documents(position_ids, batch, "spans", document_spans)


def _token_major(x: Tensor) -> Tensor:
    """(B, H, S, D) laid out as (B, S, H, D) in memory: a view when it already is."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _forward(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None, scale: float,
             window: int, softcap: float, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    b, hq, s, d = q.shape
    name = kernel(q, position_ids is not None, window, softcap, sinks is not None)
    if name == "reference":
        out, lse = reference.attention(q, k, v, position_ids, scale, window, softcap, sinks)
        return _token_major(out), lse.reshape(-1)
    if name == "triton":
        return attention_triton.forward(q, k, v, _spans(position_ids, b), scale, window,
                                        softcap, sinks=sinks)
    if name == "cudnn":
        out, lse = cudnn_attention_forward(_token_major(q), _token_major(k), _token_major(v),
                                           scale)
        return _token_major(out), lse.reshape(-1)
    cu = _cu_seqlens(position_ids, b, s, q.device)
    out, lse = flash_attention_forward(
        q.transpose(1, 2).reshape(b * s, hq, d),
        k.transpose(1, 2).reshape(b * s, k.shape[1], d),
        v.transpose(1, 2).reshape(b * s, k.shape[1], d),
        cu, s, scale, window,
    )
    return out.view(b, s, hq, d).transpose(1, 2), lse.reshape(-1)


@torch.library.custom_op("chronicals::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None, scale: float,
                  window: int, softcap: float = 0.0, sinks: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, position_ids, window, softcap, sinks)
    return _forward(q, k, v, position_ids, scale, window, softcap, sinks)


@_attention_op.register_fake
def _attention_fake(q, k, v, position_ids, scale, window, softcap=0.0, sinks=None):
    b, hq, s, _d = q.shape
    return empty_token_major(q), q.new_empty((b * hq * s,), dtype=torch.float32)


@torch.library.custom_op("chronicals::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, position_ids: Tensor | None, scale: float, window: int,
                           softcap: float = 0.0, sinks: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and the sinks' gradient (an empty tensor without sinks)."""
    dq, dk, dv, dsinks = _backward_grads(dout, q, k, v, out, lse, position_ids, scale, window,
                                         softcap, sinks)
    return dq, dk, dv, q.new_empty((0,), dtype=torch.float32) if dsinks is None else dsinks


def _backward_grads(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    position_ids: Tensor | None, scale: float, window: int, softcap: float,
                    sinks: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and the sinks' gradient (None without sinks, which only the reference and
    the Triton kernel take)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    name = kernel(q, position_ids is not None, window, softcap, sinks is not None)
    if name == "reference":
        *grads, dsinks = reference.attention_backward(dout, q, k, v, position_ids, scale, window,
                                                      softcap, sinks)
        return (*(_token_major(g) for g in grads), dsinks)
    if name == "triton":
        return attention_triton.backward(dout, q, k, v, out, lse, _spans(position_ids, b),
                                         scale, window, softcap, sinks=sinks)
    if name == "cudnn":
        grads = cudnn_attention_backward(
            _token_major(dout), _token_major(q), _token_major(k), _token_major(v), out,
            lse.view(b, hq, s, 1), scale,
        )
        return (*(_token_major(g) for g in grads), None)
    cu = _cu_seqlens(position_ids, b, s, q.device)
    dq, dk, dv = flash_attention_backward(
        dout.transpose(1, 2).reshape(b * s, hq, d),
        q.transpose(1, 2).reshape(b * s, hq, d),
        k.transpose(1, 2).reshape(b * s, hk, d),
        v.transpose(1, 2).reshape(b * s, hk, d),
        out.transpose(1, 2).reshape(b * s, hq, d),
        lse.view(hq, b * s), cu, s, scale, window,
    )
    return (dq.view(b, s, hq, d).transpose(1, 2), dk.view(b, s, hk, d).transpose(1, 2),
            dv.view(b, s, hk, d).transpose(1, 2), None)


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, position_ids, scale, window, softcap=0.0,
                             sinks=None):
    dsinks = (q.new_empty((0,), dtype=torch.float32) if sinks is None
              else torch.empty_like(sinks, memory_format=torch.contiguous_format))
    return empty_token_major(q), empty_token_major(k), empty_token_major(v), dsinks


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, position_ids, scale, window, softcap, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, position_ids, sinks)
    ctx.scale, ctx.window, ctx.softcap = scale, window, softcap
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Tensor | None, _dlse: Tensor | None):
    q, k, v, out, lse, position_ids, sinks = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None
    dq, dk, dv, dsinks = _attention_backward_op(dout, q, k, v, out, lse, position_ids, ctx.scale,
                                                ctx.window, ctx.softcap, sinks)
    return dq, dk, dv, None, None, None, None, dsinks if sinks is not None else None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None = None, *,
              scale: float | None = None, window: int | None = None,
              softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Causal attention within the documents of each row; see the module docstring.

    q (B, Hq, S, D), k and v (B, Hk, S, D) with Hq a multiple of Hk; position_ids (B, S) or
    (1, S) integers, or None for one document per row; scale defaults to 1/sqrt(D); window w: a
    token sees the w most recent tokens of its document, itself included (transformers'
    `sliding_window`); softcap c: scores become c * tanh(scores / c) before the softmax
    (Gemma-2's `attn_logit_softcapping`); sinks (Hq,): each head's sink logit (gpt-oss's
    `sinks`), which joins every query's softmax and attends to nothing. Returns (B, Hq, S, D) in
    q's dtype, laid out as (B, S, Hq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None. Got {window}.")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"attention: softcap must be > 0 or None. Got {softcap}.")
    return _attention_op(q, k, v, position_ids, scale, window or 0, float(softcap or 0.0),
                         sinks)[0]
