"""The fine-tuning job: the default run, LoRA adapters, exact resume, data formats, errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chronicals.ops  # noqa: F401  (kernels defined now, under conftest's Triton interpreter)
from chronicals import cli, packing
from chronicals import config as config_lib
from chronicals import data as data_lib
from chronicals.config import FinetuneConfig, field_docs
from chronicals.plot import PLOT_FILE, matplotlib_missing
from chronicals.warmup import CompilePackages, cache_key
from compile_passes._torch_api import unique_graphs_compiled
from tests.helpers import packages_on_for_tiny_models

# The GPU machine's stack (CI's second stage) has no `datasets`: a dataset name then gets the
# error that says so instead of the lookup's.
_HAS_DATASETS = importlib.util.find_spec("datasets") is not None

# The default job compiles with the chronicals backend; the other tests run eagerly ("none"),
# where compiling is not the point (the backend is tested in tests/compile_passes).


def _small(tmp_path: Path, name: str = "out", **overrides) -> FinetuneConfig:
    """The built-in job cut down: rows of 128 tokens (long examples split), 2 rows a step."""
    settings = dict(
        output_dir=str(tmp_path / name), max_len=128, overlong="split", batch_size=2, steps=6,
        eval_every=2, compile="none", progress=False,
    )
    return FinetuneConfig(**{**settings, **overrides})


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each job starts from empty Dynamo caches: the tests count the graphs a job compiles, and
    the compiled entries that earlier tests left for the same code would change that count."""
    torch.compiler.reset()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test here reaches the Hub: a request is refused before it is sent."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _log(output_dir: Path, kind: str) -> list[dict]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_default_job_runs_and_loss_falls(tmp_path, capsys, monkeypatch):
    # As a user's CPU runs it: the ops' PyTorch references, not the Triton interpreter (the
    # variable is read per launch; the kernels were defined under the interpreter at import).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "default"
    # The default job with fewer steps and shorter rows, through the command line.
    rc = cli.main(["finetune", "--output-dir", str(out), "--steps", "12", "--max-len", "512",
                   "--overlong", "split", "--eval-every", "6", "--no-progress"])
    assert rc == 0, capsys.readouterr().err

    # One training graph (and one for evaluation), all four fusions in each. The two layers are
    # one region (chronicals/regions.py): of the 5 norms, the 2 post-attention norms follow a
    # residual add and are left to Inductor (tests/models.py); the layers' input norms read the
    # region's input and the final norm its output, and fire. The 2 attention calls are
    # chronicals_varlen's own (the job's packed rows), left as written.
    reports = _log(out, "compile")
    assert len(reports) == 2
    for report in reports:
        fired = report["fired"]
        assert fired["rms_norm"] == 3 and fired["swiglu"] == 2 and fired["rope"] == 2
        assert fired["linear_cross_entropy"] == 1 and report["rejected"] == 0
        assert report["declined"] == 4 and "2 attention, 2 rms_norm" in report["summary"]
    # The warm-up time: to the end of step 5, compile included, once.
    (warmup,) = _log(out, "warmup")
    assert warmup["step"] == 5 and warmup["seconds"] > 0
    folder = Path(warmup["compile_cache"])  # the job's folder under the versions' folder
    assert folder.parent.name == cache_key() and folder.name.startswith("job-")
    assert warmup["package_loaded"] is False  # on the CPU the backend compiles with aot_eager

    train = _log(out, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    losses = [r["loss"] for r in train]
    assert losses[0] > 7.0  # ln(2048) = 7.6 at random init
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 and r["label_tokens"] > 0 for r in train)
    evals = _log(out, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    assert (out / PLOT_FILE).is_file() == (not matplotlib_missing())  # tests/test_plot.py
    assert (out / "checkpoint-12" / cli.STATE_FILE).is_file()
    assert (out / "final" / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tokenizer) == 2048


@pytest.mark.parametrize("lora_r", [0, 4])
def test_a_second_run_starts_from_the_first_runs_compile_package(tmp_path, monkeypatch, lora_r):
    # Inductor compiles (the chronicals backend's compiler on a GPU; on the CPU, plain
    # --compile inductor), so the job keeps Dynamo's package in its compile cache folder.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    runs = []
    for name, max_len in (("first", 128), ("second", 128), ("other_rows", 96)):
        graphs = unique_graphs_compiled()
        config = _small(tmp_path, name, compile="inductor", lora_r=lora_r, eval_every=3,
                        max_len=max_len)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a package that failed would warn
            cli.finetune(config)
        out = Path(config.output_dir)
        runs.append((_log(out, "warmup")[0], _log(out, "train"), _log(out, "eval"),
                     unique_graphs_compiled() - graphs))
    (first, first_train, first_eval, first_graphs), (second, train, evals, graphs) = runs[:2]
    other, _, other_eval, other_graphs = runs[2]
    assert first["compile_cache"] == second["compile_cache"] == other["compile_cache"]
    # The first run compiled the training graph and the evaluation's; the second loaded both.
    assert not first["package_loaded"] and first_graphs == 2
    if not packages_on_for_tiny_models():  # off (chronicals/warmup.py): each run compiles
        assert not second["package_loaded"] and graphs == 2
    else:
        assert (Path(first["compile_cache"]) / "dynamo").is_dir()
        assert second["package_loaded"] and graphs == 0
        # Rows of another length: the package loads, and its graphs' guards send the new
        # shapes to a compile (Dynamo names the new graphs' globals past the package's).
        assert other["package_loaded"] and other_graphs == 2
        assert not (Path(first["compile_cache"]) / CompilePackages.OFF).exists()
    assert [r["loss"] for r in train] == [r["loss"] for r in first_train]
    assert [r["grad_norm"] for r in train] == [r["grad_norm"] for r in first_train]
    assert [r["eval_loss"] for r in evals] == [r["eval_loss"] for r in first_eval]
    assert other_eval and all(math.isfinite(r["eval_loss"]) for r in other_eval)


def test_lora_adapter_reloads_through_peft_with_same_logits(tmp_path):
    config = _small(tmp_path, lora_r=4, steps=3, lr=1e-2)
    result = cli.finetune(config)
    final = Path(config.output_dir) / "final"
    assert (final / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    base_dir = Path(adapter_config["base_model_name_or_path"])
    assert base_dir == (Path(config.output_dir) / "base-model").resolve()
    # Its model.safetensors is a copy of the base (test_lora_output_..._after_the_folder_moves).
    assert (final / "model.safetensors").read_bytes() == (
        base_dir / "model.safetensors").read_bytes()

    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    ids = torch.randint(0, 2048, (2, 40), generator=torch.Generator().manual_seed(0))
    result.model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Training moved the adapters: B starts at zero, so a trained model differs from its base.
    with torch.no_grad(), reloaded.disable_adapter():
        assert not torch.allclose(reloaded(input_ids=ids).logits, got)


@pytest.mark.parametrize("lora_dtype, adapter_dtype", [("fp32", torch.float32),
                                                       ("model", torch.bfloat16)])
def test_lora_dtype_sets_the_adapters_dtype(tmp_path, lora_dtype, adapter_dtype):
    # Rows of 256: at 128, step 2's rows hold only prompt pieces, and such a step is skipped.
    config = _small(tmp_path, lora_r=4, steps=2, dtype="bf16", lora_dtype=lora_dtype,
                    max_len=256)
    model = cli.finetune(config).model
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == adapter_dtype for p in adapters)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    train = _log(Path(config.output_dir), "train")
    assert len(train) == 2 and all(r["grad_norm"] > 0 for r in train)


def test_lora_precision_reaches_the_backend(tmp_path, monkeypatch):
    # The default, mixed, is what the other LoRA jobs compiled with the backend run. The ops run
    # their PyTorch references (the interpreter's frozen-head LCE alone takes minutes here).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    precision = "exact"
    config = _small(tmp_path, lora_r=4, steps=1, eval_every=0, compile="chronicals",
                    lora_precision=precision, max_len=256)
    cli.finetune(config)
    compiles = _log(Path(config.output_dir), "compile")
    assert compiles and all(f"lora precision: {precision}" in r["summary"] for r in compiles)
    assert sum(r["fired"].get("lora", 0) for r in compiles) == 0


def test_unknown_lora_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"lora_dtype must be one of \('fp32', 'model'\)"):
        _small(tmp_path, lora_r=4, lora_dtype="fp16")


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_stopped_and_resumed_run_matches_uninterrupted_run(tmp_path, monkeypatch, lora_r):
    # Rows of 256 tokens: at 128 the split pieces of some steps hold prompt only, and a step
    # without label tokens does not call train_step, which this test counts.
    whole = _small(tmp_path, "whole", lora_r=lora_r, save_every=3, max_len=256)
    cli.finetune(whole)

    stopped = _small(tmp_path, "stopped", lora_r=lora_r, save_every=3, max_len=256)
    calls = []
    real_step = cli.train_step

    def stop_at_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cli, "train_step", stop_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        cli.finetune(stopped)
    monkeypatch.setattr(cli, "train_step", real_step)
    out = Path(stopped.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "final").exists() and not list(out.glob(".tmp-*"))

    resumed = cli.finetune(_small(tmp_path, "stopped", lora_r=lora_r, save_every=3,
                                  max_len=256, resume="auto"))
    assert len(resumed.losses) == 3  # steps 4..6 ran in this process
    expected = [(r["step"], r["loss"], r["grad_norm"]) for r in _log(Path(whole.output_dir),
                                                                     "train")]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in _log(out, "train")]
    assert got == expected
    assert _log(out, "eval") == _log(Path(whole.output_dir), "eval")


def test_resume_with_other_settings_is_an_error(tmp_path):
    cli.finetune(_small(tmp_path, steps=2, eval_every=0))
    with pytest.raises(ValueError, match=r"other settings \(max_len: checkpoint 128, now 256"):
        cli.finetune(_small(tmp_path, steps=2, max_len=256, resume="auto"))


def test_chat_data_trains_on_assistant_replies_only(tmp_path):
    conversations = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{2 * i}"}]}
        for i in range(12)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    tokenizer = AutoTokenizer.from_pretrained(data_lib.default_tokenizer_path())
    example = data_lib.tokenize_records(data_lib.load_records(path), tokenizer)[3]
    trained = tokenizer.decode([t for t in example.labels if t != -100])
    assert trained == "6<|im_end|>\n"

    result = cli.finetune(_small(tmp_path, data=str(path), steps=2, packing=False,
                                 overlong="error"))
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _records(n: int, long: tuple[int, ...] = ()) -> str:
    """n prompt/completion records as JSON lines; those in `long` have a 300-token prompt."""
    return "".join(
        json.dumps({"prompt": "x " * 300 if i in long else f"p{i}", "completion": f"c{i}"}) + "\n"
        for i in range(n)
    )


def _chat_lines(bad: dict) -> str:
    """Chat records as JSON lines: three good ones, then `bad`."""
    good = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    return "".join(json.dumps(r) + "\n" for r in [good, good, good, bad])


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--data", str(d / "missing.jsonl")], "data: file not found: .*missing.jsonl"),
        (lambda d: ["--data", _write(d / "empty.jsonl", "\n")], "holds no records"),
        (lambda d: ["--data", _write(d / "text.jsonl", '{"text": "hello"}\n')],
         r"text.jsonl:1: expected a 'messages' column .* Got columns \['text'\]"),
        (lambda d: ["--max-len", "64"],
         (r"examples are longer than max_len=64 tokens \(the longest, \S*humaneval.jsonl:\d+, "
          ".*overlong")),
        # The record on line 8 is the one too long; with 4 of 20 records held out it is the 6th
        # of the training split, which the error named before, then "record 7".
        (lambda d: ["--data", _write(d / "long.jsonl", _records(20, long=(7,))), "--max-len",
                    "64", "--eval-fraction", "0.2"],
         (r"1 of 20 examples are longer than max_len=64 tokens \(the longest, \S*long.jsonl:8, "
          "has")),
        (lambda d: ["--data", _write(d / "chat.jsonl", _chat_lines(
            {"messages": [{"role": "user", "content": "Hi"}]}))],
         r"data: \S*chat.jsonl:4: no 'assistant' message"),
        (lambda d: ["--data", _write(d / "chat.jsonl", _chat_lines(
            {"messages": [{"role": "bot", "content": "Hi"}]}))],
         r"data: \S*chat.jsonl:4: messages\[0\] has role 'bot'; expected one of"),
        (lambda d: ["--data", _write(d / "chat.jsonl", _chat_lines(
            {"messages": [{"role": "user", "content": ["Hi"]},
                          {"role": "assistant", "content": "Hello"}]}))],
         (r"data: \S*chat.jsonl:4: messages\[0\] \(user\) must have a string 'content'. Got "
          "list")),
        (lambda d: ["--data", _write(d / "data.json", json.dumps({"data": []}, indent=1))],
         "holds one JSON object spread over several lines"),
        (lambda d: ["--data", "chronicals-test/no-such-data"],
         "'chronicals-test/no-such-data' is " + (
             "neither a local file nor a dataset" if _HAS_DATASETS
             else "not a local file, and loading a dataset by name needs the `datasets` package")),
        (lambda d: ["--output-dir", _write(d / "file", "")], "exists and is not a directory"),
        (lambda d: ["--output-dir", str(Path(_write(d / "file", "")) / "out")],
         r"cannot create .*out: .*file is a file"),
        # /sys refuses new entries to everyone, root included (permission bits do not).
        (lambda d: ["--output-dir", "/sys/chronicals-test-out"], "cannot write in /sys"),
        (lambda d: ["--device", "foo"], "device: 'foo' is not a device; expected 'auto', 'cpu'"),
        (lambda d: ["--device", "cuda:99"], "device: 'cuda:99' is not available"),
        (lambda d: ["--lora-r", "4", "--lora-target", "q_proj,qproj"],
         "lora: --lora-target 'q_proj,qproj': qproj matches no linear, .* q_proj, up_proj"),
        (lambda d: ["--lora-r", "4", "--lora-dropout", "1"],
         r"lora_dropout must be in \[0, 1\). Got 1.0"),
        (lambda d: ["--max-len", "1"], "max_len must be >= 2"),
        (lambda d: ["--lr", "inf"], "lr must be finite and > 0. Got inf"),
        (lambda d: ["--max-len", "8", "--overlong", "truncate"],
         "training split has no label tokens to learn from"),
        (lambda d: ["--weight-decay", "inf"], "weight_decay must be finite and >= 0. Got inf"),
        (lambda d: ["--model", str(d / "no-such-model")], "model: no such file or directory"),
        (lambda d: ["--model", str(d)], "has no config.json"),
    ],
    ids=["missing-file", "empty", "missing-columns", "max-len-too-small",
         "overlong-names-file-record", "chat-no-assistant", "chat-unknown-role",
         "chat-content-not-str", "json-object", "unknown-dataset", "output-dir-is-file",
         "output-dir-under-file", "output-dir-not-writable", "device-unknown", "device-absent",
         "lora-target-unknown", "lora-dropout-1", "max-len-1", "lr-inf", "no-label-tokens",
         "weight-decay-inf", "unknown-model", "model-dir-without-config"],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, make_args, message):
    out = tmp_path / "out"
    rc = cli.main(["finetune", "--output-dir", str(out), "--compile", "none", "--no-progress",
                   *make_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("chronicals finetune: error: ")
    assert re.search(message, err[-1]), err[-1]
    assert not out.exists()


def test_fresh_run_into_another_runs_dir_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / cli.CONFIG_FILE).write_text("{}")
    before = sorted(out.iterdir())
    rc = cli.main(["finetune", "--output-dir", str(out), "--compile", "none", "--no-progress"])
    assert rc == 1
    assert "already holds a run (run_config.json). Continue it with --resume auto" in (
        capsys.readouterr().err
    )
    assert sorted(out.iterdir()) == before and (out / cli.CONFIG_FILE).read_text() == "{}"


def test_steps_without_label_tokens_do_not_step_the_optimizer(tmp_path, monkeypatch, caplog):
    # Records 1, 3 and 5 lose their completions to truncation: one row each, one row a step,
    # so 3 of the 6 steps have no label token. AdamW with weight decay would still change the
    # weights (and its moments) on them.
    data = _write(tmp_path / "data.jsonl", _records(6, long=(1, 3, 5)))
    label_counts = []
    real_step = cli.train_step

    def counting_step(loss_fn, optimizer, micro_batches, **kwargs):
        label_counts.append(sum(int(cli.count_label_tokens(b["labels"])) for b in micro_batches))
        return real_step(loss_fn, optimizer, micro_batches, **kwargs)

    monkeypatch.setattr(cli, "train_step", counting_step)
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--output-dir", str(out), "--data", data, "--no-packing",
                     "--max-len", "16", "--overlong", "truncate", "--batch-size", "1",
                     "--steps", "6", "--eval-fraction", "0", "--weight-decay", "0.1",
                     "--compile", "none", "--no-progress"]) == 0
    assert len(label_counts) == 3 and all(label_counts)
    skips, trains = _log(out, "skip"), _log(out, "train")
    assert len(skips) == 3 and all(r["label_tokens"] == 0 for r in skips)
    assert sorted(r["step"] for r in skips + trains) == [1, 2, 3, 4, 5, 6]
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert done == [(
        "done: 6 steps (3 skipped: no label tokens in their micro-batches, the optimizer did "
        "not step); 3 examples lost every label token to --overlong truncate; model in "
        f"{out / 'final'}"
    )]


def test_evaluation_split_without_label_tokens_is_an_error(tmp_path, capsys):
    # Its loss would read 0 (0 tokens, clamped to 1), as if the model were perfect.
    examples = [data_lib.Example(input_ids=[i], labels=[i]) for i in range(4)]
    held_out = data_lib.split_eval(examples, eval_fraction=0.25, seed=0)[1][0].input_ids[0]
    data = _write(tmp_path / "data.jsonl", _records(4, long=(held_out,)))
    out = tmp_path / "out"
    rc = cli.main(["finetune", "--output-dir", str(out), "--data", data, "--max-len", "16",
                   "--overlong", "truncate", "--eval-fraction", "0.25", "--compile", "none",
                   "--no-progress"])
    assert rc == 1
    assert "error: data: the evaluation split has no label tokens to learn from" in (
        capsys.readouterr().err)
    assert not out.exists()


def test_every_option_says_its_default():
    finetune = cli.build_parser()._subparsers._group_actions[0].choices["finetune"]
    for action in finetune._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings
    text = finetune.format_help()
    # Before, argparse appended "(default: None)" to a None's own meaning, and "(default:
    # True)" to --no-packing.
    assert "(default: None)" not in text and "(default: True)" not in text


@pytest.mark.parametrize("saved", [False, True])
def test_interrupt_says_whether_there_is_a_checkpoint(tmp_path, capsys, monkeypatch, saved):
    def interrupted(config):
        if saved:
            (tmp_path / cli.LATEST_FILE).write_text('{"checkpoint": "checkpoint-2", "id": "0"}')
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "finetune", interrupted)
    assert cli.main(["finetune", "--output-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    expected = ("continue with --resume auto" if saved else
                "no checkpoint was saved, so --resume auto starts the run again from step 0")
    assert expected in err, err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "finetune" in capsys.readouterr().err


def test_bundled_tokenizer_is_reproducible(tmp_path):
    data_lib.build_default_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (data_lib.DATA_DIR / name).read_text(), name


def test_resume_of_a_finished_run_does_nothing_and_says_so(tmp_path, caplog, capsys):
    # Before: it loaded everything, ran no step and wrote final/ again.
    config = _small(tmp_path, steps=2, eval_every=0)
    cli.finetune(config)
    out = Path(config.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    assert cli.main(["finetune", "--output-dir", str(out), "--max-len", "128", "--overlong",
                     "split", "--steps", "2", "--eval-every", "0", "--compile", "none",
                     "--no-progress", "--resume", "auto"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "already finished" in said and "nothing to do" in said
    assert "resume with a higher --steps" in said and "done:" not in said


def test_resume_with_more_steps_extends_the_run_on_a_recomputed_schedule(tmp_path):
    # Before: --steps differing from the checkpoint's was refused as "other settings".
    # Rows of 256: at 128 step 5's rows hold only prompt pieces, and such a step is skipped.
    cli.finetune(_small(tmp_path, steps=4, max_len=256))
    result = cli.finetune(_small(tmp_path, steps=6, max_len=256, resume="auto"))
    out = Path(result.output_dir)
    assert len(result.losses) == 2 and result.step == 6
    train = _log(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _log(out, "eval")] == [2, 4, 6]
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-4").is_dir()
    # Steps 5 and 6 have the 6-step schedule's learning rates, as a 6-step run has them.
    fresh = _log(Path(cli.finetune(_small(tmp_path, "fresh", steps=6, max_len=256)).output_dir),
                 "train")
    assert [r["lr"] for r in train[4:]] == pytest.approx([r["lr"] for r in fresh[4:]], rel=1e-6)
    assert train[3]["lr"] != pytest.approx(fresh[3]["lr"])  # step 4 ran on the 4-step one

    with pytest.raises(ValueError, match=r"checkpoint-6 is at step 6, past --steps 5; resume "
                       r"with --steps 6 or more"):
        cli.finetune(_small(tmp_path, steps=5, max_len=256, resume="auto"))


def test_progress_without_a_terminal_is_plain_log_lines(tmp_path, capsys, caplog):
    # Before: the bar's redraws went to a log file or CI log as carriage returns and blank lines.
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--output-dir", str(out), "--max-len", "256", "--overlong",
                     "split", "--steps", "3", "--log-every", "1", "--eval-every", "2",
                     "--compile", "none"]) == 0
    assert "step/s" not in capsys.readouterr().err  # the bar's unit
    said = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in said if m.startswith("step ")] == [
        "step 1", "step 2", "step 2", "step 3", "step 3"]  # steps, and the evaluations
    assert any(m.startswith("step 2: eval loss") for m in said)


def test_gradient_checkpointing_keeps_every_fusion(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as in test_default_job_runs_and_loss_falls
    runs = {}
    for flags in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"out{len(flags)}"
        assert cli.main(["finetune", "--output-dir", str(out), "--steps", "2", "--max-len",
                         "512", "--overlong", "split", "--eval-every", "0", "--no-progress",
                         *flags]) == 0
        runs[bool(flags)] = out
    checkpointed, plain = (_log(runs[k], "compile") for k in (True, False))
    assert len(checkpointed) == len(plain) == 2
    for with_, without in zip(checkpointed, plain):
        # Every fusion fires as often, none is rejected. Under checkpointing the layers are
        # compiled whole (not as one region, chronicals/regions.py), each in its checkpointed
        # body: the residual adds before their input norms lie outside it, so those norms are
        # not declined as following an add (see test_default_job_runs_and_loss_falls), as in
        # the region; each norm is fused or declined either way.
        fired, fired_plain = dict(with_["fired"]), dict(without["fired"])
        assert fired.pop("rms_norm") + with_["declined"] == (
            fired_plain.pop("rms_norm") + without["declined"])
        assert fired == fired_plain and fired["linear_cross_entropy"] == 1
        assert fired["swiglu"] == fired["rope"] == 2
        assert with_["rejected"] == without["rejected"] == 0
    assert [r["fired"]["rms_norm"] for r in checkpointed] == [3, 1]  # training, evaluation
    # Recomputing the activations changes nothing that is computed.
    losses = {k: [r["loss"] for r in _log(out, "train")] for k, out in runs.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_gradient_checkpointing_is_on_in_the_model(tmp_path):
    model = cli.finetune(_small(tmp_path, steps=1, gradient_checkpointing=True)).model
    assert model.is_gradient_checkpointing
    assert not cli.finetune(_small(tmp_path, "plain", steps=1)).model.is_gradient_checkpointing


def test_gradient_checkpointing_with_lora_keeps_one_graph_and_the_lm_head_fusion(tmp_path,
                                                                                  monkeypatch):
    # Before: PEFT hooked the embeddings to call requires_grad_(), a graph break that split the
    # training graph and left the logits to exist (the LM-head + CE fusion rejected).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = _small(tmp_path, lora_r=4, steps=1, max_len=256, eval_every=0,
                    compile="chronicals", gradient_checkpointing=True)
    model = cli.finetune(config).model
    assert model.get_base_model().is_gradient_checkpointing
    reports = _log(Path(config.output_dir), "compile")
    assert len(reports) == 2  # training, and the evaluation at the end
    assert all(r["fired"]["linear_cross_entropy"] == 1 and r["rejected"] == 0 for r in reports), (
        [r["summary"] for r in reports])


def test_epochs_set_the_steps_from_the_training_rows(tmp_path, monkeypatch):
    # 10 examples, one padded row each, 2 rows a step (batch 1 x 2 micro-batches): 3 passes are
    # 15 steps, each row trained on 3 times.
    data = _write(tmp_path / "data.jsonl", _records(10))
    seen = []
    real_batch_at = cli.data_lib.batch_at

    def recording_batch_at(rows, cursor, batch_size, *, seed):
        batch, n = real_batch_at(rows, cursor, batch_size, seed=seed)
        seen.extend(tuple(row) for row in batch["input_ids"].tolist())
        return batch, n

    monkeypatch.setattr(cli.data_lib, "batch_at", recording_batch_at)
    result = cli.finetune(_small(tmp_path, data=data, packing=False, max_len=16, batch_size=1,
                                 grad_accum=2, eval_fraction=0, steps=None, epochs=3))
    assert result.step == 15
    assert [r["step"] for r in _log(Path(result.output_dir), "train")] == list(range(1, 16))
    assert len(seen) == 30 and all(seen.count(t) == 3 for t in set(seen)) and len(set(seen)) == 10


def test_steps_and_epochs_together_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--output-dir", str(out), "--steps", "5", "--epochs", "2"]) == 1
    assert ("give steps or epochs, not both. Got steps=5 and epochs=2"
            in capsys.readouterr().err)
    assert not out.exists()


def _eval_loss(model, tokenizer, config: FinetuneConfig) -> float:
    """`model`'s loss on the held-out rows of a run of `config` on the bundled data, as the job
    computes its eval loss (for outputs reloaded elsewhere)."""
    records = data_lib.load_records(data_lib.default_data_path())
    examples = data_lib.tokenize_records(records, tokenizer)
    held_out = data_lib.split_eval(examples, eval_fraction=config.eval_fraction,
                                   seed=config.seed)[1]
    rows = data_lib.make_rows(held_out, max_len=config.max_len, pad_id=tokenizer.pad_token_id,
                              packing=config.packing, overlong=config.overlong)
    batches = data_lib.eval_batches(rows, config.batch_size)
    return cli.evaluate_loss(cli.compile_loss(model, backend=None), model, batches).item()


def test_lora_output_on_its_own_base_loads_after_the_folder_moves(tmp_path):
    # Before: adapter_config.json named <output>/base-model by its absolute path, so a moved
    # folder did not load. Padded rows: the reloaded model's sdpa then computes what the job did.
    config = _small(tmp_path, lora_r=4, steps=3, lr=1e-2, packing=False, max_len=256,
                    eval_every=3)
    cli.finetune(config)
    logged = _log(Path(config.output_dir), "eval")[-1]["eval_loss"]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    Path(config.output_dir).rename(moved)

    model = AutoModelForCausalLM.from_pretrained(moved / "final")
    assert sum("lora_" in n for n, _ in model.named_parameters()) > 0
    tokenizer = AutoTokenizer.from_pretrained(moved / "final")
    assert _eval_loss(model, tokenizer, config) == pytest.approx(logged, rel=1e-5)


def test_lora_on_a_local_model_names_it_by_its_absolute_path(tmp_path, monkeypatch):
    # Given as ./<dir>, the adapters named it as given: read from the loader's working directory.
    first = _small(tmp_path, "first", lora_r=4, steps=1, eval_every=0)
    cli.finetune(first)
    monkeypatch.chdir(tmp_path)
    config = _small(tmp_path, lora_r=4, steps=1, eval_every=0, model="./first/base-model")
    cli.finetune(config)
    adapter_config = json.loads((Path(config.output_dir) / "final" / "adapter_config.json")
                                .read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "first" / "base-model")


def test_options_are_the_config_fields_with_their_docstrings():
    # Each option's help is its FinetuneConfig field's docstring, written once (config.py).
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    grouped = [name for names in cli.OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(fields), "every field is an option, once"
    docs = field_docs()
    assert set(docs) == set(fields), f"fields without a docstring: {set(fields) - set(docs)}"
    finetune = cli.build_parser()._subparsers._group_actions[0].choices["finetune"]
    actions = {a.dest: a for a in finetune._actions}
    assert actions["overlong"].choices == config_lib.OVERLONG == packing.OVERLONG_POLICIES
    assert actions["overlong"].help.startswith(
        "Examples longer than --max-len tokens: error, truncate (keep the first --max-len tokens")
    assert actions["steps"].help.endswith(f"default: {config_lib.DEFAULT_STEPS}, or those of "
                                          "--epochs.")
    assert actions["packing"].option_strings == ["--no-packing"]
    assert actions["packing"].help.endswith("(default: on; this flag turns it off)")
    for name, choices in config_lib.CHOICES.items():
        assert actions[name].choices == choices, name
    assert cli.config_from_args(finetune.parse_args(["--max-grad-norm", "0"])).max_grad_norm is None
