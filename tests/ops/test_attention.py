"""chronicals::attention: opcheck, numerics against an fp64 truth, packed documents, bad input.

Each case runs the op's CPU kernel (the reference) and its Triton kernel through Triton's
interpreter (`forced_kernel("triton")`)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

from chronicals import reference
from chronicals.ops import attention as ops
from chronicals.ops import attention_triton as triton_kernel
from tests.helpers import ULP, assert_no_worse_than_eager, devices

# (B, Hq, Hk, S, D, packed, window, softcap, sinks): causal, GQA, MQA, sliding window, packed
# documents, logit softcap, attention sinks, odd sizes; rows longer than the interpreter's
# 16-token blocks.
CASES = [
    (2, 4, 4, 13, 16, False, 0, 0.0, False),
    (2, 6, 2, 17, 16, False, 0, 0.0, False),
    (1, 4, 1, 11, 24, True, 0, 0.0, False),
    (2, 4, 2, 19, 16, True, 5, 0.0, False),
    (3, 2, 2, 9, 40, False, 4, 0.0, False),
    (2, 6, 2, 37, 16, False, 0, 2.0, False),
    (1, 4, 2, 41, 24, True, 9, 1.5, False),
    (2, 4, 1, 35, 20, True, 0, 0.0, False),
    (1, 2, 1, 70, 16, True, 20, 0.0, False),
    (2, 6, 2, 37, 16, False, 0, 0.0, True),
    (1, 4, 2, 41, 24, True, 9, 0.0, True),
    (2, 4, 4, 19, 16, True, 0, 2.0, True),
]
KERNELS = ["default", "triton"]


def _positions(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """Packed rows: documents of random lengths, positions restarting at 0 (and one row whose
    first document continues from position 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(b):
        pos, start = [], 3 if row == 1 else 0
        while len(pos) < s:
            n = int(torch.randint(1, 7, (1,), generator=g))
            pos.extend(range(start, start + n))
            start = 0
        rows.append(pos[:s])
    return torch.tensor(rows)


def _inputs(case, dtype, device, seed=0):
    b, hq, hk, s, d, packed, window, _softcap, _sinks = case
    g = torch.Generator().manual_seed(seed)
    # HF's layout: transposed views of (B, S, H, D) projections.
    q = torch.randn(b, s, hq, d, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(b, s, hk, d, generator=g).to(device, dtype).transpose(1, 2)
    pos = _positions(b, s, seed).to(device) if packed else None
    return q, k, v, pos, window


def _sinks(case, dtype, device, seed=0) -> torch.Tensor | None:
    """One sink logit per query head (gpt-oss's), or None."""
    if not case[8]:
        return None
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randn(case[1], generator=g).to(device, dtype)


def _sdpa(q, k, v, pos, window, scale, softcap=0.0, sinks=None):
    """What transformers computes: sdpa with the dense mask, K/V repeated per query head; with a
    softcap or sinks, its eager attention (scores in the input dtype, softmax in fp32, over the
    scores and the head's sink logit, whose probability is then dropped)."""
    b, hq, s, _ = q.shape
    mask = reference.attention_mask(pos, b, s, window, q.device)
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v
    scores = torch.cat([scores, sinks.view(1, hq, 1, 1).expand(b, hq, s, 1)], -1)
    return torch.softmax(scores, -1, dtype=torch.float32)[..., :-1].to(q.dtype) @ v


def _kernel(name):
    return contextlib.nullcontext() if name == "default" else ops.forced_kernel(name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_against_fp64(case, dtype, kernel, device):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take float16/bfloat16 (the pass rejects fp32 there)")
    if device == "cuda" and kernel == "default" and (case[7] or case[8]):
        pytest.skip("softcap, sinks: the default CUDA kernel is the triton one, the other "
                    "parameter")
    if device == "cuda" and case[4] % 8:
        pytest.skip("the CUDA kernels take head dims that are multiples of 8 (unsupported())")
    softcap = case[7]
    q, k, v, pos, window = _inputs(case, dtype, device)
    sinks = _sinks(case, dtype, device)
    scale = q.shape[-1] ** -0.5
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=g).to(device, dtype)
    tensors = (q, k, v) if sinks is None else (q, k, v, sinks)

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    with _kernel(kernel):
        got = run(lambda a, b, c, sk=None: ops.attention(
            a, b, c, pos, scale=scale, window=window or None, softcap=softcap or None, sinks=sk),
            *tensors)
    eager = run(lambda a, b, c, sk=None: _sdpa(a, b, c, pos, window, scale, softcap, sk),
                *tensors)
    truth = run(lambda a, b, c, sk=None: _sdpa(a, b, c, pos, window, scale, softcap, sk),
                *(t.double() for t in tensors))
    assert len(got) == len(tensors) + 1
    for o, t in zip(got, truth):
        assert o.dtype == dtype and o.shape == t.shape
    if device == "cuda" or (kernel == "triton" and dtype != torch.float32):
        # The triton kernel computes dO.O from the output rounded to bf16, as flash kernels do:
        # element by element its dQ/dK can sit on the other side of the truth from eager's.
        _assert_norm_error_no_worse(got, eager, truth)
        return
    for name, o, e, t in zip(("out", "dq", "dk", "dv"), got, eager, truth):
        assert_no_worse_than_eager(name, o, e, t, atol=1e-6)
    if sinks is not None:
        # dsinks sums over every query of every row in fp32 in another order than eager's
        # reduction: about sqrt(B * S) ulps of its magnitude (as rms_norm's dW over rows).
        terms = q.shape[0] * q.shape[2]
        atol = 1e-6 + terms**0.5 * ULP[torch.float32] * float(truth[4].abs().max())
        assert_no_worse_than_eager("dsinks", got[4], eager[4], truth[4], atol=atol)


def test_output_is_token_major():
    q, k, v, pos, _window = _inputs(CASES[1], torch.float32, "cpu")
    out = ops.attention(q, k, v, pos)
    _b, h, s, d = out.shape
    assert out.stride() == (s * h * d, d, h * d, 1)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_document_equals_document_alone(kernel):
    b, hq, hk, s, d = 1, 4, 2, 40, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hk, hk))
    # documents [0, 5), [5, 23), [23, 40): across the interpreter's 16-token blocks
    docs = ((0, 5), (5, 23), (23, 40))
    pos = torch.cat([torch.arange(end - start) for start, end in docs])[None]
    with _kernel(kernel):
        packed = ops.attention(q, k, v, pos, softcap=3.0)
        for start, end in docs:
            alone = ops.attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                  softcap=3.0)
            torch.testing.assert_close(packed[:, :, start:end], alone, rtol=0, atol=1e-6)


def test_document_spans():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    start, end = ops.document_spans(pos, 2)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5], [0, 0, 0, 0, 4, 4]]
    assert end.tolist() == [[3, 3, 3, 5, 5, 6], [4, 4, 4, 4, 6, 6]]
    # (1, S) positions are shared by every row.
    start, end = ops.document_spans(pos[:1], 3)
    assert start.shape == (3, 6) and end[2].tolist() == [3, 3, 3, 5, 5, 6]


def test_position_ids_of_one_document_per_row_equal_none():
    q, k, v, _, _ = _inputs(CASES[1], torch.float32, "cpu")
    pos = torch.arange(q.shape[2])[None]
    torch.testing.assert_close(ops.attention(q, k, v, pos), ops.attention(q, k, v), rtol=0,
                               atol=0)


def test_document_bounds_are_computed_once_per_position_tensor(monkeypatch):
    # The flash kernel's cu_seqlens cost a host sync each; every layer of a step gets the same
    # position_ids tensor, so they are computed once for it, and again when it changes.
    computed, bounds = [], ops.document_bounds
    monkeypatch.setattr(ops, "document_bounds", lambda pos, b: computed.append(pos) or bounds(pos, b))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    want = torch.tensor([0, 3, 5, 6, 10, 12], dtype=torch.int32)
    for _ in range(3):
        torch.testing.assert_close(ops._cu_seqlens(pos, 2, 6, pos.device), want, rtol=0, atol=0)
    assert len(computed) == 1
    pos[0, 3:5] = torch.tensor([3, 4])  # changed in place: documents [0, 5), [5, 6), row 1's
    torch.testing.assert_close(ops._cu_seqlens(pos, 2, 6, pos.device),
                               torch.tensor([0, 5, 6, 10, 12], dtype=torch.int32), rtol=0, atol=0)
    other = pos.clone()  # equal values, another tensor: computed for it
    ops._cu_seqlens(other, 2, 6, pos.device)
    assert len(computed) == 3
    # One document per row: no boundaries to find.
    torch.testing.assert_close(ops._cu_seqlens(None, 3, 4, pos.device),
                               torch.tensor([0, 4, 8, 12], dtype=torch.int32), rtol=0, atol=0)
    assert len(computed) == 3
    # The triton kernel's spans are memoised beside them for the same tensor.
    spans = ops._spans(other, 2)
    assert ops._spans(other, 2) is spans and len(computed) == 3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("window, softcap, sinks", [(0, 0.0, False), (3, 0.0, False),
                                                    (0, 2.5, False), (3, 0.0, True)])
def test_opcheck(packed, window, softcap, sinks, kernel):
    case = (2, 4, 2, 9, 8, packed, 0, 0.0, sinks)
    q, k, v, pos, _ = _inputs(case, torch.float32, "cpu")
    sink = _sinks(case, torch.float32, "cpu")
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(),
            v.detach().requires_grad_(), pos, 0.3, window, softcap,
            None if sink is None else sink.requires_grad_())
    with _kernel(kernel):
        torch.library.opcheck(torch.ops.chronicals.attention.default, args)


def test_kernel_choice():
    q = torch.empty(1, 4, 8, 64)
    assert ops.kernel(q, packed=False, window=0) == "reference"
    assert ops.kernel(q, packed=True, window=0, softcap=30.0) == "reference"
    meta = torch.empty(1, 4, 8, 64, device="meta")
    # meta tensors are neither CUDA nor CPU: the reference would run; CUDA's choice is by device.
    assert ops.kernel(meta, packed=True, window=0) == "reference"
    with ops.forced_kernel("triton"):
        assert ops.kernel(q, packed=False, window=0) == "triton"
    assert ops.kernel(q, packed=False, window=0) == "reference"


@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_chosen_tiles_meet_the_kernels_constraint(head_dim, device_type):
    q = types.SimpleNamespace(device=torch.device(device_type), shape=(1, 2, 8, head_dim))
    for tiles in triton_kernel._tiles(q):
        assert tiles.checked() == tiles


def test_tiles_the_kernels_cannot_run_raise():
    q, k, v, pos, _ = _inputs(CASES[2], torch.float32, "cpu")
    spans = ops.document_spans(pos, q.shape[0])
    bad = triton_kernel._Tiles(16, 32, 4, 1)
    with pytest.raises(ValueError, match="rows must be a multiple of cols"):
        triton_kernel.forward(q, k, v, spans, 0.25, 0, 0.0, bad)
    out, lse = triton_kernel.forward(q, k, v, spans, 0.25, 0, 0.0)
    small = triton_kernel._Tiles(16, 16, 4, 1)
    with pytest.raises(ValueError, match="rows must be a multiple of cols"):
        triton_kernel.backward(out, q, k, v, out, lse, spans, 0.25, 0, 0.0, (small, bad))


@pytest.mark.parametrize("tiles", [(32, 16), (64, 32), (32, 32)])
def test_larger_tiles_compute_what_the_small_ones_do(tiles):
    """Tiles wider than the interpreter's default (the kind the GPU runs): same output, lse and
    gradients, on packed rows with a window, a softcap and sinks (blocks cut by documents,
    windows and the row's end)."""
    case = (1, 4, 2, 83, 16, True, 9, 1.5, True)
    q, k, v, pos, window = _inputs(case, torch.float32, "cpu")
    sinks = _sinks(case, torch.float32, "cpu")
    spans = ops.document_spans(pos, q.shape[0])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    big = triton_kernel._Tiles(*tiles, 4, 1)

    def run(t):
        out, lse = triton_kernel.forward(q, k, v, spans, 0.25, window, 1.5, t, sinks=sinks)
        grads = triton_kernel.backward(dout, q, k, v, out, lse, spans, 0.25, window, 1.5,
                                       None if t is None else (t, t), sinks=sinks)
        return out, lse, *grads

    for got, want in zip(run(big), run(None), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forced_kernel_that_cannot_take_the_inputs_raises():
    q, k, v, pos, _ = _inputs(CASES[2], torch.float32, "cpu")
    with pytest.raises(ValueError, match="one of"), ops.forced_kernel("flash"):
        pass
    with ops.forced_kernel("cudnn"), pytest.raises(ValueError, match="cudnn kernel takes CUDA"):
        ops.attention(q, k, v, pos)


def test_bad_softcap():
    q, k, v, _, _ = _inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        ops.attention(q, k, v, softcap=0.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda q, k, v, p: (q[0], k, v, p), "expected q"),
        (lambda q, k, v, p: (q, k[:, :, :-1], v[:, :, :-1], p), "do not match"),
        (lambda q, k, v, p: (q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], p),
         "not a multiple"),
        (lambda q, k, v, p: (q, k, v, p[:, :-1]), "position_ids must be"),
        (lambda q, k, v, p: (q, k, v, p.float()), "position_ids must be"),
    ],
)
def test_bad_input(bad, match):
    q, k, v, pos, _ = _inputs((2, 4, 2, 9, 8, True, 0, 0.0, False), torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        ops.attention(*bad(q, k, v, pos))


@pytest.mark.parametrize("sinks", [torch.zeros(2), torch.zeros(4, 1), torch.zeros(4).long()])
def test_bad_sinks(sinks):
    q, k, v, _, _ = _inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"sinks must be one float logit per query head, "
                                         r"shape \(4,\)"):
        ops.attention(q, k, v, sinks=sinks)


def test_bad_window():
    q, k, v, _, _ = _inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.attention(q, k, v, window=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("packed, window, softcap, sinks", [
    (False, 0, 0.0, False), (True, 0, 0.0, False), (True, 100, 0.0, False),
    (False, 100, 30.0, False), (True, 100, 0.0, True)])
def test_cuda_kernels_model_shapes(head_dim, packed, window, softcap, sinks, kernel):
    case = (2, 8, 2, 300, head_dim, packed, window, softcap, sinks)
    q, k, v, pos, _ = _inputs(case, torch.bfloat16, "cuda")
    sink = _sinks(case, torch.bfloat16, "cuda")
    if kernel == "default":
        expected = ("triton" if softcap or sinks else
                    "flash-varlen" if packed or window or head_dim > 128 else "cudnn")
        assert ops.kernel(q, packed, window, softcap, sinks) == expected
    tensors = (q, k, v) if sink is None else (q, k, v, sink)
    scale = head_dim ** -0.5
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    with _kernel(kernel):
        got = run(lambda a, b, c, sk=None: ops.attention(
            a, b, c, pos, scale=scale, window=window or None, softcap=softcap or None, sinks=sk),
            *tensors)
    eager = run(lambda a, b, c, sk=None: _sdpa(a, b, c, pos, window, scale, softcap, sk),
                *tensors)
    truth = run(lambda a, b, c, sk=None: _sdpa(a, b, c, pos, window, scale, softcap, sk),
                *(t.double() for t in tensors))
    _assert_norm_error_no_worse(got, eager, truth)


def _assert_norm_error_no_worse(got, eager, truth):
    """GPU rule (as for whole models in tests/compile_passes/harness.py): each tensor's relative
    norm error against the fp64 truth at most twice eager's in the same dtype plus one bf16 unit.
    Flash kernels round P to bf16 before the dV and dQ products, so element by element they can
    sit on the other side of the truth from eager's (fp32-accumulating) masked kernel."""
    assert len(got) == len(truth)
    for name, o, e, t in zip(("out", "dq", "dk", "dv", "dsinks"), got, eager, truth):
        assert not o.isnan().any(), name
        err = float((o.double() - t).norm() / t.norm())
        err_eager = float((e.double() - t).norm() / t.norm())
        assert err <= 2 * err_eager + 2**-7, (name, err, err_eager)
