"""compile_model inside Hugging Face Trainer, TRL's SFTTrainer and an Accelerate loop: the same
model object, every fusion fired in training (LM head + cross-entropy included), the loss falls,
eval gives logits."""

from __future__ import annotations

import inspect
import logging
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

import compile_passes
from chronicals import compile_model
from tests.models import EXPECTED, VOCAB, tiny_batch, tiny_model

FUSIONS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy")


def _rows(n: int = 16) -> list[dict[str, list[int]]]:
    """Four short arithmetic sequences repeated: a tiny model learns them within a few steps."""
    rows = []
    for i in range(n):
        start, step, length = 3 + 7 * (i % 4), 1 + i % 4, 10 + 2 * (i % 4)
        rows.append({"input_ids": [3 + (start + step * k) % (VOCAB - 3) for k in range(length)]})
    return rows


def _fired_in_training(reports) -> dict[str, int]:
    """Fusions fired, summed over the graphs of `reports`."""
    fired = dict.fromkeys(FUSIONS, 0)
    for report in reports:
        for name in FUSIONS:
            fired[name] += report.fired[name]
    return fired


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_compile_model_keeps_the_model_and_its_signature():
    model = tiny_model("qwen2")
    class_signature = inspect.signature(type(model).forward.__get__(model))
    assert compile_model(model) is model
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert inspect.signature(model.forward) == class_signature
    assert compile_model(model) is model  # a second call leaves it as it is


def test_compile_model_keeps_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("qwen2"),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert compile_model(model) is model
    assert isinstance(model, peft.PeftModelForCausalLM)
    ids, labels = tiny_batch()
    model.train()
    compile_passes.clear_fusion_reports()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert _fired_in_training(compile_passes.fusion_reports())["linear_cross_entropy"] == 1
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default
    assert lora_b.weight.grad is not None


def test_compile_model_refuses_a_model_without_lm_head():
    with pytest.raises(TypeError, match="expected a transformers causal LM.*Got Qwen2Model"):
        compile_model(tiny_model("qwen2").model)


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(7)}, {"shift": True}])
def test_training_loss_is_the_models_own(kwargs):
    """num_items_in_batch (Trainer under gradient accumulation) and shift_labels (context
    parallelism) keep the model loss function's meaning; logits are not returned."""
    eager, compiled = tiny_model("qwen2"), tiny_model("qwen2")
    compile_model(compiled)
    ids, labels = tiny_batch()
    inputs = {"input_ids": ids, "labels": labels, **kwargs}
    if inputs.pop("shift", False):
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        inputs["shift_labels"] = shifted.contiguous()
        inputs["shift_labels"][:, 5] = -100  # differs from labels' own shift
    want = eager.train()(**inputs, use_cache=False).loss
    got = compiled.train()(**inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)


def test_eval_and_generate_return_logits():
    eager, compiled = tiny_model("qwen2"), tiny_model("qwen2")
    compile_model(compiled)
    ids, labels = tiny_batch()
    want = eager.eval()(input_ids=ids, labels=labels, use_cache=False)
    got = compiled.eval()(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "use_cache": True}
    assert torch.equal(compiled.generate(ids[:1], **kwargs), eager.generate(ids[:1], **kwargs))


def _args(cls, tmp_path, **kwargs):
    return cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", **kwargs,
    )


def test_trainer_fuses_everything_and_learns(tmp_path):
    model = tiny_model("qwen2")
    compile_model(model)
    rows = [{"input_ids": r["input_ids"][:10], "labels": r["input_ids"][:10]} for r in _rows()]
    # Gradient accumulation: Trainer passes num_items_in_batch to the model.
    args = _args(TrainingArguments, tmp_path, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    compile_passes.clear_fusion_reports()
    trainer.train()
    reports = compile_passes.fusion_reports()
    assert reports and all(r.fired[name] == EXPECTED["qwen2"][name] for r in reports
                           for name in FUSIONS), [r.summary() for r in reports]
    losses = _losses(trainer)
    assert losses[-1] < 0.8 * losses[0], losses

    predictions = trainer.predict(rows[:4])
    assert predictions.predictions.shape == (4, 10, VOCAB)


def test_accelerate_loop_fuses_everything_and_learns():
    from accelerate import Accelerator

    model = tiny_model("qwen2")
    compile_model(model)
    rows = [torch.tensor(r["input_ids"][:10]) for r in _rows()]
    loader = torch.utils.data.DataLoader(
        rows, batch_size=4, collate_fn=lambda b: {"input_ids": torch.stack(b),
                                                  "labels": torch.stack(b)})
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    prepared.train()
    compile_passes.clear_fusion_reports()
    losses = []
    for _ in range(2):
        for batch in loader:
            out = prepared(**batch)
            assert out.logits is None
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
    reports = compile_passes.fusion_reports()
    assert reports and all(r.fired[name] == EXPECTED["qwen2"][name] for r in reports
                           for name in FUSIONS), [r.summary() for r in reports]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "packing, gradient_checkpointing",
    [(False, False), (True, False), (True, True)],
    ids=["padded", "packed-padding-free", "packed-checkpointed"],
)
def test_sft_trainer_fuses_everything_and_learns(tmp_path, caplog, packing, gradient_checkpointing):
    """Packing in SFTTrainer is padding-free: one row, per-document position_ids, no mask."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[test]')")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from chronicals.data import default_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_path())  # for its pad and eos ids
    model = tiny_model("qwen2", pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    compile_model(model)
    args = _args(trl.SFTConfig, tmp_path, packing=packing, max_length=64,
                 gradient_checkpointing=gradient_checkpointing)
    dataset = Dataset.from_list(_rows())
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=dataset)
    compile_passes.clear_fusion_reports()
    with caplog.at_level(logging.WARNING, logger="chronicals.hf"):
        trainer.train()
    fired = _fired_in_training(compile_passes.fusion_reports())
    assert all(fired[name] >= EXPECTED["qwen2"][name] for name in FUSIONS), fired
    losses = _losses(trainer)
    assert losses[-1] < 0.8 * losses[0], losses
    # TRL's evaluation runs the fused head too (no grad): a finite loss.
    with caplog.at_level(logging.WARNING, logger="chronicals.hf"):
        evaluated = trainer.evaluate(dataset.select(range(4)))
    assert math.isfinite(evaluated["eval_loss"])
    # TRL's entropy and token accuracy, in training and evaluation: NaN, said once.
    assert [r.message for r in caplog.records].count(
        "chronicals.compile_model: TRL's entropy and mean_token_accuracy metrics are skipped "
        "(logged as nan): the fused LM head returns log-probabilities only (the op keeps no "
        "softmax rows)"
    ) == 1
    for metrics in (trainer.state.log_history[0], evaluated):
        prefix = "eval_" if metrics is evaluated else ""
        assert math.isnan(metrics[f"{prefix}mean_token_accuracy"])
        assert math.isnan(metrics[f"{prefix}entropy"])

    model.eval()
    batch = tokenizer.pad([{"input_ids": r["input_ids"]} for r in _rows(2)], return_tensors="pt")
    assert model(**batch).logits.shape == (*batch["input_ids"].shape, VOCAB)


def test_saved_model_folder_reloads_the_bundled_tokenizer(tmp_path):
    """transformers loads a Qwen2 model folder's tokenizer as Qwen2Tokenizer whatever its
    tokenizer_config.json names; the bundled tokenizer reads the same under that class."""
    from transformers import AutoTokenizer

    from chronicals.data import default_data_path, default_tokenizer_path

    bundled = AutoTokenizer.from_pretrained(default_tokenizer_path())
    tiny_model("qwen2", vocab_size=len(bundled)).save_pretrained(tmp_path)
    bundled.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(bundled)
    text = default_data_path().read_text(encoding="utf-8")[:20_000] + "\n    x"
    assert reloaded(text)["input_ids"] == bundled(text)["input_ids"]


def test_full_fine_tune_reloads_from_a_moved_folder_with_its_logged_eval_loss(tmp_path):
    """The job's final/ (model + tokenizer), moved elsewhere and loaded with the Auto classes,
    tokenises the data as the run did and gives the eval loss the run logged last."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chronicals import cli
    from chronicals import data as data_lib
    from chronicals.config import FinetuneConfig
    from chronicals.train import compile_loss, evaluate_loss

    config = FinetuneConfig(output_dir=str(tmp_path / "run"), max_len=128, overlong="split",
                            batch_size=2, steps=4, eval_every=4, compile="none", progress=False)
    cli.finetune(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / cli.LOG_FILE).open()]
    eval_loss = [r["eval_loss"] for r in logged if r["kind"] == "eval"][-1]
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved)

    model = AutoModelForCausalLM.from_pretrained(moved / "final")
    tokenizer = AutoTokenizer.from_pretrained(moved / "final")
    examples = data_lib.tokenize_records(
        data_lib.load_records(str(data_lib.default_data_path())), tokenizer)
    _, eval_examples = data_lib.split_eval(examples, eval_fraction=config.eval_fraction,
                                           seed=config.seed)
    rows = data_lib.make_rows(eval_examples, max_len=config.max_len,
                              pad_id=tokenizer.pad_token_id, packing=config.packing,
                              overlong=config.overlong)
    batches = list(data_lib.eval_batches(rows, config.batch_size))
    got = evaluate_loss(compile_loss(model, backend=None), model, batches).item()
    assert got == pytest.approx(eval_loss, rel=1e-5)
