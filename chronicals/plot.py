"""The finetune job's plot: loss and eval loss, gradient norm, learning rate and tokens/s against
the step, one panel each, drawn with matplotlib from the records of log.jsonl.

matplotlib is a dependency of the package, but an environment installed without dependencies
(`pip install --no-deps`, as on a machine without internet) may lack it; `matplotlib_missing()`
says so, and the job then logs one line and trains without a plot. The figure is rendered by
matplotlib's Agg canvas directly, not through pyplot: no display is needed and the process's
pyplot backend (a notebook's, say) is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILE = "metrics.png"

# (record key, panel title, y-axis label) of the train records' panels after the loss.
_PANELS = (
    ("grad_norm", "Gradient norm (before clipping)", "L2 norm"),
    ("lr", "Learning rate", "learning rate"),
    ("tokens_per_s", "Throughput", "real (non-pad) tokens/s"),
)


def matplotlib_missing() -> bool:
    """True when matplotlib is not installed. A matplotlib that is installed but fails to import
    (one of its own dependencies missing) raises: that is a broken install, not a choice."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        return True
    return False


def metrics_figure(records: Iterable[Mapping[str, Any]]) -> Figure:
    """A 2 x 2 figure of the run's "train" and "eval" records (log.jsonl's; other kinds are
    ignored): train and eval loss, gradient norm, learning rate, tokens/s, each against the step,
    with labelled axes and a grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"] if train else []
    steps = [r["step"] for r in train]
    figure = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).flat
    loss = next(axes)
    loss.plot(steps, [r["loss"] for r in train], label="train loss", color="tab:blue")
    if evals:
        loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                  label="eval loss", color="tab:red")
    loss.set(title="Loss", ylabel="loss (mean per label token)")
    loss.legend()
    for ax, (key, title, ylabel) in zip(axes, _PANELS):
        ax.plot(steps, [r[key] for r in train], color="tab:blue")
        ax.set(title=title, ylabel=ylabel)
    for ax in figure.axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.4)
    return figure


def write_plot(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write `metrics_figure(records)` as a PNG at `path`, replacing the file in one rename (a
    reader, or a job killed mid-write, never sees half an image)."""
    figure = metrics_figure(records)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    os.replace(partial, path)
