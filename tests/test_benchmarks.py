"""The benchmarks (benchmarks/) need a GPU to measure anything; here every script is imported and
its command line parsed, the shared harness checked, and the launch overrides the tuning sweeps
pass to the ops' launchers run on the CPU (Triton's interpreter), so none of it rots unnoticed."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from chronicals.ops import linear_cross_entropy as lce
from chronicals.ops import linear_cross_entropy_frozen as frozen_head
from chronicals.ops import rms_norm as rms
from chronicals.ops._lce_common import LossOptions

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "benchmarks").rglob("*.py") if path.name != "__init__.py"
)
# Scripts with a command line of their own; bench_unsloth is started by bench_train with a spec.
SCRIPTS = [m for m in MODULES if m not in ("benchmarks.harness", "benchmarks.bench_unsloth")]


def test_every_benchmark_is_found():
    assert "benchmarks.bench_train" in MODULES and "benchmarks.tuning.sweep_rms_norm" in MODULES
    assert len(MODULES) >= 14, MODULES


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_imports_without_editing_sys_path(module):
    path = list(sys.path)
    importlib.import_module(module)
    assert sys.path == path
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    assert "sys.path" not in source and "mock.patch" not in source, module


@pytest.mark.parametrize("module", SCRIPTS)
def test_benchmark_help(module, monkeypatch, capsys):
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_check_numerics_refuses_what_is_worse_than_eager():
    truth = torch.linspace(-2, 2, 64, dtype=torch.float64)
    eager = truth.to(torch.bfloat16)
    harness.check_numerics("same as eager", eager.clone(), eager, truth)
    worse = eager.clone()
    worse[3] += 0.25
    with pytest.raises(AssertionError, match="1 elements outside eager's error"):
        harness.check_numerics("worse", worse, eager, truth)
    with pytest.raises(AssertionError, match="NaN"):
        harness.check_numerics("nan", torch.full_like(eager, float("nan")), eager, truth)


def test_relative_max_error():
    want = torch.tensor([1.0, -4.0])
    assert harness.relative_max_error(torch.tensor([1.5, -4.0]), want) == pytest.approx(0.125)


def test_write_json_records_the_environment(tmp_path):
    path = harness.write_json(tmp_path / "new", "r.json", [{"ms": 1.5}], dtype="bfloat16")
    written = json.loads(path.read_text())
    assert written["results"] == [{"ms": 1.5}]
    meta = written["meta"]
    assert meta["torch"] == torch.__version__ and meta["dtype"] == "bfloat16"
    assert {"device", "triton", "transformers", "python"} <= set(meta)


# The tuning sweeps' overrides: they replace the op's own choice (which is made to raise here),
# and a launch configuration other than the op's computes the same.


def _not_asked(*args, **kwargs):
    raise AssertionError("the op chose its own launch configuration despite the override")


def test_rms_norm_launch_overrides(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    x, w = torch.randn(6, 96), 1 + 0.1 * torch.randn(96)
    dy = torch.randn_like(x)
    default = rms._rms_norm_fwd(x, w, 1e-6, False)
    chosen = rms._fwd_config(6, 96, rms._FWD_MAX_BLOCK_COLS)
    other = (1, 32, 3, 1)  # one row a program, the row in three column blocks
    assert other != chosen
    _, dw = rms._rms_norm_bwd(dy, x, w, 1e-6, False, True)
    monkeypatch.setattr(rms, "_fwd_config", _not_asked)
    monkeypatch.setattr(rms, "_dw_config", _not_asked)
    torch.testing.assert_close(rms._rms_norm_fwd(x, w, 1e-6, False, config=other), default)
    partials = []

    def torch_finish(partial, dtype):
        partials.append(partial)
        return partial.sum(0).to(dtype)

    _, dw_torch = rms._rms_norm_bwd(dy, x, w, 1e-6, False, True, finish_dw=torch_finish)
    assert len(partials) == 1
    torch.testing.assert_close(dw_torch, dw)
    finish = functools.partial(rms._finish_dw, config=(2, 16, 1))
    torch.testing.assert_close(rms._rms_norm_bwd(dy, x, w, 1e-6, False, True,
                                                 finish_dw=finish)[1], dw)


def test_linear_cross_entropy_launch_overrides(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    h, w = torch.randn(24, 32), torch.randn(80, 32) / 32**0.5
    labels = torch.randint(0, 80, (24,))
    options = LossOptions()
    loss, lse = lce._lce_fwd(h, w, labels, None, options)
    tiles = lce._Tiles(16, 32, 16, 1, 1)
    assert tiles != lce._tiles(h.dtype)
    grads = lce._lce_bwd(torch.ones_like(loss), h, w, labels, lse, None, options, True, True)
    default = frozen_head._lce_fwd_d_hidden(h, w, labels, None, options)
    assert frozen_head._frozen_blocks(24, 32, 80, 4) != (4, 32)
    monkeypatch.setattr(lce, "_tiles", _not_asked)
    monkeypatch.setattr(frozen_head, "_frozen_blocks", _not_asked)
    loss_t, lse_t = lce._lce_fwd(h, w, labels, None, options, tiles=tiles)
    torch.testing.assert_close((loss_t, lse_t), (loss, lse))
    torch.testing.assert_close(
        lce._lce_bwd(torch.ones_like(loss), h, w, labels, lse, None, options, True, True,
                     tiles=tiles), grads)
    # The frozen head's one-pass path, blocks of 4 tokens x 32 columns against its default.
    torch.testing.assert_close(
        frozen_head._lce_fwd_d_hidden(h, w, labels, None, options, blocks=(4, 32)), default)


def _write_log(path: Path, losses: list[float], evals: dict[int, float]) -> Path:
    records = [{"kind": "compile", "step": 0}]
    records += [{"kind": "train", "step": i + 1, "loss": x} for i, x in enumerate(losses)]
    records += [{"kind": "eval", "step": s, "eval_loss": x} for s, x in evals.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_runs_prints_the_gaps_and_plots(tmp_path, monkeypatch, capsys):
    from benchmarks import compare_runs

    a = _write_log(tmp_path / "a.jsonl", [4.0, 3.0, 2.0, 1.0], {2: 3.5, 4: 1.5})
    b = _write_log(tmp_path / "b.jsonl", [4.0, 3.5, 2.5, 1.25], {2: 3.0, 4: 1.5})
    assert compare_runs.mean_gap(*(compare_runs.read_losses(p)[0] for p in (a, b)), last=2) == 0.375
    plot = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["compare_runs", f"mixed={a}", f"exact={b}", "--last", "3",
                                      "--plot", str(plot)])
    compare_runs.main()
    out = capsys.readouterr().out
    assert "mixed: 4 train records, first loss 4.0000, last 1.0000, last eval 1.5000" in out
    # last 3 steps: |3 - 3.5|, |2 - 2.5|, |1 - 1.25|; evals: |3.5 - 3|, 0
    assert "mean |train loss gap| over the last 3 steps 0.4167, mean |eval loss gap| 0.2500" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_compare_runs_refuses_a_log_without_train_records(tmp_path):
    from benchmarks import compare_runs

    empty = _write_log(tmp_path / "empty.jsonl", [], {})
    with pytest.raises(ValueError, match="expected train records"):
        compare_runs.read_losses(empty)
