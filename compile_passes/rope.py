"""Rotary embedding applied to q and k -> one `chronicals::rope`.

transformers 5.17 and newer compute cos/sin in different ways but apply them identically
(`apply_rotary_pos_emb`: unsqueeze cos/sin on the head axis, `x * cos + rotate_half(x) * sin`
for q and k); the pattern is that application, with q and k as one match so one launch rotates
both. Phi-3 spells it with a `[..., :rotary_dim]` split and a concatenation of the pass-through
channels; that spelling has its own pattern. The head_dim literals inside the slices are checked
against the real shapes when a match is validated, so every head_dim matches.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import Node

from chronicals.ops import rope as ops
from compile_passes import _torch_api
from compile_passes.fusion import FLOAT_DTYPES, Fusion, register_pattern, reject

aten = torch.ops.aten


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope_pattern_hf(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


def _rope_pattern_phi3(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def _rope_replacement(q, k, cos, sin):
    return ops.rope(q, k, cos, sin)


def _extra_check(match) -> bool:
    outputs = _torch_api.match_outputs(match)
    if len(set(outputs)) != len(outputs):
        # The matcher can bind both halves of the (q, k) pattern to one tensor's subgraph when the
        # other half differs from the pattern (seen on torch 2.13: q's rotate_half split elsewhere).
        return reject(match, "q and k matched the same subgraph")
    q, k, cos, sin = (_torch_api.match_value(match, n) for n in ("q", "k", "cos", "sin"))
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return reject(match, f"ranks q {q.dim()}, k {k.dim()}, cos {cos.dim()} (need 4, 4, 3)")
    # cos/sin may be wider than q/k (autocast's bf16 projections, fp32 cos/sin): the op promotes
    # as the graph's `q * cos` does.
    paired = (k.dtype, sin.dtype) == (q.dtype, cos.dtype)
    if not paired or not {q.dtype, cos.dtype} <= set(FLOAT_DTYPES):
        return reject(match, f"dtypes q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype}")
    if cos.shape != sin.shape:
        return reject(match, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    batch, _, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        return reject(match, f"q {tuple(q.shape)} and k {tuple(k.shape)} do not pair")
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq:
        return reject(match, f"cos {tuple(cos.shape)} does not give one row per token of q")
    rot = cos.shape[-1]
    if rot % 2 or rot > head_dim or head_dim % 2:
        return reject(match, f"rotary dim {rot} with head_dim {head_dim} (need even, <=)")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return reject(match, "q/k last dimension is not contiguous")
    return True


@functools.cache
def _example_inputs(dtype: torch.dtype) -> list:
    return [
        torch.empty(2, 4, 8, 16, dtype=dtype),
        torch.empty(2, 2, 8, 16, dtype=dtype),
        torch.empty(2, 8, 16, dtype=dtype),
        torch.empty(2, 8, 16, dtype=dtype),
    ]


def register(pattern_pass) -> None:
    for dtype in FLOAT_DTYPES:
        for search in (_rope_pattern_hf, _rope_pattern_phi3):
            register_pattern(
                search,
                _rope_replacement,
                _example_inputs(dtype),
                pattern_pass,
                extra_check=_extra_check,
            )


def _is_candidate(node: Node) -> bool:
    """`cat((-x2, x1), -1)`: rotate_half, the mark of a rotary embedding."""
    if node.op != "call_function" or node.target is not aten.cat.default:
        return False
    parts = node.args[0]
    return len(parts) == 2 and getattr(parts[0], "target", None) is aten.neg.default


def _diagnose(node: Node) -> str:
    return (
        "rotate_half is not applied as apply_rotary_pos_emb does for a (q, k) pair "
        "(x * cos + rotate_half(x) * sin on both, sharing cos/sin)"
    )


FUSION = Fusion(
    name="rope",
    register=register,
    fused_ops=lambda: (torch.ops.chronicals.rope.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
)
