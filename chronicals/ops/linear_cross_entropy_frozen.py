"""The frozen-head path of `linear_cross_entropy` (LoRA's LM head): hidden's gradient computed in
the forward.

Taken for a frozen weight, a scalar loss, bf16/fp32 and not softcap with label smoothing together
(`takes_frozen_head_path`): the forward computes d loss / d hidden for an upstream gradient of 1
and saves it instead of its inputs; the backward scales it by the upstream gradient (`_scale_op`:
fp32, rounded once; doing it in place would save a copy, but AOTAutograd's partitioner rejects a
backward that mutates a saved tensor). d loss / d hidden = softmax(l) @ W - W_y is computed the
way attention's output is: per chunk of tokens, over blocks of vocab columns, cuBLAS writes the
block's logits in the input dtype (as eager's LM head does), `_lce_block_kernel` turns them into
exp(l - m) against each token's running max m (rescaling the token's accumulator when m grows),
cuBLAS adds block @ W[block] into an fp32 accumulator [tokens, H], and
`_lce_frozen_finish_kernel` divides by the sum of exps, subtracts the label's row (and the
options' terms) and rounds once. Two GEMMs instead of the other path's three, and nothing [N, V]:
block and accumulator take under 1% of the logits' bytes, or the kept gradient's if more
(`_frozen_blocks`). Timings against torch.compile: README.md, "Frozen head". fp16 keeps the other
path: its d_hidden for an upstream gradient of 1 would underflow before a loss scale reached it.

Numerics: the logits are rounded to the input dtype as eager rounds them; the accumulator, lse and
the token losses are fp32; d_hidden is rounded once, to the input dtype.

Memory beyond inputs and gradients: the logits block and accumulator (0.93% of the logits' bytes
or the kept gradient's, within 8-48 MiB), state of 16 bytes a token, and d_hidden, which the
forward keeps for the backward in place of hidden (one gradient-sized tensor, H / V of the
logits' bytes, until the backward has scaled it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from chronicals.ops._launch import cast_nearest, interpreter_on, next_power_of_2, use_triton
from chronicals.ops._lce_common import (
    LossOptions,
    _accumulate_d_hidden,
    _as_kernel_operands,
    _load_labels,
    _logits,
    _or_one,
    _reduce,
    _token_loss,
    _token_weight,
)

# Memory of the frozen-weight path (`_lce_fwd_d_hidden`), its logits block and fp32 accumulator
# together: 0.93% of what the logits [N, V] would take (with the per-token state and the
# allocator's rounding, under 1%; 0.95% picked a 9728-column block at 16k x 896 x 152k that
# cuBLAS ran 2-12% slower than 9472 or 10240 columns), or as much as the gradient [N, H] the path
# keeps from forward to backward anyway if that is more, within [8, 48] MiB; the accumulator
# [tokens, H] takes at most a third, for at most 2048 tokens
# (`benchmarks/tuning/sweep_lce_frozen_blocks.py`).
_FROZEN_SHARE_OF_LOGITS = 0.0093
_FROZEN_MIN_BYTES = 8 << 20
_FROZEN_MAX_BYTES = 48 << 20
_FROZEN_MAX_ROWS = 2048


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_logits(row, c0, cols, logit_scale, softcap, HAS_SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [c0, c0 + BLOCK) of a row of h W^T of `cols`: (offsets, in-range mask, fp32 logits
    (scaled, softcapped), 0 past the row)."""
    offs = c0 + tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, _logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _lce_block_kernel(
    block_ptr, acc_ptr, state_ptr, labels_ptr,
    row0, v0, cols, N, seq_len, stride_labels_b, stride_labels_s, ignore_index, logit_scale,
    softcap, V: tl.constexpr, H: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    SHIFT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    MAX_COLS: tl.constexpr,
):
    """Row r of a logits block (token row0 + r; vocab columns [v0, v0 + cols), contiguous rows,
    cols <= MAX_COLS: the loops run to that constexpr bound, which triton 3.6's interpreter needs):
    the token's running max m and sum s of exp(l - m), its label's logit and (smoothing) its sum
    of logits are updated in state[4, N]; exp(l - m) (times the softcap's derivative) is written
    over the row in place; where m grew, the token's fp32 accumulator row of exp(l - m) @ W is
    rescaled to the new max (set to 0 on the token's first block)."""
    r = tl.program_id(0)
    token = row0 + r
    row = block_ptr + r.to(tl.int64) * cols
    label, _, _ = _load_labels(
        labels_ptr, token, r >= 0, seq_len, stride_labels_b, stride_labels_s, ignore_index, V,
        SHIFT,
    )
    m_old = tl.load(state_ptr + token)
    block_max = tl.max(tl.full((BLOCK,), float("-inf"), dtype=tl.float32), axis=0)
    target = tl.zeros((BLOCK,), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, MAX_COLS, BLOCK):
        offs, mask, x = _row_logits(row, c0, cols, logit_scale, softcap, HAS_SCALE,
                                      HAS_SOFTCAP, BLOCK)
        block_max = tl.maximum(block_max, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        target += tl.where(mask & (v0 + offs == label), x, 0.0)
        if HAS_SMOOTHING:
            total += tl.where(mask, x, 0.0)
    m = tl.maximum(m_old, block_max)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, MAX_COLS, BLOCK):
        offs, mask, x = _row_logits(row, c0, cols, logit_scale, softcap, HAS_SCALE,
                                      HAS_SOFTCAP, BLOCK)
        p = tl.where(mask, tl.exp(x - m), 0.0)
        s += p
        if HAS_SOFTCAP:
            capped = x / softcap
            p = p * (1.0 - capped * capped)
        tl.store(row + offs, cast_nearest(p, block_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if m > m_old:
        acc_row = acc_ptr + r.to(tl.int64) * H
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            if m_old == float("-inf"):  # the token's first block: the accumulator is garbage
                tl.store(acc_row + offs_h, tl.zeros((BLOCK_H,), dtype=tl.float32), mask=mask_h)
            else:
                a = tl.load(acc_row + offs_h, mask=mask_h, other=0.0)
                tl.store(acc_row + offs_h, a * tl.exp(m_old - m), mask=mask_h)
    s_old = tl.load(state_ptr + N + token)
    tl.store(state_ptr + token, m)
    tl.store(state_ptr + N + token, s_old * tl.exp(m_old - m) + tl.sum(s, axis=0))
    tl.store(state_ptr + 2 * N + token, tl.load(state_ptr + 2 * N + token) + tl.sum(target, axis=0))
    if HAS_SMOOTHING:
        tl.store(state_ptr + 3 * N + token,
                 tl.load(state_ptr + 3 * N + token) + tl.sum(total, axis=0))


@triton.jit
def _lce_frozen_finish_kernel(
    acc_ptr, state_ptr, w_ptr, w_sum_ptr, labels_ptr, g_ptr, lse_ptr, loss_ptr, dh_ptr,
    row0, N, seq_len, stride_w_v, stride_labels_b, stride_labels_s, ignore_index,
    logit_scale, softcap, z_loss, label_smoothing,
    V: tl.constexpr, H: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, SHIFT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Token row0 + r after its last block: lse and loss from the state, and d loss / d hidden
    times g (the token's weight in the returned loss), rounded once:
    a g ((1 + 2 z lse) acc / s - (1 - eps) c'(l_y) W_y - eps / V sum_v W_v), a the logit scale,
    c' the softcap's derivative (1 without one; the smoothing term is only taken without a
    softcap)."""
    r = tl.program_id(0)
    token = row0 + r
    label, valid, bad = _load_labels(
        labels_ptr, token, r >= 0, seq_len, stride_labels_b, stride_labels_s, ignore_index, V,
        SHIFT,
    )
    m = tl.load(state_ptr + token)
    s = tl.load(state_ptr + N + token)
    target = tl.load(state_ptr + 2 * N + token)
    total = 0.0
    if HAS_SMOOTHING:
        total = tl.load(state_ptr + 3 * N + token)
    lse = m + tl.log(s)
    tl.device_assert(~bad, "linear_cross_entropy: label out of bounds [0, V)")
    tl.store(lse_ptr + token, lse)
    tl.store(loss_ptr + token, _token_loss(
        lse, target, total, valid, bad, z_loss, label_smoothing, V, HAS_Z, HAS_SMOOTHING,
    ))
    g = tl.load(g_ptr).to(tl.float32)
    g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
    if HAS_SCALE:
        g = g * logit_scale
    coef_p = g / s
    if HAS_Z:
        coef_p = coef_p * (1.0 + 2.0 * z_loss * lse)
    coef_y = g
    if HAS_SMOOTHING:
        coef_y = coef_y * (1.0 - label_smoothing)
    if HAS_SOFTCAP:
        capped = target / softcap
        coef_y = coef_y * (1.0 - capped * capped)
    acc_row = acc_ptr + r.to(tl.int64) * H
    # An ignored token's label reads row 0 (with coef_y = g = 0); an out-of-range one is NaN.
    w_row = w_ptr + tl.maximum(label, 0).to(tl.int64) * stride_w_v
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        dh = coef_p * tl.load(acc_row + offs_h, mask=mask_h, other=0.0)
        w_y = tl.load(w_row + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        dh -= coef_y * w_y
        if HAS_SMOOTHING:
            dh -= (g * label_smoothing / V) * tl.load(w_sum_ptr + offs_h, mask=mask_h, other=0.0)
        tl.store(dh_ptr + token.to(tl.int64) * H + offs_h,
                 cast_nearest(dh, dh_ptr.dtype.element_ty, INTERPRET), mask=mask_h)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, out_ptr, n, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y * tl.load(g_ptr).to(tl.float32)
    tl.store(out_ptr + offs, cast_nearest(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------------------------
# Block sizing and launcher
# ----------------------------------------------------------------------------------------------


def _frozen_blocks(N: int, H: int, V: int, element_size: int) -> tuple[int, int]:
    """(tokens, vocab columns) of the frozen-weight path's logits blocks. The fp32 accumulator
    [tokens, H] and the block [tokens, columns] share the budget; tokens are the largest power of
    two up to `_FROZEN_MAX_ROWS` whose accumulator takes at most a third of it (at most N),
    columns a multiple of 256 filling the rest. On an H200 long blocks won: cuBLAS's accumulate
    GEMM (K = columns) keeps its speed with few tokens, and fewer blocks mean fewer launches."""
    if interpreter_on():
        return max(1, min(N, 8)), min(V, 64)
    budget = max(int(_FROZEN_SHARE_OF_LOGITS * N * V * element_size), N * H * element_size)
    budget = min(max(budget, _FROZEN_MIN_BYTES), _FROZEN_MAX_BYTES)
    rows = 1
    while rows < _FROZEN_MAX_ROWS and 3 * 4 * (rows * 2) * H <= budget:
        rows *= 2
    rows = max(1, min(rows, N))  # no tokens: the loops over them run no step
    return rows, _frozen_cols(budget, rows, H, V, element_size)


def _frozen_cols(budget: int, rows: int, H: int, V: int, element_size: int) -> int:
    """Vocab columns of a block of `rows` tokens: what the budget leaves beside the fp32
    accumulator, a multiple of 256 (at least one, at most V rounded up)."""
    cols = (budget - 4 * rows * H) // (element_size * rows) // 256 * 256
    return max(256, min(cols, triton.cdiv(V, 256) * 256))


def _lce_fwd_d_hidden(
    hidden: Tensor, weight: Tensor, labels: Tensor, num_items, options: LossOptions, *,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse [N] fp32, d loss / d hidden) for a frozen weight, in one pass over the logits.

    d loss / d hidden = softmax(l) @ W - W_y (plus the options' terms) is computed as attention
    is: per chunk of tokens, over blocks of vocab columns, cuBLAS writes the block's logits (in
    the input dtype, as eager's LM head does), `_lce_block_kernel` turns them into exp(l - m)
    against each token's running max m (rescaling what was accumulated when m grows), and cuBLAS
    adds block @ W[block] into an fp32 accumulator. `_lce_frozen_finish_kernel` divides by the
    sum of exps, subtracts the label's row and rounds once. Two GEMMs and no [N, V] anything: the
    block and the accumulator stay within `_frozen_blocks`'s budget. `blocks`: (rows, cols)
    instead of `_frozen_blocks`'s (for benchmarks/tuning/sweep_lce_frozen_blocks.py)."""
    h2, weight, labels2d = _as_kernel_operands(hidden, weight, labels)
    (N, H), V = h2.shape, weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    lse = torch.empty(N, dtype=torch.float32, device=device)
    token_loss = torch.empty(N, dtype=torch.float32, device=device)
    d_hidden = torch.empty((N, H), dtype=dtype, device=device)
    g = _token_weight(torch.ones((), device=device), labels2d, options, num_items)
    rows, cols = blocks or _frozen_blocks(N, H, V, hidden.element_size())
    state = torch.zeros((4, N), dtype=torch.float32, device=device)  # m, s, label logit, sum
    state[0] = float("-inf")
    block = torch.empty(rows * cols, dtype=dtype, device=device)
    acc = torch.empty((rows, H), dtype=torch.float32, device=device)
    smoothing = options.label_smoothing != 0.0
    w_sum = weight.sum(0, dtype=torch.float32) if smoothing else acc  # acc: a pointer never read
    flags = dict(HAS_SCALE=options.logit_scale is not None,
                 HAS_SOFTCAP=options.softcap is not None, HAS_SMOOTHING=smoothing,
                 SHIFT=options.shift, INTERPRET=interpreter_on(),
                 BLOCK_H=min(next_power_of_2(H), 1024))
    # Loop-invariant launch arguments, made once: the loop's Python cost is per block.
    block_args = (N, labels2d.shape[1], labels2d.stride(0), labels2d.stride(1),
                  options.ignore_index, _or_one(options.logit_scale), _or_one(options.softcap))
    block_meta = dict(V=V, H=H, MAX_COLS=cols, **flags,
                      BLOCK=min(next_power_of_2(cols), 64 if interpreter_on() else 4096))
    for t0 in range(0, N, rows):
        n = min(rows, N - t0)
        for v0 in range(0, V, cols):
            c = min(cols, V - v0)
            blk = block[: n * c].view(n, c)
            w_blk = weight[v0 : v0 + c]
            torch.mm(h2[t0 : t0 + n], w_blk.t(), out=blk)
            _lce_block_kernel[(n,)](blk, acc, state, labels2d, t0, v0, c, *block_args,
                                    **block_meta, num_warps=8)
            _accumulate_d_hidden(acc[:n], blk, w_blk)
        _lce_frozen_finish_kernel[(n,)](
            acc, state, weight, w_sum, labels2d, g, lse, token_loss, d_hidden,
            t0, N, labels2d.shape[1], weight.stride(0), labels2d.stride(0), labels2d.stride(1),
            options.ignore_index, _or_one(options.logit_scale), _or_one(options.softcap),
            float(options.z_loss), float(options.label_smoothing),
            V=V, H=H, HAS_Z=options.z_loss != 0.0, **flags, num_warps=4,
        )
    loss = _reduce(token_loss, labels2d, labels.shape, options, num_items)
    return loss, lse, d_hidden.view(hidden.shape)


# ----------------------------------------------------------------------------------------------
# The backward's custom op, and when the path is taken
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("chronicals::linear_cross_entropy_scale", mutates_args=())
def _scale_op(d_hidden: Tensor, grad_loss: Tensor) -> Tensor:
    """d_hidden (the forward's gradient, for an upstream gradient of 1) times the upstream
    gradient, in fp32 and rounded once, without an fp32 copy of d_hidden (Triton path only: the
    forward computes d_hidden there alone)."""
    out = torch.empty_like(d_hidden)
    n = d_hidden.numel()
    block = 64 if interpreter_on() else 4096
    if n:
        _scale_kernel[(triton.cdiv(n, block),)](
            d_hidden, grad_loss, out, n, INTERPRET=interpreter_on(), BLOCK=block, num_warps=4,
        )
    return out


@_scale_op.register_fake
def _(d_hidden, grad_loss):
    return torch.empty_like(d_hidden)


def takes_frozen_head_path(
    hidden: Tensor, weight: Tensor, reduction: str, softcap: float | None = None,
    label_smoothing: float = 0.0,
) -> bool:
    """Whether the op computes d loss / d hidden in its forward: a backward will want hidden's
    gradient alone (grad mode on, hidden requires grad, weight does not: LoRA's frozen LM head)
    and `frozen_head_path_supports` allows it."""
    return (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and frozen_head_path_supports(hidden, reduction, softcap, label_smoothing)
    )


def frozen_head_path_supports(
    hidden: Tensor, reduction: str, softcap: float | None = None, label_smoothing: float = 0.0,
) -> bool:
    """A scalar loss (its upstream gradient is applied in the backward), bf16/fp32 (fp16's
    d_hidden for an upstream gradient of 1 would underflow before the loss scale reaches it), the
    Triton kernels (the reference path, plain PyTorch on CPU, computes gradients in the backward
    only), and not softcap with label smoothing together (the smoothing term would need a second
    GEMM through the softcap's derivative)."""
    return (
        reduction != "none" and hidden.dtype != torch.float16 and use_triton(hidden)
        and not (softcap is not None and label_smoothing != 0.0)
    )
