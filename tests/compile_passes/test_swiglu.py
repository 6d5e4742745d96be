"""The SwiGLU and GeGLU fusions on standalone subgraphs."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from chronicals.ops import swiglu as swiglu_ops
from tests.compile_passes.harness import compile_and_compare, compile_fn
from tests.models import DECLINED, EXPECTED, LAYERS


@pytest.fixture
def forward_ops(monkeypatch):
    """Names of the chronicals gated-activation forward ops that run, in order."""
    calls = []
    original = swiglu_ops._forward

    def recording(op, *args, **kwargs):
        calls.append(op)
        return original(op, *args, **kwargs)

    monkeypatch.setattr(swiglu_ops, "_forward", recording)
    return calls


def test_fuses_both_operand_orders_and_chunked_halves(forward_ops):
    def mlp(gate, up, gate_up):
        g, u = gate_up.chunk(2, dim=-1)  # Phi-3's fused projection
        return F.silu(gate) * up, up * F.silu(gate), u * F.silu(g)

    gate, up, gate_up = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(3, 5, 48)
    outs, report = compile_fn(mlp, gate, up, gate_up)
    assert report.fired["swiglu"] == 3 and report.rejected == ()
    assert sorted(forward_ops) == ["swiglu", "swiglu", "swiglu_gate_up"]
    for out, expected in zip(outs, mlp(gate, up, gate_up)):
        torch.testing.assert_close(out, expected)


def test_chunked_gate_up_gradient_matches_eager(forward_ops):
    def mlp(gate_up):
        gate, up = gate_up.chunk(2, -1)
        return (up * F.silu(gate)).square().sum()

    gate_up = torch.randn(3, 5, 48, requires_grad=True)
    loss, report = compile_fn(mlp, gate_up)
    (grad,) = torch.autograd.grad(loss, gate_up)
    (expected,) = torch.autograd.grad(mlp(gate_up), gate_up)
    assert report.fired["swiglu"] == 1 and forward_ops == ["swiglu_gate_up"]
    torch.testing.assert_close(grad, expected)


def test_phi3_mlp_runs_the_gate_up_op(forward_ops):
    result = compile_and_compare("phi3", torch.float32)
    result.assert_counts("phi3")
    assert forward_ops and set(forward_ops) == {"swiglu_gate_up"}
    result.assert_matches_eager(torch.float32)


@pytest.mark.parametrize(
    "case",
    ["activation on the second half", "three chunks", "halves of dim 0", "half used elsewhere"],
)
def test_chunked_look_alikes_do_not_become_gate_up(case, forward_ops):
    def mlp(x):
        if case == "activation on the second half":
            up, gate = x.chunk(2, -1)
            return up * F.silu(gate)
        if case == "three chunks":
            gate, up, _ = x.chunk(3, -1)
            return up * F.silu(gate)
        if case == "halves of dim 0":
            gate, up = x.chunk(2, 0)
            return up * F.silu(gate)
        gate, up = x.chunk(2, -1)
        return up * F.silu(gate), up + 1

    x = torch.randn(4, 5, 48)
    outs, report = compile_fn(mlp, x)
    # The product is still fused, as `swiglu` on the two views; never as the gate_up op.
    assert report.fired["swiglu"] == 1 and forward_ops == ["swiglu"]
    torch.testing.assert_close(outs, mlp(x))


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
    (out, _act), report = compile_fn(mlp, gate, up)
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


def test_pointwise_operands_are_declined_not_rejected(forward_ops):
    """An operand computed by a point-wise op (here a sum, as LoRA's base + adapter) is left to
    Inductor, which fuses the sum into its activation kernel; the report lists the product as
    declined, which strict mode accepts."""

    def mlp(gate, up, bias):
        return F.silu(gate + bias) * up, F.silu(gate) * (up * 2.0)

    gate, up, bias = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(24)
    outs, report = compile_fn(mlp, gate, up, bias, strict=True)
    assert report.fired["swiglu"] == 0 and forward_ops == [] and report.rejected == ()
    assert [r.fusion for r in report.declined] == ["swiglu", "swiglu"]
    assert "Inductor fuses into the activation" in report.declined[0].reason
    assert "rejected 0; declined 2 swiglu [ops:" in report.summary()
    for out, expected in zip(outs, mlp(gate, up, bias)):
        torch.testing.assert_close(out, expected)


def test_lora_mlp_is_left_to_inductor(forward_ops):
    """PEFT LoRA on every linear: gate and up are sums, so SwiGLU is declined in each layer while
    the other fusions fire (LoRA's rewrite on each of the 7 adapted linears a layer); loss and
    gradients match eager."""
    import copy

    import peft

    from tests.models import tiny_batch, tiny_model

    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False))
    eager = copy.deepcopy(model)
    ids, labels = tiny_batch()

    def loss_fn(model, ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    loss, report = compile_fn(lambda *a: loss_fn(model, *a), ids, labels, strict=True)
    expected = EXPECTED["llama"]
    assert report.fired == {**expected, "swiglu": 0, "lora": 7 * LAYERS} and forward_ops == []
    declined = collections.Counter(r.fusion for r in report.declined)
    assert declined == {**DECLINED["llama"], "swiglu": expected["swiglu"]}
    assert report.rejected == ()
    reference = loss_fn(eager, ids, labels)
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cast_operand_is_declined(forward_ops):
    """A dtype cast of a sum (PEFT's fp32 adapters' sum cast back to the model's dtype) counts as
    point-wise: Inductor fuses the cast and the sum into its activation kernel."""

    def mlp(gate, bias, up):
        return F.silu((gate + bias).to(torch.bfloat16)) * up

    gate, bias = torch.randn(3, 5, 24), torch.randn(24)
    up = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    out, report = compile_fn(mlp, gate, bias, up, strict=True)
    assert report.fired["swiglu"] == 0 and forward_ops == [] and report.rejected == ()
    (declined,) = report.declined
    assert declined.fusion == "swiglu" and "aten.to" in declined.reason
    torch.testing.assert_close(out, mlp(gate, bias, up), atol=0, rtol=0)


@pytest.mark.parametrize("lora_precision", ["mixed", "exact"])
def test_peft_fp32_adapters_on_a_bf16_model_are_declined(forward_ops, lora_precision):
    """PEFT keeps adapters in fp32 by default and casts each adapted linear's sum back to bf16:
    SwiGLU is declined on those casts (lora_precision='exact'), and on the bf16 sums that LoRA's
    mixed-precision rewrite leaves instead."""
    import peft

    from tests.models import tiny_batch, tiny_model

    model = peft.get_peft_model(tiny_model("llama", torch.bfloat16), peft.LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False))
    assert model.base_model.model.model.layers[0].mlp.gate_proj.lora_A["default"].weight.dtype == (
        torch.float32)
    ids, labels = tiny_batch()

    def loss_fn(ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    loss, report = compile_fn(loss_fn, ids, labels, strict=True, lora_precision=lora_precision)
    declined = collections.Counter(r.fusion for r in report.declined if r.fusion != "lora")
    assert report.fired["swiglu"] == 0 and forward_ops == []
    assert declined == {**DECLINED["llama"], "swiglu": EXPECTED["llama"]["swiglu"]}
    # A bf16 model: the fused LM head + CE (and, mixed, the bf16 adapter GEMMs) round differently
    # from eager, within a bf16 unit.
    torch.testing.assert_close(loss, loss_fn(ids, labels), atol=0, rtol=2**-8)
