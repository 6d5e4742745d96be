"""The examples run as a user runs them, and their training actually trains."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _trained_steps(proc: subprocess.CompletedProcess) -> list[dict]:
    """The metrics of the `step N: {...}` lines an example printed, once it exited cleanly: at
    least two steps, each with a finite loss and a nonzero gradient norm, the loss falling."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [
        ast.literal_eval(line.split(": ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("step ")
    ]
    assert len(steps) >= 2, proc.stdout
    for metrics in steps:
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
    assert steps[-1]["loss"] < steps[0]["loss"], steps
    return steps


@pytest.mark.slow
def test_custom_loop_trains(tmp_path):
    """examples/custom_loop.py end to end: exits cleanly, its printed metrics are finite with a
    gradient norm above zero, and the loss falls. Ops run as plain PyTorch here (about 50 s):
    through the Triton interpreter the script takes over ten minutes, and the ops' kernels have
    their own interpreter tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_loop.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    steps = _trained_steps(proc)
    assert all(metrics["num_tokens"] > 0 for metrics in steps), steps


@pytest.mark.slow
def test_fsdp_example_trains_and_saves(tmp_path):
    """examples/fsdp.py under `torchrun --nproc-per-node 2` on CPU (gloo): exits cleanly, the
    loss of the global batch falls and every rank wrote its shard of the DCP checkpoint. Ops as
    plain PyTorch, as in test_custom_loop_trains (about 20 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "fsdp.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    _trained_steps(proc)
    checkpoint = tmp_path / "fsdp-checkpoint"
    assert (checkpoint / ".metadata").is_file()
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
