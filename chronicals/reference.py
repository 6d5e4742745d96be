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
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` (logits upcast to fp32) against `labels`.

    hidden: (..., H), weight: (V, H), labels: hidden.shape[:-1]. With `shift`, position t is scored
    against label t + 1 along the last label dimension and the last position is ignored (HF's
    causal-LM loss). `softcap` applies `c * tanh(logits / c)` (Gemma-2). `z_loss` adds
    `z_loss * logsumexp^2` per valid token. `reduction="mean"` divides by the number of valid tokens
    (0 when there are none, never NaN), or by `num_items_in_batch` when given; `"none"` returns one
    loss per token (0 where ignored), shaped like labels.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}. Got {reduction!r}.")
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    out_shape = labels.shape
    # fp32 logits for bf16/fp16/fp32 as HF computes them; fp64 inputs stay fp64 (test truths).
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
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
