"""The finetune job's plot: what it draws, that the job writes it at each evaluation, and that a
job without matplotlib says so in one log line and finishes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from chronicals import cli
from chronicals import plot as plot_lib
from chronicals.config import FinetuneConfig

needs_matplotlib = pytest.mark.skipif(
    plot_lib.matplotlib_missing(),
    reason="matplotlib is not installed (the GPU machine's stack); the job's run without it is "
           "test_job_without_matplotlib_says_so_once_and_finishes",
)

_RECORDS = [
    {"kind": "compile", "step": 0, "fired": {}},
    {"kind": "train", "step": 1, "loss": 7.5, "grad_norm": 3.0, "lr": 1e-4, "tokens_per_s": 900.0},
    {"kind": "skip", "step": 2, "tokens": 10, "label_tokens": 0, "reason": "..."},
    {"kind": "train", "step": 3, "loss": 6.0, "grad_norm": 2.0, "lr": 2e-4, "tokens_per_s": 1500.0},
    {"kind": "eval", "step": 3, "eval_loss": 6.5},
    {"kind": "train", "step": 4, "loss": 5.0, "grad_norm": 1.5, "lr": 1e-4, "tokens_per_s": 1600.0},
]


def _job(tmp_path: Path, **overrides) -> FinetuneConfig:
    """The built-in job cut down to 4 eager steps of 2 rows of 256 tokens, evaluated every 2."""
    settings = dict(output_dir=str(tmp_path / "out"), max_len=256, overlong="split",
                    batch_size=2, steps=4, eval_every=2, compile="none", progress=False)
    return FinetuneConfig(**{**settings, **overrides})


@needs_matplotlib
def test_figure_draws_every_metric_against_the_step_with_labels_and_grid():
    figure = plot_lib.metrics_figure(_RECORDS)
    loss, grad_norm, lr, rate = figure.axes
    train_steps = [1, 3, 4]
    assert [tuple(line.get_xdata()) for line in loss.lines] == [(1, 3, 4), (3,)]
    assert list(loss.lines[0].get_ydata()) == [7.5, 6.0, 5.0]
    assert list(loss.lines[1].get_ydata()) == [6.5]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train loss", "eval loss"]
    for ax, key in ((grad_norm, "grad_norm"), (lr, "lr"), (rate, "tokens_per_s")):
        (line,) = ax.lines
        assert list(line.get_xdata()) == train_steps
        assert list(line.get_ydata()) == [r[key] for r in _RECORDS if r["kind"] == "train"]
    for ax in figure.axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and ax.get_title()
        assert all(g.get_visible() for g in ax.get_xgridlines() + ax.get_ygridlines())
    assert "tokens/s" in rate.get_ylabel()


@needs_matplotlib
def test_written_plot_is_a_readable_png(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / plot_lib.PLOT_FILE
    plot_lib.write_plot(path, _RECORDS)
    image = imread(path)
    assert image.shape == (700, 1100, 4)  # figsize 11 x 7 inches at 100 dpi, RGBA
    assert image[..., :3].min() < 0.5  # something is drawn on the white background
    assert sorted(p.name for p in tmp_path.iterdir()) == [plot_lib.PLOT_FILE]  # no partial file


@needs_matplotlib
def test_job_writes_the_plot_at_each_evaluation_from_the_whole_log(tmp_path, monkeypatch):
    drawn = []
    real = plot_lib.write_plot

    def write_plot(path, records):
        drawn.append([(r["kind"], r["step"]) for r in records if r["kind"] in ("train", "eval")])
        real(path, records)

    monkeypatch.setattr(plot_lib, "write_plot", write_plot)
    cli.finetune(_job(tmp_path, save_every=2, steps=2))
    # Resumed and extended to 4 steps: the plot is drawn from the whole log, the steps of the
    # first process included.
    cli.finetune(_job(tmp_path, resume="auto"))
    steps_of = [("train", 1), ("train", 2), ("eval", 2)]
    assert drawn == [steps_of, steps_of + [("train", 3), ("train", 4), ("eval", 4)]]
    out = tmp_path / "out"
    from matplotlib.image import imread

    assert imread(out / plot_lib.PLOT_FILE).shape[-1] == 4
    assert not (out / "loss.svg").exists()


def test_job_without_matplotlib_says_so_once_and_finishes(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if absent
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--output-dir", str(out), "--max-len", "256", "--overlong",
                     "split", "--batch-size", "2", "--steps", "4", "--eval-every", "2",
                     "--compile", "none", "--no-progress"]) == 0, capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert said == [(f"plot: matplotlib is not installed, so {out / plot_lib.PLOT_FILE} is not "
                    "written; the run goes on without it (pip install matplotlib to get it)")]
    assert not (out / plot_lib.PLOT_FILE).exists()
    assert (out / "final" / "model.safetensors").is_file()
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [2, 4]


def test_no_plot_writes_none_and_says_nothing_of_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level(logging.INFO, logger="chronicals.finetune")
    cli.finetune(_job(tmp_path, plot=False, steps=2))
    assert not (tmp_path / "out" / plot_lib.PLOT_FILE).exists()
    assert not any("matplotlib" in r.getMessage() for r in caplog.records)


def test_broken_matplotlib_install_is_an_error_not_a_missing_plot(monkeypatch):
    # Installed, but one of its own dependencies is gone: raised, not taken for "not installed".
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib":
                raise ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")

    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="kiwisolver"):
        plot_lib.matplotlib_missing()
