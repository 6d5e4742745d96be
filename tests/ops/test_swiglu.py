"""chronicals.ops.swiglu: SwiGLU and GeGLU forward and backward against eager and fp64 truth."""

from __future__ import annotations

import pytest
import torch

from chronicals import reference
from chronicals.ops import swiglu as swiglu_module
from chronicals.ops._launch import use_triton
from chronicals.ops.swiglu import geglu, swiglu, swiglu_gate_up
from tests.helpers import assert_no_worse_than_eager, devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 7, 50), (5, 129), (1, 1000)]
# Absolute slack on top of eager's own error: fused fp32 arithmetic and eager's differ in the last
# bits of fp32 (a few 1e-7 on these O(1) values); in bf16/fp16 the 1-ulp rule term covers rounding.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 0.0, torch.float16: 0.0}

OPS = {
    "swiglu": (swiglu, reference.swiglu),
    "geglu": (geglu, reference.geglu),
}
BACKWARD_OPS = {
    "swiglu": torch.ops.chronicals.swiglu_backward,
    "geglu": torch.ops.chronicals.geglu_backward,
}


def _inputs(shape, dtype, device, requires_grad=False):
    # gate spread over the activation's curved region and both tails.
    gate = (2.0 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device)
    up = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    return gate.requires_grad_(requires_grad), up.requires_grad_(requires_grad)


def _grads(fn, gate, up, grad_out):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    return torch.autograd.grad(fn(gate, up), (gate, up), grad_out)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = getattr(torch.ops.chronicals, name)
    gate, up = _inputs((3, 20), torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(op, (gate, up))
    # Row-strided halves of one tensor, as Phi-3 passes them: the fake must match the real strides.
    parent = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(op, tuple(parent.chunk(2, -1)))


@pytest.mark.parametrize("name", BACKWARD_OPS)
def test_opcheck_backward(name):
    gate, up = _inputs((3, 20), torch.float32, "cpu")
    torch.library.opcheck(BACKWARD_OPS[name], (torch.randn(3, 20), gate, up))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_forward_matches_truth(name, dtype, shape, device):
    fused, ref = OPS[name]
    gate, up = _inputs(shape, dtype, device)
    out = fused(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    assert_no_worse_than_eager(
        f"{name} {dtype}", out, ref(gate, up), ref(gate.double(), up.double()), atol=ATOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_backward_matches_truth(name, dtype, shape, device):
    fused, ref = OPS[name]
    gate, up = _inputs(shape, dtype, device)
    grad_out = torch.randn(shape, dtype=dtype, device=device)
    grads = _grads(fused, gate, up, grad_out)
    eager = _grads(ref, gate, up, grad_out)
    truth = _grads(ref, gate.double(), up.double(), grad_out.double())
    for label, g, e, t in zip(("dgate", "dup"), grads, eager, truth):
        assert g.dtype == dtype and g.is_contiguous()
        assert_no_worse_than_eager(f"{name} {dtype} {label}", g, e, t, atol=ATOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_chunked_inputs_match_contiguous_copies(name, dtype, device):
    fused, _ = OPS[name]
    # (2, 9, 2 * 50) chunks collapse to one row dim with row stride 100; the transposed parent's
    # chunks do not collapse and take the copy path.
    parents = {
        "collapsible": torch.randn(2, 9, 100, dtype=dtype, device=device),
        "transposed": torch.randn(9, 2, 100, dtype=dtype, device=device).transpose(0, 1),
    }
    for layout, parent in parents.items():
        gate, up = parent.chunk(2, -1)
        assert not gate.is_contiguous()
        expected = fused(gate.contiguous(), up.contiguous())
        _assert_same(fused(gate, up), expected, layout)
        grad_out = torch.randn_like(expected)
        for got, want in zip(
            BACKWARD_OPS[name](grad_out, gate, up),
            BACKWARD_OPS[name](grad_out, gate.contiguous(), up.contiguous()),
        ):
            _assert_same(got, want, layout)


def _assert_same(got, want, msg=None):
    """Bitwise on the kernels, whatever the input strides. The reference path (CPU without the
    interpreter) is eager PyTorch, whose CPU kernels round differently for strided inputs."""
    assert got.is_contiguous()
    exact = use_triton(got)
    torch.testing.assert_close(got, want, rtol=0 if exact else None, atol=0 if exact else None,
                               msg=msg)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_gradients_flow_to_chunked_parent(name, dtype, device):
    fused, ref = OPS[name]
    parent = (2.0 * torch.randn(4, 6, 2 * 37, dtype=torch.float64)).to(dtype).to(device)
    weight = torch.randn(4, 6, 37, dtype=dtype, device=device)

    def parent_grad(fn, p):
        p = p.detach().requires_grad_()
        (fn(*p.chunk(2, -1)) * weight).sum().backward()
        return p.grad

    got = parent_grad(fused, parent)
    assert_no_worse_than_eager(
        f"{name} {dtype} d(gate_up)", got, parent_grad(ref, parent),
        parent_grad(ref, parent.double()), atol=ATOL[dtype])
    # `.sum()` alone hands the backward a stride-0 (expanded) grad_out.
    p = parent.detach().requires_grad_()
    fused(*p.chunk(2, -1)).sum().backward()
    gate, up = parent.chunk(2, -1)
    expected = torch.cat(BACKWARD_OPS[name](torch.ones_like(gate), gate, up), dim=-1)
    _assert_same(p.grad, expected)


def test_opcheck_swiglu_gate_up():
    torch.library.opcheck(
        torch.ops.chronicals.swiglu_gate_up, (torch.randn(3, 40, requires_grad=True),))
    torch.library.opcheck(
        torch.ops.chronicals.swiglu_gate_up_backward, (torch.randn(3, 20), torch.randn(3, 40)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_gate_up_matches_swiglu_on_chunks(dtype, device):
    # Same kernels, so bitwise the same as swiglu on the views; d(gate_up) is one contiguous
    # tensor written by the kernel, equal to autograd's concatenation of dgate and dup.
    parent = (2.0 * torch.randn(4, 6, 2 * 37, dtype=torch.float64)).to(dtype).to(device)
    grad_out = torch.randn(4, 6, 37, dtype=dtype, device=device)
    p = parent.detach().requires_grad_()
    out = swiglu_gate_up(p)
    out.backward(grad_out)
    q = parent.detach().requires_grad_()
    expected = swiglu(*q.chunk(2, -1))
    expected.backward(grad_out)
    _assert_same(out, expected)
    _assert_same(p.grad, q.grad)


def test_swiglu_gate_up_rejects_odd_last_dim():
    with pytest.raises(ValueError, match=r"swiglu_gate_up: gate_up must have an even last dim"):
        swiglu_gate_up(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"swiglu_gate_up_backward: grad_out must have gate's sh"):
        torch.ops.chronicals.swiglu_gate_up_backward(torch.randn(3, 5), torch.randn(3, 8))


@pytest.mark.parametrize("name", OPS)
def test_extreme_gates_no_nan(name):
    fused, ref = OPS[name]
    gate = torch.tensor([-1e4, -100.0, -30.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 30.0, 100.0, 1e4])
    up = torch.linspace(-2.0, 2.0, gate.numel())
    grad_out = torch.ones_like(gate)
    assert_no_worse_than_eager(
        name, fused(gate, up), ref(gate, up), ref(gate.double(), up.double()), atol=1e-6)
    truth = _grads(ref, gate.double(), up.double(), grad_out.double())
    for g, e, t in zip(_grads(fused, gate, up, grad_out), _grads(ref, gate, up, grad_out), truth):
        assert_no_worse_than_eager(f"{name} grad", g, e, t, atol=1e-6)


@pytest.mark.parametrize("name", OPS)
def test_reference_path_equals_eager(name, monkeypatch):
    # CPU without TRITON_INTERPRET runs the reference; it must be exactly eager autograd.
    monkeypatch.setattr(swiglu_module, "use_triton", lambda t: False)
    fused, ref = OPS[name]
    gate, up = torch.randn(2, 5, 64, dtype=torch.bfloat16).chunk(2, -1)
    grad_out = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    out = fused(gate, up)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref(gate, up), rtol=0, atol=0)
    for got, want in zip(_grads(fused, gate, up, grad_out), _grads(ref, gate, up, grad_out)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPS)
def test_empty_and_scalar_inputs(name):
    fused, ref = OPS[name]
    empty = torch.randn(0, 8)
    assert fused(empty, empty).shape == (0, 8)
    gate, up = torch.tensor(1.5), torch.tensor(-0.5)
    torch.testing.assert_close(fused(gate, up), ref(gate, up))


def test_compiles_fullgraph_with_chunked_inputs():
    def mlp(gate_up):
        return swiglu(*gate_up.chunk(2, -1))

    parent = torch.randn(2, 3, 32, requires_grad=True)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    out = compiled(parent)
    out.sum().backward()
    expected = parent.detach().requires_grad_()
    mlp(expected).sum().backward()
    torch.testing.assert_close(out, mlp(parent), rtol=0, atol=0)
    torch.testing.assert_close(parent.grad, expected.grad, rtol=0, atol=0)


def _other_device() -> str:
    return "cuda" if torch.cuda.is_available() else "meta"


@pytest.mark.parametrize("name", OPS)
def test_bad_inputs_raise(name):
    fused, _ = OPS[name]
    backward = BACKWARD_OPS[name]
    x = torch.randn(4, 6)
    shape = rf"{name}: up must have gate's shape \(4, 6\)\. Got \(4, 5\)\."
    with pytest.raises(ValueError, match=shape):
        fused(x, torch.randn(4, 5))
    dtype = rf"{name}: up must have gate's dtype torch.float32\. Got torch.bfloat16\."
    with pytest.raises(TypeError, match=dtype):
        fused(x, x.bfloat16())
    integer = rf"{name}: gate must be float32, bfloat16 or float16\. Got torch.int64\."
    with pytest.raises(TypeError, match=integer):
        fused(x.long(), x.long())
    with pytest.raises(ValueError, match=rf"{name}: all inputs must be on one device"):
        fused(x, x.to(_other_device()))
    with pytest.raises(ValueError, match=rf"{name}_backward: grad_out must have gate's shape"):
        backward(torch.randn(4, 5), x, x)
    with pytest.raises(TypeError, match=rf"{name}_backward: grad_out must have gate's dtype"):
        backward(x.half(), x, x)


@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_int64_offsets_cuda(name):
    # Past 2**31 elements int32 offsets would wrap: a flat launch over 2**31 + 4096 elements, and a
    # row-strided launch whose last rows start past element 2**31 of the chunked parent.
    fused, ref = OPS[name]
    cols = 8192
    rows = (2**31 + 4096) // cols + 1
    gate = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    up = torch.randn_like(gate)
    out = fused(gate, up)
    torch.testing.assert_close(out[-3:], fused(gate[-3:].clone(), up[-3:].clone()), rtol=0, atol=0)
    tail_gate, tail_up = gate[-3:].double(), up[-3:].double()
    assert_no_worse_than_eager(
        name, out[-3:], ref(gate[-3:], up[-3:]), ref(tail_gate, tail_up), atol=0.0)
    del gate, up, out
    parent = torch.randn(rows // 2 + 1, 2 * cols, dtype=torch.bfloat16, device="cuda")
    gate, up = parent.chunk(2, -1)
    out = fused(gate, up)
    torch.testing.assert_close(out[-3:], fused(gate[-3:].clone(), up[-3:].clone()), rtol=0, atol=0)
