"""Plain PyTorch definitions of every Chronicals op.

Each function here is the numerics oracle for its fused op (`chronicals/ops/<op>.py`) and the
implementation the ops use on CPU when the Triton interpreter is off. They reproduce the arithmetic
of Hugging Face `transformers` (cast order included), so a fused op can be checked against the
model code it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm over the last dimension, x: (..., H), weight: (H,).

    Statistics in fp32. Llama-style (`gemma=False`): normalise in fp32, cast to x's dtype, then
    multiply by `weight` in the promoted dtype. Gemma-style (`gemma=True`): multiply by
    `(1 + weight)` in fp32, then cast to x's dtype.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) * up`, elementwise, in the inputs' dtype."""
    return F.silu(gate) * up


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """`gelu_tanh(gate) * up` (Gemma's MLP), elementwise, in the inputs' dtype."""
    return F.gelu(gate, approximate="tanh") * up


def attention_mask(position_ids: Tensor | None, batch: int, seq: int, window: int,
                   device: torch.device) -> Tensor:
    """(B, 1, S, S) bool: key j is visible to query i when j <= i, both are in one document (a
    maximal run of consecutive position_ids; one per row without them) and i - j < window (if
    window > 0)."""
    idx = torch.arange(seq, device=device)
    if position_ids is None:
        doc = torch.zeros(batch, seq, dtype=torch.long, device=device)
    else:
        pos = position_ids.expand(batch, -1)
        doc = torch.zeros_like(pos)
        doc[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).cumsum(-1)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (idx[:, None] >= idx[None, :])
    if window:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    return allowed[:, None]


def _attention_scores(q: Tensor, k: Tensor, scale: float, softcap: float) -> Tensor:
    """scale * q k^T, soft-capped to softcap * tanh(. / softcap) when softcap > 0 (Gemma-2)."""
    scores = q @ k.transpose(-1, -2) * scale
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None, scale: float,
              window: int, softcap: float = 0.0, sinks: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """Causal attention within documents (chronicals/ops/attention.py): output (B, Hq, S, D) in
    q's dtype and the fp32 log-sum-exp of the scaled, soft-capped, masked scores (B, Hq, S).
    Scores and softmax in fp32; K/V heads shared by Hq / Hk query heads. `sinks` (Hq,): each
    head's sink logit joins every query's softmax and attends to nothing (gpt-oss): the
    log-sum-exp includes it."""
    p, lse, _scores, _kf, vf = _attention_probs(q, k, v, position_ids, scale, window, softcap,
                                                sinks)
    return (p @ vf).to(q.dtype), lse


def _attention_probs(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor | None,
                     scale: float, window: int, softcap: float, sinks: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fp32 probabilities P (B, Hq, S, S) (a row sums to 1 less its sink's share), the
    log-sum-exp (B, Hq, S), the scaled and soft-capped scores before the mask, and K and V with
    their heads repeated per query head."""
    b, hq, s, _ = q.shape
    group = hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = _attention_scores(q.float(), kf, scale, softcap)
    mask = attention_mask(position_ids, b, s, window, q.device)
    masked = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(1, hq, 1))
    return torch.exp(masked - lse[..., None]), lse, scores, kf, vf


def attention_sinks_grad(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """The sink logits' gradient, in their dtype: a sink has no value, so its logit gets -sum
    over batch and queries of its probability exp(sink - lse) times delta = rowsum(dO * O); lse
    (the sinks included) and delta fp32 (B, Hq, S)."""
    p_sink = torch.exp(sinks.float().view(1, -1, 1) - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       position_ids: Tensor | None, scale: float, window: int,
                       softcap: float = 0.0, sinks: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of `attention`'s output for q, k, v (each in its input's dtype) and the sinks
    (in theirs; None without), in fp32: dV = P^T dO, dS = P * (dO V^T - delta) with delta =
    rowsum(dO * O), times the softcap's derivative 1 - (S / softcap)^2 when capped, dQ = scale dS
    K, dK = scale dS^T Q, with the query heads of a group summed into their shared K/V head; a
    sink's logit gets -sum over queries of its probability times delta (it has no value)."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    qf, dof = q.float(), dout.float()
    p, lse, scores, kr, vr = _attention_probs(q, k, v, position_ids, scale, window, softcap,
                                              sinks)
    out = p @ vr
    delta = (dof * out).sum(-1, keepdim=True)
    dv = (p.transpose(-1, -2) @ dof).view(b, hk, group, s, d).sum(2)
    ds = p * (dof @ vr.transpose(-1, -2) - delta)
    if softcap:
        ds = ds * (1 - (scores / softcap) ** 2)
    dq = (ds @ kr) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).view(b, hk, group, s, d).sum(2)
    dsinks = None if sinks is None else attention_sinks_grad(sinks, lse, delta[..., 0])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: Tensor) -> Tensor:
    """The interleaved (GPT-J) layout's rotate_half: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2,
    ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


ROPE_LAYOUTS = ("half", "interleaved", "deinterleave")


def deinterleave(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): the pairs' first channels, then their
    second ones."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "half"
         ) -> tuple[Tensor, Tensor]:
    """Rotary embedding applied to q and k: `x * cos + rotate(x) * sin` on the rotated channels.

    q: (B, Hq, S, D), k: (B, Hk, S, D), cos/sin: (B, S, R) with R <= D even. The first R channels
    of each head are rotated; channels R.. pass through unchanged (partial rotary, as Phi-3 and
    GLM). `layout` says which channels pair up:
    - "half": i with i + R/2, `rotate_half` (Llama);
    - "interleaved": 2i with 2i + 1, `rotate_pairs`, cos/sin in the same interleaved order (GPT-J,
      GLM, Cohere);
    - "deinterleave": 2i with 2i + 1 on the way in, the result written in the rotate-half order
      (DeepSeek-V3's `rope_interleave`): "half" applied to `deinterleave(x)`.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope: layout must be one of {ROPE_LAYOUTS}. Got {layout!r}.")
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotate = rotate_pairs if layout == "interleaved" else rotate_half

    def apply(x: Tensor) -> Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        if layout == "deinterleave":
            x_rot = deinterleave(x_rot)
        out = x_rot * cos + rotate(x_rot) * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return apply(q), apply(k)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` (logits upcast to fp32) against `labels`.

    hidden: (..., H), weight: (V, H), labels: hidden.shape[:-1]. With `shift`, position t is scored
    against label t + 1 along the last label dimension and the last position is ignored (HF's
    causal-LM loss). `logit_scale` multiplies the logits (Cohere multiplies by its `logit_scale`,
    Granite divides by `logits_scaling`), before `softcap` applies `c * tanh(logits / c)`
    (Gemma-2). `z_loss` adds `z_loss * logsumexp^2` per valid token. `reduction="mean"` divides
    by the number of valid tokens (0 when there are none, never NaN), or by `num_items_in_batch`
    when given; `"none"` returns one loss per token (0 where ignored), shaped like labels.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}. Got {reduction!r}.")
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    out_shape = labels.shape
    # fp32 logits for bf16/fp16/fp32 as HF computes them; fp64 inputs stay fp64 (test truths).
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, safe[:, None]).squeeze(1)
    if label_smoothing:
        smooth = lse - logits.mean(dim=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss:
        nll = nll + z_loss * lse.square()
    loss = torch.where(valid, nll, 0.0)
    if reduction == "none":
        return loss.view(out_shape)
    total = loss.sum()
    if isinstance(num_items_in_batch, Tensor):
        return total / num_items_in_batch.reshape(())  # one element: a 0-d loss, as the op gives
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
