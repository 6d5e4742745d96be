"""The finetune job's record of a run: log.jsonl, the progress bar (or plain log lines without a
terminal), the losses of this process, and the plot drawn from the log (chronicals.plot).

log.jsonl holds one JSON object a line: "train" for a step, "skip" for a step whose micro-batches
held no label token (the optimizer did not step), "nonfinite" for a step whose loss or gradient
norm was NaN or infinite, "eval" for an evaluation and "compile" for a compiled graph's fusion
report. A resumed run keeps the lines up to its checkpoint's step (chronicals.checkpoint.trim_log)
and appends; the plot is drawn from the whole file, so it shows the run from its first step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from chronicals import checkpoint as ckpt
from chronicals import plot as plot_lib
from chronicals.train import StepMetrics

logger = logging.getLogger("chronicals.finetune")

Pending = list[tuple[int, StepMetrics | None, int]]
"""Steps not yet logged: (step, its metrics or None for a step without label tokens, its real
tokens)."""


class RunLog:
    """log.jsonl, the progress bar, the loss history and the plot."""

    def __init__(
        self, path: Path, *, start_step: int, total_steps: int, progress: bool,
        plot: Path | None,
    ) -> None:
        """`plot`: where to write the plot at each `write_plot()`; None: no plot."""
        self.path = path
        if start_step:
            ckpt.trim_log(path, start_step)
        elif path.exists():
            path.unlink()
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.plot_path = plot
        if plot is not None and plot_lib.matplotlib_missing():
            # An install without dependencies (--no-deps, on a machine without internet).
            logger.warning("plot: matplotlib is not installed, so %s is not written; the run goes "
                           "on without it (pip install matplotlib to get it)", plot)
            self.plot_path = None
        self.bar = None
        # Without a terminal (a log file, a CI job) a bar's redraws are carriage returns and
        # blank lines there: plain log lines instead.
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm  # a dependency of transformers

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self, pending: Pending, window_start: float, device: torch.device,
              ) -> tuple[float, str | None]:
        """Read the pending steps' metrics from the device (one sync per step's values), log them
        and clear `pending`; tokens/s is the window's real tokens over its wall time (a skipped
        step's are not trained on and not counted). Returns the new window start, and for a step
        with a NaN or infinite loss or gradient norm that was not skipped, what happened (None
        otherwise): that step is logged, and the steps after it, which trained on its update,
        are not."""
        values = [None if m is None else m.item() for _, m, _ in pending]
        now = time.perf_counter()
        tokens = sum(n for _, m, n in pending if m is not None)
        rate = tokens / max(now - window_start, 1e-9)
        memory = memory_gib(device)
        records, diverged = [], None
        for (s, m, n), v in zip(pending, values):
            if v is None:
                records.append({
                    "kind": "skip", "step": s, "tokens": n, "label_tokens": 0,
                    "reason": "no label tokens in the step's micro-batches: the optimizer did "
                              "not step"
                })
            elif m.skipped or not (math.isfinite(v["loss"]) and math.isfinite(v["grad_norm"])):
                # JSON has no NaN or infinity: they are logged as text.
                loss, norm = (x if math.isfinite(x) else str(x) for x in (v["loss"], v["grad_norm"]))
                action = ("skipped (--skip-nonfinite): the optimizer did not step" if m.skipped
                          else "the run stopped")
                records.append({"kind": "nonfinite", "step": s, "loss": loss, "grad_norm": norm,
                                "lr": v["lr"],
                                "reason": f"loss {loss}, gradient norm {norm}: {action}"})
                if not m.skipped:
                    which = " and ".join(name for name, x in (("loss", loss),
                                                              ("gradient norm", norm))
                                         if isinstance(x, str))
                    diverged = (f"step {s}: non-finite {which} (loss {loss}, gradient norm "
                                f"{norm}); nothing after step {s - 1} was saved")
                    break
            else:
                records.append({
                    "kind": "train", "step": s, "loss": v["loss"], "grad_norm": v["grad_norm"],
                    "lr": v["lr"], "tokens": n, "label_tokens": v["num_tokens"],
                    "tokens_per_s": rate, "mem_gib": memory,
                })
        self._steps(records, len(records))
        pending.clear()
        return now, diverged

    def _steps(self, records: list[dict[str, Any]], n_steps: int) -> None:
        for r in records:
            self.write(r)
            if r["kind"] == "train":
                self.losses.append(r["loss"])
            elif r["kind"] == "skip":
                self.note(f"step {r['step']}: skipped ({r['reason']})")
            else:
                self.note(f"step {r['step']}: {r['reason']}")
        trained = [r for r in records if r["kind"] == "train"]
        postfix = {} if not trained else {
            "loss": f"{trained[-1]['loss']:.4f}", "tok/s": f"{trained[-1]['tokens_per_s']:,.0f}",
            "mem": f"{trained[-1]['mem_gib']:.2f}GiB",
        }
        if self.bar is not None:
            self.bar.update(n_steps)
            self.bar.set_postfix(postfix)
        elif trained:
            logger.info("step %d: %s", trained[-1]["step"], postfix)

    def eval(self, step: int, loss: float) -> None:
        self.write({"kind": "eval", "step": step, "eval_loss": loss})
        self.eval_losses.append((step, loss))
        self.note(f"step {step}: eval loss {loss:.4f}")

    def write_plot(self) -> None:
        """Draw the plot from the whole log (a resumed run's earlier steps included); nothing
        without a plot path or before the first logged training step."""
        if self.plot_path is None:
            return
        records = [json.loads(line) for line in self.path.read_text("utf-8").splitlines()]
        if any(r["kind"] == "train" for r in records):
            plot_lib.write_plot(self.plot_path, records)

    def note(self, message: str) -> None:
        """A line for the user, printed above the progress bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def memory_gib(device: torch.device) -> float:
    """Peak memory: allocated on the GPU, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
