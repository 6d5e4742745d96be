"""What both paths of `linear_cross_entropy` share (`linear_cross_entropy.py`, the forward and
backward over the whole vocabulary; `linear_cross_entropy_frozen.py`, the frozen head's forward
that computes hidden's gradient): the Triton helpers for a token's label, its logits and its loss,
and on the host the kernels' operands, the reduction and the gradient accumulation."""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from chronicals.ops._launch import as_rows

# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # No tanh in tl.math (and libdevice does not run in the interpreter). The series keeps full
    # fp32 precision near 0, where (1 - e) / (1 + e) would lose it to cancellation.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    t = tl.where(a < 0.1, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_labels(
    labels_ptr, rows, row_mask, seq_len, stride_labels_b, stride_labels_s, ignore_index, V,
    SHIFT: tl.constexpr,
):
    """Label of each token row as (label or -1, valid, out_of_range). Token n sits at (b, s) of
    labels viewed as [B, seq_len]; with SHIFT it is scored against (b, s + 1), the last position
    of each row against nothing."""
    b = rows // seq_len
    s = rows % seq_len
    if SHIFT:
        s = s + 1
        row_mask = row_mask & (s < seq_len)
    offs = b.to(tl.int64) * stride_labels_b + s.to(tl.int64) * stride_labels_s
    label = tl.load(labels_ptr + offs, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    bad = valid & ((label < 0) | (label >= V))
    # int32 for the per-element compare against vocab columns; -1 never matches a column.
    label32 = tl.where(valid & ~bad, label, -1).to(tl.int32)
    return label32, valid, bad


@triton.jit
def _logits(acc, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Logits from h W^T: times the logit scale, then softcapped."""
    if HAS_SCALE:
        acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _token_loss(lse, target, total, valid, bad, z_loss, label_smoothing, V: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """A token's loss from its lse, label logit and (smoothing) sum of logits: 0 where ignored,
    NaN where the label is out of range."""
    loss = lse - target
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - total / V)
    if HAS_Z:
        loss += z_loss * lse * lse
    return tl.where(bad, float("nan"), tl.where(valid, loss, 0.0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LossOptions:
    """What the loss computes beside CE(hidden @ weight.T, labels), as `linear_cross_entropy`
    takes it (semantics: `chronicals.reference.linear_cross_entropy`). The custom ops carry these
    fields as scalar arguments of the same names (a custom op's schema takes no dataclass); the
    launchers take them as one value."""

    ignore_index: int = -100
    reduction: str = "mean"
    shift: bool = False
    softcap: float | None = None
    logit_scale: float | None = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0

    def reference_kwargs(self, num_items) -> dict:
        """Keyword arguments of `chronicals.reference.linear_cross_entropy`."""
        return {**dataclasses.asdict(self), "num_items_in_batch": num_items}


def _or_one(option: float | None) -> float:
    """A kernel's float argument for an optional scale (ignored by the kernel when None)."""
    return 1.0 if option is None else float(option)


def _labels_2d(labels: Tensor) -> Tensor:
    """labels as [B, S] (S = the dim `shift` works along); a view whenever reshape can give one."""
    if labels.dim() == 1:
        return labels.unsqueeze(0)
    return labels.reshape(math.prod(labels.shape[:-1]), labels.shape[-1])  # no -1: S may be 0


def _reduce(
    token_loss: Tensor, labels2d: Tensor, out_shape: torch.Size, options: LossOptions, num_items,
) -> Tensor:
    if options.reduction == "none":
        return token_loss.view(out_shape)
    return token_loss.sum() / _divisor(labels2d, options, num_items)


def _token_weight(grad_loss: Tensor, labels2d: Tensor, options: LossOptions, num_items) -> Tensor:
    """d(returned loss) / d(loss_n): a 0-d fp32 tensor (same for every token) or [N] for 'none'."""
    grad = grad_loss.float()
    if options.reduction == "none":
        return grad.reshape(-1).contiguous()
    return grad / _divisor(labels2d, options, num_items)


def _divisor(labels2d: Tensor, options: LossOptions, num_items):
    """What the summed token losses are divided by: `num_items_in_batch` when given, else the
    number of scored tokens for 'mean' (at least 1: no NaN when all are ignored; counted on the
    device, no host sync), else 1 ('sum')."""
    if num_items is not None:
        return num_items
    if options.reduction == "sum":
        return 1
    scored = labels2d[:, 1:] if options.shift else labels2d
    return (scored != options.ignore_index).sum().clamp(min=1)


def _as_kernel_operands(hidden: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
    """hidden as [N, H] rows with a unit last-dim stride, weight contiguous, labels as [B, seq]
    (views where possible)."""
    return as_rows(hidden), weight.contiguous(), _labels_2d(labels)


def _accumulate_d_hidden(acc: Tensor, dlogits: Tensor, w_chunk: Tensor) -> None:
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits, w_chunk)
    elif acc.is_cuda:
        # bf16/fp16 operands, fp32 accumulator read and written by cuBLAS itself.
        torch.addmm(acc, dlogits, w_chunk, out_dtype=torch.float32, out=acc)
    else:
        # CPU has no mixed-dtype addmm; the upcasts are exact, so the result is the same.
        acc.addmm_(dlogits.float(), w_chunk.float())
