"""The attention pass: transformers' masked sdpa under torch.compile -> chronicals::attention,
proven from what the mask computes; look-alikes rejected with their reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import compile_passes
from chronicals import reference
from tests.compile_passes.harness import compile_fn
from tests.models import LAYERS, tiny_batch, tiny_model


def _attention_inputs(b=2, hq=4, hk=2, s=10, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, h, d, generator=g).transpose(1, 2) for h in (hq, hk, hk)]


def _model_losses(family, seq=12, position_ids=None, attention_mask=None, checkpointing=False,
                  **overrides):
    """Compiled and eager loss and gradients of a tiny model, and the compile's report."""
    torch.compiler.reset()
    model = tiny_model(family, **overrides)
    eager = copy.deepcopy(model)
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = tiny_batch(seq=seq)
    kwargs = {k: v for k, v in (("position_ids", position_ids),
                                ("attention_mask", attention_mask)) if v is not None}

    def loss_fn(m):
        return lambda i, l: m(input_ids=i, labels=l, use_cache=False, **kwargs).loss

    compile_passes.clear_fusion_reports()
    loss = torch.compile(loss_fn(model), backend="chronicals", options={"report": "none"})(
        ids, labels)
    loss.backward()
    report = compile_passes.fusion_reports()[-1]
    loss_eager = loss_fn(eager)(ids, labels)
    loss_eager.backward()
    grad_err = max(float((p.grad - q.grad).abs().max())
                   for p, q in zip(model.parameters(), eager.parameters()))
    return report, float(loss), float(loss_eager), grad_err


PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("positions", [None, PACKED], ids=["rows", "packed"])
def test_fires_once_per_layer_and_matches_eager(family, positions):
    report, loss, loss_eager, grad_err = _model_losses(family, position_ids=positions)
    assert report.fired["attention"] == LAYERS, report.summary()
    assert not [r for r in report.rejected if r.fusion == "attention"], report.summary()
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager)
    assert grad_err <= 1e-5


def test_packed_positions_reach_the_op_and_keep_documents_apart():
    """The fused op receives position_ids, and the compiled packed model equals eager's, whose
    mask keeps documents apart (a mask that ignored documents would give another loss)."""
    report, loss, loss_eager, _ = _model_losses("qwen2", position_ids=PACKED)
    assert report.fired["attention"] == LAYERS
    _, loss_rows, _, _ = _model_losses("qwen2")
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager)
    assert abs(loss - loss_rows) > 1e-3  # the documents changed the answer


def test_checkpointed_layers_get_positions_from_the_graph_around_them():
    """Under gradient checkpointing each layer is a region whose mask is an operand: the mask is
    proven in the top graph and position_ids passed into the region."""
    report, loss, loss_eager, grad_err = _model_losses("llama", position_ids=PACKED,
                                                       checkpointing=True)
    assert report.fired["attention"] == LAYERS, report.summary()
    assert not _rejections(report)
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


def test_sliding_window_is_read_from_the_mask(monkeypatch):
    """Mistral with a window shorter than the row: the window is proven and passed to the op."""
    import chronicals.ops.attention as attention_ops

    windows = []
    real = attention_ops._forward
    monkeypatch.setattr(attention_ops, "_forward",
                        lambda *a: windows.append(a[-1]) or real(*a))
    report, loss, loss_eager, grad_err = _model_losses("mistral", seq=16, sliding_window=5)
    assert report.fired["attention"] == LAYERS, report.summary()
    assert windows == [5] * LAYERS
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


def test_window_value_reaches_the_op():
    q, k, v = _attention_inputs(s=12)

    def fn(q, k, v):
        idx = torch.arange(q.shape[2])
        mask = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=0.3,
                                              enable_gqa=True)

    out, report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 1, report.summary()
    expected, _ = reference.attention(q, k, v, None, 0.3, 4)
    torch.testing.assert_close(out, expected)


def test_is_causal_without_mask_fires():
    q, k, v = _attention_inputs()
    out, report = compile_fn(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        q, k, v)
    assert report.fired["attention"] == 1
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def _rejections(report):
    return [r.reason for r in report.rejected if r.fusion == "attention"]


def test_padding_mask_is_rejected():
    """A padded batch: the mask depends on attention_mask, not only on positions."""
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    report, loss, loss_eager, grad_err = _model_losses("llama", attention_mask=attention_mask)
    assert report.fired["attention"] == 0
    reasons = _rejections(report)
    assert len(reasons) == LAYERS and all("not causal within the documents" in r
                                          for r in reasons), reasons
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


@pytest.mark.parametrize(
    "make_mask, reason",
    [
        (lambda s: torch.ones(s, s, dtype=torch.bool).tril(-1), "not causal"),  # no diagonal
        (lambda s: torch.ones(s, s, dtype=torch.bool), "not causal"),  # bidirectional
        (lambda s: torch.zeros(s, s).masked_fill(
            torch.ones(s, s, dtype=torch.bool).triu(1), -1e4), "values other than 0"),
    ],
)
def test_look_alike_masks_are_rejected(make_mask, reason):
    q, k, v = _attention_inputs()

    def fn(q, k, v):
        mask = make_mask(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None],
                                              enable_gqa=True)

    out, report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 0
    assert any(reason in r for r in _rejections(report)), _rejections(report)
    torch.testing.assert_close(out, fn(q, k, v), equal_nan=True)


def test_mask_from_a_float_input_is_rejected():
    q, k, v = _attention_inputs()
    bias = torch.randn(1, 1, 10, 10)

    def fn(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias > 0, enable_gqa=True)

    _out, report = compile_fn(fn, q, k, v, bias)
    assert report.fired["attention"] == 0 and _rejections(report)


def test_dropout_and_non_causal_are_rejected():
    q, k, v = _attention_inputs()
    _, report = compile_fn(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True,
                                                       enable_gqa=True), q, k, v)
    assert any("dropout" in r for r in _rejections(report))
    _, report = compile_fn(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
    assert any("not causal" in r for r in _rejections(report))


def test_value_head_dim_other_than_the_querys_is_rejected():
    """Multi-head latent attention (DeepSeek-V2): q and k of 24 channels (16 + 8 rotary), v of
    16. Fused, the op returned q's head dim and the graph's reshape after it failed."""
    q, k, _ = _attention_inputs(hq=4, hk=4, d=24)
    v = _attention_inputs(hq=4, hk=4, d=16)[2]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(
            2, 10, 4 * 16)

    out, report = compile_fn(attend, q, k, v)
    assert report.fired["attention"] == 0 and report.error is None, report
    assert _rejections(report) == [("value head dim 16 differs from the query's 24 (multi-head "
                                    "latent attention)")]
    torch.testing.assert_close(out, attend(q, k, v))


def test_attention_fusion_can_be_turned_off():
    q, k, v = _attention_inputs()
    fusions = [f for f in compile_passes.backend.FUSION_NAMES if f != "attention"]
    _, report = compile_fn(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        q, k, v, fusions=fusions)
    assert "attention" not in report.fired


@pytest.mark.cuda
@pytest.mark.parametrize("positions", [None, PACKED], ids=["rows", "packed"])
def test_cuda_model_through_inductor(positions):
    """bf16 on the GPU: the fused kernels inside Inductor's graph, against eager in bf16 and the
    fp32 truth (the numerics rule on the loss and the gradients' relative error)."""
    torch.compiler.reset()
    model = tiny_model("qwen2", torch.bfloat16, head_dim=64, num_attention_heads=4,
                       num_key_value_heads=2, hidden_size=256).cuda()
    eager, truth = copy.deepcopy(model), copy.deepcopy(model).float()
    ids, labels = (t.cuda() for t in tiny_batch(seq=12))
    pos = None if positions is None else positions.cuda()

    def loss_fn(m):
        return lambda i, l: m(input_ids=i, labels=l, position_ids=pos, use_cache=False).loss

    compile_passes.clear_fusion_reports()
    loss = torch.compile(loss_fn(model), backend="chronicals", options={"report": "none"})(
        ids, labels)
    loss.backward()
    report = compile_passes.fusion_reports()[-1]
    assert report.fired["attention"] == LAYERS, report.summary()
    losses = []
    for m in (eager, truth):
        out = loss_fn(m)(ids, labels)
        out.backward()
        losses.append(float(out))

    def rel(a, b):
        return max(float((x.grad.float() - y.grad).norm() / y.grad.norm())
                   for x, y in zip(a.parameters(), b.parameters()))

    assert abs(float(loss) - losses[1]) <= 2 * abs(losses[0] - losses[1]) + 2**-7 * losses[1]
    assert rel(model, truth) <= 2 * rel(eager, truth) + 2**-7
