"""The fine-tuning job's run folder (chronicals/checkpoint.py): checkpoints verified against their
manifest and loaded strictly, the line of checkpoints `--resume auto` follows, the data
fingerprint, non-finite steps, and one error line for every damaged or foreign state.

The runs are the built-in job cut down (rows of 128 tokens, 4 steps, eager); its step 2 holds
only prompt pieces and is a "skip" step, so steps 1, 3 and 4 train."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from chronicals import checkpoint as ckpt
from chronicals import cli
from tests.test_cli import _records, _write

ARGS = ["finetune", "--max-len", "128", "--overlong", "split", "--steps", "4", "--save-every",
        "2", "--eval-every", "0", "--compile", "none", "--no-progress"]
LORA = ["--lora-r", "4", "--steps", "2"]  # the last --steps counts


def _main(out: Path, *extra: str) -> int:
    return cli.main([*ARGS, "--output-dir", str(out), *extra])


def _error(capsys) -> str:
    """The one line a failed run printed; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("chronicals finetune: error: "), err
    return line


def _trained(out: Path) -> list[tuple]:
    records = map(json.loads, (out / ckpt.LOG_FILE).read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]


def _files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: a full fine-tune (checkpoints 2 and 4) and a LoRA one (checkpoint 2)."""
    root = tmp_path_factory.mktemp("runs")
    assert _main(root / "full") == 0
    assert _main(root / "lora", *LORA) == 0
    return {"full": root / "full", "lora": root / "lora"}


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def _reseal(directory: Path) -> None:
    """Rewrite the manifest to match the files as they are now: a checkpoint whose files are
    whole but whose contents are wrong (a writer's bug, a foreign checkpoint)."""
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(directory.iterdir()) if p.name != ckpt.MANIFEST_FILE
    }
    (directory / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header + 64  # inside the first tensor's data; the header stays intact
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    path.write_bytes(bytes(data))


def _edit_state(directory: Path, edit) -> None:
    state = torch.load(directory / ckpt.STATE_FILE, weights_only=True)
    edit(state)
    torch.save(state, directory / ckpt.STATE_FILE)


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


_UP = "model.layers.0.mlp.up_proj.weight"
_LORA_A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"

# (run, damage of its last checkpoint c (and the output folder o), what the error says after
# "<checkpoint> is damaged or incomplete: " or, starting with "!", after "error: ").
_DAMAGES = {
    "tensor-bytes-flipped": ("full", lambda c, o: _flip_tensor_bytes(c / "model.safetensors"),
                             "model.safetensors does not match its sha256 in manifest.json"),
    "tensor-deleted": ("full", lambda c, o: _edit_weights(c / "model.safetensors",
                                                          lambda t: t.pop(_UP)),
                       r"model.safetensors has \d+ bytes, manifest.json says \d+"),
    "tensor-deleted-resealed": (
        "full", lambda c, o: (_edit_weights(c / "model.safetensors", lambda t: t.pop(_UP)),
                              _reseal(c)),
        (rf"model.safetensors lacks tensor\(s\) {_UP} of the model \(loading would "
         "re-initialise them at random\\)")),
    "tensor-added-resealed": (
        "full", lambda c, o: (_edit_weights(c / "model.safetensors",
                                            lambda t: t.update(extra=torch.zeros(3))),
                              _reseal(c)),
        r"model.safetensors holds tensor\(s\) extra that the model does not have"),
    "nan-weight-resealed": (
        "full", lambda c, o: (_edit_weights(c / "model.safetensors",
                                            lambda t: t["model.norm.weight"].fill_(float("nan"))),
                              _reseal(c)),
        r"its weights hold NaN or infinite values \(tensor model.norm.weight\)"),
    "config-size-resealed": (
        "full", lambda c, o: (_edit_json(c / "config.json",
                                         lambda j: {**j, "intermediate_size": 320}), _reseal(c)),
        (r"tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has shape \[384, "
         r"128\], the model's is \[320, 128\]")),
    "config-invalid-json-resealed": (
        "full", lambda c, o: ((c / "config.json").write_text("{"), _reseal(c)),
        "config.json cannot be loaded"),
    "state-truncated": ("full", lambda c, o: _cut(c / ckpt.STATE_FILE, 8192),
                        r"training_state.pt has 8192 bytes, manifest.json says \d+ \(cut short"),
    "state-truncated-resealed": (
        "full", lambda c, o: (_cut(c / ckpt.STATE_FILE, 8192), _reseal(c)),
        "training_state.pt cannot be loaded"),
    "state-step-string-resealed": (
        "full", lambda c, o: (_edit_state(c, lambda s: s.update(step="4")), _reseal(c)),
        r"training_state.pt has a missing or malformed step \(step = str;"),
    "state-rng-none-resealed": (
        "full", lambda c, o: (_edit_state(c, lambda s: s.update(rng=None)), _reseal(c)),
        r"training_state.pt has a missing or malformed rng \(rng = NoneType;"),
    "state-foreign-optimizer-resealed": (
        "full", lambda c, o: (_edit_state(c, lambda s: s["optimizer"]["param_groups"].pop()),
                              _reseal(c)),
        r"training_state.pt does not fit this run's model and optimizer \(ValueError: "),
    "run-config-list-resealed": (
        "full", lambda c, o: ((c / ckpt.CONFIG_FILE).write_text("[1, 2]"), _reseal(c)),
        "run_config.json holds a JSON list, not an object of settings"),
    "manifest-deleted": ("full", lambda c, o: (c / ckpt.MANIFEST_FILE).unlink(),
                         "it has no manifest.json"),
    "manifest-not-a-manifest": ("full", lambda c, o: (c / ckpt.MANIFEST_FILE).write_text("{}"),
                                "manifest.json is not a manifest of this job"),
    "file-added": ("full", lambda c, o: (c / "pytorch_model.bin").write_bytes(b"x"),
                   r"pytorch_model.bin not listed in manifest.json \(added after"),
    "file-deleted": ("full", lambda c, o: (c / "tokenizer.json").unlink(),
                     r"tokenizer.json is missing \(listed in manifest.json\)"),
    "latest-invalid-json": ("full", lambda c, o: (o / ckpt.LATEST_FILE).write_text('{"chec'),
                            r"!resume: .*latest.json is not valid JSON"),
    "latest-names-a-replaced-checkpoint": (
        "full", lambda c, o: _edit_json(c / ckpt.MANIFEST_FILE, lambda j: {**j, "id": "0"}),
        (r"!resume: .*latest.json names .*checkpoint-4 as the run's latest checkpoint, which was "
         "replaced since")),
    "latest-deleted": (
        "full", lambda c, o: (o / ckpt.LATEST_FILE).unlink(),
        (r"!resume: .*out holds checkpoint-2, checkpoint-4 but no latest.json naming the run's "
         r"latest checkpoint; resume from one by its directory \(--resume DIR\)\.$")),
    "log-line-torn-before-the-last": (
        "full", lambda c, o: _edit_log(o, 1, '{"kind": "tra'),
        r"!resume: .*log.jsonl line 2 is not valid JSON .*only the last line may be cut short"),
    "lora-tensor-deleted-resealed": (
        "lora", lambda c, o: (_edit_weights(c / "adapter_model.safetensors",
                                            lambda t: t.pop(_LORA_A)), _reseal(c)),
        rf"adapter_model.safetensors lacks tensor\(s\) {_LORA_A} of the model"),
    "lora-tensor-bytes-flipped": (
        "lora", lambda c, o: _flip_tensor_bytes(c / "adapter_model.safetensors"),
        "adapter_model.safetensors does not match its sha256 in manifest.json"),
    "lora-base-model-damaged": (
        "lora", lambda c, o: _flip_tensor_bytes(o / "base-model" / "model.safetensors"),
        (r"!resume: .*base-model is damaged or incomplete: model.safetensors does not match .*; "
         r"delete it to have it written again \(the model built from the config with --seed\)\.$")),
}


def _edit_log(out: Path, index: int, line: str) -> None:
    lines = (out / ckpt.LOG_FILE).read_text().splitlines()
    lines[index] = line
    (out / ckpt.LOG_FILE).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", _DAMAGES)
def test_damaged_state_is_one_error_line_and_changes_nothing(runs, tmp_path, capsys, case):
    run, damage, message = _DAMAGES[case]
    out = _copy(runs[run], tmp_path)
    head = out / ("checkpoint-4" if run == "full" else "checkpoint-2")
    damage(head, out)
    before = _files(out)
    rc = _main(out, "--resume", "auto", *(LORA if run == "lora" else ()))
    line = _error(capsys)
    assert rc == 1
    if message.startswith("!"):
        pattern = "chronicals finetune: error: " + message[1:]
    else:
        pattern = (f"chronicals finetune: error: resume: {head} is damaged or incomplete: "
                   f"{message}")
    assert re.match(pattern, line), line
    assert _files(out) == before


def test_without_the_damage_the_same_resume_succeeds(runs, tmp_path, capsys):
    # The cases above fail for their damage alone: the undamaged copy resumes (at its last step,
    # so only final/ is written again).
    out = _copy(runs["full"], tmp_path)
    assert _main(out, "--resume", "auto") == 0, capsys.readouterr().err
    out = _copy(runs["lora"], tmp_path / "lora")
    assert _main(out, "--resume", "auto", *LORA) == 0, capsys.readouterr().err


def test_checkpoint_write_is_atomic_and_sealed(tmp_path):
    final = tmp_path / "checkpoint-1"

    def fails_halfway(d: Path) -> None:
        (d / "model.safetensors").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_atomically(final, fails_halfway)
    assert list(tmp_path.iterdir()) == []

    ckpt.write_atomically(final, lambda d: (d / "a").write_text("1"))
    manifest = ckpt.write_atomically(final, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert sorted(p.name for p in final.iterdir()) == ["b", ckpt.MANIFEST_FILE]
    assert manifest["files"] == {"b": {"bytes": 1, "sha256": hashlib.sha256(b"2").hexdigest()}}
    assert ckpt.verify(final) == manifest


# ---------------------------------------------------------------------------------------------
# Foreign inputs and stale state


def test_pickled_model_weights_are_refused_in_one_line(tmp_path, capsys):
    model_dir = tmp_path / "model"
    transformers.Qwen2Config(vocab_size=2048, **cli._TINY_MODEL).save_pretrained(model_dir)

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"model.norm.weight": RunsCode()}, model_dir / "pytorch_model.bin")
    tokenizer = str(cli.data_lib.default_tokenizer_path())
    out = tmp_path / "out"
    assert _main(out, "--model", str(model_dir), "--tokenizer", tokenizer) == 1
    assert (f"error: model: {model_dir} holds pickled weights that "
            "torch.load(weights_only=True) refuses") in _error(capsys)
    (model_dir / "config.json").write_text("{")
    assert _main(out, "--model", str(model_dir), "--tokenizer", tokenizer) == 1
    assert f"error: model: {model_dir} cannot be loaded. (" in _error(capsys)
    assert not out.exists()


def test_stale_temporary_folder_that_cannot_be_deleted(runs, tmp_path, capsys, monkeypatch):
    out = _copy(runs["full"], tmp_path)
    stale = out / ".tmp-checkpoint-6-123"
    stale.mkdir()
    real_rmtree = shutil.rmtree

    def refuse(path, *args, **kwargs):
        if Path(path) == stale:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", refuse)
    assert _main(out, "--resume", "auto") == 1
    assert _error(capsys).endswith(
        f"error: output dir: cannot delete {stale}, left by a run killed while saving "
        "(Permission denied); delete it by hand.")


def test_resume_auto_without_a_run_is_an_error(tmp_path, capsys):
    assert _main(tmp_path / "out", "--resume", "auto") == 1
    assert _error(capsys).endswith(
        f"resume: {tmp_path / 'out'} holds no run to resume (no run_config.json); start one "
        "without --resume.")


def test_changed_data_is_refused_unless_allowed(tmp_path, capsys):
    data = Path(_write(tmp_path / "data.jsonl", _records(12)))
    out = tmp_path / "out"
    args = ["--data", str(data), "--steps", "2", "--eval-fraction", "0"]
    assert _main(out, *args) == 0
    saved = json.loads((out / ckpt.CONFIG_FILE).read_text())["data_fingerprint"]
    assert saved["examples"] == 12

    # The same contents at another path are the same data.
    moved = tmp_path / "moved.jsonl"
    data.rename(moved)
    args[1] = str(moved)
    assert _main(out, *args, "--resume", "auto") == 0

    # Other contents at the same path.
    moved.write_text(_records(12).replace('"c3"', '"changed"'))
    before = _files(out)
    assert _main(out, *args, "--resume", "auto") == 1
    assert (f"error: resume: the data changed since {out / 'checkpoint-2'} was written: the run "
            f"trained on 12 examples of {saved['tokens']} tokens (sha256 {saved['sha256'][:12]}), "
            f"{moved} gives 12 examples") in _error(capsys)
    assert _files(out) == before

    # One step more: resuming the finished run without it does nothing (test_cli).
    assert _main(out, *args, "--steps", "3", "--resume", "auto", "--allow-data-change") == 0
    now = json.loads((out / ckpt.CONFIG_FILE).read_text())["data_fingerprint"]
    assert now["sha256"] != saved["sha256"]


# ---------------------------------------------------------------------------------------------
# Resuming: killed runs, torn log lines, the line of checkpoints


def _stop_at_train_step(monkeypatch, n: int) -> None:
    """The n-th train_step call raises KeyboardInterrupt, as Ctrl-C there would."""
    real_step, calls = cli.train_step, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cli, "train_step", stopping)


def test_killed_before_the_first_checkpoint_resumes_from_the_start(runs, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "out"
    _stop_at_train_step(monkeypatch, 1)
    assert _main(out) == 130
    assert "no checkpoint was saved, so --resume auto starts the run again from step 0" in (
        capsys.readouterr().err)
    assert not list(out.glob("checkpoint-*"))
    monkeypatch.undo()
    # A fresh run into it is still refused: it holds a run.
    assert _main(out) == 1
    assert "already holds a run" in _error(capsys)
    assert _main(out, "--resume", "auto") == 0
    assert _trained(out) == _trained(runs["full"])


def test_torn_last_log_line_is_dropped_and_losses_match(runs, tmp_path, capsys, monkeypatch,
                                                        caplog):
    out = tmp_path / "out"
    _stop_at_train_step(monkeypatch, 2)  # step 3, after checkpoint-2
    assert _main(out) == 130
    monkeypatch.undo()
    with (out / ckpt.LOG_FILE).open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # killed while appending
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    assert _main(out, "--resume", "auto") == 0, capsys.readouterr().err
    assert any("dropped its last line" in r.getMessage() for r in caplog.records)
    assert _trained(out) == _trained(runs["full"])


def test_resume_auto_follows_the_current_line(runs, tmp_path, capsys, monkeypatch, caplog):
    # An explicit resume from checkpoint-2 starts a new line; it is killed while saving
    # checkpoint-4, so the old line's checkpoint-4 is still on disk, untouched.
    out = _copy(runs["full"], tmp_path)
    old = _files(out / "checkpoint-4")
    real_save = cli._save_model

    def killed_while_saving(model, tokenizer, directory):
        if directory.name.startswith(".tmp-checkpoint-4"):
            raise KeyboardInterrupt
        real_save(model, tokenizer, directory)

    monkeypatch.setattr(cli, "_save_model", killed_while_saving)
    assert _main(out, "--resume", str(out / "checkpoint-2")) == 130
    monkeypatch.undo()
    assert json.loads((out / ckpt.LATEST_FILE).read_text())["checkpoint"] == "checkpoint-2"
    assert _files(out / "checkpoint-4") == old and not list(out.glob(".tmp-*"))

    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    assert _main(out, "--resume", "auto") == 0, capsys.readouterr().err
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")]
    assert resumed == [f"resumed from {out / 'checkpoint-2'} at step 2"]
    assert _trained(out) == _trained(runs["full"])
    assert json.loads((out / ckpt.LATEST_FILE).read_text())["checkpoint"] == "checkpoint-4"


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def test_huge_learning_rate_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(out, "--lr", "1e6", "--max-grad-norm", "0", "--save-every", "1") == 1
    line = _error(capsys)
    found = re.search(r"error: step (\d+): non-finite (loss|gradient norm|loss and gradient "
                      r"norm) .*The last good checkpoint, (.*checkpoint-(\d+)), is kept", line)
    assert found, line
    step, last = int(found[1]), int(found[4])
    assert last == step - 1 and found[3] == str(out / f"checkpoint-{last}")
    assert json.loads((out / ckpt.LATEST_FILE).read_text())["checkpoint"] == f"checkpoint-{last}"
    assert not (out / f"checkpoint-{step}").exists() and not (out / "final").exists()
    last_record = json.loads((out / ckpt.LOG_FILE).read_text().splitlines()[-1])
    assert last_record["kind"] == "nonfinite" and last_record["step"] == step


def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """The loss of the given train_step calls (1-based, training only) is NaN."""
    real_compile, calls = cli.compile_loss, []

    def compile_poisoned(model, **kwargs):
        loss_fn = real_compile(model, **kwargs)

        def poisoned(batch, num_items):
            loss = loss_fn(batch, num_items)
            if model.training:
                calls.append(1)
                if len(calls) in steps:
                    return loss * float("nan")
            return loss

        return poisoned

    monkeypatch.setattr(cli, "compile_loss", compile_poisoned)


_REMEDY = ("lower --lr or clip gradients (--max-grad-norm) and start a new run, or skip such "
           "steps with --skip-nonfinite N and --resume auto.")


def test_nonfinite_step_stops_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _poison_steps(monkeypatch, {2})  # step 3
    assert _main(out, "--save-every", "1", "--log-every", "4") == 1
    assert _error(capsys).endswith(
        "error: step 3: non-finite loss and gradient norm (loss nan, gradient norm nan); nothing "
        f"after step 2 was saved. The last good checkpoint, {out / 'checkpoint-2'}, is kept; "
        + _REMEDY)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, capsys, monkeypatch, caplog):
    out = tmp_path / "out"
    _poison_steps(monkeypatch, {2})  # step 3
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    assert _main(out, "--save-every", "1", "--skip-nonfinite", "1") == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / ckpt.LOG_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] != "eval"] == [
        ("train", 1), ("skip", 2), ("nonfinite", 3), ("train", 4), ("warmup", 4)]
    assert records[2]["loss"] == records[2]["grad_norm"] == "nan"
    assert "skipped (--skip-nonfinite)" in records[2]["reason"]
    assert any("1 skipped for a NaN or infinite loss or gradient norm: steps 3" in r.getMessage()
               for r in caplog.records)
    # The skipped step changed neither the weights nor the optimizer's moments.
    weights = [load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    moments = [torch.load(out / f"checkpoint-{s}" / ckpt.STATE_FILE, weights_only=True)
               ["optimizer"]["state"] for s in (2, 3)]
    assert all(torch.equal(v, moments[1][i][k]) for i, s in moments[0].items()
               for k, v in s.items())

    # One more than the budget stops the run, after logging it; the skipped step's checkpoint
    # is a good one.
    out = tmp_path / "out2"
    _poison_steps(monkeypatch, {2, 3})  # steps 3 and 4
    assert _main(out, "--save-every", "1", "--skip-nonfinite", "1") == 1
    assert _error(capsys).endswith(
        "error: step 4: 2 steps with a NaN or infinite loss or gradient norm (steps 3, 4), more "
        f"than --skip-nonfinite 1 allows. The last good checkpoint, {out / 'checkpoint-3'}, is "
        "kept; " + _REMEDY)
    assert json.loads((out / ckpt.LOG_FILE).read_text().splitlines()[-1])["step"] == 4


def test_nonfinite_weights_are_not_saved(tmp_path, capsys, monkeypatch):
    real_step, calls = cli.train_step, []

    def blows_up(loss_fn, optimizer, micro_batches, **kwargs):
        metrics = real_step(loss_fn, optimizer, micro_batches, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # step 3: finite metrics, but the update left an infinite weight
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setattr(cli, "train_step", blows_up)
    out = tmp_path / "out"
    assert _main(out, "--save-every", "1") == 1
    assert _error(capsys).endswith(
        "error: after step 3 the weights hold NaN or infinite values (tensor "
        "model.embed_tokens.weight); they were not saved. The last good checkpoint, "
        f"{out / 'checkpoint-2'}, is kept; " + _REMEDY)
    assert json.loads((out / ckpt.LATEST_FILE).read_text())["checkpoint"] == "checkpoint-2"
