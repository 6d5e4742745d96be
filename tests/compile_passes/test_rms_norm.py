"""The RMSNorm fusion on standalone subgraphs: what it fuses, what it leaves alone and why."""

from __future__ import annotations

import pytest
import torch

from chronicals import reference
from tests.compile_passes.harness import compile_fn


def _llama_norm(x, w):
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(variance + 1e-5)).to(x.dtype)


def _eps_outside_rsqrt(x, w):
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * (torch.rsqrt(variance) + 1e-5)).to(x.dtype)


def _variance_used_twice(x, w):
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(variance + 1e-5)).to(x.dtype), variance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fuses_llama_norm_and_captures_eps(dtype):
    x, w = torch.randn(3, 5, 40, dtype=dtype), torch.randn(40, dtype=dtype)
    out, report = compile_fn(_llama_norm, x, w)
    assert report.fired["rms_norm"] == 1 and report.rejected == ()
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5), atol=0, rtol=2**-7)


def test_eps_outside_rsqrt_is_left_alone():
    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(_eps_outside_rsqrt, x, w)
    assert report.fired["rms_norm"] == 0
    (rejection,) = report.rejected
    assert rejection.fusion == "rms_norm" and "spelling" in rejection.reason
    torch.testing.assert_close(out, _eps_outside_rsqrt(x, w))


def test_intermediate_with_another_user_is_left_alone():
    x, w = torch.randn(4, 24), torch.randn(24)
    (out, variance), report = compile_fn(_variance_used_twice, x, w)
    assert report.fired["rms_norm"] == 0
    (rejection,) = report.rejected
    assert "also used outside" in rejection.reason
    expected, expected_variance = _variance_used_twice(x, w)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(variance, expected_variance)


def test_strict_turns_a_rejection_into_an_error():
    x, w = torch.randn(4, 24), torch.randn(24)
    with pytest.raises(RuntimeError, match=r"(?s)strict.*rms_norm"):
        compile_fn(_eps_outside_rsqrt, x, w, strict=True)


def test_mismatched_weight_is_rejected_with_reason():
    # A broadcasting weight of shape (1,) looks like a norm but is not one the op supports.
    x, w = torch.randn(4, 24), torch.randn(1)
    out, report = compile_fn(_llama_norm, x, w)
    assert report.fired["rms_norm"] == 0
    (rejection,) = report.rejected
    assert "weight shape (1,)" in rejection.reason
    torch.testing.assert_close(out, _llama_norm(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_of_a_pointwise_result_is_declined_not_rejected(dtype):
    """A decoder's residual add feeding its norm: Inductor fuses the add into its own norm
    kernels, so the norm is left to it (declined, which strict mode accepts). The same norm of
    a matmul's result fires."""

    def block(h, delta, w, proj):
        h = h + delta
        return _llama_norm(h, w), h, _llama_norm(h @ proj, w)

    h, delta = torch.randn(3, 5, 40, dtype=dtype), torch.randn(3, 5, 40, dtype=dtype)
    w, proj = torch.randn(40, dtype=dtype), torch.randn(40, 40, dtype=dtype)
    outs, report = compile_fn(block, h, delta, w, proj, strict=True)
    assert report.fired["rms_norm"] == 1 and report.rejected == ()
    (declined,) = report.declined
    assert declined.fusion == "rms_norm" and "residual add" in declined.reason
    assert "declined 1 rms_norm" in report.summary()
    for out, expected in zip(outs, block(h, delta, w, proj)):
        torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
