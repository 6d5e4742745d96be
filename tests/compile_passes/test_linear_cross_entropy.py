"""The LM-head + cross-entropy fusion through HF's loss path, and why it does not fire when the
logits escape."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

import compile_passes
from tests.compile_passes.harness import compile_fn
from tests.helpers import count_frozen_lce_calls
from tests.models import EXPECTED, tiny_batch, tiny_config_kwargs, tiny_model


def _grads_close(model, other, atol=1e-5):
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4, msg=name)


def test_num_items_in_batch_path_fuses_and_matches_eager():
    model = tiny_model("qwen2")
    eager = copy.deepcopy(model)
    ids, labels = tiny_batch()
    count = torch.tensor(7)  # e.g. the valid-token count over several micro-batches

    def loss_fn(model, ids, labels, count):
        return model(input_ids=ids, labels=labels, num_items_in_batch=count, use_cache=False).loss

    loss, report = compile_fn(lambda *a: loss_fn(model, *a), ids, labels, count)
    assert report.fired["linear_cross_entropy"] == 1 and report.rejected == ()
    expected = loss_fn(eager, ids, labels, count)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    _grads_close(model, eager)


def test_preshifted_labels_fuse():
    model = tiny_model("llama")
    eager = copy.deepcopy(model)
    ids, labels = tiny_batch()
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()

    def loss_fn(model, ids, shift_labels):
        return model(input_ids=ids, labels=ids, shift_labels=shift_labels, use_cache=False).loss

    loss, report = compile_fn(lambda *a: loss_fn(model, *a), ids, shift_labels)
    assert report.fired["linear_cross_entropy"] == 1
    torch.testing.assert_close(loss, loss_fn(eager, ids, shift_labels))


def test_logits_as_graph_output_are_reported_not_fused():
    model = tiny_model("llama")
    ids, labels = tiny_batch()
    out, report = compile_fn(
        lambda ids, labels: model(input_ids=ids, labels=labels, use_cache=False), ids, labels
    )
    assert report.fired["linear_cross_entropy"] == 0
    # the rest of the model is still fused
    assert {k: v for k, v in report.fired.items() if k != "linear_cross_entropy"} == {
        k: v for k, v in EXPECTED["llama"].items() if k != "linear_cross_entropy"}
    (rejection,) = [r for r in report.rejected if r.fusion == "linear_cross_entropy"]
    assert "graph output" in rejection.reason
    assert out.logits.shape == (2, 12, 128)


def test_other_ignore_index_is_left_alone():
    hidden, weight = torch.randn(2, 6, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (12,))

    def loss_fn(hidden, weight, labels):
        logits = F.linear(hidden, weight).float().view(-1, 40)
        return F.cross_entropy(logits, labels, ignore_index=3)

    loss, report = compile_fn(loss_fn, hidden, weight, labels)
    assert report.fired["linear_cross_entropy"] == 0
    (rejection,) = report.rejected
    assert "ignore_index" in rejection.reason
    torch.testing.assert_close(loss, loss_fn(hidden, weight, labels))


def _llama_training_mlp_only(everything: bool = False):
    """A tiny Llama whose MLPs train and whose other weights (the tied head too) are frozen
    unless `everything`, and an eager copy."""
    model = tiny_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_(everything or ".mlp." in name)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("head, grad_mode", [("frozen", True), ("trainable", True),
                                             ("frozen", False)])
def test_frozen_head_gets_its_gradient_in_the_forward(head, grad_mode, monkeypatch):
    """LoRA's case: with the LM head (here tied to the embeddings) frozen and a backward to
    follow, the fused op computes hidden's gradient in its forward; a trainable head, or a graph
    compiled under no_grad, keeps the forward-only kernels. Loss and gradients match eager."""
    calls = count_frozen_lce_calls(monkeypatch)
    model, eager = _llama_training_mlp_only(head == "trainable")
    ids, labels = tiny_batch()

    def loss_fn(model, ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    with torch.set_grad_enabled(grad_mode):
        loss, report = compile_fn(lambda *a: loss_fn(model, *a), ids, labels)
        expected = loss_fn(eager, ids, labels)
    assert report.fired["linear_cross_entropy"] == 1
    assert len(calls) == (head == "frozen" and grad_mode)
    torch.testing.assert_close(loss, expected)
    if grad_mode:
        loss.backward()
        expected.backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_frozen_fp32_head_under_autocast_gets_its_gradient_in_the_forward(monkeypatch):
    """An fp32 model under autocast to bf16: the head reaches the loss through autocast's cast
    (written into the graph), which is as frozen as the head, so the frozen-head path still runs.
    Loss and the trainable weights' gradients match eager under the same autocast to bf16's
    precision (both run the head in bf16)."""
    calls = count_frozen_lce_calls(monkeypatch)
    model, eager = _llama_training_mlp_only()
    ids, labels = tiny_batch()
    losses = []
    for m, compiled in ((model, True), (eager, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if compiled:
                loss, report = compile_fn(
                    lambda *a: m(input_ids=a[0], labels=a[1], use_cache=False).loss, ids, labels)
            else:
                loss = m(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        losses.append(loss)
    assert report.fired["linear_cross_entropy"] == 1 and report.skipped is None
    assert calls == [1]
    torch.testing.assert_close(losses[0], losses[1], rtol=2**-8, atol=0)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).norm() <= 2**-6 * q.grad.norm(), name


def _shifted_labels(labels):
    return F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous().view(-1)


def _head_with_bias(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float().view(-1, 40)
    return F.cross_entropy(logits, _shifted_labels(labels), ignore_index=-100)


def _two_caps(hidden, weight, bias, labels):
    logits = torch.tanh(F.linear(hidden, weight) / 30.0) * 20.0
    return F.cross_entropy(logits.float().view(-1, 40), _shifted_labels(labels), ignore_index=-100)


def _shifted_logits(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight) + 0.5
    return F.cross_entropy(logits.float().view(-1, 40), _shifted_labels(labels), ignore_index=-100)


def _logits_reshaped(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight).float().reshape(-1, 40)
    return F.cross_entropy(logits, _shifted_labels(labels), ignore_index=-100)


def _labels_reshaped(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight).float().view(-1, 40)
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    return F.cross_entropy(logits, labels, ignore_index=-100)


def _one_token(hidden, weight, bias, labels):
    logits = F.linear(hidden[0, 0], weight).float().view(-1, 40)
    return F.cross_entropy(logits, labels[0, :1].contiguous().view(-1), ignore_index=-100)


def _granite_scale_zero(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight) / 0.0
    return F.cross_entropy(logits.float().view(-1, 40), _shifted_labels(labels), ignore_index=-100)


@pytest.mark.parametrize("loss_fn, reason", [
    (_head_with_bias, "the LM head has a bias"),
    (_two_caps, "soft-capping is not spelled as Gemma-2's"),
    (_shifted_logits, "the logits pass through aten.add.Tensor between the LM head and the loss"),
    (_logits_reshaped, "flattened with reshape, where HF's causal-LM loss uses view"),
    (_labels_reshaped, "the labels are not prepared as HF's causal-LM loss does"),
    (_one_token, "is one token without a token dim"),
    (_granite_scale_zero, "granite's logits_scaling 0.0 is not a float the fused op takes"),
])
def test_rejection_names_what_differs_from_hf_loss(loss_fn, reason):
    hidden, weight, bias = torch.randn(2, 6, 16), torch.randn(40, 16), torch.randn(40)
    labels = torch.randint(0, 40, (2, 6))
    loss, report = compile_fn(loss_fn, hidden, weight, bias, labels)
    assert report.fired["linear_cross_entropy"] == 0
    (rejection,) = report.rejected
    assert rejection.fusion == "linear_cross_entropy" and reason in rejection.reason
    torch.testing.assert_close(loss, loss_fn(hidden, weight, bias, labels), equal_nan=True)


# Layouts of hidden states and labels around the LM head (issue: a flattened hidden with labels
# shifted per row gave a wrong loss). Odd, non-square sizes: B and S differ, so a transposed or
# misaligned pairing of logit rows and labels changes the loss. Each takes (hidden [B, S, H],
# weight [V, H], labels [B, S]) and computes what a user's loss could; the compiled one must
# equal eager.
_S, _H, _V = 5, 19, 37


def _ce(logits, labels):
    return F.cross_entropy(logits.float().view(-1, _V), labels.view(-1), ignore_index=-100)


def _row_shifted(labels):
    return F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()


LAYOUTS = {
    # HF's loss: the op shifts inside (labels have hidden's token shape).
    "hf": lambda h, w, y: _ce(F.linear(h, w), _row_shifted(y)),
    # Hidden flattened to [B*S, H] before the head, labels shifted per row of [B, S].
    "flat_hidden_row_shifted": lambda h, w, y: _ce(F.linear(h.reshape(-1, _H), w),
                                                   _row_shifted(y)),
    "flat_hidden_row_shifted_view": lambda h, w, y: _ce(F.linear(h.view(-1, _H), w),
                                                        _row_shifted(y)),
    # Labels flattened before the shift: the shift crosses rows, in eager too.
    "shift_after_flatten": lambda h, w, y: _ce(F.linear(h, w), _row_shifted(y.view(-1))),
    "flat_both_shift_after_flatten": lambda h, w, y: _ce(F.linear(h.reshape(-1, _H), w),
                                                         _row_shifted(y.reshape(-1))),
    # Pre-shifted labels (HF's shift_labels), flat or per row.
    "preshifted": lambda h, w, y: _ce(F.linear(h, w), _row_shifted(y)[:, :].clone()),
    "preshifted_flat": lambda h, w, y: _ce(F.linear(h, w), _row_shifted(y).view(-1).clone()),
    # Sequence-major [S, B, H] hidden, labels shifted per row and transposed to match.
    "sequence_major": lambda h, w, y: _ce(F.linear(h.transpose(0, 1), w),
                                          _row_shifted(y).t().contiguous()),
    # Sequence-major hidden with [S, B] labels shifted along their last dim, as the graph says.
    "sequence_major_shift_along_batch": lambda h, w, y: _ce(F.linear(h.transpose(0, 1), w),
                                                            _row_shifted(y.t())),
}


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _assert_matches_eager(loss_fn, hidden, weight, labels, *rest, frozen_weight=False):
    h, w = _leaf(hidden), weight.detach().clone().requires_grad_(not frozen_weight)
    loss, report = compile_fn(loss_fn, h, w, labels, *rest)
    h_eager, w_eager = _leaf(hidden), w.detach().clone().requires_grad_(not frozen_weight)
    expected = loss_fn(h_eager, w_eager, labels, *rest)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(h.grad, h_eager.grad, atol=1e-6, rtol=1e-4)
    if not frozen_weight:
        torch.testing.assert_close(w.grad, w_eager.grad, atol=1e-6, rtol=1e-4)
    return report


def _layout_inputs(batch):
    hidden, weight = torch.randn(batch, _S, _H), torch.randn(_V, _H) / _H**0.5 * 4
    labels = torch.randint(0, _V, (batch, _S))
    labels[0, 1] = -100
    return hidden, weight, labels


# Every layout at batch 1 and 3, but shifting along a batch of 1 leaves no label to score, where
# eager's mean is NaN and the op's 0 (its documented choice, not a layout question).
LAYOUT_CASES = [(layout, batch) for layout in LAYOUTS for batch in (1, 3)
                if (layout, batch) != ("sequence_major_shift_along_batch", 1)]


@pytest.mark.parametrize("implementation", ["triton-interpreter", "reference"])
@pytest.mark.parametrize("layout, batch", LAYOUT_CASES)
def test_layouts_fuse_and_match_eager(layout, batch, implementation, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if implementation == "triton-interpreter" else "0")
    report = _assert_matches_eager(LAYOUTS[layout], *_layout_inputs(batch))
    assert report.fired["linear_cross_entropy"] == 1 and report.rejected == ()


HEADS = {
    "plain": lambda logits: logits,
    "gemma2_softcap": lambda logits: torch.tanh(logits / 3.0) * 3.0,
    "granite_divide": lambda logits: logits / 3.0,
    "cohere_multiply": lambda logits: logits * 0.37,
}
# (reduction as HF spells it, frozen head): 'num_items' is a sum divided in the graph.
REDUCTIONS = [("mean", False), ("sum", True), ("num_items", True)]


@pytest.mark.parametrize("reduction, frozen", REDUCTIONS)
@pytest.mark.parametrize("head", HEADS)
def test_flattened_layout_with_every_head_reduction_and_frozen_weight(head, reduction, frozen,
                                                                       monkeypatch):
    """The flattened layout of the issue through every path of the replacement: each family's
    logits, mean / sum / sum divided by num_items_in_batch, and a frozen weight (the op then
    computes hidden's gradient in its forward, chosen by the pass's finalize)."""
    calls = count_frozen_lce_calls(monkeypatch)

    def loss_fn(h, w, y, num_items):
        logits = HEADS[head](F.linear(h.reshape(-1, _H), w)).float().view(-1, _V)
        loss = F.cross_entropy(logits, _row_shifted(y).view(-1), ignore_index=-100,
                               reduction="mean" if reduction == "mean" else "sum")
        return loss / num_items if reduction == "num_items" else loss

    report = _assert_matches_eager(loss_fn, *_layout_inputs(3), torch.tensor(7),
                                   frozen_weight=frozen)
    assert report.fired["linear_cross_entropy"] == 1 and report.rejected == ()
    assert len(calls) == frozen


@pytest.mark.parametrize("layout", ["hf", "flat_hidden_row_shifted", "shift_after_flatten"])
def test_layouts_under_dynamic_shapes_compile_once(layout):
    """With symbolic batch and sequence sizes the pass proves the labels' layout symbolically
    (no guard on the sizes): a second batch of other sizes runs the same graph, and matches."""
    loss_fn = LAYOUTS[layout]
    compiled = torch.compile(loss_fn, backend="chronicals", dynamic=True,
                             options={"report": "none"})
    torch.compiler.reset()
    compile_passes.clear_fusion_reports()
    for batch, seq in ((3, 5), (2, 7)):
        hidden, labels = torch.randn(batch, seq, _H), torch.randint(0, _V, (batch, seq))
        weight = torch.randn(_V, _H)
        torch.testing.assert_close(compiled(hidden, weight, labels),
                                   loss_fn(hidden, weight, labels), atol=1e-6, rtol=1e-5)
    (report,) = compile_passes.fusion_reports()
    assert report.fired["linear_cross_entropy"] == 1


def _tiny_scaled_model(config_cls: str, model_cls: str, **scale):
    config = getattr(transformers, config_cls)(**{**tiny_config_kwargs(), **scale})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config)


@pytest.mark.parametrize("family, scale", [
    (("GraniteConfig", "GraniteForCausalLM"), dict(logits_scaling=3.0)),
    (("CohereConfig", "CohereForCausalLM"), dict(logit_scale=0.37)),
    (("Cohere2Config", "Cohere2ForCausalLM"), dict(logit_scale=1.7)),
], ids=["granite", "cohere", "cohere2"])
@pytest.mark.parametrize("labels_as", ["labels", "shift_labels", "num_items_in_batch"])
def test_scaled_logits_families_fuse_and_match_eager(family, scale, labels_as):
    """Granite divides its logits by config.logits_scaling, Cohere multiplies them by
    logit_scale: both reach the fused op as its logit_scale."""
    model = _tiny_scaled_model(*family, **scale)
    eager = copy.deepcopy(model)
    ids, labels = tiny_batch()
    kwargs = {
        "labels": dict(labels=labels),
        "shift_labels": dict(labels=ids, shift_labels=_row_shifted(labels)),
        "num_items_in_batch": dict(labels=labels, num_items_in_batch=torch.tensor(7)),
    }[labels_as]

    def loss_fn(model, ids):
        return model(input_ids=ids, use_cache=False, **kwargs).loss

    loss, report = compile_fn(lambda ids: loss_fn(model, ids), ids)
    assert report.fired["linear_cross_entropy"] == 1
    assert not [r for r in report.rejected if r.fusion == "linear_cross_entropy"]
    expected = loss_fn(eager, ids)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    _grads_close(model, eager)
