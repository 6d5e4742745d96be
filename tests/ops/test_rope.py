"""chronicals::rope against the fp64 truth of `chronicals.reference.rope`, through the kernel (the
Triton interpreter on CPU) and the plain-PyTorch path, in every layout (rotate-half, interleaved,
and interleaved in with rotate-half out)."""

from __future__ import annotations

import pytest
import torch

from chronicals import reference
from chronicals.ops.rope import rope
from tests.helpers import assert_no_worse_than_eager, devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROPE_LAYOUTS = ["half", "interleaved", "deinterleave"]
# Absolute slack for elements whose truth is near 0 (the relative ulp term vanishes there).
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}

# (batch, heads_q, heads_k, seq, head_dim, rotary_dim, cos_batch_is_1)
SHAPES = [
    pytest.param(2, 4, 2, 7, 8, 8, False, id="gqa-d8"),
    pytest.param(1, 4, 2, 13, 64, 64, True, id="gqa-d64-cos1"),
    pytest.param(2, 4, 2, 13, 24, 24, False, id="d24"),
    pytest.param(2, 3, 1, 5, 80, 80, True, id="d80-cos1"),
    pytest.param(2, 4, 2, 7, 32, 16, False, id="partial-d32-r16"),
    pytest.param(1, 2, 2, 9, 24, 10, True, id="partial-d24-r10"),
    # More heads than one inner step takes (16 at D=128): several head blocks, the last partial.
    pytest.param(1, 24, 8, 3, 128, 128, True, id="heads24-d128"),
]


def _qk(batch, heads_q, heads_k, seq, head_dim, dtype, device, layout):
    """q and k as HF gives them (`view(B, S, H, D).transpose(1, 2)`) or contiguous."""
    def make(heads):
        if layout == "hf":
            x = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device)
            return x.transpose(1, 2)
        return torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device)

    q, k = make(heads_q), make(heads_k)
    assert q.is_contiguous() == (layout == "contiguous")
    return q, k


def _random_cos_sin(cos_batch, seq, rot, dtype, device):
    # Independent values in every channel: unlike HF's cat(freqs, freqs) (or the interleaved
    # layout's repeat_interleave(freqs, 2)), this catches a kernel that reads the wrong channel
    # of a pair's cos/sin or transposes the backward wrongly.
    cos = torch.rand(cos_batch, seq, rot, device=device) * 2 - 1
    sin = torch.rand(cos_batch, seq, rot, device=device) * 2 - 1
    return cos.to(dtype), sin.to(dtype)


def _hf_cos_sin(position_ids, rot, dtype, rope_layout="half", base=10000.0):
    """cos/sin as HF's rotary embedding builds them from position ids: (B, S, rot), each pair's
    angle at its two channels (2i and 2i + 1 in the interleaved layout, else i and i + rot/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    freqs = position_ids[..., None].float() * inv_freq
    if rope_layout == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _truth_and_eager(q, k, cos, sin, gq, gk, rope_layout):
    """Forward outputs and (dq, dk) of the reference in fp64 (truth) and in the inputs' own
    dtypes (eager, with PyTorch's type promotion where q's and cos's differ)."""
    results = []
    for q_dtype, cos_dtype in ((torch.float64, torch.float64), (q.dtype, cos.dtype)):
        q_, k_ = (t.detach().to(q_dtype).requires_grad_() for t in (q, k))
        out = reference.rope(q_, k_, cos.to(cos_dtype), sin.to(cos_dtype), rope_layout)
        grads = torch.autograd.grad(out, (q_, k_), (gq.to(out[0].dtype), gk.to(out[1].dtype)))
        results.append((*out, *grads))
    return results


def _assert_token_major(name, t):
    _batch, heads, seq, head_dim = t.shape
    expected = (seq * heads * head_dim, head_dim, heads * head_dim, 1)
    assert t.stride() == expected, f"{name}: strides {t.stride()} != token-major {expected}"


def _check_rope_against_truth(q, k, cos, sin, rope_layout):
    """rope's outputs (in the dtype of `q * cos`) and (dq, dk) (in q's dtype): token-major
    strides, and no worse than eager against the fp64 truth."""
    q, k = q.requires_grad_(), k.requires_grad_()
    q_out, k_out = rope(q, k, cos, sin, layout=rope_layout)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    truth, eager = _truth_and_eager(q, k, cos, sin, gq, gk, rope_layout)
    for name, out, e, t in zip(("q_out", "k_out", "dq", "dk"), (q_out, k_out, dq, dk), eager,
                               truth):
        assert out.dtype == e.dtype == (q.dtype if name.startswith("d") else q_out.dtype)
        _assert_token_major(name, out)
        assert_no_worse_than_eager(name, out, e, t, atol=ATOL[out.dtype])
    assert q_out.dtype == torch.promote_types(q.dtype, cos.dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads_q,heads_k,seq,head_dim,rot,cos1", SHAPES)
def test_forward_backward_vs_fp64(batch, heads_q, heads_k, seq, head_dim, rot, cos1, dtype,
                                  layout, rope_layout, device):
    q, k = _qk(batch, heads_q, heads_k, seq, head_dim, dtype, device, layout)
    cos, sin = _random_cos_sin(1 if cos1 else batch, seq, rot, dtype, device)
    _check_rope_against_truth(q, k, cos, sin, rope_layout)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
def test_layout_pairs_the_right_channels(rope_layout, device):
    """A rotation by 90 degrees (cos 0, sin 1) sends each rotated channel's partner into it, the
    first of a pair negated: the rotate-half layout pairs channel i with i + R/2, the interleaved
    one 2i with 2i + 1, and "deinterleave" reads (2i, 2i + 1) and writes (i, i + R/2); channels
    R.. pass through. Exact values, forward and backward."""
    head_dim, rot = 12, 8
    partner, sign = {
        "half": ([4, 5, 6, 7, 0, 1, 2, 3], [-1] * 4 + [1] * 4),
        "interleaved": ([1, 0, 3, 2, 5, 4, 7, 6], [-1, 1] * 4),
        "deinterleave": ([1, 3, 5, 7, 0, 2, 4, 6], [-1] * 4 + [1] * 4),
    }[rope_layout]
    partner, sign = partner + [8, 9, 10, 11], torch.tensor(sign + [1] * 4, dtype=torch.float32)
    q = torch.arange(head_dim, dtype=torch.float32, device=device).expand(1, 1, 1, head_dim)
    k = (q + 100).expand(1, 3, 1, head_dim).contiguous()
    q = q.contiguous().requires_grad_()
    k.requires_grad_()
    cos = torch.zeros(1, 1, rot, device=device)
    sin = torch.ones(1, 1, rot, device=device)
    q_out, k_out = rope(q, k, cos, sin, layout=rope_layout)
    for x, out in ((q, q_out), (k, k_out)):
        torch.testing.assert_close(out, x.detach()[..., partner] * sign.to(device), rtol=0, atol=0)
    # The backward is the inverse rotation: it sends q_out back to q.
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (q_out.detach(), k_out.detach()))
    torch.testing.assert_close(dq, q.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dk, k.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("q_dtype,cos_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32),
                                               (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_dtypes_promote_like_pytorch(q_dtype, cos_dtype, rope_layout, device):
    """An fp32 model under autocast to bf16 gives bf16 q/k (the projections) and fp32 cos/sin
    (HF casts them to the hidden states' dtype): the outputs are fp32 as `q * cos` is, and dq,
    dk come back in q's dtype, as autograd returns them."""
    q, k = _qk(2, 4, 2, 7, 16, q_dtype, device, "hf")
    cos, sin = _random_cos_sin(2, 7, 12, cos_dtype, device)
    _check_rope_against_truth(q, k, cos, sin, rope_layout)


@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("heads_k", [2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path_when_interpreter_off(dtype, heads_k, rope_layout, monkeypatch):
    """Without TRITON_INTERPRET the CPU op runs plain PyTorch: same contract, same strides (also
    on a size-1 head dim, which Inductor compares against the fake)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = _qk(2, 4, heads_k, 7, 32, dtype, "cpu", "hf")
    cos, sin = _random_cos_sin(2, 7, 16, dtype, "cpu")
    _check_rope_against_truth(q, k, cos, sin, rope_layout)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_positions_equal_documents_alone(dtype, rope_layout, device):
    """Positions that restart inside a row ([0..4, 0..6]) rotate each document exactly as if it
    were run alone: cos/sin are per token, the kernel never assumes arange positions."""
    lengths = (5, 7)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cos, sin = (t.to(device) for t in _hf_cos_sin(position_ids, 16, dtype, rope_layout))
    q, k = _qk(1, 4, 2, sum(lengths), 16, dtype, device, "hf")
    q.requires_grad_()
    k.requires_grad_()
    q_out, k_out = rope(q, k, cos, sin, layout=rope_layout)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    start = 0
    for n in lengths:
        doc = slice(start, start + n)
        cos_doc, sin_doc = (
            t.to(device) for t in _hf_cos_sin(torch.arange(n)[None], 16, dtype, rope_layout)
        )
        q_doc = q.detach()[:, :, doc].requires_grad_()
        k_doc = k.detach()[:, :, doc].requires_grad_()
        q_alone, k_alone = rope(q_doc, k_doc, cos_doc, sin_doc, layout=rope_layout)
        dq_alone, dk_alone = torch.autograd.grad(
            (q_alone, k_alone), (q_doc, k_doc), (gq[:, :, doc], gk[:, :, doc])
        )
        for packed, alone in ((q_out, q_alone), (k_out, k_alone), (dq, dq_alone),
                              (dk, dk_alone)):
            torch.testing.assert_close(packed[:, :, doc], alone, rtol=0, atol=0)
        start += n
    # The second document really was rotated from position 0, not from position 5.
    cos_arange, sin_arange = (
        t.to(device) for t in _hf_cos_sin(torch.arange(12)[None], 16, dtype, rope_layout)
    )
    q_wrong, _ = reference.rope(q.detach(), k.detach(), cos_arange, sin_arange, rope_layout)
    assert not torch.allclose(q_out[:, :, 5:].detach(), q_wrong[:, :, 5:])


@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
def test_opcheck(layout, rope_layout):
    q, k = _qk(2, 4, 2, 5, 12, torch.float32, "cpu", layout)
    cos, sin = _random_cos_sin(2, 5, 8, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.chronicals.rope.default,
                          (q.requires_grad_(), k.requires_grad_(), cos, sin, rope_layout))
    cos1, sin1 = cos[:1], sin[:1]
    torch.library.opcheck(torch.ops.chronicals.rope_backward.default,
                          (q.detach(), k.detach(), cos1, sin1, torch.float32, rope_layout))
    # Mixed dtypes: bf16 q/k, fp32 cos/sin (fp32 outputs), and the backward back to bf16.
    q16, k16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k))
    torch.library.opcheck(torch.ops.chronicals.rope.default, (q16, k16, cos, sin, rope_layout))
    torch.library.opcheck(torch.ops.chronicals.rope_backward.default,
                          (q.detach(), k.detach(), cos, sin, torch.bfloat16, rope_layout))


@pytest.mark.cuda
@pytest.mark.parametrize("rope_layout", ROPE_LAYOUTS)
def test_compiled_with_inductor_matches_eager(rope_layout):
    """Inductor asserts the fake's strides against the real outputs; HF-strided inputs. (opcheck
    checks the same strides on CPU; Inductor's cold C++ compile takes about a minute there.)"""
    q, k = _qk(1, 4, 2, 5, 16, torch.float32, "cuda", "hf")
    cos, sin = _random_cos_sin(1, 5, 16, torch.float32, "cuda")

    def f(q, k, cos, sin):
        q_out, k_out = rope(q * 2.0, k, cos, sin, layout=rope_layout)
        return q_out + 1.0, k_out * 3.0

    torch.compiler.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    for got, want in zip(compiled(q, k, cos, sin), f(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def _good():
    q, k = _qk(2, 4, 2, 5, 8, torch.float32, "cpu", "hf")
    cos, sin = _random_cos_sin(2, 5, 8, torch.float32, "cpu")
    return {"q": q, "k": k, "cos": cos, "sin": sin}


BAD_INPUTS = [
    pytest.param({"q": torch.randn(2, 5, 8)}, r"rope: q must be 4-D .* Got shape \(2, 5, 8\)",
                 id="q-3d"),
    pytest.param({"k": torch.randn(3, 2, 5, 8)}, r"same batch and seq sizes. Got q \(2, 4, 5, 8\) "
                 r"and k \(3, 2, 5, 8\)", id="batch-mismatch"),
    pytest.param({"k": torch.randn(2, 2, 6, 8)}, r"same batch and seq sizes", id="seq-mismatch"),
    pytest.param({"k": torch.randn(2, 2, 5, 6)}, r"same head_dim. Got 8 and 6",
                 id="head-dim-mismatch"),
    pytest.param({"q": torch.randn(2, 4, 5, 7), "k": torch.randn(2, 2, 5, 7),
                  "cos": torch.randn(2, 5, 6), "sin": torch.randn(2, 5, 6)},
                 r"head_dim must be even. Got 7", id="head-dim-odd"),
    pytest.param({"cos": torch.randn(2, 5, 7), "sin": torch.randn(2, 5, 7)},
                 r"rotary_dim .* must be even and in \[2, head_dim=8\]. Got 7", id="rot-odd"),
    pytest.param({"cos": torch.randn(2, 5, 10), "sin": torch.randn(2, 5, 10)},
                 r"rotary_dim .* Got 10", id="rot-too-big"),
    pytest.param({"cos": torch.randn(2, 6, 8), "sin": torch.randn(2, 6, 8)},
                 r"cos/sin must match q's positions: shape \(1 or 2, 5, 8\). Got \(2, 6, 8\)",
                 id="cos-seq"),
    pytest.param({"cos": torch.randn(3, 5, 8), "sin": torch.randn(3, 5, 8)},
                 r"must match q's positions", id="cos-batch"),
    pytest.param({"cos": torch.randn(5, 8), "sin": torch.randn(5, 8)},
                 r"cos/sin must be 3-D", id="cos-2d"),
    pytest.param({"sin": torch.randn(1, 5, 8)},
                 r"cos and sin must have the same shape. Got \(2, 5, 8\) and \(1, 5, 8\)",
                 id="cos-sin-shapes"),
    pytest.param({"cos": torch.randn(2, 5, 8, dtype=torch.bfloat16)},
                 r"TypeError: rope: q and k must share one dtype, and cos and sin one. Got q "
                 r"torch.float32, k torch.float32, cos torch.bfloat16, sin torch.float32",
                 id="cos-sin-dtypes"),
    pytest.param({"k": torch.randn(2, 2, 5, 8, dtype=torch.float16)},
                 r"TypeError: q and k must share one dtype.* k torch.float16", id="q-k-dtypes"),
    pytest.param({"cos": torch.randn(2, 5, 8, dtype=torch.float64),
                  "sin": torch.randn(2, 5, 8, dtype=torch.float64)},
                 r"TypeError: cos must be float32, bfloat16 or float16. Got torch.float64",
                 id="cos-fp64"),
    pytest.param({"q": torch.randn(2, 4, 5, 8, dtype=torch.float64),
                  "k": torch.randn(2, 2, 5, 8, dtype=torch.float64)},
                 r"TypeError: q must be float32, bfloat16 or float16. Got torch.float64",
                 id="fp64"),
    pytest.param({"cos": torch.randn(2, 5, 8, device="meta")}, r"all inputs must be on one device",
                 id="device-mismatch"),
    pytest.param({"q": torch.randn(2, 0, 5, 8)},
                 r"q and k must each have at least one head. Got q \(2, 0, 5, 8\)", id="q-no-heads"),
    pytest.param({"k": torch.randn(2, 0, 5, 8)}, r"at least one head", id="k-no-heads"),
    pytest.param({"cos": torch.randn(2, 5, 8, requires_grad=True)},
                 r"cos and sin require grad, but rope computes gradients for q and k only",
                 id="cos-requires-grad"),
    pytest.param({"sin": torch.randn(2, 5, 8, requires_grad=True)}, r"cos and sin require grad",
                 id="sin-requires-grad"),
]


@pytest.mark.parametrize("override,match", BAD_INPUTS)
def test_bad_inputs_raise(override, match):
    args = {**_good(), **override}
    error = TypeError if match.startswith("TypeError: ") else ValueError
    with pytest.raises(error, match=match.removeprefix("TypeError: ")):
        rope(args["q"], args["k"], args["cos"], args["sin"])


def test_backward_op_names_its_inputs():
    args = _good()
    with pytest.raises(ValueError, match=r"rope_backward: dq and dk must have the same head_dim"):
        torch.ops.chronicals.rope_backward(args["q"], torch.randn(2, 2, 5, 6), args["cos"],
                                           args["sin"], torch.float32)


def test_unknown_layout_raises():
    args = _good()
    with pytest.raises(ValueError, match=r"rope: layout must be one of \('half', 'interleaved', "
                       r"'deinterleave'\). Got 'pairs'"):
        rope(args["q"], args["k"], args["cos"], args["sin"], layout="pairs")
