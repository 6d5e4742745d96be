"""train_step: accumulation equals one batch, normalisation by real tokens, metrics, errors."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from chronicals.train import (
    IGNORE_INDEX,
    StepMetrics,
    compile_loss,
    count_label_tokens,
    evaluate_loss,
    train_step,
)
from compile_passes.backend import chronicals_backend
from tests.models import VOCAB, tiny_model

# None: eager; "chronicals": the fused ops (through the Triton interpreter, conftest.py).
BACKENDS = [None, "chronicals"]


def _batch(rows: int = 8, seq: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows with very different numbers of ignored labels, so a mean per micro-batch would differ
    from the mean over all tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    labels = ids.clone()
    for r in range(rows):
        labels[r, : 2 + 3 * r] = -100  # row r ignores 2 + 3r labels (up to 23 of 24)
    return {"input_ids": ids, "labels": labels}


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    return [dict(zip(batch, chunk)) for chunk in zip(*(t.chunk(parts) for t in batch.values()))]


def _gradient_step(backend, micro_batches, max_grad_norm=None):
    """One SGD step with lr 1: parameter change = -gradient (after clipping)."""
    model = tiny_model("qwen2")
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = train_step(compile_loss(model, backend=backend), optimizer, micro_batches,
                         max_grad_norm=max_grad_norm)
    grads = {k: before[k] - v for k, v in model.state_dict().items()}
    return grads, metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_accumulation_equals_one_batch(backend, max_grad_norm):
    batch = _batch()
    one, m_one = _gradient_step(backend, [batch], max_grad_norm)
    four, m_four = _gradient_step(backend, _split(batch, 4), max_grad_norm)

    assert m_one.item()["num_tokens"] == m_four.item()["num_tokens"] == int(
        count_label_tokens(batch["labels"])
    )
    torch.testing.assert_close(m_four.loss, m_one.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m_four.grad_norm, m_one.grad_norm, rtol=1e-5, atol=1e-7)
    # Only the summation order differs (4 partial sums vs 1): fp32 rounding of terms of magnitude
    # ~1, so 1e-6 absolute. A wrong normaliser would be off by a factor (4x, or a token ratio).
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert m_one.grad_norm.item() > 0


def test_loss_is_mean_over_real_tokens_of_all_micro_batches():
    batch = _batch()
    model = tiny_model("qwen2")
    logits = model(input_ids=batch["input_ids"]).logits.detach()
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = batch["labels"][:, 1:]
    valid = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    expected = nll[valid].mean()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = train_step(compile_loss(model, backend=None), optimizer, _split(batch, 4))
    torch.testing.assert_close(metrics.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_all_ignored_labels_give_zero_loss_not_nan():
    batch = _batch(rows=2)
    batch["labels"][:] = -100
    model = tiny_model("qwen2")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = train_step(compile_loss(model, backend=None), optimizer, [batch]).item()
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0 and metrics["num_tokens"] == 0


def test_metrics_stay_on_device_until_read():
    model = tiny_model("qwen2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    batch = _batch(rows=2)
    metrics = train_step(compile_loss(model, backend=None), optimizer, [batch, batch],
                         scheduler=scheduler)
    assert isinstance(metrics, StepMetrics)
    for t in (metrics.loss, metrics.grad_norm, metrics.num_tokens):
        assert isinstance(t, torch.Tensor) and t.ndim == 0
    values = metrics.item()
    assert values["num_tokens"] == 2 * int(count_label_tokens(batch["labels"]))
    assert values["lr"] == 1e-3  # the rate this step used; the scheduler moved on afterwards
    assert optimizer.param_groups[0]["lr"] == 0.5e-3
    assert all(p.grad is None for p in model.parameters())


def _counted_compiles() -> tuple[list, dict]:
    """A list that gets each graph the chronicals backend compiles (its report), and the options
    that make it so. Each compile_loss has a compile cache of its own (chronicals.train.own_code),
    so earlier tests' compiles do not count against Dynamo's recompile limit here."""
    compiles = []
    return compiles, {"report": compiles.append}


def test_compiled_loss_compiles_once():
    compiles, options = _counted_compiles()
    model = tiny_model("qwen2")
    loss_fn = compile_loss(model, options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for seed in range(3):
        batch = _batch(rows=2, seed=seed)
        train_step(loss_fn, optimizer, _split(batch, 2))
    assert len(compiles) == 1


def test_evaluate_loss_matches_training_loss_and_restores_mode():
    model = tiny_model("qwen2")
    loss_fn = compile_loss(model, backend=None)
    batches = _split(_batch(), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    expected = train_step(loss_fn, optimizer, batches).loss
    model.train()
    got = evaluate_loss(loss_fn, model, batches)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert model.training


def test_bad_input_errors():
    model = tiny_model("qwen2")
    loss_fn = compile_loss(model, backend=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        train_step(loss_fn, optimizer, [])
    with pytest.raises(ValueError, match=r"micro_batches\[0\] must have 'input_ids' and 'labels'"):
        train_step(loss_fn, optimizer, [{"input_ids": _batch()["input_ids"]}])
    with pytest.raises(TypeError, match=r"sequence of micro-batch dicts. Got one dict \(keys "
                                        r"\['input_ids', 'labels'\]\)"):
        train_step(loss_fn, optimizer, _batch())
    with pytest.raises(TypeError, match=r"micro_batches\[1\] must be a dict .* Got Tensor"):
        train_step(loss_fn, optimizer, [_batch(), _batch()["labels"]])
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        train_step(loss_fn, optimizer, [_batch()], max_grad_norm=0.0)
    frozen = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match="no parameter of the optimizer received a gradient"):
        train_step(loss_fn, frozen, [_batch()])


def test_evaluate_loss_checks_batches_like_train_step():
    model = tiny_model("qwen2")
    loss_fn = compile_loss(model, backend=None)
    with pytest.raises(ValueError, match=r"evaluate_loss: batches\[1\] must have 'input_ids' "
                                         r"and 'labels'. Got keys \['input_ids'\]"):
        evaluate_loss(loss_fn, model, [_batch(), {"input_ids": _batch()["input_ids"]}])
    with pytest.raises(TypeError, match="evaluate_loss: batches must be a sequence"):
        evaluate_loss(loss_fn, model, _batch())


def test_micro_batches_may_be_any_iterable():
    batches = _split(_batch(), 2)
    _, from_list = _gradient_step(None, batches)
    _, from_generator = _gradient_step(None, (b for b in batches))
    assert from_generator.item() == from_list.item()


def _out_of_range_call(loss_fn, optimizer, batch):
    """A train_step whose second micro-batch fails after the first one's backward ran."""
    bad = {**batch, "labels": torch.full_like(batch["labels"], VOCAB)}
    with pytest.raises(IndexError, match="out of bounds"):
        train_step(loss_fn, optimizer, [batch, bad])


def _stray_backward(loss_fn, optimizer, batch):
    loss_fn(batch, torch.tensor(1)).backward()


@pytest.mark.parametrize("leave_grads", [_out_of_range_call, _stray_backward])
def test_step_starts_from_zero_gradients(leave_grads):
    batch = _batch(rows=2)
    fresh, fresh_metrics = _gradient_step(None, [batch])

    model = tiny_model("qwen2")
    before = copy.deepcopy(model.state_dict())
    loss_fn = compile_loss(model, backend=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    leave_grads(loss_fn, optimizer, batch)
    assert any(p.grad is not None for p in model.parameters())  # the scenario holds

    metrics = train_step(loss_fn, optimizer, [batch])
    assert metrics.item() == fresh_metrics.item()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(before[name] - value, fresh[name], rtol=0, atol=0, msg=name)


def test_ignore_index_is_hugging_faces():
    hf_default = inspect.signature(ForCausalLMLoss).parameters["ignore_index"].default
    assert IGNORE_INDEX == hf_default == -100
    labels = torch.tensor([[7, IGNORE_INDEX, 5, IGNORE_INDEX]])  # the first is never scored
    assert int(count_label_tokens(labels)) == 1


def test_packed_batches_with_different_document_counts_compile_once():
    from chronicals.attention import PACKED_ATTENTION, register_packed_attention
    from chronicals.packing import pack

    compiles, options = _counted_compiles()
    register_packed_attention()
    model = tiny_model("qwen2", attn_implementation=PACKED_ATTENTION)
    loss_fn = compile_loss(model, options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    segments = set()
    for step in range(3):
        lengths = torch.randint(3, 40, (8 + 4 * step,), generator=g).tolist()
        packed = pack([torch.randint(0, VOCAB, (n,), generator=g) for n in lengths], max_len=64)
        batch = packed.batches(2)[0].model_inputs()
        segments.add(batch["cu_seq_lens_q"].numel())
        train_step(loss_fn, optimizer, [batch])
    assert len(segments) == 3 and len(compiles) == 1


def test_a_second_model_does_not_start_from_the_first_ones_dynamic_sizes():
    # Dynamo remembers which input sizes changed by a function's file, line and code name; every
    # compiled loss is named apart, so a second model starts static like the first. Under a
    # shared name the packed model below began with dynamic rows from the first model's
    # changing lengths, and torch 2.13 failed stamping out its layer region (KeyError).
    from chronicals.attention import PACKED_ATTENTION, register_packed_attention
    from chronicals.packing import pack

    first = compile_loss(tiny_model("qwen2"), backend="aot_eager")
    for rows, seq in ((1, 24), (2, 40)):  # the second batch makes the first model's sizes dynamic
        ids = torch.randint(0, VOCAB, (rows, seq))
        first({"input_ids": ids, "labels": ids}, torch.tensor(rows * seq)).backward()
    register_packed_attention()
    model = tiny_model("qwen2", attn_implementation=PACKED_ATTENTION)
    graphs = []

    def recording(gm, example_inputs):  # keeps the traced (fake) input of every placeholder
        graphs.append([n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")])
        return chronicals_backend(gm, example_inputs, {"report": "none"})

    loss_fn = compile_loss(model, backend=recording)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (8,), generator=g).tolist()
    packed = pack([torch.randint(0, VOCAB, (n,), generator=g) for n in lengths], max_len=64)
    loss_fn(packed.batches(2)[0].model_inputs(), torch.tensor(60)).backward()
    # Dynamic only where compile_loss marks it: the documents' boundaries (1-D).
    (inputs,) = graphs
    dynamic = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)
               and not all(isinstance(d, int) for d in t.shape)]
    assert dynamic and all(len(shape) == 1 for shape in dynamic), dynamic


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_skip_nonfinite_leaves_weights_and_moments_as_they_were(poison):
    model = tiny_model("qwen2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    eager = compile_loss(model, backend=None)
    train_step(eager, optimizer, [_batch(seed=1)], scheduler=scheduler)  # moments to keep
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])

    def loss_fn(batch, num_items):
        loss = eager(batch, num_items)
        return loss if poison is None else loss * poison

    metrics = train_step(loss_fn, optimizer, [_batch(seed=2)], scheduler=scheduler,
                         max_grad_norm=1.0, skip_nonfinite=True)
    assert metrics.skipped == (poison is not None)
    assert scheduler.last_epoch == 2  # the schedule steps either way
    state = optimizer.state_dict()["state"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]) == (poison is not None), name
        assert torch.isfinite(value).all(), name
    for i, param_state in moments.items():
        same = all(torch.equal(v, state[i][k]) for k, v in param_state.items())
        assert same == (poison is not None), i
    assert all(p.grad is None for p in model.parameters())
