"""chronicals::rms_norm against an fp64 truth under the numerics rule of tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from chronicals import reference
from chronicals.ops import rms_norm as rms_norm_module
from chronicals.ops._launch import as_rows, use_triton
from chronicals.ops.rms_norm import rms_norm
from tests.helpers import ULP, assert_no_worse_than_eager, devices

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd hidden sizes; (600, 24) gives the backward several row tiles per program (some fully
# masked), exercising the partial-dW accumulation across tiles.
SHAPES = [(3, 5, 96), (7, 200), (2, 1000), (4, 33), (600, 24)]
ATOL = 1e-6


def _truth(x: torch.Tensor, w: torch.Tensor, gemma: bool) -> torch.Tensor:
    """The exact math in fp64, without the intermediate cast."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return normed * (1.0 + w) if gemma else w * normed


def _truth_dw_llama(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Llama's y = w * cast(n) is linear in w with coefficient cast(n), so the exact dW is
    sum(dy * cast(n)) with HF's cast(n) (fp32 statistics), accumulated in fp64. The fp64 truth
    without the cast would measure the cast's own rounding, which kernel and eager share; eager's
    extra bf16 product rounding then cancels it by luck at some elements."""
    xf = x.float()
    cast_n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return (dy.double() * cast_n.double()).reshape(-1, x.shape[-1]).sum(0)


def _inputs(shape, dtype, w_dtype, device, gemma):
    x = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    # Gemma stores w around 0 and scales by (1 + w); Llama stores w around 1.
    w = 0.5 * torch.randn(shape[-1], device=device) + (0.0 if gemma else 1.0)
    return x, w.to(w_dtype)


def _grads(fn, x, w, dy, wrt_w=True):
    x_ = x.detach().requires_grad_()
    w_ = w.detach().requires_grad_(wrt_w)
    y = fn(x_, w_)
    y.backward(dy)
    return y.detach(), x_.grad, w_.grad


def _check_all(name, x, w, gemma, y, dx, dw, dy):
    """Compare a (y, dx, dw) against eager (reference, same dtypes) and the fp64 truth."""
    eager_y, eager_dx, eager_dw = _grads(
        lambda a, b: reference.rms_norm(a, b, EPS, gemma), x, w, dy
    )
    truth_y, truth_dx, truth_dw = _grads(
        lambda a, b: _truth(a, b, gemma), x.double(), w.double(), dy.double()
    )
    if not gemma:
        truth_dw = _truth_dw_llama(x, dy)
    assert y.dtype == eager_y.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert y.is_contiguous()
    assert_no_worse_than_eager(f"{name} y", y, eager_y, truth_y, atol=ATOL)
    assert_no_worse_than_eager(f"{name} dx", dx, eager_dx, truth_dx, atol=ATOL)
    # dW sums over rows in fp32 in another order than eager's reduction; the order alone moves an
    # fp32 sum by about sqrt(rows) ulps of its magnitude (600 rows: ~25 ulps, 3e-6 relative).
    rows = x.numel() // x.shape[-1]
    atol_dw = ATOL + rows**0.5 * ULP[torch.float32] * float(truth_dw.abs().max())
    assert_no_worse_than_eager(f"{name} dw", dw, eager_dw, truth_dw, atol=atol_dw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_truth(device, dtype, shape, gemma):
    x, w = _inputs(shape, dtype, dtype, device, gemma)
    dy = torch.randn(shape, device=device).to(dtype)
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, EPS, gemma), x, w, dy)
    _check_all("rms_norm", x, w, gemma, y, dx, dw, dy)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.float32)],
    ids=str,
)
def test_forward_rounds_like_hf(device, x_dtype, w_dtype, gemma):
    """The numerics rule cannot see a kernel that is more accurate than HF (e.g. one skipping
    Llama's intermediate cast): pin the cast order by agreeing with eager bit for bit. Only a
    last-bit difference in the fp32 rstd can flip a rounding (~1e-4 of elements in fp16); skipping
    the cast changes ~1/4 of them."""
    x, w = _inputs((64, 200), x_dtype, w_dtype, device, gemma)
    y = rms_norm(x, w, EPS, gemma)
    eager = reference.rms_norm(x, w, EPS, gemma)
    same = (y == eager).double().mean().item()
    assert same >= 0.99, f"only {same:.4f} of elements equal eager's"
    torch.testing.assert_close(y, eager, rtol=ULP[x_dtype], atol=0.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_block_rows_match_truth(device, dtype, gemma):
    """A 64-column block cap forces the two-pass loop over column blocks (130 = 64 + 64 + 2);
    5 rows over 3 backward programs give two rows per program (the last program's second one
    masked), accumulating dW in each program's partial row across rows."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("calls the Triton launchers: needs TRITON_INTERPRET=1 or a GPU")
    shape = (5, 130)
    x, w = _inputs(shape, dtype, dtype, device, gemma)
    dy = torch.randn(shape, device=device).to(dtype)
    y = rms_norm_module._rms_norm_fwd(x, w, EPS, gemma, max_block_cols=64)
    dx, dw = rms_norm_module._rms_norm_bwd(dy, x, w, EPS, gemma, True, max_block_cols=64)
    _check_all("rms_norm multi-block", x, w, gemma, y, dx, dw, dy)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hidden_beyond_block_cap_matches_truth(device, dtype):
    """Hidden 10000 > the 8192-column block cap, through the public op at its default config."""
    x, w = _inputs((2, 10000), dtype, dtype, device, False)
    dy = torch.randn(x.shape, device=device).to(dtype)
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, EPS), x, w, dy)
    _check_all("rms_norm hidden 10000", x, w, False, y, dx, dw, dy)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.bfloat16, torch.float16)],
    ids=str,
)
def test_mixed_dtypes_promote_like_reference(device, x_dtype, w_dtype, gemma):
    x, w = _inputs((6, 72), x_dtype, w_dtype, device, gemma)
    expected = x_dtype if gemma else torch.promote_types(w_dtype, x_dtype)
    dy = torch.randn(x.shape, device=device).to(expected)
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, EPS, gemma), x, w, dy)
    assert y.dtype == expected
    _check_all("rms_norm mixed", x, w, gemma, y, dx, dw, dy)


@pytest.mark.parametrize("device", devices())
def test_frozen_weight_skips_dw(device, monkeypatch):
    x, w = _inputs((7, 200), torch.bfloat16, torch.bfloat16, device, False)
    dy = torch.randn(x.shape, device=device).to(torch.bfloat16)
    asked = []
    launcher, fallback = rms_norm_module._rms_norm_bwd, rms_norm_module._reference_backward

    def spy(real):
        def wrapped(dy, x, weight, eps, gemma, compute_dw, **kwargs):
            asked.append(compute_dw)
            return real(dy, x, weight, eps, gemma, compute_dw, **kwargs)
        return wrapped

    monkeypatch.setattr(rms_norm_module, "_rms_norm_bwd", spy(launcher))
    monkeypatch.setattr(rms_norm_module, "_reference_backward", spy(fallback))
    _, dx_frozen, dw_frozen = _grads(lambda a, b: rms_norm(a, b, EPS), x, w, dy, wrt_w=False)
    _, dx_trained, _ = _grads(lambda a, b: rms_norm(a, b, EPS), x, w, dy, wrt_w=True)
    assert asked == [False, True]
    assert dw_frozen is None
    torch.testing.assert_close(dx_frozen, dx_trained, rtol=0, atol=0)
    dx, dw = torch.ops.chronicals.rms_norm_backward(dy, x, w, EPS, False, False)
    assert dw.shape == (0,)
    torch.testing.assert_close(dx, dx_frozen, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dw_finish_sums_every_partial_row(device, dtype):
    """The finishing kernel over more partial rows than one row block and a ragged last column
    block. The partials are multiples of 1/64 small enough that every fp32 sum is exact in any
    order, so the result must equal PyTorch's sum-then-cast bit for bit (rounding included)."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the finishing kernel is Triton's (CPU needs the interpreter)")
    block_rows, block_cols, _ = rms_norm_module._dw_config()
    rows, cols = 2 * block_rows + 5, 3 * block_cols + 7
    partial = torch.randint(-4096, 4096, (rows, cols), device=device).float() / 64
    partial[:, 0] = 1 / 64 + 2.0**-20  # sums to a value between two bf16/fp16 neighbours
    got = rms_norm_module._finish_dw(partial, dtype)
    assert got.dtype == dtype and got.shape == (cols,)
    torch.testing.assert_close(got, partial.sum(0).to(dtype), rtol=0, atol=0)


def _non_contiguous_views(device):
    # A slice of a fused projection: leading dims collapse, so the kernel reads it in place with
    # row stride 100.
    sliced = torch.randn(3, 4, 100, device=device)[..., 10:50]
    # A heads-first view of (B, S, heads, D): unit column stride, but rows do not collapse.
    transposed = torch.randn(2, 6, 3, 40, device=device).transpose(1, 2)
    # Last dim strided: needs a copy.
    strided_last = torch.randn(5, 40, 7, device=device).transpose(-1, -2)
    return {"sliced": sliced, "transposed": transposed, "strided_last": strided_last}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["sliced", "transposed", "strided_last"])
def test_non_contiguous_inputs(device, kind):
    x = _non_contiguous_views(device)[kind]
    assert not x.is_contiguous()
    w = 0.5 * torch.randn(x.shape[-1], device=device) + 1.0
    dy = torch.randn(x.shape[::-1], device=device).permute(*reversed(range(x.dim())))
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, EPS), x, w, dy)
    _check_all(f"rms_norm {kind}", x, w, False, y, dx, dw, dy)
    # The op's own dx is contiguous (its fake says so); x.grad above follows x's layout because
    # autograd restrides gradients of non-contiguous leaves.
    dx_op, _ = torch.ops.chronicals.rms_norm_backward(dy, x, w, EPS, False, True)
    assert dx_op.is_contiguous()
    torch.testing.assert_close(dx_op, dx, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("kind", ["strided", "expanded", "column"])
def test_non_contiguous_weight(device, kind, gemma):
    """The kernels read w with unit stride: a strided, expanded (stride 0) or column view of a
    parameter must give the same y, dx and dW as its contiguous copy."""
    x = torch.randn(5, 24, device=device)
    base = 0.5 * torch.randn(48, device=device) + (0.0 if gemma else 1.0)
    w = {
        "strided": base[::2],
        "expanded": base[:1].expand(24),
        "column": base.view(24, 2)[:, 1],
    }[kind]
    assert not w.is_contiguous()
    dy = torch.randn(x.shape, device=device)
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, EPS, gemma), x, w, dy)
    _check_all(f"rms_norm weight {kind}", x, w.contiguous(), gemma, y, dx, dw, dy)


def test_sliced_rows_are_read_in_place():
    x = _non_contiguous_views("cpu")["sliced"]
    rows = as_rows(x)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (100, 1)


@pytest.mark.parametrize("device", devices())
def test_empty_rows(device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = rms_norm(x, w, EPS)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device", devices())
def test_zero_hidden(device):
    x = torch.randn(3, 0, device=device, requires_grad=True)
    w = torch.ones(0, device=device, requires_grad=True)
    y = rms_norm(x, w, EPS)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("device", devices())
def test_compiles_with_non_contiguous_input(device):
    x = torch.randn(2, 6, 3, 40, device=device).transpose(1, 2).requires_grad_()
    w = torch.randn(40, device=device, requires_grad=True)
    fn = torch.compile(lambda a, b: rms_norm(a, b, EPS) * 2.0, backend="aot_eager", fullgraph=True)
    y = fn(x, w)
    y.sum().backward()
    y_eager, dx_eager, dw_eager = _grads(
        lambda a, b: reference.rms_norm(a, b, EPS) * 2.0, x, w, torch.ones_like(y)
    )
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(x.grad, dx_eager)
    torch.testing.assert_close(w.grad, dw_eager)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("w_requires_grad", [True, False])
def test_opcheck_forward(device, dtype, gemma, w_requires_grad):
    x = torch.randn(3, 5, 24, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(24, device=device, dtype=dtype, requires_grad=w_requires_grad)
    torch.library.opcheck(torch.ops.chronicals.rms_norm.default, (x, w, EPS, gemma))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("compute_dw", [True, False])
def test_opcheck_backward(device, gemma, compute_dw):
    x = torch.randn(3, 5, 24, device=device, dtype=torch.bfloat16)
    w = torch.randn(24, device=device, dtype=torch.bfloat16)
    dy = torch.randn(3, 5, 24, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.chronicals.rms_norm_backward.default, (dy, x, w, EPS, gemma, compute_dw)
    )


@pytest.mark.parametrize(
    "x, w, eps, error, match",
    [
        (torch.randn(4, 8), torch.ones(6), EPS, ValueError, r"shape \(8,\) to match .* Got \(6,\)"),
        (torch.randn(4, 8), torch.ones(2, 8), EPS, ValueError, r"1-D .* Got shape \(2, 8\)"),
        (torch.tensor(1.0), torch.ones(1), EPS, ValueError, "at least 1 dimension"),
        (torch.randn(4, 8), torch.ones(8), 0.0, ValueError, "eps must be finite and > 0. Got 0.0"),
        (torch.randn(4, 8), torch.ones(8), -1e-6, ValueError, "eps must be finite and > 0"),
        (torch.randn(4, 8), torch.ones(8), float("inf"), ValueError, "finite and > 0. Got inf"),
        (torch.randn(4, 8), torch.ones(8), float("nan"), ValueError, "finite and > 0. Got nan"),
        (torch.ones(4, 8, dtype=torch.int32), torch.ones(8), EPS, TypeError,
         "x must be float32, bfloat16 or float16. Got torch.int32"),
        (torch.randn(4, 8), torch.ones(8, dtype=torch.float64), EPS, TypeError,
         "weight must be .* Got torch.float64"),
        (torch.randn(4, 8), torch.ones(8, device="meta"), EPS, ValueError, "one device"),
    ],
    ids=["shape", "weight-2d", "x-0d", "eps-0", "eps-neg", "eps-inf", "eps-nan", "x-int", "w-fp64",
         "devices"],
)
def test_bad_inputs_raise(x, w, eps, error, match):
    with pytest.raises(error, match=match):
        rms_norm(x, w, eps)
