"""The fine-tuning job's run folder: checkpoints written atomically and verified, the line of
checkpoints `--resume auto` follows, the data fingerprint, and the resume checks.

A checkpoint (and `final/`, `base-model/`) is written in a temporary sibling folder, given a
`manifest.json` with the size and SHA-256 of every file, flushed to disk and renamed into place.
Resuming reads the manifest back and refuses a file that is missing, added, cut short or changed,
then checks that the weights hold exactly the tensors the model has (a missing tensor would be
re-initialised at random by `from_pretrained`) and that they are finite.

`latest.json` in the output folder names the checkpoint of the current line: it moves to each new
checkpoint once it is complete, and back to the checkpoint a run resumes from, so `--resume auto`
continues the run that ran last, not the highest step number on disk (a checkpoint of a line
abandoned by an earlier resume may have a higher one).

Every damaged or foreign state raises `CheckpointError` naming the file and what is wrong; the
command line prints it as one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import uuid
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from chronicals.config import RESUME_MAY_CHANGE, FinetuneConfig

logger = logging.getLogger("chronicals.finetune")

STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.json"
LOG_FILE = "log.jsonl"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20  # bytes read at a time when hashing: a 15 GB checkpoint never sits in memory
_ANOTHER = "resume from another checkpoint (its directory as --resume) or start a new run"


class CheckpointError(ValueError):
    """A checkpoint, run folder or run file that is damaged, incomplete or not of this run."""


# ---------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def write_atomically(final: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    """Write a folder with `write(tmp)` in a temporary sibling, add its manifest, flush it to disk
    and rename it to `final`: a reader sees the old folder or the complete new one, never a
    half-written one. Returns the manifest."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        files = {}
        for name in _files(tmp):
            _fsync(tmp / name)  # the rename must not reach the disk before the data does
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        manifest = {"format": MANIFEST_FORMAT, "id": uuid.uuid4().hex, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync(tmp / MANIFEST_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(final.parent)
    return manifest


def set_latest(output_dir: Path, checkpoint: Path, manifest: Mapping[str, Any]) -> None:
    """Make `checkpoint` the head of the run's line of checkpoints (replacing latest.json in one
    rename)."""
    record = {"checkpoint": os.path.relpath(checkpoint, output_dir), "id": manifest["id"]}
    tmp = output_dir / f".tmp-{LATEST_FILE}-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, output_dir / LATEST_FILE)
    _fsync(output_dir)


def remove_stale(output_dir: Path) -> None:
    """Delete the temporary folders and files of a run killed while saving."""
    for stale in [*output_dir.glob(".tmp-*"), *output_dir.glob(".old-*")]:
        try:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        except OSError as e:
            raise CheckpointError(
                f"output dir: cannot delete {stale}, left by a run killed while saving "
                f"({e.strerror}); delete it by hand."
            ) from e


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Verifying


def _damaged(directory: Path, problem: str, remedy: str = _ANOTHER) -> CheckpointError:
    return CheckpointError(f"resume: {directory} is damaged or incomplete: {problem}; {remedy}.")


def _read_json(path: Path, directory: Path, remedy: str = _ANOTHER) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(directory, f"{path.name} is not valid JSON ({e})", remedy) from e


def verify(directory: Path, remedy: str = _ANOTHER) -> dict[str, Any]:
    """Check every file of `directory` against its manifest; returns the manifest. `remedy` ends
    the error message."""
    if not (directory / MANIFEST_FILE).is_file():
        raise _damaged(directory, f"it has no {MANIFEST_FILE} (not written by this version of "
                                  "the job, or cut short), so its files cannot be verified",
                       remedy)
    manifest = _read_json(directory / MANIFEST_FILE, directory, remedy)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("id"), str)
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                       and isinstance(e.get("sha256"), str) for e in files.values())):
        raise _damaged(directory, f"{MANIFEST_FILE} is not a manifest of this job (expected an "
                                  f"object with format {MANIFEST_FORMAT}, an id, and the bytes "
                                  "and sha256 of each file)", remedy)
    added = sorted(set(_files(directory)) - set(files))
    if added:
        raise _damaged(directory, f"{', '.join(added)} not listed in {MANIFEST_FILE} (added "
                                  "after the checkpoint was written)", remedy)
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise _damaged(directory, f"{name} is missing (listed in {MANIFEST_FILE})", remedy)
        try:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise _damaged(directory, f"{name} has {size} bytes, {MANIFEST_FILE} says "
                                          f"{entry['bytes']} (cut short or replaced)", remedy)
            if _sha256(path) != entry["sha256"]:
                raise _damaged(directory, f"{name} does not match its sha256 in {MANIFEST_FILE} "
                                          "(its content changed after it was written)", remedy)
        except OSError as e:
            raise _damaged(directory, f"{name} cannot be read ({e.strerror})", remedy) from e
    return manifest


def check_weights(
    directory: Path, expected: Mapping[str, Sequence[int]], aliases: Mapping[str, str],
    optional: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """The .safetensors files of `directory` hold every tensor of `expected` (name -> shape), and
    besides them only tensors of `optional` (buffers, which a model rebuilds from its config);
    a tensor named by a key of `aliases` (a tied weight's other name) counts as its value.
    `from_pretrained` would re-initialise a missing weight at random and ignore an extra one."""
    optional = optional or {}
    from safetensors import SafetensorError, safe_open

    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise _damaged(directory, "it has no .safetensors weights")
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open's handle is not iterable)
                    name = aliases.get(key, key)
                    found[name] = tuple(f.get_slice(key).get_shape())
                    where[name] = path.name
        except SafetensorError as e:
            raise _damaged(directory, f"{path.name} cannot be read ({e})") from e
    files = ", ".join(p.name for p in weight_files)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise _damaged(directory, f"{files} lacks tensor(s) {', '.join(missing)} of the model "
                                  "(loading would re-initialise them at random)")
    unexpected = sorted(set(found) - set(expected) - set(optional))
    if unexpected:
        raise _damaged(directory, f"{files} holds tensor(s) {', '.join(unexpected)} that the "
                                  "model does not have")
    for name, shape in {**optional, **expected}.items():
        if name in found and tuple(shape) != found[name]:
            raise _damaged(directory, f"tensor {name} in {where[name]} has shape "
                                      f"{list(found[name])}, the model's is {list(shape)}")


def check_finite(directory: Path, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """The loaded trainable tensors hold no NaN or infinity (one device sync)."""
    bad = first_nonfinite(named)
    if bad is not None:
        raise _damaged(directory, f"its weights hold NaN or infinite values (tensor {bad}); "
                                  "training from them would produce NaN losses")


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or infinity, None if all are finite (one device
    sync when all are)."""
    named = list(named)
    if not named or torch.stack([torch.isfinite(t).all() for _, t in named]).all():
        return None
    return next(n for n, t in named if not torch.isfinite(t).all())


def load_full_model(directory: Path, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """A full fine-tune's model from checkpoint `directory`, loaded strictly: its weights must
    hold every tensor of the model its config.json describes (checked against that model built
    on the meta device, without memory) and only those, and must be finite."""
    import transformers

    try:
        model_config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        text = str(e).strip()
        raise _damaged(directory, f"config.json cannot be loaded "
                                  f"({text.splitlines()[0] if text else type(e).__name__})") from e
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(model_config, **kwargs)
    # A tied weight (lm_head.weight sharing the embedding) is stored once, under either name.
    names: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    aliases = {alias: group[0] for group in names.values() for alias in group[1:]}
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    expected = {group[0]: shapes[group[0]] for group in names.values()}
    buffers = {k: v for k, v in shapes.items() if k not in expected and k not in aliases}
    check_weights(directory, expected, aliases, buffers)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, **kwargs
    )
    check_finite(directory, model.named_parameters())
    return model


def load_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Load checkpoint `directory`'s LoRA adapter weights into the PEFT `model` (made as the run
    made it), strictly: exactly the adapter tensors of `model`, of its shapes, and finite."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    check_weights(directory, expected, {})
    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    set_peft_model_state_dict(model, weights)
    check_finite(directory, ((n, p) for n, p in model.named_parameters() if p.requires_grad))


def read_run_config(path: Path, directory: Path) -> dict[str, Any]:
    saved = _read_json(path, directory)
    if not isinstance(saved, dict):
        raise _damaged(directory, f"{path.name} holds a JSON {type(saved).__name__}, not an "
                                  "object of settings")
    return saved


def check_settings(saved: Mapping[str, Any], config: FinetuneConfig, where: Path) -> None:
    current = config.to_dict()
    differ = sorted(
        k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k]
    )
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ)
        raise CheckpointError(
            f"resume: {where} was made with other settings ({details}). Resume with the same "
            "settings to continue the same run."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_training_state(directory: Path) -> dict[str, Any]:
    """training_state.pt of `directory`, loaded with weights_only=True and its entries checked."""
    path = directory / STATE_FILE
    try:
        # On the CPU: the RNG state must stay there, and the optimizer moves its state to the
        # parameters' device when it loads it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        text = str(e).strip()
        raise _damaged(directory, f"{STATE_FILE} cannot be loaded "
                                  f"({text.splitlines()[0] if text else type(e).__name__})") from e
    rng = state.get("rng") if isinstance(state, dict) else None
    checks = {
        "step": lambda s: _is_int(s.get("step")),
        "cursor": lambda s: _is_int(s.get("cursor")),
        "optimizer": lambda s: isinstance(s.get("optimizer"), dict)
        and {"state", "param_groups"} <= set(s["optimizer"]),
        "scheduler": lambda s: isinstance(s.get("scheduler"), dict),
        "rng": lambda s: isinstance(rng, dict) and isinstance(rng.get("python"), tuple)
        and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8,
    }
    if not isinstance(state, dict):
        raise _damaged(directory, f"{STATE_FILE} holds a {type(state).__name__}, not the "
                                  f"training state ({', '.join(checks)})")
    bad = [k for k, ok in checks.items() if not ok(state)]
    if bad:
        shown = ", ".join(f"{k} = {type(state.get(k)).__name__}" for k in bad)
        raise _damaged(directory, f"{STATE_FILE} has a missing or malformed {', '.join(bad)} "
                                  f"({shown}; expected a step and cursor >= 0, the optimizer's "
                                  "and scheduler's state_dict and the RNG states)")
    return state


def restore_training_state(
    directory: Path, state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load the optimizer, scheduler and RNG states; one that does not fit (another model's
    optimizer state, a foreign RNG state) is a CheckpointError naming training_state.pt."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise _damaged(directory, f"{STATE_FILE} does not fit this run's model and optimizer "
                                  f"({type(e).__name__}: {str(e).strip()[:200]})") from e


def holds_weights_of(directory: Path, manifest: Mapping[str, Any]) -> bool:
    """Whether `directory` (a run's final/) is intact and holds the weight files of the
    checkpoint with `manifest`, byte for byte (same SHA-256); False if it is missing or damaged."""
    weights = {n: e["sha256"] for n, e in manifest["files"].items() if n.endswith(".safetensors")}
    if not weights or not (directory / MANIFEST_FILE).is_file():
        return False
    try:
        files = verify(directory)["files"]
    except CheckpointError as e:
        logger.warning("%s; it is written again", e)
        return False
    return all(files.get(n, {}).get("sha256") == sha for n, sha in weights.items())


# ---------------------------------------------------------------------------------------------
# The line of checkpoints and what to resume from


def latest(output_dir: Path) -> Path | None:
    """The head of the run's line of checkpoints (latest.json), None before the first one."""
    path = output_dir / LATEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"resume: {path} is not valid JSON ({e}); resume from a checkpoint "
                              "by its directory (--resume DIR).") from e
    if not (isinstance(record, dict) and isinstance(record.get("checkpoint"), str)
            and isinstance(record.get("id"), str)):
        raise CheckpointError(f"resume: {path} does not name a checkpoint (expected "
                              '{"checkpoint": ..., "id": ...}); resume from a checkpoint by '
                              "its directory (--resume DIR).")
    head = output_dir / record["checkpoint"]
    found = "is missing"
    if head.is_dir():
        try:
            manifest = json.loads((head / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return head  # verify() says what is wrong with it
        if not isinstance(manifest, dict) or manifest.get("id") in (record["id"], None):
            return head
        found = "was replaced since (its manifest has another id)"
    raise CheckpointError(
        f"resume: {path} names {head} as the run's latest checkpoint, which {found}; resume "
        "from a checkpoint by its directory (--resume DIR)."
    )


@dataclasses.dataclass(frozen=True)
class Resume:
    """What a resumed run continues from: a verified checkpoint, or (checkpoint None) the start of
    a run killed before its first checkpoint."""

    checkpoint: Path | None
    state: dict[str, Any] | None
    manifest: dict[str, Any] | None
    run_config: dict[str, Any]
    """The run's saved settings, with its data fingerprint."""


def resolve_resume(config: FinetuneConfig) -> Resume | None:
    """What `config.resume` continues from, checked before anything is written: the checkpoint's
    files against its manifest, its settings against `config`'s, its training state. None for a
    fresh run."""
    if config.resume is None:
        return None
    output_dir = Path(config.output_dir)
    if config.resume == "auto":
        if not (output_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"resume: {output_dir} holds no run to resume (no "
                                  f"{CONFIG_FILE}); start one without --resume.")
        path = latest(output_dir)
        found = sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
        if path is None and found:
            # Written by an older version, or killed between saving the first checkpoint and
            # recording it: which line they belong to is unknown, so the user picks one.
            raise CheckpointError(
                f"resume: {output_dir} holds {', '.join(found)} but no {LATEST_FILE} naming the "
                "run's latest checkpoint; resume from one by its directory (--resume DIR)."
            )
        if path is None:
            saved = read_run_config(output_dir / CONFIG_FILE, output_dir)
            check_settings(saved, config, output_dir)
            return Resume(checkpoint=None, state=None, manifest=None, run_config=saved)
    else:
        path = Path(config.resume)
    if not (path / STATE_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"resume: {path} is not a checkpoint of this job (no {STATE_FILE} / {CONFIG_FILE})."
        )
    manifest = verify(path)
    saved = read_run_config(path / CONFIG_FILE, path)
    check_settings(saved, config, path)
    model_config = "adapter_config.json" if config.lora_r else "config.json"
    if not (path / model_config).is_file():
        raise _damaged(path, f"it has no {model_config}")
    state = load_training_state(path)
    return Resume(checkpoint=path, state=state, manifest=manifest, run_config=saved)


# ---------------------------------------------------------------------------------------------
# Data fingerprint


def data_fingerprint(examples: Iterable[Any]) -> dict[str, Any]:
    """SHA-256 of the tokenised examples (their input ids and labels): what the run trains on,
    so a replaced data file, another dataset or another tokenizer all change it."""
    digest = hashlib.sha256()
    n = tokens = 0
    for example in examples:
        ids, labels = array("q", example.input_ids), array("q", example.labels)
        digest.update(array("q", [len(ids), len(labels)]).tobytes())
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
        n += 1
        tokens += len(ids)
    return {"examples": n, "tokens": tokens, "sha256": digest.hexdigest()}


def check_data(
    saved: Mapping[str, Any], fingerprint: Mapping[str, Any], source: str, allow_change: bool,
    where: Path,
) -> None:
    """Refuse to resume on data other than the run's, unless `allow_change`."""
    before = saved.get("data_fingerprint")
    if not (isinstance(before, dict) and isinstance(before.get("sha256"), str)):
        if not allow_change:
            raise CheckpointError(
                f"resume: {where / CONFIG_FILE} has no data fingerprint (not written by this "
                "version of the job); pass --allow-data-change to resume on the data as it is now."
            )
        logger.warning("%s has no data fingerprint; continuing on the data as it is now "
                       "(--allow-data-change).", where / CONFIG_FILE)
        return
    if before["sha256"] == fingerprint["sha256"]:
        return
    change = (f"the run trained on {before.get('examples')} examples of "
              f"{before.get('tokens')} tokens (sha256 {before['sha256'][:12]}), {source} gives "
              f"{fingerprint['examples']} examples of {fingerprint['tokens']} tokens (sha256 "
              f"{fingerprint['sha256'][:12]})")
    if not allow_change:
        raise CheckpointError(
            f"resume: the data changed since {where} was written: {change}. Use the run's data, "
            "or pass --allow-data-change to continue on this data."
        )
    logger.warning("data changed (--allow-data-change): %s; continuing on the new data.", change)


# ---------------------------------------------------------------------------------------------
# The run log


def kept_log_lines(path: Path, step: int) -> tuple[list[str], bool]:
    """log.jsonl's lines of records up to `step` (those after it were logged by the run that
    stopped, and are redone), and whether its last line was torn (the job killed while appending
    it: dropped). A damaged line before the last is an error naming the line."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                return kept, True
            raise CheckpointError(
                f"resume: {path} line {i} is not valid JSON ({e}); only the last line may be cut "
                "short. Delete the line (or the file) to resume."
            ) from e
        if not (isinstance(record, dict) and isinstance(record.get("step", 0), int)):
            raise CheckpointError(f"resume: {path} line {i} is not a record of this job (a JSON "
                                  "object with an integer step).")
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept, False


def trim_log(path: Path, step: int) -> None:
    """Cut log.jsonl back to the records up to `step` (see `kept_log_lines`)."""
    kept, torn = kept_log_lines(path, step)
    if torn:
        logger.warning("%s: dropped its last line, cut short when the job was killed while "
                       "writing it", path)
    if path.exists():
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
