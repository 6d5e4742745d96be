"""`python -m chronicals finetune` (console script `chronicals finetune`): the main job.

    data (chronicals.data) -> model (+ PEFT LoRA with LoRA+ groups) -> compile_loss -> loop of
    train_step -> JSONL log, progress bar, held-out eval loss, checkpoints, loss plot

With no arguments it fine-tunes a tiny Qwen2-shaped model (built from a config) on the bundled
HumanEval prompt/completion data with the bundled tokenizer, in about a minute on a laptop CPU.

Output directory:
    log.jsonl            one line per step ({"kind": "train", ...}), per evaluation ("eval") and
                         per compiled graph's fusion report ("compile")
    checkpoint-<step>/   model (safetensors; a PEFT adapter or the full model) + tokenizer, loadable
                         with `from_pretrained`, and training_state.pt for --resume
    final/               model + tokenizer of the last step
    base-model/          the randomly initialised base of a LoRA run on a model built from a
                         config, so the adapter has a base to load onto
    loss.svg             the loss curve
    run_config.json      the settings

Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint. Every input is checked (data, columns, lengths, model path) before the
output directory is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronicals import data as data_lib
from chronicals.attention import PACKED_ATTENTION, register_packed_attention
from chronicals.config import COMPILE_BACKENDS, LORA_DTYPES, RESUME_MAY_CHANGE, FinetuneConfig
from chronicals.lora_plus import lora_plus_param_groups
from chronicals.train import (
    StepMetrics,
    compile_loss,
    count_label_tokens,
    evaluate_loss,
    train_step,
)

logger = logging.getLogger("chronicals.finetune")

STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.json"
LOG_FILE = "log.jsonl"

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
    resumed run's start at the checkpoint), the last step, the trained model, and where the
    outputs are."""

    model: nn.Module
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    step: int
    output_dir: Path
    final_dir: Path


# ---------------------------------------------------------------------------------------------
# Setup


def _device(config: FinetuneConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=dtype, **common
        )
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
            raise ValueError(
                f"model: cannot load {config.model!r}: it is not a local model directory and "
                f"could not be fetched as a Hugging Face model id. ({_first_line(e)})"
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

    fp32_adapters = config.lora_dtype == "fp32"
    if checkpoint is not None:
        return peft.PeftModel.from_pretrained(
            model, str(checkpoint), is_trainable=True, autocast_adapter_dtype=fp32_adapters)
    targets = config.lora_target if config.lora_target == "all-linear" else [
        t.strip() for t in config.lora_target.split(",")
    ]
    lora = peft.LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha or config.lora_r,
        lora_dropout=config.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora, autocast_adapter_dtype=fp32_adapters)


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


def _scheduler(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 20

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, config.steps - warmup)
        # Cosine from the peak down to 10% of it at the last step.
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _latest_checkpoint(output_dir: Path) -> Path:
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()
    )
    if not found:
        raise ValueError(f"resume: no checkpoint with {STATE_FILE} in {output_dir}.")
    return found[-1][1]


def _resolve_resume(config: FinetuneConfig) -> Path | None:
    if config.resume is None:
        return None
    path = _latest_checkpoint(Path(config.output_dir)) if config.resume == "auto" else Path(
        config.resume
    )
    if not (path / STATE_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"resume: {path} is not a checkpoint of this job (no {STATE_FILE} / {CONFIG_FILE})."
        )
    saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    current = config.to_dict()
    differ = sorted(
        k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k]
    )
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ)
        raise ValueError(
            f"resume: {path} was made with other settings ({details}). Resume with the same "
            "settings to continue the same run."
        )
    return path


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory with `write(tmp)` in a temporary sibling, then rename it to `final`: a
    reader sees the old directory or the complete new one, never a half-written one."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
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


def _save_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Reporting


class _RunLog:
    """log.jsonl, the progress bar and the loss history."""

    def __init__(self, path: Path, config: FinetuneConfig, start_step: int) -> None:
        self.path = path
        if start_step and path.exists():
            # Steps after the checkpoint were logged by the run that stopped; they are redone.
            kept = [
                line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif path.exists():
            path.unlink()
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.bar = None
        if config.progress:
            from tqdm.auto import tqdm  # a dependency of transformers

            self.bar = tqdm(total=config.steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def steps(self, records: list[dict[str, Any]], n_steps: int) -> None:
        for r in records:
            self.write(r)
            self.losses.append(r["loss"])
        last = records[-1]
        postfix = {"loss": f"{last['loss']:.4f}", "tok/s": f"{last['tokens_per_s']:,.0f}",
                   "mem": f"{last['mem_gib']:.2f}GiB"}
        if self.bar is not None:
            self.bar.update(n_steps)
            self.bar.set_postfix(postfix)
        else:
            logger.info("step %d: %s", last["step"], postfix)

    def eval(self, step: int, loss: float) -> None:
        self.write({"kind": "eval", "step": step, "eval_loss": loss})
        self.eval_losses.append((step, loss))
        self.note(f"step {step}: eval loss {loss:.4f}")

    def note(self, message: str) -> None:
        """A line for the user, printed above the progress bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot_losses(
    path: Path, losses: Sequence[tuple[int, float]], eval_losses: Sequence[tuple[int, float]]
) -> None:
    """Write the loss curve as a small standalone SVG (train loss line, eval loss dots)."""
    width, height, pad = 640, 360, 48
    points = list(losses) + list(eval_losses)
    x_lo, x_hi = min(s for s, _ in points), max(s for s, _ in points)
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)

    def xy(step: float, value: float) -> str:
        x = pad + (step - x_lo) / (x_hi - x_lo) * (width - 2 * pad)
        y = height - pad - (value - y_lo) / (y_hi - y_lo) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in losses)
    dots = "".join(
        f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="3.5" '
        'fill="#d62728"/>' for s, v in eval_losses
    )
    text = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
        'fill="none" stroke="#999"/>'
        f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>{dots}'
        f'<text x="{pad}" y="{pad - 10}">loss (blue: train, red: eval)</text>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y_hi:.3g}</text>'
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y_lo:.3g}</text>'
        f'<text x="{pad}" y="{height - pad + 16}">{x_lo}</text>'
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {x_hi}</text>'
        "</svg>\n"
    )
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The job


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Run the fine-tuning job described by `config` (see the module docstring for the outputs).

    Raises:
        FileNotFoundError: the data file does not exist.
        ValueError: anything else wrong with the inputs (empty data, missing columns, examples
            longer than max_len, a model path that does not load, a checkpoint of other
            settings). All of these are raised before the output directory is written.
    """
    device = _device(config)
    dtype = _dtype(config, device)
    backend = None if config.compile == "none" else config.compile
    resume_from = _resolve_resume(config)
    if resume_from is None and (Path(config.output_dir) / CONFIG_FILE).is_file():
        # A fresh run on top of another would mix their checkpoints, logs and LoRA base model.
        raise ValueError(
            f"output dir {config.output_dir} already holds a run ({CONFIG_FILE}). Continue it "
            "with --resume auto, or give another --output-dir (or delete this one)."
        )

    # Inputs first: every check that can fail runs before anything is written.
    if config.model is not None:
        _check_model_path(config.model, config.from_config)
    tokenizer = _load_tokenizer(config)
    source = config.data if config.data is not None else str(data_lib.default_data_path())
    records = data_lib.load_records(source, split=config.data_split)
    examples = data_lib.tokenize_records(records, tokenizer)
    train_examples, eval_examples = data_lib.split_eval(
        examples, eval_fraction=config.eval_fraction, seed=config.seed
    )
    row_args = dict(max_len=config.max_len, pad_id=tokenizer.pad_token_id,
                    packing=config.packing, overlong=config.overlong)
    train_rows = data_lib.make_rows(train_examples, **row_args)
    if count_label_tokens(train_rows.labels) == 0:
        raise ValueError(
            "data: the training split has no label tokens to learn from (every label is masked: "
            "no assistant reply or completion, or --overlong truncate cut them all off)."
        )
    eval_rows = data_lib.make_rows(eval_examples, **row_args) if eval_examples else None
    model = _load_model(config, tokenizer, dtype, None if config.lora_r else resume_from)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob(".tmp-*"), *output_dir.glob(".old-*")]:
        shutil.rmtree(stale)  # left by a run killed while saving
    (output_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2), "utf-8")
    if config.lora_r:
        if config.model is None or config.from_config:
            # A random base is saved beside the adapters, which name it as their base model.
            base_dir = (output_dir / "base-model").resolve()
            if not (base_dir / "config.json").is_file():
                _write_atomically(base_dir, lambda d: _save_model(model, tokenizer, d))
            model.name_or_path = model.config.name_or_path = str(base_dir)
        model = _add_lora(model, config, resume_from)
    model = model.to(device)
    model.train()

    optimizer = _optimizer(model, config, device)
    scheduler = _scheduler(optimizer, config)
    step = cursor = 0  # optimizer steps taken; rows of the training stream consumed
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, cursor = state["step"], state["cursor"]
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", resume_from, step)
    else:
        torch.manual_seed(config.seed)

    run_log = _RunLog(output_dir / LOG_FILE, config, step)
    options = None
    if backend == "chronicals":
        def report(fusion_report: Any) -> None:
            run_log.note(fusion_report.summary())
            run_log.write({"kind": "compile", "step": step, "fired": fusion_report.fired,
                           "rejected": len(fusion_report.rejected),
                           "summary": fusion_report.summary()})

        options = {"report": report}
    loss_fn = compile_loss(model, backend=backend, options=options)
    eval_batches = None
    if eval_rows is not None:
        eval_batches = [
            _to_device(b, device) for b in data_lib.eval_batches(eval_rows, config.batch_size)
        ]

    def save(at_step: int) -> None:
        def write(d: Path) -> None:
            _save_model(model, tokenizer, d)
            (d / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2), "utf-8")
            torch.save({
                "step": at_step,
                "cursor": cursor,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            }, d / STATE_FILE)

        _write_atomically(output_dir / f"checkpoint-{at_step}", write)

    def run_eval(at_step: int) -> None:
        if eval_batches is not None:
            run_log.eval(at_step, evaluate_loss(loss_fn, model, eval_batches).item())

    pending: list[tuple[int, StepMetrics, int]] = []
    window_start = time.perf_counter()
    try:
        while step < config.steps:
            micro_batches, real_tokens = [], 0
            for _ in range(config.grad_accum):
                batch, n = data_lib.batch_at(train_rows, cursor, config.batch_size,
                                             seed=config.seed)
                cursor += config.batch_size
                micro_batches.append(_to_device(batch, device))
                real_tokens += n
            metrics = train_step(loss_fn, optimizer, micro_batches, scheduler=scheduler,
                                 max_grad_norm=config.max_grad_norm)
            step += 1
            pending.append((step, metrics, real_tokens))
            evaluate = config.eval_every and step % config.eval_every == 0 or step == config.steps
            checkpoint = config.save_every and step % config.save_every == 0 or (
                step == config.steps
            )
            if len(pending) >= config.log_every or evaluate or checkpoint:
                window_start = _flush(pending, run_log, window_start, device)
            if evaluate:
                run_eval(step)
            if checkpoint:
                save(step)
            if evaluate or checkpoint:
                window_start = time.perf_counter()  # not counted as training time
    finally:
        run_log.close()

    if _attention(config) == PACKED_ATTENTION:
        # Packed attention needs packer boundaries in every call; the returned model is for
        # ordinary use (evaluation, generation), so it gets HF's default attention back.
        base = model.get_base_model() if config.lora_r else model
        base.set_attn_implementation("sdpa")
    final_dir = output_dir / "final"
    _write_atomically(final_dir, lambda d: _save_model(model, tokenizer, d))
    history = _logged_losses(output_dir / LOG_FILE)  # a resumed run's earlier steps included
    if config.plot and history["train"]:
        plot_losses(output_dir / "loss.svg", history["train"], history["eval"])
    return FinetuneResult(
        model=model, losses=run_log.losses, eval_losses=run_log.eval_losses, step=step,
        output_dir=output_dir, final_dir=final_dir,
    )


def _flush(
    pending: list[tuple[int, StepMetrics, int]], run_log: _RunLog, window_start: float,
    device: torch.device,
) -> float:
    """Read the pending steps' metrics from the device (one sync per step's values) and log them;
    tokens/s is the window's real tokens over its wall time. Returns the new window start."""
    values = [m.item() for _, m, _ in pending]
    now = time.perf_counter()
    tokens = sum(n for _, _, n in pending)
    rate = tokens / max(now - window_start, 1e-9)
    memory = _memory_gib(device)
    records = [
        {"kind": "train", "step": s, "loss": v["loss"], "grad_norm": v["grad_norm"], "lr": v["lr"],
         "tokens": n, "label_tokens": v["num_tokens"], "tokens_per_s": rate, "mem_gib": memory}
        for (s, _, n), v in zip(pending, values)
    ]
    run_log.steps(records, len(pending))
    pending.clear()
    return now


def _logged_losses(path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out["train"].append((r["step"], r["loss"]))
        elif r["kind"] == "eval":
            out["eval"].append((r["step"], r["eval_loss"]))
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    defaults = FinetuneConfig()
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="Hugging Face model id or local directory (default: the "
                   "built-in tiny Qwen2-shaped model)")
    g.add_argument("--from-config", action="store_true",
                   help="build --model (a config.json or a directory holding one) with random "
                   "weights")
    g.add_argument("--tokenizer", help="tokenizer id or directory (default: the model's, or the "
                   "bundled one for the built-in model)")
    g.add_argument("--data", help="local .json/.jsonl/.parquet file or a `datasets` name with "
                   "'messages' (chat) or 'prompt'/'completion' columns (default: bundled "
                   "HumanEval)")
    g.add_argument("--data-split", default=defaults.data_split)
    g.add_argument("--attn-implementation", default=defaults.attn_implementation,
                   help="transformers attention (auto: chronicals_varlen for packed rows, sdpa "
                   "for padded rows)")
    g.add_argument("--max-len", type=int, default=defaults.max_len, help="tokens per row")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="one example per row, padded, instead of packed rows")
    g.add_argument("--overlong", choices=("error", "truncate", "split"),
                   default=defaults.overlong, help="examples longer than --max-len")
    g.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="share of the examples held out for the evaluation loss")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=defaults.steps)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="rows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 with LoRA, 2e-5 "
                   "full fine-tune, 2e-3 for the built-in model)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default=defaults.lr_schedule)
    g.add_argument("--warmup-steps", type=int, help="(default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm,
                   help="clip the gradient norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--compile", default=defaults.compile, choices=COMPILE_BACKENDS,
                   help="torch.compile backend of the loss function ('none': eager)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=defaults.dtype,
                   help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=defaults.device)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=defaults.lora_r,
                   help="LoRA rank (0: full fine-tune)")
    g.add_argument("--lora-alpha", type=float, help="(default: the rank)")
    g.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    g.add_argument("--lora-target", default=defaults.lora_target,
                   help="'all-linear' or comma-separated module names")
    g.add_argument("--lora-plus-ratio", type=float, default=defaults.lora_plus_ratio,
                   help="LoRA+: learning rate of B over that of A")
    g.add_argument("--lora-dtype", choices=LORA_DTYPES, default=defaults.lora_dtype,
                   help="adapter weights' dtype: fp32 (PEFT's default) or the model's (faster "
                   "in bf16)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=defaults.output_dir)
    g.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between evaluations (0: only at the end)")
    g.add_argument("--save-every", type=int, default=defaults.save_every,
                   help="steps between checkpoints (0: only at the end)")
    g.add_argument("--log-every", type=int, default=defaults.log_every,
                   help="steps between reading metrics from the device (all steps are logged)")
    g.add_argument("--resume", help="checkpoint directory to continue from, or 'auto' for the "
                   "newest in --output-dir")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false")
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
    except (ValueError, FileNotFoundError) as e:
        print(f"chronicals finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = any((d / STATE_FILE).is_file() for d in Path(args.output_dir).glob("checkpoint-*"))
        hint = (
            "continue with --resume auto (from the newest checkpoint)" if saved else
            "no checkpoint was saved, so there is nothing to resume (--save-every N saves one "
            "every N steps)"
        )
        print(f"chronicals finetune: interrupted; {hint}.", file=sys.stderr)
        return 130
    logger.info("done: %d steps; model in %s", result.step, result.final_dir)
    return 0
