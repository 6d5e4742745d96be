"""The attention pass: transformers' masked sdpa and eager attention under torch.compile ->
chronicals::attention, proven from what the mask computes; look-alikes rejected with their
reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

import compile_passes
from chronicals import reference
from chronicals.ops import attention as attention_ops
from chronicals.train import compile_loss
from tests.compile_passes.harness import RecordingBackend, compile_and_compare, compile_fn
from tests.models import LAYERS, VOCAB, tiny_batch, tiny_model


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


def _recording_op_args(monkeypatch) -> list[tuple]:
    """(scale, window, softcap) of every call of the fused op's forward."""
    calls = []
    real = attention_ops._forward
    monkeypatch.setattr(attention_ops, "_forward",
                        lambda *a: calls.append(a[4:]) or real(*a))
    return calls


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
    calls = _recording_op_args(monkeypatch)
    report, loss, loss_eager, grad_err = _model_losses("mistral", seq=16, sliding_window=5)
    assert report.fired["attention"] == LAYERS, report.summary()
    assert [window for _, window, _ in calls] == [5] * LAYERS
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


# Eager attention (transformers' eager_attention_forward) ----------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_attention_fires_once_per_layer_and_matches_eager(family, dtype):
    model = tiny_model(family, dtype, attn_implementation="eager")
    result = compile_and_compare(family, dtype, model=model, batch=tiny_batch())
    result.assert_counts(family)
    result.assert_matches_eager(dtype)


def test_eager_attention_of_packed_documents_matches_eager():
    report, loss, loss_eager, grad_err = _model_losses("llama", position_ids=PACKED,
                                                       attn_implementation="eager")
    assert report.fired["attention"] == LAYERS, report.summary()
    assert not _rejections(report)
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma2_soft_capped_attention_reaches_the_op_and_matches_eager(dtype, monkeypatch):
    """Gemma-2 caps its scores at 50 * tanh(s / 50) after scaling by query_pre_attn_scalar ** -0.5
    (256: 1/16); sliding-window layers with a window (64) longer than the rows prove causal."""
    calls = _recording_op_args(monkeypatch)
    result = compile_and_compare("gemma2", dtype)
    result.assert_counts("gemma2")
    result.assert_matches_eager(dtype)
    assert set(calls) == {(1 / 16, 0, 50.0)}, calls


def test_gemma2_sliding_window_shorter_than_the_rows():
    report, loss, loss_eager, grad_err = _model_losses("gemma2", seq=16, sliding_window=5)
    assert report.fired["attention"] == LAYERS, report.summary()
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


@pytest.mark.parametrize("family, overrides, fired", [
    ("llama", {"attn_implementation": "eager"}, 4),
    # Gemma-2's sliding and global layers pass two masks into the one layer body: at rows no
    # longer than the window both prove causal and the attention fuses in the shared body; at
    # longer rows they differ, and it is not fused.
    ("gemma2", {}, 4),
    ("gemma2", {"sliding_window": 5}, 0),
], ids=["llama-eager", "gemma2", "gemma2-window-5"])
def test_eager_attention_in_a_layer_region(family, overrides, fired):
    torch.compiler.reset()
    model = tiny_model(family, num_hidden_layers=4, **overrides)
    eager = copy.deepcopy(model)
    backend = RecordingBackend()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    loss = compile_loss(model, backend=backend)(batch, torch.tensor(32))
    loss.backward()
    (gm,) = backend.graphs
    calls = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
    assert len(calls) == 4 and len({getattr(gm, c.args[0].target) for c in calls}) == 1
    (report,) = backend.reports
    assert report.fired["attention"] == fired, report.summary()
    if not fired:
        reason = ("the layers' calls pass masks proven different (window 5, positions none; "
                  "window none, positions none)")
        assert [r.reason for r in report.rejected] == [reason] * 4, report.summary()
    loss_eager = compile_loss(eager, backend=None)(batch, torch.tensor(32))
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def _causal(s: int) -> torch.Tensor:
    """transformers' additive causal mask: 0 where a key is visible, the dtype's minimum where
    not."""
    idx = torch.arange(s)
    blocked = idx[None, :] > idx[:, None]
    return torch.zeros(s, s).masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]


# Spellings of eager attention (q, k, v of 2 query heads per K/V head, repeated as repeat_kv does):
# the scale as a mul, as a div or on q; with a softcap; softmax in fp32 or in the input dtype.
EAGER_VARIANTS = {
    "mul": (lambda q, k: q @ k.transpose(2, 3) * 0.3, 0.3, 0.0),
    "div": (lambda q, k: torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(8), 8 ** -0.5, 0.0),
    "scaled-q": (lambda q, k: (q * 0.3) @ k.transpose(2, 3), 0.3, 0.0),
    "softcap": (lambda q, k: torch.tanh(q @ k.transpose(2, 3) * 0.3 / 2.0) * 2.0, 0.3, 2.0),
}


@pytest.mark.parametrize("softmax_dtype", [torch.float32, None], ids=["fp32", "input-dtype"])
@pytest.mark.parametrize("variant", EAGER_VARIANTS)
def test_eager_attention_spellings_fire(variant, softmax_dtype):
    scores, scale, softcap = EAGER_VARIANTS[variant]
    q, k, v = _attention_inputs()

    def fn(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = scores(q, k) + _causal(q.shape[2])
        w = F.softmax(w, dim=-1, dtype=softmax_dtype).to(q.dtype)
        w = F.dropout(w, p=0.0, training=True)
        return torch.matmul(w, v)

    out, report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 1 and report.rejected == (), report.summary()
    torch.testing.assert_close(out, fn(q, k, v))
    torch.testing.assert_close(out, reference.attention(q, k, v, None, scale, 0, softcap)[0])


def _weights_and_output(weights, v):
    return weights, weights @ v


@pytest.mark.parametrize("make, reason", [
    # The weights dropped out in training (random: not compared with eager).
    (lambda w, v, mask: F.dropout(F.softmax(w + mask, -1), p=0.5, training=True) @ v,
     "attention dropout 0.5 > 0 in training"),
    # The weights returned too (output_attentions).
    (lambda w, v, mask: _weights_and_output(F.softmax(w + mask, -1), v),
     "the attention weights (aten.softmax.int) are also used outside the attention"),
    # A bias added to the scores besides the mask (ALiBi-like).
    (lambda w, v, mask: F.softmax(w + 0.1 * torch.arange(w.shape[-1]) + mask, -1) @ v,
     "the scores reach the softmax through aten.add.Tensor"),
    # The mask added before the softcap: c * tanh(min / c) = -c does not mask.
    (lambda w, v, mask: F.softmax(torch.tanh((w + mask) / 2.0) * 2.0, -1) @ v,
     "the scores reach the softmax through aten.add.Tensor"),
    # No mask: not causal.
    (lambda w, v, mask: F.softmax(w, -1) @ v, "without a mask and not causal"),
    # A mask that lets every query see every key.
    (lambda w, v, mask: F.softmax(w + torch.zeros_like(mask), -1) @ v, "not causal"),
], ids=["dropout", "weights-returned", "position-bias", "mask-before-softcap", "no-mask",
        "bidirectional"])
def test_eager_look_alikes_are_rejected(make, reason):
    q, k, v = _attention_inputs(hk=4)

    def fn(q, k, v):
        return make(q @ k.transpose(2, 3) * 0.3, v, _causal(q.shape[2]))

    out, report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 0, report.summary()
    assert [reason in r for r in _rejections(report)] == [True], _rejections(report)
    if "dropout" not in reason:
        torch.testing.assert_close(out, fn(q, k, v))


def test_a_router_softmax_is_not_a_candidate():
    """A softmax over a projection's output (a mixture of experts' router) is not attention."""
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    _, report = compile_fn(lambda x, w: F.softmax(x @ w.T, -1).topk(2).values, x, w)
    assert report.rejected == () and report.declined == ()


def test_eager_model_look_alikes_are_rejected():
    """Llama with eager attention: dropout in training, a padded batch, weights returned."""
    model = tiny_model("llama", attn_implementation="eager", attention_dropout=0.5)
    model.train()
    ids, _ = tiny_batch()
    _, report = compile_fn(lambda i: model(input_ids=i, use_cache=False).logits, ids)
    assert _rejections(report) == ["attention dropout 0.5 > 0 in training"] * LAYERS

    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    report, loss, loss_eager, grad_err = _model_losses(
        "llama", attention_mask=attention_mask, attn_implementation="eager")
    reasons = _rejections(report)
    assert len(reasons) == LAYERS and all("not causal within the documents" in r
                                          for r in reasons), reasons
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5

    model.eval()

    def logits_and_weights(i):
        out = model(input_ids=i, use_cache=False, output_attentions=True)
        return out.logits, out.attentions

    # transformers captures the weights with hooks, which break the graph: the layers are in
    # the first of the graphs.
    (logits, weights), _ = compile_fn(logits_and_weights, ids)
    report = compile_passes.fusion_reports()[0]
    assert report.fired["attention"] == 0
    reason = ("the attention weights (aten.dropout.default) are also used outside the attention "
              "(e.g. returned with output_attentions), which the fused op does not compute")
    assert _rejections(report) == [reason] * LAYERS
    expected = logits_and_weights(ids)
    torch.testing.assert_close(logits, expected[0])
    torch.testing.assert_close(weights, expected[1])
