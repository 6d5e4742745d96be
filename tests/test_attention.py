"""Tests for chronicals/attention.py: packed documents attend only to themselves.

The model-level tests run a tiny HF model in fp32: a packed row's per-document logits, loss and
gradients must equal each document run alone, eager and compiled (aot_eager and the chronicals
backend).
"""

from __future__ import annotations

import contextlib
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from chronicals.attention import (
    PACKED_ATTENTION,
    implementation,
    packed_attention_forward,
    register_packed_attention,
    use_packed_attention,
    varlen_attention,
)
from chronicals.ops import attention as ops
from chronicals.packing import pack
from tests.helpers import ULP, assert_no_worse_than_eager, devices

# torch.compile backends the model-level equality is checked under. None = eager.
BACKENDS = [None, "aot_eager", "chronicals"]

IGNORE = -100
VOCAB = 128


def tiny_model(family: str, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    cfg = config_cls(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, **overrides,
    )
    torch.manual_seed(0)
    register_packed_attention()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=PACKED_ATTENTION)
    return model.float().eval()


def documents(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def alone(model, doc: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits, summed CE loss and target count of one document run by itself (HF's shift)."""
    model.set_attn_implementation("sdpa")
    try:
        ids = torch.tensor([doc["input_ids"]])
        logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(PACKED_ATTENTION)
    labels = torch.tensor(doc["labels"][1:], dtype=torch.long)
    loss = F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum")
    return logits, loss, int((labels != IGNORE).sum())


# Lengths chosen so rows hold several documents, a one-token document, and a pad tail.
LENGTHS = [9, 5, 13, 1, 7, 4, 11, 3]
MAX_LEN = 17


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_packed_document_equals_document_alone(family, backend):
    model = tiny_model(family)
    docs = documents(LENGTHS)
    packed = pack(docs, max_len=MAX_LEN)
    assert packed.stats.rows > 1 and any(len(r) > 2 for r in packed.documents)

    def forward(inputs):
        return model(**inputs, use_cache=False)

    run = forward if backend is None else torch.compile(forward, backend=backend, fullgraph=True)
    with torch.no_grad():
        out = run(packed.model_inputs())
        loss_sum, count = 0.0, 0
        for r, row in enumerate(packed.documents):
            slot = 0
            for d in row:
                ref_logits, ref_loss, n = alone(model, docs[d.example])
                got = out.logits[r, slot : slot + d.length]
                torch.testing.assert_close(got, ref_logits, atol=1e-5, rtol=1e-5)
                loss_sum, count, slot = loss_sum + ref_loss, count + n, slot + d.length
    # HF's mean over the row's scored targets equals the documents' pooled loss.
    torch.testing.assert_close(out.loss, loss_sum / count, atol=1e-6, rtol=1e-6)


def test_packed_gradients_equal_the_sum_over_documents_alone():
    model = tiny_model("qwen2")
    docs = documents(LENGTHS, seed=1)
    packed = pack(docs, max_len=MAX_LEN)
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(**packed.model_inputs(), use_cache=False).logits
    shifted = packed.labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), shifted, ignore_index=IGNORE,
                           reduction="sum")
    grads = torch.autograd.grad(loss, params)

    total = sum(alone(model, d)[1] for d in docs)
    ref = torch.autograd.grad(total, params)
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-6)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_changing_one_document_leaves_the_others_bitwise_unchanged():
    model = tiny_model("qwen2")
    docs = documents([6, 6, 4], seed=2)
    packed = pack(docs, max_len=16)
    inputs = packed.model_inputs()
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    (row,) = packed.documents
    first = row[0].length
    changed["input_ids"][0, :first] = (changed["input_ids"][0, :first] + 1) % VOCAB
    with torch.no_grad():
        a = model(**inputs, use_cache=False).logits
        b = model(**changed, use_cache=False).logits
    assert not torch.equal(a[0, :first], b[0, :first])
    assert torch.equal(a[0, first:], b[0, first:])


def test_sliding_window_model_matches_alone():
    # Mistral-style sliding window on every layer, window shorter than the documents.
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert model.model.layers[0].self_attn.sliding_window == 4
    docs = documents([9, 6, 2], seed=3)
    packed = pack(docs, max_len=MAX_LEN)
    with torch.no_grad():
        out = model(**packed.model_inputs(), use_cache=False).logits
        slot = 0
        for d in packed.documents[0]:
            ref = alone(model, docs[d.example])[0]
            torch.testing.assert_close(out[0, slot : slot + d.length], ref, atol=1e-5, rtol=1e-5)
            slot += d.length


def per_document_truth(q, k, v, cu, scale, window=None, softcap=None, sinks=None):
    """fp64 attention document by document: the oracle, independent of masks over rows. `sinks`
    (Hq,): a logit per head in each softmax's sum."""
    b, hq, s, d = q.shape
    rep = hq // k.shape[1]
    qf = q.double().transpose(1, 2).reshape(b * s, hq, d)
    kf = k.double().repeat_interleave(rep, 1).transpose(1, 2).reshape(b * s, hq, d)
    vf = v.double().repeat_interleave(rep, 1).transpose(1, 2).reshape(b * s, hq, -1)
    out = qf.new_empty(b * s, hq, v.shape[-1])
    bounds = cu.tolist()
    for lo, hi in itertools.pairwise(bounds):
        n = hi - lo
        scores = torch.einsum("qhd,khd->hqk", qf[lo:hi], kf[lo:hi]) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n, device=q.device)
        keep = i[:, None] >= i[None, :]
        if window is not None:
            keep &= i[:, None] - i[None, :] < window
        scores = scores.masked_fill(~keep, float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)
        if sinks is not None:
            lse = torch.logaddexp(lse, sinks.double()[:, None, None])
        out[lo:hi] = torch.einsum("hqk,khd->qhd", (scores - lse).exp(), vf[lo:hi])
    return out.view(b, s, hq, -1)


def random_qkv(b, s, hq, hk, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def make(h):
        x = torch.randn(b, s, h, d, generator=gen, dtype=torch.float32).to(device, dtype)
        return x.transpose(1, 2).requires_grad_()  # HF's layout: a transposed projection

    return make(hq), make(hk), make(hk)


def segments_cu(lengths_per_row: list[list[int]], s: int, device) -> torch.Tensor:
    bounds = [0]
    for r, row in enumerate(lengths_per_row):
        slot = r * s
        for n in row:
            slot += n
            bounds.append(slot)
        if slot < (r + 1) * s:
            bounds.append((r + 1) * s)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_reference_path_matches_per_document_attention(heads, window):
    hq, hk = heads
    s, d = 23, 12
    q, k, v = random_qkv(2, s, hq, hk, d, torch.float64, "cpu")
    cu = segments_cu([[7, 1, 10], [23]], s, "cpu")
    out = varlen_attention(q, k, v, cu, scale=0.3, sliding_window=window)
    assert out.shape == (2, s, hq, d)
    truth = per_document_truth(q, k, v, cu, 0.3, window)
    torch.testing.assert_close(out, truth, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kernel", ["default", "triton"])
@pytest.mark.parametrize("window", [None, 3])
def test_softcap_runs_chronicals_attention_per_document(window, kernel):
    # Gemma-2's soft-capped scores: neither PyTorch kernel computes them, chronicals::attention
    # does (its reference on CPU, its Triton kernel through the interpreter when forced).
    s, d = 23, 12
    q, k, v = random_qkv(2, s, 6, 2, d, torch.float32, "cpu")
    cu = segments_cu([[7, 1, 10], [23]], s, "cpu")
    forced = ops.forced_kernel("triton") if kernel == "triton" else contextlib.nullcontext()
    with forced:
        out = call(q, k, v=v, cu_seq_lens_q=cu, scaling=0.3, sliding_window=window,
                   softcap=2.0)[0]
    assert out.shape == (2, s, 6, d)
    truth = per_document_truth(q, k, v, cu, 0.3, window, softcap=2.0)
    torch.testing.assert_close(out.double(), truth, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["default", "triton"])
@pytest.mark.parametrize("window", [None, 3])
def test_sinks_run_chronicals_attention_per_document(window, kernel):
    # gpt-oss's and Granite-SWA's attention sinks (transformers passes them as s_aux): a logit
    # per head in every softmax's sum, within each document.
    s, d = 23, 12
    q, k, v = random_qkv(2, s, 6, 2, d, torch.float32, "cpu")
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(3)).requires_grad_()
    cu = segments_cu([[7, 1, 10], [23]], s, "cpu")
    forced = ops.forced_kernel("triton") if kernel == "triton" else contextlib.nullcontext()
    with forced:
        out = call(q, k, v=v, cu_seq_lens_q=cu, scaling=0.3, sliding_window=window,
                   s_aux=sinks)[0]
        out.square().sum().backward()
    truth = per_document_truth(q, k, v, cu, 0.3, window, sinks=sinks)
    torch.testing.assert_close(out.double(), truth, atol=2e-6, rtol=1e-5)
    grads = [t.grad for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    truth.square().sum().backward()
    for name, g, t in zip(("dq", "dk", "dv", "dsinks"), grads, (q, k, v, sinks)):
        torch.testing.assert_close(g.double(), t.grad.double(), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family, alone_attention", [("gpt_oss", "eager"),
                                                     ("deepseek_v2", "sdpa")])
def test_sink_and_latent_families_packed_document_equals_document_alone(family,
                                                                       alone_attention):
    """gpt-oss (attention sinks, sliding and full layers) and DeepSeek-V2 (value head dim below
    the query's) switched to packed attention: each packed document's logits equal the document
    run alone with the family's own attention."""
    from tests import families

    model = families.build(family).eval()
    docs = documents(LENGTHS)
    packed = pack(docs, max_len=MAX_LEN)
    use_packed_attention(model)
    with torch.no_grad():
        out = model(**packed.model_inputs(), use_cache=False).logits
        model.set_attn_implementation(alone_attention)
        for r, row in enumerate(packed.documents):
            slot = 0
            for d in row:
                ids = torch.tensor([docs[d.example]["input_ids"]])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                torch.testing.assert_close(out[r, slot:slot + d.length], alone, atol=1e-5,
                                           rtol=1e-5)
                slot += d.length


def test_implementation_choice_is_per_device_and_dtype():
    assert implementation(torch.empty(1, 2, 3, 64)) == "reference"
    assert implementation(torch.empty(1, 2, 3, 64), softcap=30.0) == "chronicals"
    assert implementation(torch.empty(1, 2, 3, 64), sinks=True) == "chronicals"
    assert implementation(torch.empty(1, 2, 3, 64, dtype=torch.bfloat16)) == "reference"
    if torch.cuda.is_available():
        assert implementation(torch.empty(1, 2, 3, 64, device="cuda")) == "reference"
        for dt in (torch.bfloat16, torch.float16):
            assert implementation(torch.empty(1, 2, 3, 64, device="cuda", dtype=dt)) == (
                "flash-varlen")
        assert implementation(torch.empty(1, 2, 3, 60, device="cuda", dtype=torch.bfloat16)) == (
            "reference")


class _Module(torch.nn.Module):
    is_causal = True


def call(q=None, k=None, mask=None, v=None, **kwargs):
    q = torch.randn(1, 2, 5, 8) if q is None else q
    k = torch.randn(1, 2, 5, 8) if k is None else k
    return packed_attention_forward(_Module(), q, k, k if v is None else v, mask, **kwargs)


def test_missing_boundaries_raise_instead_of_attending_across_documents():
    with pytest.raises(ValueError, match="needs the document boundaries `cu_seq_lens_q`"):
        call(position_ids=torch.tensor([[0, 1, 0, 1, 2]]))


def test_model_without_boundaries_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.ones(1, 5, dtype=torch.bool)}, "Pass no attention_mask"),
        ({"k": torch.randn(1, 2, 8, 8)}, "KV cache is in use. Call the model with use_cache=False"),
        ({"dropout": 0.1}, "attention dropout is not supported"),
        ({"cu_seq_lens_k": torch.tensor([0, 5], dtype=torch.int32)}, "must equal cu_seq_lens_q"),
    ],
)
def test_unsupported_calls_raise(kwargs, match):
    kwargs.setdefault("cu_seq_lens_q", torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([0, 2, 5]), "1-D int32 tensor"),
        (torch.tensor([5], dtype=torch.int32), "N \\+ 1 >= 2 boundaries"),
        (torch.tensor([[0, 5]], dtype=torch.int32), "1-D int32 tensor"),
    ],
)
def test_bad_boundaries_raise(cu, match):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, q, q, cu)


def test_bad_shapes_raise():
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"expected query \(B, Hq, S, D\)"):
        varlen_attention(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), cu)
    with pytest.raises(ValueError, match="query heads a multiple of key heads"):
        varlen_attention(torch.randn(1, 3, 5, 8), torch.randn(1, 2, 5, 8),
                         torch.randn(1, 2, 5, 8), cu)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        q = torch.randn(1, 2, 5, 8)
        varlen_attention(q, q, q, cu, sliding_window=0)
    with pytest.raises(ValueError, match=r"value \(B, Hk, S, Dv\), Dv <= D"):
        varlen_attention(q, q, torch.randn(1, 2, 5, 12), cu)


def test_value_head_dim_below_the_querys_runs_with_zero_channels():
    """Multi-head latent attention (DeepSeek-V2/V3): v of fewer channels than q and k."""
    s = 23
    q, k, _ = random_qkv(2, s, 6, 2, 24, torch.float64, "cpu")
    v = random_qkv(2, s, 6, 2, 16, torch.float64, "cpu", seed=1)[2]
    cu = segments_cu([[7, 1, 10], [23]], s, "cpu")
    out = varlen_attention(q, k, v, cu, scale=0.3)
    assert out.shape == (2, s, 6, 16)
    torch.testing.assert_close(out, per_document_truth(q, k, v, cu, 0.3), atol=1e-12,
                               rtol=1e-12)


def test_use_packed_attention_switches_and_refuses_non_hf_modules():
    model = tiny_model("qwen2")
    model.set_attn_implementation("sdpa")
    use_packed_attention(model)
    assert model.config._attn_implementation == PACKED_ATTENTION
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        use_packed_attention(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(14, 2, 64), (8, 8, 128)])
def test_flash_varlen_matches_reference_under_the_numerics_rule(shape, dtype, window):
    """Fast path vs fp64 truth, no worse than the reference path in the same dtype (plus one ulp
    of the dtype at the tensor's scale): forward and all three gradients."""
    hq, hk, d = shape
    s = 300
    q, k, v = random_qkv(3, s, hq, hk, d, dtype, "cuda", seed=4)
    cu = segments_cu([[1, 120, 77, 2], [300], [5, 231]], s, "cuda")
    assert implementation(q) == "flash-varlen"
    grad = torch.randn(3, s, hq, d, device="cuda", dtype=dtype)
    out = varlen_attention(q, k, v, cu, scale=d**-0.5, sliding_window=window)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    from chronicals.attention import _reference_varlen

    ref = _reference_varlen(q, k, v, cu, d**-0.5, window)
    eager = (ref, *torch.autograd.grad(ref, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    truth_out = per_document_truth(q64, k64, v64, cu, d**-0.5, window)
    truth = (truth_out, *torch.autograd.grad(truth_out, (q64, k64, v64), grad.double()))
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), got, eager, truth):
        scale = float(t.detach().abs().max())
        assert_no_worse_than_eager(name, g.detach(), e.detach(), t.detach(),
                                   atol=ULP[dtype] * scale, ulps=1.0)


@pytest.mark.cuda
def test_flash_varlen_compiles_without_graph_breaks():
    q, k, v = random_qkv(2, 256, 14, 2, 64, torch.bfloat16, "cuda", seed=5)
    cu = segments_cu([[100, 156], [17, 200]], 256, "cuda")
    grad = torch.randn(2, 256, 14, 64, device="cuda", dtype=torch.bfloat16)

    def f(q, k, v, cu):
        return varlen_attention(q, k, v, cu, scale=0.125)

    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break raises
    a = compiled(q, k, v, cu)
    b = f(q, k, v, cu)
    # The same flash kernels run either way; only the layout glue is compiled.
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    grads_a = torch.autograd.grad(a, (q, k, v), grad)
    grads_b = torch.autograd.grad(b, (q, k, v), grad)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("device", [d for d in devices() if d == "cuda"])
def test_bf16_model_packed_loss_matches_hf_isolated_sdpa(device):
    model = tiny_model("qwen2").to(device, torch.bfloat16)
    docs = documents([90, 33, 120, 7, 64, 200], seed=6)
    packed = pack(docs, max_len=256)
    inputs = packed.model_inputs(device)
    with torch.no_grad():
        ours = model(**inputs, use_cache=False).loss
        model.set_attn_implementation("sdpa")
        hf = model(**{k: inputs[k] for k in ("input_ids", "labels", "position_ids")},
                   use_cache=False).loss
    torch.testing.assert_close(ours, hf, rtol=2e-2, atol=0)
