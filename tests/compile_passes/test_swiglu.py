"""The SwiGLU and GeGLU fusions on standalone subgraphs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.compile_passes.harness import compile_fn


def test_fuses_both_operand_orders_and_chunked_halves():
    def mlp(gate, up, gate_up):
        g, u = gate_up.chunk(2, dim=-1)  # Phi-3's fused projection
        return F.silu(gate) * up, up * F.silu(gate), u * F.silu(g)

    gate, up, gate_up = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(3, 5, 48)
    outs, report = compile_fn(mlp, gate, up, gate_up)
    assert report.fired["swiglu"] == 3 and report.rejected == ()
    for out, expected in zip(outs, mlp(gate, up, gate_up)):
        torch.testing.assert_close(out, expected)


def test_fuses_tanh_geglu_but_not_exact_gelu():
    def mlp(gate, up):
        return F.gelu(gate, approximate="tanh") * up, F.gelu(gate) * up

    gate, up = torch.randn(4, 24), torch.randn(4, 24)
    outs, report = compile_fn(mlp, gate, up)
    assert report.fired["geglu"] == 1 and report.fired["swiglu"] == 0
    assert report.rejected == ()  # exact GELU is not a GeGLU candidate at all
    for out, expected in zip(outs, mlp(gate, up)):
        torch.testing.assert_close(out, expected)


def test_activation_with_another_user_is_left_alone():
    def mlp(gate, up):
        act = F.silu(gate)
        return act * up, act

    gate, up = torch.randn(4, 24), torch.randn(4, 24)
    (out, act), report = compile_fn(mlp, gate, up)
    assert report.fired["swiglu"] == 0
    (rejection,) = report.rejected
    assert "used 2 times" in rejection.reason
    torch.testing.assert_close(out, F.silu(gate) * up)


def test_broadcasting_product_is_rejected_with_reason():
    gate, up = torch.randn(4, 24), torch.randn(1, 24)
    out, report = compile_fn(lambda g, u: F.silu(g) * u, gate, up)
    assert report.fired["swiglu"] == 0
    (rejection,) = report.rejected
    assert "broadcast" in rejection.reason
    torch.testing.assert_close(out, F.silu(gate) * up)
