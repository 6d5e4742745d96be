"""Rotary position embedding for q and k in one launch (`torch.ops.chronicals.rope`).

Math (Hugging Face's `x * cos + rotate_half(x) * sin`, `chronicals.reference.rope`). For each
token t of batch row b and each head of q (Hq heads) and k (Hk heads, GQA allowed), with
R = cos.shape[-1] rotated channels, c = cos[b, t], s = sin[b, t], the R channels form R / 2 pairs
(x1, x2) at channels (j1, j2), and

    out[j1] = x1 * c[j1] - x2 * s[j1]
    out[j2] = x2 * c[j2] + x1 * s[j2]
    out[R:] = x[R:]                       (partial rotary, as Phi-3 and GLM; R == D is usual)

The layout says which channels pair up: "half" (Llama, Qwen, Phi-3) pairs i with i + R/2;
"interleaved" (GPT-J, GLM, Cohere) pairs 2i with 2i + 1, and cos/sin come in the same interleaved
order (HF repeats each pair's angle: `repeat_interleave(2, -1)`); "deinterleave" (DeepSeek-V3's
`rope_interleave`) reads the pairs (2i, 2i + 1) and writes them to (i, i + R/2), with cos/sin in
the rotate-half order: (j1, j2) = (2i, 2i + 1) on input, (i, i + R/2) on output.

cos/sin are given per token, (B or 1, S, R), so packed rows whose positions restart at each
document work unchanged: the op never assumes positions are `arange(S)`.

Backward is the transpose of that rotation (the same kernel with a BACKWARD flag):

    dx[j1] = g1 * c[j1] + g2 * s[j2]
    dx[j2] = g2 * c[j2] - g1 * s[j1]
    dx[R:] = g[R:]

(for "deinterleave", g is read at the output's channels and dx written at the input's).

which is the rotation by -sin when both channels of a pair share their angle, as HF builds them.
cos and sin get no gradient: HF computes them under no_grad from position ids, so the backward
returns None for them; do not pass cos/sin that need a gradient.

Numerics: q and k share one floating dtype (fp32, bf16 or fp16), cos and sin share one. HF casts
cos/sin to the hidden states' dtype, which is also q's unless torch.autocast runs the projections
in a lower one (an fp32 model under autocast to bf16: bf16 q, fp32 cos). The outputs then take
PyTorch's promoted dtype, as `q * cos` does, and the backward returns dq and dk in q's and k's
own dtype, as autograd does. Every element is loaded, upcast to fp32, rotated with fp32 products
and sums, and rounded once to the output dtype, so the result is at least as close to the exact
value as eager PyTorch's three separately rounded ops.

Layout: q and k are read through their strides (HF passes `view(B, S, H, D).transpose(1, 2)`
views, strides (S*H*D, D, H*D, 1)); only a last dimension with stride != 1 is copied first. The
outputs (and the backward's dq, dk) are (B, H, S, D) tensors stored token-major, i.e. allocated as
(B, S, H, D) and returned as `.transpose(1, 2)` views, whatever the input strides. That is the
layout HF's own `q * cos + rotate_half(q) * sin` returns for its inputs, so attention sees what it
sees without the fusion, and the gradients flow back into the q/k projections' `view` without a
copy. The fake tensors use the same rule, which is what Inductor asserts.

One program handles BLOCK_S tokens of one batch row: it loads their cos/sin once and applies them
to all Hq + Hk heads, BLOCK_H heads at a time. On an H200 (bf16, 16384 tokens, Qwen2.5-0.5B to
Llama-3.1-8B heads) forward and backward of the rotate-half layout each run at 87-99% of copy
bandwidth (benchmarks/bench_rope.py). The interleaved layouts load (and store) each head's pairs
as one contiguous [pairs, 2] tile split (joined) in registers, so they move the same bytes in the
same order; they have not been timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from chronicals import reference
from chronicals.ops._launch import (
    check_float,
    check_same_device,
    empty_token_major,
    next_power_of_2,
    use_triton,
)


@triton.jit
def _rotate_heads(
    x_rows,
    out_rows,
    stride_x_h,
    stride_out_h,
    mask_s,
    c1,
    c2,
    sa,
    sb,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    HAS_PASS: tl.constexpr,
    LOAD_PAIRS: tl.constexpr,
    STORE_PAIRS: tl.constexpr,
):
    """out1 = x1 * c1 + x2 * sa, out2 = x2 * c2 + x1 * sb for NUM_HEADS heads of BLOCK_S tokens.
    A pair (x1, x2) is read from channels (2i, 2i + 1) with LOAD_PAIRS, else (i, i + HALF); the
    result is written alike by STORE_PAIRS.

    x_rows / out_rows: [BLOCK_S, 1, 1] pointers to each token's head 0; c1, c2, sa, sb:
    [BLOCK_S, 1, BLOCK_HALF] fp32; mask_s: [BLOCK_S, 1, 1].
    """
    offs_c = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask_c = offs_c < HALF
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        offs_h = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        mask_h = mask_s & (offs_h < NUM_HEADS)
        mask = mask_h & mask_c
        x_heads = x_rows + offs_h * stride_x_h
        out_heads = out_rows + offs_h * stride_out_h
        # Pair i as channels (2i, 2i + 1): one contiguous [BLOCK_HALF, 2] tile per head, split
        # and joined in registers (two stride-2 accesses would not vectorise).
        offs_pair = 2 * offs_c[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
        mask_pair = mask[:, :, :, None]
        if LOAD_PAIRS:
            x = tl.load(x_heads[:, :, :, None] + offs_pair, mask=mask_pair, other=0.0)
            x1, x2 = tl.split(x.to(tl.float32))
        else:
            x1 = tl.load(x_heads + offs_c, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_heads + HALF + offs_c, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c1 + x2 * sa
        out2 = x2 * c2 + x1 * sb
        if STORE_PAIRS:
            out = tl.join(out1, out2).to(out_rows.dtype.element_ty)
            tl.store(out_heads[:, :, :, None] + offs_pair, out, mask=mask_pair)
        else:
            tl.store(out_heads + offs_c, out1.to(out_rows.dtype.element_ty), mask=mask)
            tl.store(out_heads + HALF + offs_c, out2.to(out_rows.dtype.element_ty), mask=mask)
        if HAS_PASS:
            # Channels 2*HALF..HEAD_DIM are not rotated (partial rotary): copied through.
            offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, None, :]
            mask_p = mask_h & (offs_p < HEAD_DIM)
            x_pass = tl.load(x_heads + offs_p, mask=mask_p, other=0.0)
            tl.store(out_heads + offs_p, x_pass, mask=mask_p)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    seq_len,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_q_out_b,
    stride_q_out_h,
    stride_q_out_s,
    stride_k_out_b,
    stride_k_out_h,
    stride_k_out_s,
    stride_cos_b,
    stride_cos_s,
    stride_sin_b,
    stride_sin_s,
    HEADS_Q: tl.constexpr,
    HEADS_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    HAS_PASS: tl.constexpr,
    LOAD_PAIRS: tl.constexpr,
    STORE_PAIRS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < seq_len
    # int64 token offsets: B * S * H * D passes 2**31 elements at long contexts.
    offs_s = offs_s.to(tl.int64)

    # cos/sin are read once per token and shared by all Hq + Hk heads.
    offs_c = tl.arange(0, BLOCK_HALF)
    mask_cs = mask_s[:, None] & (offs_c < HALF)[None, :]
    cos_rows = cos_ptr + pid_b * stride_cos_b + offs_s[:, None] * stride_cos_s
    sin_rows = sin_ptr + pid_b * stride_sin_b + offs_s[:, None] * stride_sin_s
    if LOAD_PAIRS and STORE_PAIRS:
        # "interleaved": pair i's cos/sin at channels (2i, 2i + 1), as the heads' pairs.
        offs_pair = 2 * offs_c[None, :, None] + tl.arange(0, 2)[None, None, :]
        mask_pair = mask_cs[:, :, None]
        cos = tl.load(cos_rows[:, :, None] + offs_pair, mask=mask_pair, other=0.0)
        sin = tl.load(sin_rows[:, :, None] + offs_pair, mask=mask_pair, other=0.0)
        c1, c2 = tl.split(cos.to(tl.float32))
        s1, s2 = tl.split(sin.to(tl.float32))
    else:
        c1 = tl.load(cos_rows + offs_c[None, :], mask=mask_cs, other=0.0).to(tl.float32)
        c2 = tl.load(cos_rows + HALF + offs_c[None, :], mask=mask_cs, other=0.0).to(tl.float32)
        s1 = tl.load(sin_rows + offs_c[None, :], mask=mask_cs, other=0.0).to(tl.float32)
        s2 = tl.load(sin_rows + HALF + offs_c[None, :], mask=mask_cs, other=0.0).to(tl.float32)
    c1 = c1[:, None, :]
    c2 = c2[:, None, :]
    s1 = s1[:, None, :]
    s2 = s2[:, None, :]
    if BACKWARD:
        # Transpose of the forward rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1.
        sa = s2
        sb = -s1
    else:
        sa = -s1
        sb = s2

    rows = offs_s[:, None, None]
    mask_rows = mask_s[:, None, None]
    _rotate_heads(
        q_ptr + pid_b * stride_q_b + rows * stride_q_s,
        q_out_ptr + pid_b * stride_q_out_b + rows * stride_q_out_s,
        stride_q_h, stride_q_out_h, mask_rows, c1, c2, sa, sb,
        HEADS_Q, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, HAS_PASS, LOAD_PAIRS,
        STORE_PAIRS,
    )
    _rotate_heads(
        k_ptr + pid_b * stride_k_b + rows * stride_k_s,
        k_out_ptr + pid_b * stride_k_out_b + rows * stride_k_out_s,
        stride_k_h, stride_k_out_h, mask_rows, c1, c2, sa, sb,
        HEADS_K, HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, HAS_PASS, LOAD_PAIRS,
        STORE_PAIRS,
    )


def _check_inputs(op: str, names: tuple[str, str], q: Tensor, k: Tensor, cos: Tensor,
                  sin: Tensor, layout: str) -> None:
    """Shape, dtype and device rules shared by the forward and backward ops and their fakes."""
    if layout not in reference.ROPE_LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {reference.ROPE_LAYOUTS}. Got {layout!r}.")
    nq, nk = names
    for name, t in ((nq, q), (nk, k)):
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D (batch, heads, seq, head_dim). Got shape "
                f"{tuple(t.shape)}."
            )
    (batch, hq, seq, head_dim), (kb, hk, ks, kd) = q.shape, k.shape
    if hq < 1 or hk < 1:
        raise ValueError(
            f"{op}: {nq} and {nk} must each have at least one head. Got {nq} {tuple(q.shape)} "
            f"and {nk} {tuple(k.shape)}."
        )
    if (kb, ks) != (batch, seq):
        raise ValueError(
            f"{op}: {nq} and {nk} must have the same batch and seq sizes. Got {nq} "
            f"{tuple(q.shape)} and {nk} {tuple(k.shape)}."
        )
    if kd != head_dim:
        raise ValueError(
            f"{op}: {nq} and {nk} must have the same head_dim. Got {head_dim} and {kd}."
        )
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even. Got {head_dim}.")
    if cos.shape != sin.shape:
        raise ValueError(
            f"{op}: cos and sin must have the same shape. Got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}."
        )
    if cos.dim() != 3:
        raise ValueError(
            f"{op}: cos/sin must be 3-D (batch or 1, seq, rotary_dim). Got shape "
            f"{tuple(cos.shape)}."
        )
    rot = cos.shape[-1]
    if rot <= 0 or rot % 2 or rot > head_dim:
        raise ValueError(
            f"{op}: rotary_dim (cos.shape[-1]) must be even and in [2, head_dim={head_dim}]. "
            f"Got {rot}."
        )
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq:
        raise ValueError(
            f"{op}: cos/sin must match {nq}'s positions: shape (1 or {batch}, {seq}, {rot}). "
            f"Got {tuple(cos.shape)}."
        )
    check_float(op, **{nq: q, "cos": cos})
    if k.dtype != q.dtype or sin.dtype != cos.dtype:
        raise TypeError(
            f"{op}: {nq} and {nk} must share one dtype, and cos and sin one. Got {nq} {q.dtype}, "
            f"{nk} {k.dtype}, cos {cos.dtype}, sin {sin.dtype}."
        )
    check_same_device(op, **{nq: q, nk: k, "cos": cos, "sin": sin})


def _token_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the output layout and dtype (the plain-PyTorch path; strides exactly the fake's)."""
    return empty_token_major(x, dtype).copy_(x)


def _launch_config(heads_q: int, heads_k: int, half: int) -> dict[str, int]:
    """Tokens per program, heads per inner step and warps.

    As few tokens per program as tiles of 1024 elements per half-head load allow, and up to 2048
    elements per load in heads. Measured on an H200 (bf16, 16384 tokens, forward, Qwen2.5-0.5B /
    Llama-3.2-1B / Llama-3.1-8B heads, 30 configs each): the best were 1-2 tokens x 8-32 heads
    with 4 warps, at 90-97% of copy bandwidth; 8-16 tokens x 16-32 heads ran up to 1.4x slower.
    At Llama-3.1-8B's 32 query heads of 128, all 32 in one step took 89.0 us against 91.0 us in
    two steps of 16 (torch.compile: 88.9 us).
    """
    block_half = next_power_of_2(half)
    block_s = max(1, min(16, 1024 // (block_half * next_power_of_2(max(heads_q, heads_k)))))
    cap = max(1, 2048 // (block_s * block_half))
    return {
        "BLOCK_S": block_s,
        "BLOCK_HQ": min(next_power_of_2(heads_q), cap),
        "BLOCK_HK": min(next_power_of_2(heads_k), cap),
        "BLOCK_HALF": block_half,
        "num_warps": 4,
    }


def _rope_launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, backward: bool,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # The kernel needs unit stride only in the last dim; other strides are passed through.
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_out, k_out = empty_token_major(q, out_dtype), empty_token_major(k, out_dtype)
    batch, heads_q, seq, head_dim = q.shape
    heads_k = k.shape[1]
    rot = cos.shape[-1]
    if batch * seq == 0:
        return q_out, k_out
    config = _launch_config(heads_q, heads_k, rot // 2)
    # Batch stride 0 broadcasts cos/sin of shape (1, S, R) over the batch.
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_b = sin.stride(0) if sin.shape[0] > 1 else 0
    grid = (triton.cdiv(seq, config["BLOCK_S"]), batch)
    _rope_kernel[grid](
        q, k, cos, sin, q_out, k_out, seq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos_b, cos.stride(1), sin_b, sin.stride(1),
        HEADS_Q=heads_q,
        HEADS_K=heads_k,
        HEAD_DIM=head_dim,
        HALF=rot // 2,
        BLOCK_PASS=next_power_of_2(max(head_dim - rot, 1)),
        HAS_PASS=rot < head_dim,
        # "deinterleave" reads pairs and writes halves; its backward reads halves, writes pairs.
        LOAD_PAIRS=layout == "interleaved" or (layout == "deinterleave" and not backward),
        STORE_PAIRS=layout == "interleaved" or (layout == "deinterleave" and backward),
        BACKWARD=backward,
        **config,
    )
    return q_out, k_out


def _out_dtype(q: Tensor, cos: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, cos.dtype)


def _rope_backward_reference(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, layout: str
                             ) -> tuple[Tensor, Tensor]:
    """Plain PyTorch transpose of `reference.rope`: g * cos - rotate(g * sin), as the transpose
    of either rotate is its negation; "deinterleave" then interleaves the pairs back."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotate = reference.rotate_pairs if layout == "interleaved" else reference.rotate_half

    def apply(g: Tensor) -> Tensor:
        g_rot, g_pass = g[..., :rot], g[..., rot:]
        out = g_rot * cos - rotate(g_rot * sin)
        if layout == "deinterleave":
            out = torch.stack((out[..., : rot // 2], out[..., rot // 2 :]), dim=-1).flatten(-2)
        return torch.cat((out, g_pass), dim=-1) if g_pass.shape[-1] else out

    return apply(dq), apply(dk)


@torch.library.custom_op("chronicals::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "half"
             ) -> tuple[Tensor, Tensor]:
    _check_inputs("rope", ("q", "k"), q, k, cos, sin, layout)
    if use_triton(q):
        return _rope_launch(q, k, cos, sin, layout, backward=False, out_dtype=_out_dtype(q, cos))
    q_out, k_out = reference.rope(q, k, cos, sin, layout)
    return _token_major(q_out, q_out.dtype), _token_major(k_out, k_out.dtype)


@_rope_op.register_fake
def _rope_fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "half"
               ) -> tuple[Tensor, Tensor]:
    _check_inputs("rope", ("q", "k"), q, k, cos, sin, layout)
    dtype = _out_dtype(q, cos)
    return empty_token_major(q, dtype), empty_token_major(k, dtype)


@torch.library.custom_op("chronicals::rope_backward", mutates_args=())
def _rope_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype,
                      layout: str = "half") -> tuple[Tensor, Tensor]:
    """(d q, d k) in `dtype`, the forward's q/k dtype, from the outputs' gradients."""
    _check_inputs("rope_backward", ("dq", "dk"), dq, dk, cos, sin, layout)
    if use_triton(dq):
        return _rope_launch(dq, dk, cos, sin, layout, backward=True, out_dtype=dtype)
    dq_in, dk_in = _rope_backward_reference(dq, dk, cos, sin, layout)
    return _token_major(dq_in, dtype), _token_major(dk_in, dtype)


@_rope_backward_op.register_fake
def _rope_backward_fake(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype,
                        layout: str = "half") -> tuple[Tensor, Tensor]:
    _check_inputs("rope_backward", ("dq", "dk"), dq, dk, cos, sin, layout)
    return empty_token_major(dq, dtype), empty_token_major(dk, dtype)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, _, cos, sin, layout = inputs
    ctx.dtype = q.dtype
    ctx.layout = layout
    if cos.requires_grad or sin.requires_grad:
        # Refused rather than silently returning no gradient for them.
        raise ValueError(
            "rope: cos and sin require grad, but rope computes gradients for q and k only (HF "
            "builds cos/sin from position ids without one). Detach them, or use "
            "chronicals.reference.rope to differentiate through them; under "
            "torch.compile(backend='chronicals'), leave 'rope' out of options['fusions']."
        )
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq: Tensor, dk: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = _rope_backward_op(dq, dk, cos, sin, ctx.dtype, ctx.layout)
    # No gradient for cos/sin: HF computes them from position ids under no_grad.
    return dq_in, dk_in, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "half"
         ) -> tuple[Tensor, Tensor]:
    """Rotate q and k by per-token cos/sin, `x * cos + rotate(x) * sin`, in one kernel launch.

    q: (B, Hq, S, D), k: (B, Hk, S, D) (any strides with a unit last-dim stride, e.g. HF's
    `view(B, S, H, D).transpose(1, 2)`), cos, sin: (B or 1, S, R) with R even, R <= D; channels
    R.. pass through. `layout`: "half" is HF's rotate-half (channel i pairs with i + R/2,
    Llama); "interleaved" the GPT-J layout (channel 2i pairs with 2i + 1, cos/sin interleaved
    alike, as GLM and Cohere build them); "deinterleave" reads pairs (2i, 2i + 1) and writes
    them to (i, i + R/2), cos/sin in the rotate-half order (DeepSeek-V3's `rope_interleave`).
    q and k share one dtype (fp32, bf16 or fp16), cos and sin one, all four one device. Returns
    (q_rotated, k_rotated), shaped like q and k in the dtype of `q * cos`, stored token-major
    (strides (S*H*D, D, H*D, 1)).
    Differentiable in q and k; cos and sin must not require grad (a ValueError says so).
    """
    return torch.ops.chronicals.rope(q, k, cos, sin, layout)
