"""FSDP2 on two CPU processes (gloo) equals one process: loss, gradients, clipping, accumulation
and a resume from a sharded checkpoint, for full fine-tuning and LoRA, with backend="chronicals".

The test launches this file with `torchrun --standalone --nproc-per-node 2` (the `__main__`
block below is the worker); each rank trains on its half of every global batch, two micro-batches
per step, and rank 0 writes what it measured; a second launch resumes from the sharded checkpoint
the first wrote. The test then runs the same global batches in this process, eager and
unsharded, and compares.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chronicals.train import compile_loss, train_step
from tests.models import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
RESUME_AFTER = 2  # the checkpoint is saved after this many steps
MAX_GRAD_NORM = 0.5  # below every step's norm here, so clipping is active
# Small enough that rounding differences of one step (~1e-7) do not grow past 1e-6 in the next
# ones; at lr 1 the LoRA run's third gradient norm moves by 5e-6 between eager and chronicals
# kernels in one process already.
LR = 0.1
ROWS, SEQ, RANKS, MICRO = 8, 16, 2, 2  # ROWS per global batch = RANKS * MICRO * 2 rows
_TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI


def _global_batch(step: int) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches of 2 rows, rank-major: rank r takes [MICRO * r, MICRO * (r + 1)).
    Rows ignore very different numbers of labels, so per-rank token counts differ and a loss
    normalised per rank would not match the global one."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=g)
    labels = ids.clone()
    for r in range(ROWS):
        labels[r, : 1 + (5 * r + 3 * step) % (SEQ - 2)] = -100
    return [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, ROWS, 2)]


def _model(mode: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_model("qwen2", seed=seed)
    if mode == "lora":
        import peft

        # init_lora_weights=False: B is random too, so every adapter weight gets a gradient.
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                 init_lora_weights=False, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    return model


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD: the first step changes each weight by -LR * (clipped) gradient. Momentum gives the
    # optimizer state a checkpoint must restore.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)


def _worker(mode: str, phase: str, out: Path) -> None:
    """phase 'train': STEPS steps from the initial weights, the checkpoint saved after
    RESUME_AFTER of them; 'resume': a new launch on a model of other weights, restored from the
    checkpoint, runs the steps after it. Rank 0 writes `<phase>.json`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from chronicals.distributed import load_checkpoint, save_checkpoint, shard_model
    from compile_passes.report import fusion_reports

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=_TIMEOUT_S // 2))
    rank = dist.get_rank()

    def full_state(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))

    def step(i):
        mine = _global_batch(i)[MICRO * rank : MICRO * (rank + 1)]
        metrics = train_step(loss_fn, optimizer, mine, scheduler=scheduler,
                             max_grad_norm=MAX_GRAD_NORM, data_parallel=dist.group.WORLD)
        return metrics.item()

    model = shard_model(_model(mode, seed=0 if phase == "train" else 1))
    optimizer = _optimizer(model)
    scheduler = _scheduler(optimizer)
    loss_fn = compile_loss(model)
    result = {}
    if phase == "train":
        before = full_state(model)
        result["steps"] = [step(0)]
        after = full_state(model)
        grads = {k: (before[k] - after[k]) / LR for k in before}
        result["fired"] = [dict(r.fired) for r in fusion_reports()]
        for i in range(1, STEPS):
            if i == RESUME_AFTER:
                save_checkpoint(out / "ckpt", model, optimizer, scheduler, step=i)
            result["steps"].append(step(i))
        if rank == 0:
            torch.save(grads, out / "grads.pt")
    else:
        result["resumed_at"] = load_checkpoint(out / "ckpt", model, optimizer, scheduler)
        result["steps"] = [step(i) for i in range(result["resumed_at"], STEPS)]
    if rank == 0:
        (out / f"{phase}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_workers(mode: str, phase: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel runs never collide.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(RANKS), __file__, mode, phase, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads((out / f"{phase}.json").read_text())


def _reference(mode: str):
    """One process, eager, no sharding: every step on all micro-batches of the global batch."""
    model = _model(mode)
    optimizer = _optimizer(model)
    scheduler = _scheduler(optimizer)
    loss_fn = compile_loss(model, backend=None)
    before = copy.deepcopy(model.state_dict())
    steps = []
    for i in range(STEPS):
        metrics = train_step(loss_fn, optimizer, _global_batch(i), scheduler=scheduler,
                             max_grad_norm=MAX_GRAD_NORM)
        steps.append(metrics.item())
        if i == 0:
            grads = {k: (before[k] - v) / LR for k, v in model.state_dict().items()}
    return steps, grads


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_two_ranks_equal_one_process(mode, tmp_path):
    got = _run_workers(mode, "train", tmp_path)
    resumed = _run_workers(mode, "resume", tmp_path)
    want_steps, want_grads = _reference(mode)

    for i, (g, w) in enumerate(zip(got["steps"], want_steps, strict=True)):
        assert g["num_tokens"] == w["num_tokens"], (i, g, w)
        assert g["grad_norm"] > MAX_GRAD_NORM, (i, g)  # clipping was active
        # fp32 sums in another order (two ranks, fused kernels): relative error ~1e-7.
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (i, key, g, w)
    # The resumed run's steps (new processes, a model of other weights restored from the sharded
    # checkpoint) equal the uninterrupted run's, to the rounding of equal arithmetic.
    assert resumed["resumed_at"] == RESUME_AFTER
    for g, w in zip(resumed["steps"], got["steps"][RESUME_AFTER:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6, abs=1e-7), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-6), (g, w)

    # The first step's clipped gradients, from the weights' change; frozen weights do not move.
    grads = torch.load(tmp_path / "grads.pt")
    assert grads.keys() == want_grads.keys()
    moved = 0
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
        moved += bool(want.abs().max() > 0)
    trainable = sum(1 for _, p in _model(mode).named_parameters() if p.requires_grad)
    assert moved == trainable

    # The fusions fired on the sharded model. Each FSDP unit's call ends a graph (FSDP2's hooks
    # run outside Dynamo), so the decoder layer is a graph of its own: its norm after the
    # attention's residual add is declined as in one process, LoRA's SwiGLU too (operands are
    # base + adapter sums). The LM head + loss fires once, on the head weight the root unit
    # gathered. Attention is rejected: the causal mask is built in the backbone's graph and
    # reaches the layer's graph as an input, whose values the pass cannot prove causal.
    layers = [r for r in got["fired"] if r["rope"]]
    assert layers and all(r["rope"] == 1 and r["rms_norm"] == 1 for r in layers), got["fired"]
    assert all(r["swiglu"] == (mode == "full") for r in layers), got["fired"]
    total = {name: sum(r[name] for r in got["fired"]) for name in got["fired"][0]}
    assert total["linear_cross_entropy"] == 1, got["fired"]
    assert total["attention"] == 0, got["fired"]

def test_errors_name_what_was_expected(tmp_path):
    from chronicals.distributed import compile_sharded_loss, load_checkpoint, shard_model

    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        shard_model(model)
    with pytest.raises(TypeError, match="expected a model sharded with FSDP2.*Got Qwen2ForCausalLM"):
        compile_sharded_loss(model)
    with pytest.raises(FileNotFoundError, match="not a complete torch.distributed.checkpoint"):
        load_checkpoint(tmp_path, model, _optimizer(model))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
