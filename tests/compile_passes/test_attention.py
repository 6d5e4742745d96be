"""The attention pass: transformers' masked sdpa and eager attention under torch.compile ->
chronicals::attention, proven from what the mask computes; look-alikes rejected with their
reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
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
                  model=None, **overrides):
    """Compiled and eager loss and gradients of a tiny model (`model`, else the family's), and
    the compile's report."""
    torch.compiler.reset()
    model = tiny_model(family, **overrides) if model is None else model
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
    """(scale, window, softcap, the sinks' shape or None) of every call of the fused op's
    forward."""
    calls = []
    real = attention_ops._forward
    monkeypatch.setattr(attention_ops, "_forward", lambda *a: calls.append(
        (*a[4:7], None if a[7] is None else tuple(a[7].shape))) or real(*a))
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
    assert [window for _, window, _, _ in calls] == [5] * LAYERS
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


def test_value_head_dim_below_the_querys_gets_zero_channels():
    """Multi-head latent attention (DeepSeek-V2): q and k of 24 channels (16 + 8 rotary), v of
    16. V is padded with zero channels to 24 and the output's 8 extra sliced off: output and
    gradients equal eager's."""
    q, k, _ = _attention_inputs(hq=4, hk=4, d=24)
    v = _attention_inputs(hq=4, hk=4, d=16)[2]

    def attend(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(2, 10, 4 * 16)

    def run(fn, *tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.square().sum().backward()
        return [out, *(t.grad for t in leaves)]

    torch.compiler.reset()
    compile_passes.clear_fusion_reports()
    got = run(torch.compile(attend, backend="chronicals", options={"report": "none"}), q, k, v)
    report = compile_passes.fusion_reports()[-1]
    assert report.fired["attention"] == 1 and report.rejected == (), report.summary()
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, run(attend, q, k, v)):
        torch.testing.assert_close(g, e, msg=name)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_models_fuse_packed_rows(family):
    """DeepSeek-V2/V3 (value head dim below the query's) with packed documents: every attention
    layer fused, loss and gradients equal eager's."""
    from tests import families

    # Dense layers only: the experts' fp32 grouped_mm fallback of transformers 5.17 breaks the
    # graph under AOT autograd (plain torch.compile too), which this test is not about.
    model = families._build(families.discover()[family], torch.float32, 0,
                            num_key_value_heads=families.HIDDEN // families.HEAD_DIM,
                            first_k_dense_replace=100)
    assert not any("Expert" in type(m).__name__ for m in model.modules())
    attentions = sum(type(m).__name__.endswith("Attention") for m in model.modules())
    report, loss, loss_eager, grad_err = _model_losses(None, position_ids=PACKED, model=model)
    assert report.fired["attention"] == attentions and not _rejections(report), report.summary()
    assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5


def test_value_head_dim_above_the_querys_is_rejected():
    q, k, _ = _attention_inputs(hq=4, hk=4, d=16)
    v = _attention_inputs(hq=4, hk=4, d=24)[2]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out, report = compile_fn(attend, q, k, v)
    assert report.fired["attention"] == 0 and report.error is None, report
    assert _rejections(report) == ["value head dim 24 exceeds the query's 16"]
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


@pytest.mark.cuda
def test_cuda_gpt_oss_with_sinks_through_inductor():
    """gpt-oss in bf16 on the GPU: attention sinks in the triton kernel inside Inductor's graph,
    loss and gradients against eager bf16 and the fp32 truth (the GPU rule)."""
    from tests import families

    model = families.build("gpt_oss", torch.bfloat16).cuda()
    result = compile_and_compare("gpt_oss", torch.bfloat16, model=model, batch=tiny_batch(),
                                 device="cuda")
    attentions = sum(type(m).__name__.endswith("Attention") for m in model.modules())
    assert result.fired["attention"] == attentions, result
    result.assert_matches_eager(torch.bfloat16)


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
    assert set(calls) == {(1 / 16, 0, 50.0, None)}, calls


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


# Attention sinks (gpt-oss, Flint, HunYuan-V4, MiMo-V2-Flash) -------------------------------------


def _with_sinks(w, sinks, shift, softmax_dtype):
    """Eager attention's weights over the scores and one sink logit per head: the concatenation
    less its row max (gpt-oss, MiMo) or not (Flint), the sink's column dropped."""
    column = sinks.reshape(1, -1, 1, 1).expand(*w.shape[:-1], 1)
    joined = torch.cat([w, column], dim=-1)
    if shift == "max":
        joined = joined - joined.max(dim=-1, keepdim=True).values
    elif shift == "amax":
        joined = joined - torch.amax(joined, dim=-1, keepdim=True)
    return F.softmax(joined, dim=-1, dtype=softmax_dtype)[..., :-1]


def _assert_fused_with_sinks(fn, monkeypatch) -> None:
    """fn(q, k, v, sinks) (scale 0.3, 2 query heads a K/V head) compiled: one attention fused
    with the (4,) sinks, its output the reference's, and every gradient, the sinks' (non-zero)
    included, eager's."""
    q, k, v = _attention_inputs()
    sinks = torch.randn(4)
    calls = _recording_op_args(monkeypatch)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, report = compile_fn(fn, *leaves)
    assert report.fired["attention"] == 1 and report.rejected == (), report.summary()
    assert calls == [(0.3, 0, 0.0, (4,))]
    torch.testing.assert_close(out, reference.attention(q, k, v, None, 0.3, 0, 0.0, sinks)[0])
    out.backward(torch.ones_like(out))
    eager = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    fn(*eager).backward(torch.ones_like(out))
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    assert float(leaves[3].grad.abs().max()) > 0


@pytest.mark.parametrize("softmax_dtype", [torch.float32, None], ids=["fp32", "input-dtype"])
@pytest.mark.parametrize("shift", ["max", "amax", "none"])
def test_attention_sinks_reach_the_op_and_get_their_gradient(shift, softmax_dtype, monkeypatch):
    def fn(q, k, v, sinks):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = q @ k.transpose(2, 3) * 0.3 + _causal(q.shape[2])
        w = _with_sinks(w, sinks, shift, softmax_dtype).to(q.dtype)
        return torch.matmul(F.dropout(w, p=0.0, training=True), v)

    _assert_fused_with_sinks(fn, monkeypatch)


def test_granite_swa_spelling_of_sinks_reaches_the_op(monkeypatch):
    """Granite-SWA scales the plain softmax's output by sigmoid(logsumexp(scores) - sink): the
    same attention as a sink logit in the softmax's sum."""
    def fn(q, k, v, sinks):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = q @ k.transpose(2, 3) * 0.3 + _causal(q.shape[2])
        scale = (torch.logsumexp(w, dim=-1) - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
        out = torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return out * scale.unsqueeze(-1).to(out.dtype)

    _assert_fused_with_sinks(fn, monkeypatch)


def test_a_log_sum_exp_used_otherwise_is_rejected():
    q, k, v = _attention_inputs(hk=4)

    def fn(q, k, v):
        w = q @ k.transpose(2, 3) * 0.3 + _causal(q.shape[2])
        return F.softmax(w, dim=-1) @ v, torch.logsumexp(w, dim=-1)

    (out, lse), report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 0
    reason = ("the attention scores' log-sum-exp is used other than to scale the output by "
              "sigmoid(lse - sink) (Granite-SWA's attention sinks)")
    assert _rejections(report) == [reason]
    expected = fn(q, k, v)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(lse, expected[1])


def test_sinks_with_scores_upcast_to_fp32_fuse_in_bf16():
    """Flint computes the scores from q and k upcast to fp32 and casts the weights back to the
    values' dtype: the kernels' own fp32 scores from the bf16 q and k."""
    q, k, v = (t.bfloat16() for t in _attention_inputs())
    sinks = torch.randn(4)

    def fn(q, k, v, sinks):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = torch.matmul(q.float(), k.float().transpose(2, 3)) * 0.3 + _causal(q.shape[2])
        return _with_sinks(w, sinks, "none", None).to(v.dtype) @ v

    out, report = compile_fn(fn, q, k, v, sinks)
    assert report.fired["attention"] == 1 and report.rejected == (), report.summary()
    assert out.dtype == torch.bfloat16
    truth = reference.attention(*(t.double() for t in (q, k, v)), None, 0.3, 0, 0.0,
                                sinks.double())[0]
    eager_err = float((fn(q, k, v, sinks).double() - truth).abs().max())
    assert float((out.double() - truth).abs().max()) <= eager_err + 2**-8 * float(truth.abs().max())


@pytest.mark.parametrize("make, reason", [
    # A sink logit per query, not per head.
    (lambda w, v, s: F.softmax(torch.cat([w, s[:, None].expand(w.shape[0], -1, w.shape[2])[
        ..., None] * torch.arange(w.shape[2])[:, None]], -1), -1)[..., :-1] @ v,
     "the sink logits are not one value per head"),
    # The first column dropped instead of the sink's.
    (lambda w, v, s: F.softmax(torch.cat([w, s.reshape(1, -1, 1, 1).expand(
        *w.shape[:-1], 1)], -1), -1)[..., 1:] @ v,
     "used other than with the sink's column dropped"),
    # The sink's probability used too.
    (lambda w, v, s: _weights_and_output(F.softmax(torch.cat([w, s.reshape(1, -1, 1, 1).expand(
        *w.shape[:-1], 1)], -1), -1), v[..., :1, :].expand(-1, -1, w.shape[-1] + 1, -1)),
     "used other than with the sink's column dropped"),
], ids=["per-query", "first-column-dropped", "sink-weight-returned"])
def test_sink_look_alikes_are_rejected(make, reason):
    q, k, v = _attention_inputs(hk=4)
    sinks = torch.randn(4)

    def fn(q, k, v, sinks):
        return make(q @ k.transpose(2, 3) * 0.3 + _causal(q.shape[2]), v, sinks)

    out, report = compile_fn(fn, q, k, v, sinks)
    assert report.fired["attention"] == 0, report.summary()
    assert [reason in r for r in _rejections(report)] == [True], _rejections(report)
    torch.testing.assert_close(out, fn(q, k, v, sinks))


def test_a_row_max_shift_alone_fuses():
    """MiMo-V2-Flash's full-attention layers subtract the row max with no sinks."""
    q, k, v = _attention_inputs()

    def fn(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = q @ k.transpose(2, 3) * 0.3 + _causal(q.shape[2])
        w = w - w.max(dim=-1, keepdim=True).values
        return F.softmax(w, dim=-1) @ v

    out, report = compile_fn(fn, q, k, v)
    assert report.fired["attention"] == 1 and report.rejected == (), report.summary()
    torch.testing.assert_close(out, fn(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("positions", [None, PACKED], ids=["rows", "packed"])
@pytest.mark.parametrize("family", ["gpt_oss", "granite_swa"])
def test_sink_families_fuse_every_layer_and_match_eager(family, dtype, positions):
    """gpt-oss (sinks in the softmax; eager attention is its only one: no sdpa) and
    Granite-SWA (sinks as a sigmoid scale of the output): sliding and full layers; packed rows
    too."""
    from tests import families

    if family not in families.discover():
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    if (family == "gpt_oss" and dtype == torch.float32
            and Version(transformers.__version__) < Version("5.25")):
        # Its experts' fp32 grouped_mm fallback reads a tensor's value in its backward: AOT
        # autograd cannot trace it (plain torch.compile breaks the graph there too).
        pytest.skip(f"gpt_oss fp32 experts do not compile on transformers "
                    f"{transformers.__version__}")
    model = families.build(family, dtype)
    attentions = sum(type(m).__name__.endswith("Attention") for m in model.modules())
    assert attentions >= 2
    if positions is None:
        result = compile_and_compare(family, dtype, model=model, batch=tiny_batch())
        assert result.fired["attention"] == attentions and not [
            r for r in result.rejected if r.fusion == "attention"], result
        result.assert_matches_eager(dtype)
        return
    report, loss, loss_eager, grad_err = _model_losses(None, position_ids=positions, model=model)
    assert report.fired["attention"] == attentions, report.summary()
    if dtype == torch.float32:
        assert abs(loss - loss_eager) <= 1e-5 * abs(loss_eager) and grad_err <= 1e-5
