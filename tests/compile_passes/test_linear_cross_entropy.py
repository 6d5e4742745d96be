"""The LM-head + cross-entropy fusion through HF's loss path, and why it does not fire when the
logits escape."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tests.compile_passes.harness import compile_fn
from tests.models import tiny_batch, tiny_model


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
    assert report.fired["rms_norm"] == 5  # the rest of the model is still fused
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
