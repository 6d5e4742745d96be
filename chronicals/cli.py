"""`python -m chronicals finetune` (console script `chronicals finetune`): the main job.

    data (chronicals.data) -> model (+ PEFT LoRA with LoRA+ groups) -> compile_loss -> loop of
    train_step -> JSONL log, progress bar, held-out eval loss, checkpoints, plot
    (chronicals.run_log, chronicals.plot)

With no arguments it fine-tunes a tiny Qwen2-shaped model (built from a config) on the bundled
HumanEval prompt/completion data with the bundled tokenizer, in about a minute on a laptop CPU.

Output directory:
    log.jsonl            one line per step, evaluation and compiled graph's fusion report
                         (chronicals.run_log)
    checkpoint-<step>/   model (safetensors; a PEFT adapter or the full model) + tokenizer, loadable
                         with `from_pretrained`, training_state.pt and run_config.json for
                         --resume, and manifest.json (the size and SHA-256 of every file)
    latest.json          the latest checkpoint of the run's current line, which --resume auto
                         continues
    final/               model + tokenizer of the last step (with its manifest.json); of a LoRA
                         run on the built-in model or --from-config, also a copy of its base,
                         so `AutoModelForCausalLM.from_pretrained(final)` loads base and adapter
                         wherever the folder is moved
    base-model/          the randomly initialised base of a LoRA run on a model built from a
                         config, so the adapter has a base to load onto
    metrics.png          loss and eval loss, gradient norm, learning rate and tokens/s against
                         the step, redrawn at each evaluation (chronicals.plot; without
                         matplotlib installed the run says so in one log line and goes on)
    run_config.json      the settings and the data's fingerprint

Checkpoints are written to a temporary directory, sealed with their manifest and renamed into
place, so a crash never leaves a half-written checkpoint, and a resumed run refuses a damaged one
(chronicals/checkpoint.py). Every input is checked (data, columns, lengths, model path, the
checkpoint to resume from) before the output directory is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronicals import checkpoint as ckpt
from chronicals import data as data_lib
from chronicals.attention import PACKED_ATTENTION, register_packed_attention
from chronicals.checkpoint import CONFIG_FILE, LATEST_FILE, LOG_FILE, STATE_FILE
from chronicals.config import CHOICES, DEFAULT_STEPS, FinetuneConfig, field_docs
from chronicals.lora_plus import lora_plus_param_groups
from chronicals.plot import PLOT_FILE
from chronicals.run_log import Pending, RunLog
from chronicals.train import (
    LossFn,
    StepMetrics,
    TrainingDiverged,
    compile_loss,
    count_label_tokens,
    evaluate_loss,
    train_step,
)
from chronicals.warmup import (
    CompilePackages,
    WarmUpClock,
    compile_fingerprint,
    use_compile_cache,
)

logger = logging.getLogger("chronicals.finetune")

# The built-in model: Qwen2-shaped (the GPU benchmark's family), 0.7 M parameters with the
# 2,048-token bundled tokenizer, so the default 40 steps of 2 x 1024 tokens take about a minute
# on 2 CPU cores.
_TINY_MODEL = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What a run did: per-step train losses and (step, loss) evaluations of this process (a
    resumed run's start at the checkpoint), the last step, the trained model, where the outputs
    are, and what was left out of training."""

    model: nn.Module | None
    """None when the run had already finished (`already_finished`)."""
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    step: int
    output_dir: Path
    final_dir: Path
    skipped_steps: list[int]
    """Steps of this process whose micro-batches held no label token: the optimizer did not step."""
    nonfinite_steps: list[int]
    """Steps of this process skipped for a NaN or infinite loss or gradient norm
    (--skip-nonfinite): the optimizer did not step."""
    examples_without_labels: int
    """Examples that lost every label token to overlong='truncate' (trained on nothing)."""
    already_finished: bool = False
    """The resumed run was at its last step with its final/ written: nothing was done."""


# ---------------------------------------------------------------------------------------------
# Setup


def _device(config: FinetuneConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    try:
        device = torch.device(config.device)
    except RuntimeError as e:
        raise ValueError(f"device: {config.device!r} is not a device; {expected}.") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: the job runs on a CPU or a CUDA GPU; {expected}. Got "
                         f"{config.device!r}.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device: {config.device!r} is not available: this machine has "
            f"{torch.cuda.device_count()} usable CUDA GPU(s) (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda or 'not built'}). Use --device cpu or auto."
        )
    return device


def _dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]


def _base_lr(config: FinetuneConfig) -> float:
    if config.lr is not None:
        return config.lr
    if config.lora_r:
        return 2e-4
    return 2e-3 if config.model is None else 2e-5


def _load_tokenizer(config: FinetuneConfig) -> Any:
    from transformers import AutoTokenizer

    if config.tokenizer is not None:
        source = config.tokenizer
    elif config.model is None:
        source = str(data_lib.default_tokenizer_path())
    else:
        path = Path(config.model)
        # A config.json given to --from-config: the tokenizer may sit beside it.
        source = str(path.parent) if path.is_file() else config.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"tokenizer: cannot load a tokenizer from {source!r}; pass --tokenizer with a "
            f"tokenizer id or directory. ({_first_line(e)})"
        ) from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer: {source!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_model_path(model: str, from_config: bool) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"model: directory {path} has no config.json.")
        if path.is_file() and not from_config:
            raise ValueError(
                f"model: {path} is a file; pass a model directory, or --from-config to build a "
                "randomly initialised model from a config.json."
            )
    elif model.startswith((".", "/", "~")) or model.count("/") > 1 or from_config:
        raise ValueError(f"model: no such file or directory: {path}")


def _attention(config: FinetuneConfig) -> str:
    if config.attn_implementation != "auto":
        return config.attn_implementation
    return register_packed_attention() if config.packing else "sdpa"


def _load_model(
    config: FinetuneConfig, tokenizer: Any, dtype: torch.dtype, checkpoint: Path | None
) -> nn.Module:
    """The model of `config`; a full fine-tune's `checkpoint` when resuming one."""
    import transformers

    common = dict(attn_implementation=_attention(config))
    if checkpoint is not None:
        model = ckpt.load_full_model(checkpoint, dtype, **common)
    elif config.model is None:
        model_config = transformers.Qwen2Config(
            vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            use_cache=False, **_TINY_MODEL,
        )
        torch.manual_seed(config.seed)
        model = transformers.AutoModelForCausalLM.from_config(model_config, **common)
    else:
        try:
            if config.from_config:
                model_config = transformers.AutoConfig.from_pretrained(config.model)
                torch.manual_seed(config.seed)
                model = transformers.AutoModelForCausalLM.from_config(model_config, **common)
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    config.model, dtype=dtype, **common
                )
        except OSError as e:
            where = (f"{config.model} cannot be loaded" if Path(config.model).exists() else
                     f"cannot load {config.model!r}: it is not a local model directory and could "
                     "not be fetched as a Hugging Face model id")
            raise ValueError(f"model: {where}. ({_first_line(e)})") from e
        except pickle.UnpicklingError as e:
            # transformers reads .bin weights with torch.load(weights_only=True), which refuses
            # a pickle that could run code.
            raise ValueError(
                f"model: {config.model} holds pickled weights that torch.load(weights_only=True) "
                "refuses (they could run code when loaded); convert them to .safetensors. "
                f"({_first_line(e)})"
            ) from e
    model = model.to(dtype)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"model: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{vocab} rows; use a matching tokenizer (--tokenizer)."
        )
    model.config.use_cache = False
    return model


def _add_lora(model: nn.Module, config: FinetuneConfig, checkpoint: Path | None) -> nn.Module:
    import peft

    lora = peft.LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha or config.lora_r,
        lora_dropout=config.lora_dropout, target_modules=_lora_targets(config),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora,
                                autocast_adapter_dtype=config.lora_dtype == "fp32")
    if checkpoint is not None:
        ckpt.load_adapter(model, checkpoint)
    return model


def _lora_targets(config: FinetuneConfig) -> str | list[str]:
    if config.lora_target == "all-linear":
        return config.lora_target
    return [t.strip() for t in config.lora_target.split(",") if t.strip()]


def _check_lora_target(model: nn.Module, config: FinetuneConfig) -> None:
    """Refuse --lora-target names that match no layer LoRA can adapt, before anything is written.
    PEFT raises only when no name matches at all, after the base model is saved, and passes over
    a name that matches nothing when another one matches."""
    targets = _lora_targets(config)
    if targets == "all-linear":
        return
    from transformers.pytorch_utils import Conv1D

    adaptable = [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D))
    ]
    # PEFT's rule for a list of names: the module's full name, or its last dotted parts.
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in adaptable)]
    if unmatched or not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
        problem = (
            f"{', '.join(unmatched)} matches no linear, embedding or convolution layer of the model"
            if targets else "names no layer"
        )
        raise ValueError(
            f"lora: --lora-target {config.lora_target!r}: {problem}; expected 'all-linear' or "
            f"comma-separated names of its layers: {', '.join(names)}."
        )


def _require_labels(rows: data_lib.Rows, split: str, n_examples: int) -> None:
    if count_label_tokens(rows.labels) == 0:
        lost = rows.overlong.truncated_to_no_labels
        raise ValueError(
            f"data: the {split} split has no label tokens to learn from (every label is masked: "
            f"{lost} of its {n_examples} examples lost theirs to --overlong truncate, the others "
            "have no assistant reply or completion). Raise --max-len or use --overlong split."
        )


def _optimizer(model: nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    lr = _base_lr(config)
    if config.lora_r:
        groups = lora_plus_param_groups(
            model, lr=lr, ratio=config.lora_plus_ratio, weight_decay=config.weight_decay
        )
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # Decay matrices only: decaying biases and norm gains pulls them to 0.
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    # fused=True: one kernel for the whole update on CUDA instead of a few per parameter.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def _total_steps(config: FinetuneConfig, train_rows: int) -> int:
    """The run's optimizer steps: --steps, or those of --epochs passes over the training rows."""
    if config.epochs is None:
        return config.steps if config.steps is not None else DEFAULT_STEPS
    rows_per_step = config.batch_size * config.grad_accum
    total = math.ceil(config.epochs * train_rows / rows_per_step)
    if config.warmup_steps is not None and config.warmup_steps > total:
        raise ValueError(f"finetune: warmup_steps must be in [0, steps={total}] (--epochs "
                         f"{config.epochs}). Got {config.warmup_steps}.")
    logger.info("--epochs %d: %d passes over %d training rows, %d rows a step: %d steps",
                config.epochs, config.epochs, train_rows, rows_per_step, total)
    return total


def _warmup(config: FinetuneConfig, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps is not None else total_steps // 20


def _scheduler(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor as a function of the step number and the run's total steps; a
    run extended on resume gets the function of its new total from the step it resumes at."""
    warmup = _warmup(config, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        # Cosine from the peak down to 10% of it at the last step.
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an --output-dir that cannot be created or written, before any input is loaded."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(
            f"output dir: {output_dir} exists and is not a directory; --output-dir names a "
            "directory (new, or one of this job's runs)."
        )
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents)
                    if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output dir: cannot create {output_dir}: {existing} is a file.")
    try:
        # A real write, not os.access: permission bits say nothing for root or a read-only mount.
        os.rmdir(tempfile.mkdtemp(prefix=".chronicals-probe-", dir=existing))
    except OSError as e:
        raise ValueError(
            f"output dir: cannot write in {existing} ({e.strerror}); give another --output-dir."
        ) from e


def _save_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------
# The job


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


@dataclasses.dataclass(frozen=True)
class _Data:
    """The run's rows, checked: every split has label tokens."""

    fingerprint: dict[str, Any]
    train_rows: data_lib.Rows
    eval_rows: data_lib.Rows | None
    unlabeled: int
    """Examples that lost every label token to overlong='truncate'."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a run needs, prepared and checked before its output directory is written."""

    config: FinetuneConfig
    device: torch.device
    output_dir: Path
    resume: ckpt.Resume | None
    tokenizer: Any
    data: _Data
    total_steps: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start_step: int
    start_cursor: int
    """Rows of the training stream consumed before the first step of this process."""

    @property
    def resume_from(self) -> Path | None:
        return None if self.resume is None else self.resume.checkpoint


@dataclasses.dataclass
class _Progress:
    """The loop's state, read by the checkpoints and the compiled graphs' fusion reports."""

    step: int
    """Optimizer steps taken."""
    cursor: int
    """Rows of the training stream consumed."""
    last_good: Path | None
    """The run's latest checkpoint."""
    skipped: list[int] = dataclasses.field(default_factory=list)
    nonfinite: list[int] = dataclasses.field(default_factory=list)


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Run the fine-tuning job described by `config` (see the module docstring for the outputs).

    A step whose micro-batches hold no label token is skipped: the optimizer does not step
    (AdamW would still decay the weights with a zero gradient), the log gets a "skip" record,
    and `FinetuneResult.skipped_steps` lists it. A step whose loss or gradient norm is NaN or
    infinite stops the run before anything after it is saved (TrainingDiverged), or with
    `config.skip_nonfinite` is skipped the same way, up to that many times ("nonfinite" records).

    Raises:
        FileNotFoundError: the data file does not exist.
        ValueError: anything else wrong with the inputs (empty data, missing columns, bad chat
            records, examples longer than max_len, a split without label tokens, a model path
            that does not load, --lora-target names that match no layer, a device that does not
            exist, an output dir that cannot be written, a checkpoint of other settings or a
            damaged one: `chronicals.checkpoint.CheckpointError`, data other than the resumed
            run's). All of these are raised before the output directory is written.
        TrainingDiverged: a non-finite loss, gradient norm or weight; the last checkpoint saved
            is the last good one.
    """
    job = _prepare(config)
    # Everything is checked: the output directory is written from here on.
    job.output_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale(job.output_dir)
    if _finished(job):
        return FinetuneResult(
            model=None, losses=[], eval_losses=[], step=job.start_step,
            output_dir=job.output_dir, final_dir=job.output_dir / "final", skipped_steps=[],
            nonfinite_steps=[], examples_without_labels=job.data.unlabeled,
            already_finished=True,
        )
    run_config = _write_run_config(job)
    run_log = RunLog(job.output_dir / LOG_FILE, start_step=job.start_step,
                     total_steps=job.total_steps, progress=config.progress,
                     plot=job.output_dir / PLOT_FILE if config.plot else None)
    try:
        progress = _train(job, run_log, run_config)
    finally:
        run_log.close()
    final_dir = _write_final(job)
    return FinetuneResult(
        model=job.model, losses=run_log.losses, eval_losses=run_log.eval_losses,
        step=progress.step, output_dir=job.output_dir, final_dir=final_dir,
        skipped_steps=progress.skipped, nonfinite_steps=progress.nonfinite,
        examples_without_labels=job.data.unlabeled,
    )


# ---------------------------------------------------------------------------------------------
# Preparing: every check that can fail, before anything is written


def _prepare(config: FinetuneConfig) -> _Job:
    """The job's inputs, each checked: device, output directory, checkpoint to resume from,
    tokenizer, data, model, optimizer. Writes nothing, except the random base model of a LoRA
    run (base-model/, atomically): PEFT changes the model in place."""
    device = _device(config)
    dtype = _dtype(config, device)
    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir)
    resume = ckpt.resolve_resume(config)
    resume_from = None if resume is None else resume.checkpoint
    if resume is None and (output_dir / CONFIG_FILE).is_file():
        # A fresh run on top of another would mix their checkpoints, logs and LoRA base model.
        raise ValueError(
            f"output dir {config.output_dir} already holds a run ({CONFIG_FILE}). Continue it "
            "with --resume auto, or give another --output-dir (or delete this one)."
        )
    if config.model is not None:
        _check_model_path(config.model, config.from_config)
    tokenizer = _load_tokenizer(config)
    data = _prepare_data(config, tokenizer, resume, output_dir)
    total_steps = _total_steps(config, len(data.train_rows))
    if resume_from is not None:
        at = resume.state["step"]
        if at > total_steps:
            raise ValueError(
                f"resume: {resume_from} is at step {at}, past --steps {total_steps}; resume with "
                f"--steps {at} or more, or from an earlier checkpoint."
            )
    model = _prepare_model(config, tokenizer, dtype, device, output_dir, resume)
    optimizer = _optimizer(model, config, device)
    scheduler = _scheduler(optimizer, config, total_steps)
    step = cursor = 0
    if resume_from is not None:
        step, cursor = _restore(config, resume, optimizer, scheduler, output_dir, total_steps)
    else:
        if resume is not None:
            logger.info("resumed %s from step 0: it stopped before its first checkpoint",
                        output_dir)
        torch.manual_seed(config.seed)
    return _Job(
        config=config, device=device, output_dir=output_dir, resume=resume, tokenizer=tokenizer,
        data=data, total_steps=total_steps, model=model, optimizer=optimizer,
        scheduler=scheduler, start_step=step, start_cursor=cursor,
    )


def _prepare_data(
    config: FinetuneConfig, tokenizer: Any, resume: ckpt.Resume | None, output_dir: Path
) -> _Data:
    source = config.data if config.data is not None else str(data_lib.default_data_path())
    records = data_lib.load_records(source, split=config.data_split)
    examples = data_lib.tokenize_records(records, tokenizer)
    fingerprint = ckpt.data_fingerprint(examples)
    if resume is not None:
        ckpt.check_data(resume.run_config, fingerprint, source, config.allow_data_change,
                        resume.checkpoint or output_dir)
    if config.overlong == "error":
        # Before the split, so the error counts all examples and names the record's own index.
        data_lib.check_lengths(examples, config.max_len)
    train_examples, eval_examples = data_lib.split_eval(
        examples, eval_fraction=config.eval_fraction, seed=config.seed
    )
    row_args = dict(max_len=config.max_len, pad_id=tokenizer.pad_token_id,
                    packing=config.packing, overlong=config.overlong)
    train_rows = data_lib.make_rows(train_examples, **row_args)
    _require_labels(train_rows, "training", len(train_examples))
    eval_rows = None
    if eval_examples:
        eval_rows = data_lib.make_rows(eval_examples, **row_args)
        _require_labels(eval_rows, "evaluation", len(eval_examples))
    unlabeled = train_rows.overlong.truncated_to_no_labels + (
        eval_rows.overlong.truncated_to_no_labels if eval_rows is not None else 0
    )
    if unlabeled:
        logger.warning(
            "data: %d of %d examples lost every label token to --overlong truncate (their "
            "labels lie beyond --max-len %d); they are trained on nothing. Raise --max-len or "
            "use --overlong split to keep them.", unlabeled, len(examples), config.max_len,
        )
    return _Data(fingerprint=fingerprint, train_rows=train_rows, eval_rows=eval_rows,
                 unlabeled=unlabeled)


def _base_dir(output_dir: Path) -> Path:
    """Where a LoRA run on a model built from a config keeps that random base."""
    return (output_dir / "base-model").resolve()


def _prepare_model(
    config: FinetuneConfig, tokenizer: Any, dtype: torch.dtype, device: torch.device,
    output_dir: Path, resume: ckpt.Resume | None,
) -> nn.Module:
    """The model on `device` in train mode: loaded (a full fine-tune's checkpoint when resuming
    one), with LoRA adapters (the checkpoint's when resuming) and gradient checkpointing."""
    resume_from = None if resume is None else resume.checkpoint
    model = _load_model(config, tokenizer, dtype, None if config.lora_r else resume_from)
    if config.lora_r:
        _check_lora_target(model, config)
        base_dir = _base_dir(output_dir)
        if base_dir.is_dir() and resume is not None:
            ckpt.verify(base_dir, "delete it to have it written again (the model built from the "
                                  "config with --seed)")
        if config.model is None or config.from_config:
            # A random base is saved beside the adapters, which name it as their base model.
            # The first write of a run: PEFT changes the model in place.
            if not base_dir.is_dir():
                output_dir.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale(output_dir)
                ckpt.write_atomically(base_dir, lambda d: _save_model(model, tokenizer, d))
            model.name_or_path = model.config.name_or_path = str(base_dir)
        elif Path(config.model).expanduser().is_dir():
            # Absolute, so the adapters find their base from any working directory and after the
            # output folder moves (as given, "./my-model" would be read from the loader's).
            local = str(Path(config.model).expanduser().resolve())
            model.name_or_path = model.config.name_or_path = local
        model = _add_lora(model, config, resume_from)
    if config.gradient_checkpointing:
        # After LoRA is added: PEFT, finding checkpointing on, would hook the embeddings as below.
        base = model.get_base_model() if config.lora_r else model
        # Non-reentrant: it needs no input that requires grad (frozen embeddings under LoRA), and
        # is the variant torch.compile traces.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers (5.17 always, 5.25 for PEFT) also hooks the embeddings to call
        # requires_grad_() on their output, which only reentrant checkpointing needs; under
        # torch.compile that call breaks the graph, and the LM-head + CE fusion is rejected.
        base.disable_input_require_grads()
    model = model.to(device)
    model.train()
    return model


def _restore(
    config: FinetuneConfig, resume: ckpt.Resume, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR, output_dir: Path, total_steps: int,
) -> tuple[int, int]:
    """Optimizer, schedule and RNG state of the checkpoint resumed from; its step and cursor."""
    ckpt.restore_training_state(resume.checkpoint, resume.state, optimizer, scheduler)
    step, cursor = resume.state["step"], resume.state["cursor"]
    ckpt.kept_log_lines(output_dir / LOG_FILE, step)  # a damaged log refused here
    logger.info("resumed from %s at step %d", resume.checkpoint, step)
    before = resume.run_config.get("total_steps", resume.run_config.get("steps"))
    if before != total_steps:
        # The optimizer's saved lr is the old schedule's for the next step: set the new one.
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        logger.info(
            "the run's steps changed from %s to %d: the learning-rate schedule is recomputed for %d "
            "steps (%s, warm-up %d steps); lr %.3g at step %d", before, total_steps,
            total_steps, config.lr_schedule, _warmup(config, total_steps),
            optimizer.param_groups[0]["lr"], step + 1,
        )
    return step, cursor


# ---------------------------------------------------------------------------------------------
# The output folder


def _finished(job: _Job) -> bool:
    """A finished run asked to continue (every check passed): rerunning the command that made
    it, as a requeued job does, must neither fail nor redo anything."""
    if not (job.start_step == job.total_steps and job.resume_from is not None
            and ckpt.holds_weights_of(job.output_dir / "final", job.resume.manifest)):
        return False
    logger.info(
        "run in %s already finished: %s is its last step (--steps %d) and final/ holds its "
        "model; nothing to do. To train further, resume with a higher --steps (the "
        "learning-rate schedule is then recomputed for the new total).",
        job.output_dir, job.resume_from, job.total_steps,
    )
    return True


def _write_run_config(job: _Job) -> str:
    """Writes the run's settings and returns them (JSON); a resumed run's line of checkpoints
    continues from the one it resumed from."""
    run_config = json.dumps({**job.config.to_dict(), "total_steps": job.total_steps,
                             "data_fingerprint": job.data.fingerprint}, indent=2)
    (job.output_dir / CONFIG_FILE).write_text(run_config, "utf-8")
    if job.resume_from is not None:
        # The run's line of checkpoints continues from here, not from a later one on disk.
        ckpt.set_latest(job.output_dir, job.resume_from, job.resume.manifest)
    return run_config


def _save_checkpoint(job: _Job, progress: _Progress, run_config: str) -> None:
    """checkpoint-<step>/, written atomically and made the run's latest; refused (the run stops)
    for weights that hold NaN or infinite values."""
    step, cursor = progress.step, progress.cursor
    model = job.model
    bad = ckpt.first_nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if bad is not None:
        raise TrainingDiverged(
            f"after step {step} the weights hold NaN or infinite values (tensor {bad}); "
            f"they were not saved. {_kept(progress.last_good)}"
        )

    def write(d: Path) -> None:
        _save_model(model, job.tokenizer, d)
        (d / CONFIG_FILE).write_text(run_config, "utf-8")
        torch.save({
            "step": step,
            "cursor": cursor,
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
        }, d / STATE_FILE)

    directory = job.output_dir / f"checkpoint-{step}"
    ckpt.set_latest(job.output_dir, directory, ckpt.write_atomically(directory, write))
    progress.last_good = directory


# ---------------------------------------------------------------------------------------------
# The finish


def _write_final(job: _Job) -> Path:
    """final/: the trained model and tokenizer (with a LoRA run's own base); the returned model
    gets HF's default attention back."""
    config, model = job.config, job.model
    if _attention(config) == PACKED_ATTENTION:
        # Packed attention needs packer boundaries in every call; the returned model is for
        # ordinary use (evaluation, generation), so it gets HF's default attention back.
        base = model.get_base_model() if config.lora_r else model
        base.set_attn_implementation("sdpa")
    own_base = config.lora_r and (config.model is None or config.from_config)
    base_dir = _base_dir(job.output_dir)

    def write(d: Path) -> None:
        _save_model(model, job.tokenizer, d)
        if own_base:
            # PEFT's AutoPeftModelForCausalLM loads base_model_name_or_path as written (from the
            # working directory), so adapters naming the run's base-model/ would not load once
            # the output folder moved. A folder holding a model and an adapter loads as both with
            # AutoModelForCausalLM.from_pretrained(folder) (transformers' PEFT integration), so
            # final/ carries a copy of its base.
            for source in sorted(base_dir.iterdir()):
                if source.name in ("config.json", "generation_config.json") or (
                        source.name.startswith("model") and ".safetensors" in source.name):
                    shutil.copyfile(source, d / source.name)

    final_dir = job.output_dir / "final"
    ckpt.write_atomically(final_dir, write)
    return final_dir


# ---------------------------------------------------------------------------------------------
# The loop


def _train(job: _Job, run_log: RunLog, run_config: str) -> _Progress:
    """The steps from the job's start to its total: each logged, with evaluations and
    checkpoints as the config asks and at the end."""
    config = job.config
    progress = _Progress(step=job.start_step, cursor=job.start_cursor, last_good=job.resume_from)
    backend = None if config.compile == "none" else config.compile
    options = {"lora_precision": config.lora_precision} if backend == "chronicals" else {}
    cache_dir = None if backend is None else use_compile_cache(
        job=compile_fingerprint(job.model, backend, options, job.device))
    # Packages hold what Inductor compiled: the chronicals backend compiles with it on a GPU.
    inductor = backend == "inductor" or (backend == "chronicals" and job.device.type == "cuda")
    packages = CompilePackages(cache_dir if inductor else None, job.model)
    if packages.off_reason is not None:
        run_log.note(f"compile packages off: {packages.off_reason}")
    with packages:
        if backend == "chronicals":
            options["report"] = functools.partial(_log_fusions, run_log, progress, packages)
        options.update(packages.compile_options())
        warmup = WarmUpClock(progress.step)
        loss_fn = packages.compile(
            lambda: compile_loss(job.model, backend=backend, options=options or None))
        _loop(job, run_log, run_config, progress, loss_fn, warmup, cache_dir, packages)
    return progress


def _loop(job: _Job, run_log: RunLog, run_config: str, progress: _Progress, loss_fn: LossFn,
          warmup: WarmUpClock, cache_dir: Path | None, packages: CompilePackages) -> None:
    """`_train`'s steps, with the compiled loss function."""
    config = job.config
    eval_batches = None
    if job.data.eval_rows is not None:
        eval_batches = [_to_device(b, job.device)
                        for b in data_lib.eval_batches(job.data.eval_rows, config.batch_size)]

    pending: Pending = []  # None: a skipped step
    window_start = time.perf_counter()
    while progress.step < job.total_steps:
        pending.append(_step(job, loss_fn, progress))
        step = progress.step
        warmed_up = warmup.step_done(step, job.device, job.total_steps)
        evaluate = config.eval_every and step % config.eval_every == 0 or step == job.total_steps
        checkpoint = config.save_every and step % config.save_every == 0 or (
            step == job.total_steps
        )
        too_many = len(progress.nonfinite) > config.skip_nonfinite
        if (len(pending) >= config.log_every or evaluate or checkpoint or too_many
                or warmed_up is not None):
            window_start, diverged = run_log.flush(pending, window_start, job.device)
            if diverged is not None:
                raise TrainingDiverged(f"{diverged}. {_kept(progress.last_good)}")
        if warmed_up is not None:  # after the steps it covers, in the log as on the clock
            loaded = packages.loaded
            run_log.write({"kind": "warmup", "step": step, "seconds": warmed_up,
                           "compile_cache": None if cache_dir is None else str(cache_dir),
                           "package_loaded": loaded})
            run_log.note(f"warm-up: {warmed_up:.1f} s to the end of step {step}"
                         + ("" if cache_dir is None else
                            f", compile included (compile cache {cache_dir}"
                            + (", a compile package loaded"
                               if loaded else "") + ")"))
            if loaded:
                _log_loaded_reports(run_log, progress, packages)
        if too_many:
            raise TrainingDiverged(
                f"step {step}: {len(progress.nonfinite)} steps with a NaN or infinite loss or "
                f"gradient norm (steps {', '.join(map(str, progress.nonfinite))}), more than "
                f"--skip-nonfinite {config.skip_nonfinite} allows. {_kept(progress.last_good)}"
            )
        if evaluate:
            if eval_batches is not None:
                run_log.eval(step, evaluate_loss(loss_fn, job.model, eval_batches).item())
            run_log.write_plot()
        if checkpoint:
            _save_checkpoint(job, progress, run_config)
        if warmup.seconds is not None:  # not before: saving would count as warm-up
            packages.save_new_graphs()
        if evaluate or checkpoint:
            window_start = time.perf_counter()  # not counted as training time


def _step(
    job: _Job, loss_fn: LossFn, progress: _Progress
) -> tuple[int, StepMetrics | None, int]:
    """One optimizer step on the next micro-batches of the training stream (advancing
    `progress`): the step's number, its metrics (None for a step without label tokens) and its
    real tokens."""
    config = job.config
    micro_batches, real_tokens, label_tokens = [], 0, 0
    for _ in range(config.grad_accum):
        batch, n = data_lib.batch_at(job.data.train_rows, progress.cursor, config.batch_size,
                                     seed=config.seed)
        progress.cursor += config.batch_size
        label_tokens += int(count_label_tokens(batch["labels"]))  # on the host: no sync
        micro_batches.append(_to_device(batch, job.device))
        real_tokens += n
    if label_tokens:
        metrics = train_step(loss_fn, job.optimizer, micro_batches, scheduler=job.scheduler,
                             max_grad_norm=config.max_grad_norm,
                             skip_nonfinite=config.skip_nonfinite > 0)
    else:
        # Nothing to learn from (rows of prompt only, e.g. split or truncated pieces): AdamW
        # would still decay the weights and move its moments with a zero gradient, so the
        # optimizer does not step. The schedule does, to stay a function of the step number.
        metrics = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            job.scheduler.step()
    progress.step += 1  # after the step: a graph compiled in it reports the step before
    if metrics is None:
        progress.skipped.append(progress.step)
    elif metrics.skipped:
        progress.nonfinite.append(progress.step)
    return progress.step, metrics, real_tokens


def _log_fusions(run_log: RunLog, progress: _Progress, packages: CompilePackages,
                 fusion_report: Any) -> None:
    """The backend's report of a compiled graph: a log line and a "compile" record, also kept
    with the compile package for a later run that loads it."""
    record = {"kind": "compile", "step": progress.step, "fired": fusion_report.fired,
              "rejected": len(fusion_report.rejected),
              "declined": len(fusion_report.declined),
              "summary": fusion_report.summary()}
    run_log.note(record["summary"])
    run_log.write(record)
    packages.remember_report({k: v for k, v in record.items() if k != "step"})


def _log_loaded_reports(run_log: RunLog, progress: _Progress, packages: CompilePackages) -> None:
    """The reports kept with a loaded package: the fusions of the graphs it brought, as the run
    that compiled them logged them ("compile" records marked `from_package`)."""
    for record in packages.loaded_reports():
        run_log.note(f"(compiled by an earlier run, loaded from the package) {record['summary']}")
        run_log.write({**record, "step": progress.step, "from_package": True})


def _kept(last_good: Path | None) -> str:
    """What a run stopped by a non-finite step leaves to continue from."""
    remedy = ("lower --lr or clip gradients (--max-grad-norm) and start a new run, or skip such "
              "steps with --skip-nonfinite N and --resume auto")
    if last_good is None:
        return f"No checkpoint was saved before it; {remedy} (from step 0)."
    return f"The last good checkpoint, {last_good}, is kept; {remedy}."


# ---------------------------------------------------------------------------------------------
# Command line: one option per FinetuneConfig field, its help the field's docstring

# The options in --help, by concern; together, every field once.
OPTION_GROUPS = {
    "model and data": ("model", "from_config", "tokenizer", "data", "data_split",
                       "attn_implementation", "max_len", "packing", "overlong", "eval_fraction"),
    "training": ("steps", "epochs", "batch_size", "grad_accum", "lr", "lr_schedule",
                 "warmup_steps", "weight_decay", "gradient_checkpointing", "skip_nonfinite",
                 "max_grad_norm", "seed", "compile", "dtype", "device"),
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "lora_plus_ratio",
             "lora_dtype", "lora_precision"),
    "output": ("output_dir", "eval_every", "save_every", "log_every", "resume",
               "allow_data_change", "plot", "progress"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(field: dataclasses.Field) -> str:
    """The field's docstring as an option's help, saying the default (and no "(default: None)"
    or "(default: True)", which argparse's ArgumentDefaultsHelpFormatter printed after a None's
    meaning and for --no-packing)."""

    def mention(match: re.Match) -> str:
        name = match[1]
        if name in fields:
            return _flag(name)
        return str(constants.get(name, match[0]))

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    constants = {"DEFAULT_STEPS": DEFAULT_STEPS}
    text = re.sub(r"`(\w+)`", mention, field_docs()[field.name]).replace("%", "%%")
    if field.default is None:
        if text.count("None: ") != 1:
            raise AssertionError(f"FinetuneConfig.{field.name}'s docstring must say once what "
                                 f"its default, None, means ('None: ...'). Got {text!r}.")
        return text.replace("None: ", "default: ")
    if field.default is True:
        return f"{text} (default: on; this flag turns it off)"
    if field.default is False:
        return f"{text} (default: off)"
    return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronicals", description="Fine-tune decoder LLMs with Chronicals."
    )
    commands = parser.add_subparsers(dest="command")
    p = commands.add_parser(
        "finetune",
        help="fine-tune a causal LM (no arguments: a built-in one-minute demo on CPU)",
        description="Fine-tune a causal LM on chat or prompt/completion data, loss on the "
        "completions only. With no arguments: a tiny model from a config on the bundled "
        "HumanEval data with the bundled tokenizer (about a minute on a laptop CPU).",
    )
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    types = typing.get_type_hints(FinetuneConfig)
    for title, names in OPTION_GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            field = fields[name]
            if field.default is True:
                group.add_argument(f"--no-{name.replace('_', '-')}", dest=name,
                                   action="store_false", help=_help(field))
            elif field.default is False:
                group.add_argument(_flag(name), action="store_true", help=_help(field))
            else:
                # int | None -> int
                kind = next(t for t in typing.get_args(types[name]) or [types[name]]
                            if t is not type(None))
                group.add_argument(_flag(name), type=kind, default=field.default,
                                   choices=CHOICES.get(name), help=_help(field))
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    return FinetuneConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(args)
        result = finetune(config)
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"chronicals finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = (Path(args.output_dir) / LATEST_FILE).is_file()
        hint = (
            "continue with --resume auto (from the run's latest checkpoint)" if saved else
            "no checkpoint was saved, so --resume auto starts the run again from step 0 "
            "(--save-every N saves one every N steps)"
        )
        print(f"chronicals finetune: interrupted; {hint}.", file=sys.stderr)
        return 130
    if result.already_finished:
        return 0
    summary = f"done: {result.step} steps"
    if result.skipped_steps:
        summary += (f" ({len(result.skipped_steps)} skipped: no label tokens in their "
                    "micro-batches, the optimizer did not step)")
    if result.nonfinite_steps:
        summary += (f" ({len(result.nonfinite_steps)} skipped for a NaN or infinite loss or "
                    f"gradient norm: steps {', '.join(map(str, result.nonfinite_steps))})")
    if result.examples_without_labels:
        summary += (f"; {result.examples_without_labels} examples lost every label token to "
                    "--overlong truncate")
    logger.info("%s; model in %s", summary, result.final_dir)
    return 0
