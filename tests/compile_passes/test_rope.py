"""The QK-RoPE fusion on standalone subgraphs, and packed positions through a whole model. The
interleaved layout is checked on the installed transformers' own `apply_rotary_pos_emb` of each
family that spells it, and on look-alikes that must not fire."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from chronicals import reference
from tests import models
from tests.compile_passes.harness import compile_and_compare, compile_fn
from tests.helpers import assert_no_worse_than_eager
from tests.models import tiny_model


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _inputs(head_dim=24, seq=7):
    q = torch.randn(2, seq, 4, head_dim).transpose(1, 2)  # as HF gives it: a transposed view
    k = torch.randn(2, seq, 2, head_dim).transpose(1, 2)
    angles = torch.randn(2, seq, head_dim // 2)
    emb = torch.cat((angles, angles), dim=-1)
    return q, k, emb.cos(), emb.sin()


def test_fuses_q_and_k_into_one_op_for_any_head_dim():
    for head_dim in (8, 24):
        args = _inputs(head_dim)
        (q_out, k_out), report = compile_fn(_apply_rotary_pos_emb, *args)
        assert report.fired["rope"] == 1 and report.rejected == ()
        q_ref, k_ref = reference.rope(*args)
        torch.testing.assert_close(q_out, q_ref)
        torch.testing.assert_close(k_out, k_ref)


@pytest.mark.parametrize("rotary", [24, 16], ids=["whole-head", "partial"])
def test_rotated_heads_viewed_heads_major_keep_their_layout(rotary):
    """GPT-NeoX-Japanese: q/k sliced from a fused projection, rotated, joined with their pass
    channels by cat (then .contiguous(), a no-op in the trace) and viewed as (B * H, S, D). The
    (q, k) pair around the cat is not replaced by the op (whose output is token-major, which the
    view cannot take): the rotation inside it is, and the cat still lays the result out."""
    def attend(qkv, cos, sin):
        query = qkv[..., :24].permute(0, 2, 1, 3)
        key = qkv[..., 24:48].permute(0, 2, 1, 3)
        q, k = _apply_rotary_pos_emb(query[..., :rotary], key[..., :rotary], cos, sin)
        q = torch.cat((q, query[..., rotary:]), dim=-1).contiguous()
        k = torch.cat((k, key[..., rotary:]), dim=-1).contiguous()
        return q.view(8, 7, 24) @ k.view(8, 7, 24).transpose(1, 2)

    qkv = torch.randn(2, 7, 4, 72)
    angles = torch.randn(2, 7, rotary // 2)
    emb = torch.cat((angles, angles), dim=-1)
    out, report = compile_fn(attend, qkv, emb.cos(), emb.sin())
    assert report.error is None and report.fired["rope"] == 1, report.summary()
    torch.testing.assert_close(out, attend(qkv, emb.cos(), emb.sin()))


def test_rotation_of_q_alone_is_left_alone():
    def only_q(q, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin

    q, _, cos, sin = _inputs()
    out, report = compile_fn(only_q, q, cos, sin)
    assert report.fired["rope"] == 0
    (rejection,) = report.rejected
    assert rejection.fusion == "rope" and "(q, k) pair" in rejection.reason
    torch.testing.assert_close(out, only_q(q, cos, sin))


@pytest.mark.parametrize("q_split, k_split", [(4, 12), (12, 4), (4, 4)])
def test_rotate_half_split_elsewhere_is_left_alone(q_split, k_split):
    """rotate_half split anywhere but the middle is not a rotary embedding. The matcher once bound
    both halves of the (q, k) pattern to k's subgraph when only q's split differed, and the fused
    op then rotated q wrongly."""

    def split_at(x, s):
        return torch.cat((-x[..., s:], x[..., :s]), dim=-1)

    def rope_like(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + split_at(q, q_split) * sin, k * cos + split_at(k, k_split) * sin

    args = _inputs(head_dim=24)
    (q_out, k_out), report = compile_fn(rope_like, *args)
    assert report.fired["rope"] == 0
    q_ref, k_ref = rope_like(*args)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


def test_cos_sin_that_require_grad_are_rejected_not_lost_gradients():
    """The fused op gives cos/sin no gradient (its autograd setup refuses them). The backend
    tries the op on the match's inputs, requiring grad as traced, first: the rope is rejected
    with the op's reason and compiled as written, so q, k, cos and sin get eager's gradients;
    strict mode raises with the reason."""
    q, k, cos, sin = _inputs()
    q, k, cos, sin = (t.requires_grad_() for t in (q, k, cos, sin))
    (q_out, k_out), report = compile_fn(_apply_rotary_pos_emb, q, k, cos, sin)
    assert report.fired["rope"] == 0 and report.error is None
    assert report.rejected and all(
        r.fusion == "rope" and "cos and sin require grad" in r.reason for r in report.rejected
    ), report.summary()
    loss = (q_out * 1.5 + k_out.sum(1, keepdim=True)).square().sum()
    loss.backward()
    got = [t.grad.clone() for t in (q, k, cos, sin)]
    for t in (q, k, cos, sin):
        t.grad = None
    q_ref, k_ref = _apply_rotary_pos_emb(q, k, cos, sin)
    expected = (q_ref * 1.5 + k_ref.sum(1, keepdim=True)).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(got, [t.grad for t in (q, k, cos, sin)])
    with pytest.raises(Exception, match=r"(?s)strict.*rope.*cos and sin require grad"):
        compile_fn(_apply_rotary_pos_emb, q, k, cos, sin, strict=True)


def test_packed_positions_match_documents_run_alone():
    """Two documents in one row with restarting position_ids give, through the fused rope, the
    same logits as each document alone (the model's attention is isolated by position_ids)."""
    model = tiny_model("llama")
    alone = copy.deepcopy(model)
    docs = [torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))]
    ids = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]

    def logits(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    packed, report = compile_fn(logits, ids, positions)
    assert report.fired["rope"] == 2
    expected = [alone(input_ids=d, use_cache=False).logits for d in docs]
    torch.testing.assert_close(packed[:, :5], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 5:], expected[1], atol=1e-5, rtol=1e-5)


# Families whose rotary embedding rotates channel pairs (2i, 2i + 1), in transformers 5.17 and
# 5.25 alike: module -> cos/sin width as a fraction of head_dim (GLM rotates half the channels).
INTERLEAVED_FAMILIES = {
    "glm": 0.5,
    "glm4": 0.5,
    "helium": 1.0,
    "ernie4_5": 1.0,
    "cohere": 1.0,
    "cohere2": 1.0,
    "blt": 1.0,
}


def _interleaved_inputs(dtype, cos_width, head_dim=24, seq=7):
    """q (3 heads) and k (1 head, GQA) as HF gives them, and cos/sin with a value per token and
    channel: random, so a fused op that reads the wrong channel of a pair's cos differs."""
    q = torch.randn(2, seq, 3, head_dim).transpose(1, 2).to(dtype)
    k = torch.randn(2, seq, 1, head_dim).transpose(1, 2).to(dtype)
    cos, sin = (torch.rand(2, seq, cos_width).mul(2).sub(1).to(dtype) for _ in range(2))
    return q, k, cos, sin


def _fuses_once_as_close_as_eager(apply, args, exact_args, dtype) -> None:
    """`apply(q, k, ...)` compiled is one rope launch for q and k, nothing rejected; each output
    has eager's dtype and shape, equals eager in fp32 and is no worse than eager against the
    fp64 truth (`apply(*exact_args)`) in lower precision."""
    out, report = compile_fn(apply, *args)
    assert report.fired["rope"] == 1 and report.rejected == (), report
    eager = apply(*args)
    truth = apply(*exact_args)
    for name, o, e, t in zip(("q", "k"), out, eager, truth):
        assert o.dtype == e.dtype == dtype and o.shape == e.shape
        if dtype == torch.float32:
            torch.testing.assert_close(o, e)
        else:
            assert_no_worse_than_eager(name, o, e, t, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", INTERLEAVED_FAMILIES)
def test_interleaved_spelling_of_each_family_fuses(family, dtype):
    """The family's own apply_rotary_pos_emb (casts to fp32 and back in Cohere and Ernie 4.5,
    partial rotary in GLM) becomes one rope launch for q and k; its result, against the fp64
    truth, is no worse than the family's eager code in the same dtype."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def apply(q, k, cos, sin):
        return module.apply_rotary_pos_emb(q, k, cos, sin)

    args = _interleaved_inputs(dtype, int(24 * INTERLEAVED_FAMILIES[family]))
    _fuses_once_as_close_as_eager(apply, args, [t.double() for t in args], dtype)


# Multi-head latent attention families whose `rope_interleave` (on by default) rotates the pairs
# (2i, 2i + 1) of the rotary channels into (i, i + R/2), in transformers 5.17 and 5.25 alike.
DEINTERLEAVE_FAMILIES = ("deepseek_v3", "glm4_moe_lite", "longcat_flash", "mistral4", "youtu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", DEINTERLEAVE_FAMILIES)
def test_deinterleave_spelling_of_each_family_fuses(family, dtype):
    """The family's own apply_rotary_pos_emb_interleave, on q's rotary slice of a wider head (as
    MLA splits it off) and a single shared k head, becomes one rope launch for q and k."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def apply(q, k, cos, sin):
        return module.apply_rotary_pos_emb_interleave(q, k, cos, sin)

    _, k, cos, sin = _interleaved_inputs(dtype, 8, head_dim=8)
    q = torch.randn(2, 7, 3, 24).to(dtype).transpose(1, 2)[..., 16:]
    args = (q, k, cos, sin)
    _fuses_once_as_close_as_eager(apply, args, [t.double() for t in args], dtype)


@pytest.mark.parametrize("width", [2, 3])
def test_deinterleave_with_one_broadcast_angle_is_left_alone(width):
    """cos/sin of width 2 or 3 leave a first half of width 1, which `x1 * cos` broadcasts over
    every pair: a computation the op does not do, so it must not fire."""
    deepseek = importlib.import_module("transformers.models.deepseek_v3.modeling_deepseek_v3")

    def apply(q, k, cos, sin):
        return deepseek.apply_rotary_pos_emb_interleave(q, k, cos, sin)

    args = _interleaved_inputs(torch.float32, width, head_dim=8)
    (q_out, k_out), report = compile_fn(apply, *args)
    assert report.fired["rope"] == 0
    q_ref, k_ref = apply(*args)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


def _rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _pair_angles(t):
    return t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1)


def _lookalike(rotate_q, rotate_k=None, angles=_pair_angles):
    """Helium's application with the given rotations and cos/sin preparation."""
    rotate_k = rotate_k or rotate_q

    def apply(q, k, cos, sin):
        cos, sin = angles(cos.unsqueeze(1)), angles(sin.unsqueeze(1))
        return q * cos + rotate_q(q) * sin, k * cos + rotate_k(k) * sin

    return apply


LOOKALIKES = {
    # The transpose of the rotation: pairs turned the other way.
    "wrong-sign": _lookalike(lambda x: torch.stack((x[..., 1::2], -x[..., 0::2]), -1).flatten(-2)),
    # The even channel negated instead of the odd one.
    "even-negated": _lookalike(
        lambda x: torch.stack((-x[..., 0::2], x[..., 1::2]), -1).flatten(-2)
    ),
    # The pairs stacked along the channel axis: (-x1, -x3, ..., x0, x2, ...), not pair by pair.
    "stack-dim": _lookalike(lambda x: torch.stack((-x[..., 1::2], x[..., 0::2]), -2).flatten(-2)),
    # cos/sin tiled (c0, c1, ..., c0, c1, ...) rather than interleaved (c0, c0, c1, c1, ...).
    "cos-tiled": _lookalike(_rotate_pairs, angles=lambda t: t[..., : t.shape[-1] // 2].repeat(
        1, 1, 1, 2)),
    # cos/sin from the second half of HF's cat(freqs, freqs): equal there, not in general.
    "cos-second-half": _lookalike(
        _rotate_pairs, angles=lambda t: t[..., t.shape[-1] // 2 :].repeat_interleave(2, dim=-1)
    ),
    # q in the interleaved layout, k in the rotate-half one.
    "mixed-layouts": _lookalike(_rotate_pairs, reference.rotate_half),
}


@pytest.mark.parametrize("name", LOOKALIKES)
def test_interleaved_lookalikes_are_left_alone(name):
    fn = LOOKALIKES[name]
    args = _interleaved_inputs(torch.float32, 24)
    (q_out, k_out), report = compile_fn(fn, *args)
    assert report.fired["rope"] == 0, name
    q_ref, k_ref = fn(*args)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


def test_gptj_rotations_are_left_alone():
    """GPT-J rotates q and k each on its own; the two share only the model-wide cos/sin, so a
    (q, k) pattern could pair one layer's q with another layer's k. Two such layers are left
    unfused, and reported, rather than paired across layers."""
    gptj = importlib.import_module("transformers.models.gptj.modeling_gptj")

    def two_layers(q1, k1, q2, k2, sin, cos):
        outs = []
        for q, k in ((q1, k1), (q2, k2)):
            k = torch.cat([gptj.apply_rotary_pos_emb(k[..., :8], sin, cos), k[..., 8:]], dim=-1)
            q = torch.cat([gptj.apply_rotary_pos_emb(q[..., :8], sin, cos), q[..., 8:]], dim=-1)
            outs += [q.transpose(1, 2), k.transpose(1, 2)]
        return outs

    qk = [torch.randn(2, 7, 4, 16) for _ in range(4)]
    sin, cos = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    out, report = compile_fn(two_layers, *qk, sin, cos)
    assert report.fired["rope"] == 0
    assert {r.fusion for r in report.rejected} == {"rope"} and len(report.rejected) == 4
    for got, want in zip(out, two_layers(*qk, sin, cos)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cohere_model_fuses_rope_once_per_layer(dtype, monkeypatch):
    """A tiny Cohere (interleaved rotary computed in fp32 between casts) fuses its rotary
    embedding once per layer, and its loss and gradients match eager. Cohere is not in
    tests/models.FAMILIES: its LayerNorm and scaled logits fuse nothing else today."""
    monkeypatch.setitem(models.FAMILIES, "cohere", ("CohereConfig", "CohereForCausalLM", {}))
    result = compile_and_compare("cohere", dtype)
    assert result.fired["rope"] == models.LAYERS, result
    assert not [r for r in result.rejected if r.fusion == "rope"], result.rejected
    result.assert_matches_eager(dtype)


def _gpt_oss_apply(q, k, cos, sin):
    """GPT-OSS's apply_rotary_pos_emb (the installed transformers' own)."""
    gpt_oss = importlib.import_module("transformers.models.gpt_oss.modeling_gpt_oss")
    return gpt_oss.apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpt_oss_halves_with_one_angle_per_pair_fuse(dtype):
    """GPT-OSS rotates chunk(x, 2)'s halves with cos/sin of width head_dim / 2: one rope launch
    for q and k, as the family computes it."""
    args = _interleaved_inputs(dtype, 12)
    _fuses_once_as_close_as_eager(_gpt_oss_apply, args, [t.double() for t in args], dtype)


def _halves(second):
    """GPT-OSS's application with `second(x1, x2, cos, sin)` as the second half's formula."""

    def apply(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate(x):
            x1, x2 = torch.chunk(x, 2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, second(x1, x2, cos, sin)), dim=-1)

        return rotate(q), rotate(k)

    return apply


GPT_OSS_LOOKALIKES = {
    # The transpose of the rotation: the second half's sine term negated.
    "wrong-sign": (_halves(lambda x1, x2, c, s: x2 * c - x1 * s), 12),
    # The first half's sine in the second half's term: x1 * cos, not a rotation.
    "not-a-rotation": (_halves(lambda x1, x2, c, s: x1 * c + x2 * s), 12),
    # cos/sin of width 1: one angle broadcast over every pair of the half.
    "one-angle": (_gpt_oss_apply, 1),
}


@pytest.mark.parametrize("name", GPT_OSS_LOOKALIKES)
def test_gpt_oss_lookalikes_are_left_alone(name):
    fn, width = GPT_OSS_LOOKALIKES[name]
    args = _interleaved_inputs(torch.float32, width)
    (q_out, k_out), report = compile_fn(fn, *args)
    assert report.fired["rope"] == 0, name
    q_ref, k_ref = fn(*args)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


# Families that rotate the pairs (2i, 2i + 1) as complex numbers, in transformers 5.17 and 5.25
# alike: module -> whether q and k come as (B, H, S, D) (else (B, S, H, D), before the transpose).
COMPLEX_FAMILIES = {"deepseek_v2": True, "llama4": False}


def _complex_inputs(dtype, heads_first, angles=12, head_dim=24, seq=7):
    """q (3 heads), k (1 head) and freqs_cis as HF's rotary embedding gives it (complex64 of
    modulus 1: torch.polar of random angles)."""
    q = torch.randn(2, seq, 3, head_dim).to(dtype)
    k = torch.randn(2, seq, 1, head_dim).to(dtype)
    if heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    theta = torch.randn(2, seq, angles)
    return q, k, torch.polar(torch.ones_like(theta), theta)


def _exact(args):
    q, k, freqs = args
    return q.double(), k.double(), freqs.to(torch.complex128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", COMPLEX_FAMILIES)
def test_complex_spelling_of_each_family_fuses(family, dtype):
    """The family's own apply_rotary_emb (view_as_complex(q) * freqs_cis in fp32, cast back)
    becomes one rope launch for q and k, as close to the fp64 truth as the family's eager code."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def apply(q, k, freqs_cis):
        return module.apply_rotary_emb(q, k, freqs_cis)

    args = _complex_inputs(dtype, COMPLEX_FAMILIES[family])
    _fuses_once_as_close_as_eager(apply, args, _exact(args), dtype)


def _complex_lookalike(turn):
    """DeepSeek-V2's application with `turn(x_complex, freqs_cis)` as the product."""

    def apply(q, k, freqs_cis):
        freqs_cis = freqs_cis.unsqueeze(1)

        def rotate(x):
            x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(turn(x_, freqs_cis)).flatten(3).type_as(x)

        return rotate(q), rotate(k)

    return apply


COMPLEX_LOOKALIKES = {
    # The rotation the other way (the conjugate angle).
    "conjugate": (_complex_lookalike(lambda x, f: x * f.conj()), 12),
    # A complex scaling that is no rotation of x: x times f squared.
    "squared": (_complex_lookalike(lambda x, f: x * f * f), 12),
    # One angle broadcast over every pair.
    "one-angle": (_complex_lookalike(lambda x, f: x * f), 1),
}


@pytest.mark.parametrize("name", COMPLEX_LOOKALIKES)
def test_complex_lookalikes_are_left_alone(name):
    fn, angles = COMPLEX_LOOKALIKES[name]
    args = _complex_inputs(torch.float32, True, angles=angles)
    (q_out, k_out), report = compile_fn(fn, *args)
    assert report.fired["rope"] == 0, name
    q_ref, k_ref = fn(*args)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)
