"""The QK-RoPE fusion on standalone subgraphs, and packed positions through a whole model."""

from __future__ import annotations

import copy

import pytest
import torch

from chronicals import reference
from tests.compile_passes.harness import compile_fn
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
