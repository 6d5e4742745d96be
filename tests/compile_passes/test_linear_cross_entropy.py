"""The LM-head + cross-entropy fusion through HF's loss path, and why it does not fire when the
logits escape."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.compile_passes.harness import compile_fn
from tests.helpers import count_frozen_lce_calls
from tests.models import EXPECTED, tiny_batch, tiny_model


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


def _scaled_logits(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight) * 0.5
    return F.cross_entropy(logits.float().view(-1, 40), _shifted_labels(labels), ignore_index=-100)


@pytest.mark.parametrize("loss_fn, reason", [
    (_head_with_bias, "the LM head has a bias"),
    (_two_caps, "soft-capping is not spelled as Gemma-2's"),
    (_scaled_logits, "the logits pass through aten.mul.Tensor between the LM head and the loss"),
])
def test_rejection_names_what_differs_from_hf_loss(loss_fn, reason):
    hidden, weight, bias = torch.randn(2, 6, 16), torch.randn(40, 16), torch.randn(40)
    labels = torch.randint(0, 40, (2, 6))
    loss, report = compile_fn(loss_fn, hidden, weight, bias, labels)
    assert report.fired["linear_cross_entropy"] == 0
    (rejection,) = report.rejected
    assert rejection.fusion == "linear_cross_entropy" and reason in rejection.reason
    torch.testing.assert_close(loss, loss_fn(hidden, weight, bias, labels))
