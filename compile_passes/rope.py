"""Rotary embedding applied to q and k -> one `chronicals::rope`.

transformers 5.17 and newer compute cos/sin in different ways but apply them identically
(`apply_rotary_pos_emb`: unsqueeze cos/sin on the head axis, `x * cos + rotate_half(x) * sin`
for q and k); the pattern is that application, with q and k as one match so one launch rotates
both. Phi-3 spells it with a `[..., :rotary_dim]` split and a concatenation of the pass-through
channels; that spelling has its own pattern. The literals in a pattern (slice bounds and steps,
the dims of stack, flatten and repeat_interleave) are checked against a trace of the pattern at
the real shapes when a match is validated, so every head_dim matches and nothing else does.

The interleaved (GPT-J) layout rotates channel pairs (2i, 2i + 1): its `rotate_half` is
`stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)`, and each family spells the rest its own
way (both in transformers 5.17 and 5.25):
- BLT, and Cohere, Cohere2 and Ergo around casts to fp32 and back: cos/sin built interleaved by
  the rotary embedding (`repeat_interleave(freqs, 2, -1)`) and applied as given;
- Helium, and Ernie 4.5 around casts to fp32: HF's `cat(freqs, freqs)` cos/sin, whose first half
  `repeat_interleave(2, -1)` makes interleaved inside the application;
- GLM and GLM-4: the same with partial rotary (the first rotary_dim channels rotated, the rest
  concatenated back).
DeepSeek-V3's `rope_interleave` (on by default; also DeepSeek-V3.2, GLM-4-MoE-Lite, GLM-MoE-DSA,
LongCat-Flash, Mistral4, Youtu) reads the pairs (2i, 2i + 1) of its rotary channels with the
first half of HF's cos/sin and writes the rotated pair to (i, i + R/2):
`cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)` with x1, x2 = x[..., 0::2], x[..., 1::2]; the
op's "deinterleave" layout.
GPT-OSS rotates the two halves in the rotate-half layout with cos/sin one angle per pair (width
head_dim / 2, no `cat(freqs, freqs)`): `cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)` with
x1, x2 = `chunk(x, 2, -1)`; the op's "half" layout with each angle given to both channels.
DeepSeek-V2 and Llama-4 rotate the pairs (2i, 2i + 1) as complex numbers: `view_as_complex` of
q in fp32, times `freqs_cis` (cos + i sin, one angle per pair), `view_as_real(...).flatten(3)`,
cast back to q's dtype; the op's "interleaved" layout with freqs_cis's real and imaginary parts
as cos and sin, each repeated for both channels of a pair. Llama-4 does it before the heads are
moved in front of the tokens (q is (B, S, H, D)); the op gets q and k transposed.
GPT-J and CodeGen are not fused: they rotate q and k each on its own (own unsqueeze and
repeat_interleave of cos/sin), so the two rotations of a layer share no node but the model-wide
cos/sin, and a (q, k) pattern binds one layer's q to whichever k the matcher finds first (on a
2-layer GPT-J, layer 2's q with layer 1's k: an invalid graph).
"""

from __future__ import annotations

import functools

import torch
from torch.fx import Node

from chronicals.ops import rope as ops
from compile_passes import _torch_api
from compile_passes.fusion import FLOAT_DTYPES, Fusion, register_pattern, reject, val

aten = torch.ops.aten


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _embed(q, k, cos, sin, rotate):
    """`x * cos + rotate(x) * sin` for q and k, as every family's apply_rotary_pos_emb ends."""
    return (q * cos) + (rotate(q) * sin), (k * cos) + (rotate(k) * sin)


def _rope_pattern_hf(q, k, cos, sin):
    return _embed(q, k, cos.unsqueeze(1), sin.unsqueeze(1), _rotate_half)


def _rope_pattern_phi3(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def _rotate_pairs(x):
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _pair_angles(t):
    """HF's `cat(freqs, freqs)` cos/sin made interleaved: each pair's angle twice in a row."""
    return t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1)


def _rope_pattern_blt(q, k, cos, sin):
    return _embed(q, k, cos.unsqueeze(1), sin.unsqueeze(1), _rotate_pairs)


def _rope_pattern_cohere(q, k, cos, sin):
    dtype = q.dtype
    q_embed, k_embed = _embed(q.float(), k.float(), cos.unsqueeze(1), sin.unsqueeze(1),
                              _rotate_pairs)
    return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)


def _rope_pattern_helium(q, k, cos, sin):
    cos = _pair_angles(cos.unsqueeze(1))
    sin = _pair_angles(sin.unsqueeze(1))
    return _embed(q, k, cos, sin, _rotate_pairs)


def _rope_pattern_ernie4_5(q, k, cos, sin):
    dtype = q.dtype
    cos = _pair_angles(cos.unsqueeze(1))
    sin = _pair_angles(sin.unsqueeze(1))
    q_embed = (q.float() * cos) + (_rotate_pairs(q).float() * sin)
    k_embed = (k.float() * cos) + (_rotate_pairs(k).float() * sin)
    return q_embed.to(dtype), k_embed.to(dtype)


def _rope_pattern_glm(q, k, cos, sin):
    cos = _pair_angles(cos.unsqueeze(1))
    sin = _pair_angles(sin.unsqueeze(1))
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed, k_embed = _embed(q_rot, k_rot, cos, sin, _rotate_pairs)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def _rope_pattern_deepseek_v3(q, k, cos, sin):
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
    k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return q_embed, k_embed


def _rope_pattern_gpt_oss(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def _as_complex(x):
    return torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))


def _rope_pattern_deepseek_v2(q, k, freqs_cis):
    freqs_cis = freqs_cis.unsqueeze(1)
    q_out = torch.view_as_real(_as_complex(q) * freqs_cis).flatten(3).type_as(q)
    k_out = torch.view_as_real(_as_complex(k) * freqs_cis).flatten(3).type_as(k)
    return q_out, k_out


def _rope_pattern_llama4(q, k, freqs_cis):
    q_out = torch.view_as_real(_as_complex(q) * freqs_cis[:, :, None, :]).flatten(3)
    k_out = torch.view_as_real(_as_complex(k) * freqs_cis[:, :, None, :]).flatten(3)
    return q_out.type_as(q), k_out.type_as(k)


def _rope_replacement(q, k, cos, sin):
    return ops.rope(q, k, cos, sin)


def _in_dtype_of(out: tuple, q, k) -> tuple:
    """The fused outputs cast back to q's and k's dtype, as the patterns that compute in fp32
    end (a no-op unless cos/sin are wider than q, as under autocast)."""
    q_out, k_out = out
    return q_out.to(q.dtype), k_out.to(k.dtype)


def _interleaved_replacement(q, k, cos, sin):
    return ops.rope(q, k, cos, sin, layout="interleaved")


def _cohere_replacement(q, k, cos, sin):
    return _in_dtype_of(ops.rope(q, k, cos, sin, layout="interleaved"), q, k)


def _pair_angles_replacement(q, k, cos, sin):
    return ops.rope(q, k, _pair_angles(cos), _pair_angles(sin), layout="interleaved")


def _ernie4_5_replacement(q, k, cos, sin):
    return _in_dtype_of(_pair_angles_replacement(q, k, cos, sin), q, k)


def _first_half_twice(t):
    """The first half of HF's `cat(freqs, freqs)` cos/sin in both halves, as DeepSeek-V3 uses
    it for both channels of a pair."""
    half = t[..., : t.shape[-1] // 2]
    return torch.cat((half, half), dim=-1)


def _deepseek_v3_replacement(q, k, cos, sin):
    return ops.rope(q, k, _first_half_twice(cos), _first_half_twice(sin), layout="deinterleave")


def _gpt_oss_replacement(q, k, cos, sin):
    return ops.rope(q, k, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))


def _complex_rope(q, k, freqs_cis):
    """The complex product as the op's interleaved layout, in fp32 as the patterns compute it,
    cast back to q's and k's dtype."""
    cos = freqs_cis.real.repeat_interleave(2, dim=-1)
    sin = freqs_cis.imag.repeat_interleave(2, dim=-1)
    return _in_dtype_of(ops.rope(q, k, cos, sin, layout="interleaved"), q, k)


def _deepseek_v2_replacement(q, k, freqs_cis):
    return _complex_rope(q, k, freqs_cis)


def _llama4_replacement(q, k, freqs_cis):
    q_out, k_out = _complex_rope(q.transpose(1, 2), k.transpose(1, 2), freqs_cis)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _extra_check_deepseek_v2(match) -> bool:
    """q and k as (B, H, S, D)."""
    return _check_complex(match, head_axis=1)


def _extra_check_llama4(match) -> bool:
    """q and k as (B, S, H, D)."""
    return _check_complex(match, head_axis=2)


def _check_complex(match, *, head_axis: int) -> bool:
    """freqs_cis holds one complex angle per pair of every channel of q and k (the op rotates
    them all); the operands are then checked as the op gets them."""
    q, k, freqs = (_torch_api.match_value(match, n) for n in ("q", "k", "freqs_cis"))
    if freqs.dtype != torch.complex64:
        return reject(match, f"freqs_cis is {freqs.dtype} (need complex64, as torch.polar of "
                             "fp32 angles gives)")
    if q.dim() != 4 or freqs.dim() != 3:
        return reject(match, f"ranks q {q.dim()}, freqs_cis {freqs.dim()} (need 4, 3)")
    if 2 * freqs.shape[-1] != q.shape[-1]:
        return reject(match, f"freqs_cis has {freqs.shape[-1]} angles for head_dim "
                             f"{q.shape[-1]} (need one per pair of channels)")
    if head_axis == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return _check_values(match, q, k, freqs.real, freqs.imag, rot=q.shape[-1], whole_head=True)


def _extra_check(match) -> bool:
    """cos/sin passed to the op as given: R = cos.shape[-1] channels rotated."""
    return _check_operands(match, pair_angles=False)


def _extra_check_pair_angles(match) -> bool:
    """HF's `cat(freqs, freqs)` cos/sin, whose first half is repeated: 2 * (R // 2) rotated."""
    return _check_operands(match, pair_angles=True)


def _extra_check_deepseek_v3(match) -> bool:
    """As `_extra_check_pair_angles`, and every channel of q and k rotated: a first half of width
    1 would broadcast one angle over all pairs, which the op does not compute."""
    return _check_operands(match, pair_angles=True, whole_head=True)


def _extra_check_gpt_oss(match) -> bool:
    """cos/sin with one angle per pair (R = 2 * cos.shape[-1]), and every channel of q and k
    rotated: `chunk` halves the whole head."""
    return _check_operands(match, pair_angles=False, whole_head=True, angle_per_pair=True)


def _check_operands(match, *, pair_angles: bool, whole_head: bool = False,
                    angle_per_pair: bool = False) -> bool:
    q, k, cos, sin = (_torch_api.match_value(match, n) for n in ("q", "k", "cos", "sin"))
    if angle_per_pair:
        rot = 2 * cos.shape[-1]
    else:
        rot = cos.shape[-1] // 2 * 2 if pair_angles else cos.shape[-1]
    return _check_values(match, q, k, cos, sin, rot=rot, whole_head=whole_head)


def _check_values(match, q, k, cos, sin, *, rot: int, whole_head: bool) -> bool:
    """q, k (B, H, S, D), cos and sin (B or 1, S, R') as the op gets them, rot channels rotated."""
    outputs = _torch_api.match_outputs(match)
    if len(set(outputs)) != len(outputs):
        # The matcher can bind both halves of the (q, k) pattern to one tensor's subgraph when the
        # other half differs from the pattern (seen on torch 2.13: q's rotate_half split elsewhere).
        return reject(match, "q and k matched the same subgraph")
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
    if rot < 2 or rot % 2 or rot > head_dim or head_dim % 2:
        return reject(match, f"rotary dim {rot} with head_dim {head_dim} (need even, <=)")
    if whole_head and rot != head_dim:
        return reject(match, f"rotary dim {rot} with head_dim {head_dim} (need equal)")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return reject(match, "q/k last dimension is not contiguous")
    for out in outputs:
        # The op returns token-major q/k. A view of an output the graph computed in another
        # layout (GPT-NeoX-Japanese: cat((rotated, pass)) then .view(B * H, S, D), its
        # .contiguous() gone from the trace as a no-op) would fail on the op's.
        value = val(out)
        viewed = any(u.target in (aten.view.default, aten._unsafe_view.default)
                     for u in out.users)
        if viewed and isinstance(value, torch.Tensor) and not value.transpose(1, 2).is_contiguous():
            return reject(match, "the rotated q/k is viewed in the heads-major layout the graph "
                                 "computed it in (e.g. as (B * H, S, D)); the op returns it "
                                 "token-major")
    return True


@functools.cache
def _example_inputs(dtype: torch.dtype, cos_width: int) -> list:
    return [
        torch.empty(2, 4, 8, 16, dtype=dtype),
        torch.empty(2, 2, 8, 16, dtype=dtype),
        torch.empty(2, 8, cos_width, dtype=dtype),
        torch.empty(2, 8, cos_width, dtype=dtype),
    ]


def _complex_example_inputs(dtype: torch.dtype, heads_first: bool) -> list:
    def qk(heads):
        return torch.empty(2, heads, 8, 16, dtype=dtype) if heads_first else torch.empty(
            2, 8, heads, 16, dtype=dtype)

    return [qk(4), qk(2), torch.empty(2, 8, 8, dtype=torch.complex64)]


# (search, replacement, extra check, cos/sin width of the example inputs for a head_dim of 16)
_PATTERNS = (
    (_rope_pattern_hf, _rope_replacement, _extra_check, 16),
    (_rope_pattern_phi3, _rope_replacement, _extra_check, 16),
    (_rope_pattern_blt, _interleaved_replacement, _extra_check, 16),
    (_rope_pattern_cohere, _cohere_replacement, _extra_check, 16),
    (_rope_pattern_helium, _pair_angles_replacement, _extra_check_pair_angles, 16),
    (_rope_pattern_ernie4_5, _ernie4_5_replacement, _extra_check_pair_angles, 16),
    (_rope_pattern_glm, _pair_angles_replacement, _extra_check_pair_angles, 16),
    (_rope_pattern_deepseek_v3, _deepseek_v3_replacement, _extra_check_deepseek_v3, 16),
    (_rope_pattern_gpt_oss, _gpt_oss_replacement, _extra_check_gpt_oss, 8),
)


def register(pattern_pass, dtypes) -> None:
    for dtype in dtypes:
        for search, replacement, check, cos_width in _PATTERNS:
            register_pattern(
                search,
                replacement,
                _example_inputs(dtype, cos_width),
                pattern_pass,
                extra_check=check,
            )
        for search, replacement, check, heads_first in (
            (_rope_pattern_deepseek_v2, _deepseek_v2_replacement, _extra_check_deepseek_v2, True),
            (_rope_pattern_llama4, _llama4_replacement, _extra_check_llama4, False),
        ):
            register_pattern(
                search,
                replacement,
                _complex_example_inputs(dtype, heads_first),
                pattern_pass,
                extra_check=check,
            )


def _is_candidate(node: Node) -> bool:
    """`cat((-x2, x1), -1)` or `stack((-x2, x1), -1)`: rotate_half of either layout, the mark
    of a rotary embedding."""
    if node.op != "call_function" or node.target not in (aten.cat.default, aten.stack.default):
        return False
    parts = node.args[0]
    return len(parts) == 2 and getattr(parts[0], "target", None) is aten.neg.default


def _diagnose(node: Node) -> str:
    return (
        "rotate_half is not applied as apply_rotary_pos_emb does for a (q, k) pair "
        "(x * cos + rotate_half(x) * sin on both, sharing cos/sin, in the rotate-half or the "
        "interleaved layout as a supported family spells it)"
    )


FUSION = Fusion(
    name="rope",
    register=register,
    fused_ops=lambda: (torch.ops.chronicals.rope.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
)
