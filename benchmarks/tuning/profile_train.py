"""Where a training step's GPU time goes, per stack: kernel time summed by kernel name.

    python -m benchmarks.tuning.profile_train --out DIR --stacks hf_compile,chronicals \
        --modes lora --lora-dtype model --steps 3 [--top 30]

Takes `bench_train.py`'s options and builds the same model, batches and step (its `build`,
`make_batches`, `compile_loss` and `train_step`), runs the warm-up steps, then profiles `--steps`
steps with `torch.profiler` (CUDA activity only) and prints, per stack, the total kernel time per
step and the `--top` kernels by time, each with its share. Kernels are grouped by name with
digits removed, so Inductor's numbered fused kernels of one kind add up. It times nothing for a
target: `bench_train.py` is the benchmark; this says where a gap between stacks lies.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import torch

from benchmarks.bench_train import STACKS, build, chronicals_options, make_batches, parse_args
from chronicals.train import compile_loss, train_step


def _args():
    return parse_args(
        __doc__.split("\n\n")[0],
        lambda p: p.add_argument("--top", type=int, default=30,
                                 help="kernels listed per stack (default 30)"),
    )


def _kernel_times(prof) -> dict[str, float]:
    """Kernel name (digits removed) -> total CUDA microseconds."""
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[re.sub(r"\d+", "N", event.name)[:110]] += event.device_time
    return totals


def profile(stack: str, mode: str, args: argparse.Namespace) -> str:
    torch.compiler.reset()
    device = torch.device("cuda")
    batches = make_batches(args, device)
    model, optimizer = build(stack, mode, args, device, torch.bfloat16)
    loss_fn = compile_loss(model, backend=STACKS[stack],
                           options=chronicals_options(stack, args, "none"))
    for i in range(args.warmup):
        train_step(loss_fn, optimizer, [batches[i % len(batches)]])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            train_step(loss_fn, optimizer, [batches[i % len(batches)]])
        torch.cuda.synchronize()
    totals = _kernel_times(prof)
    step_ms = sum(totals.values()) / 1e3 / args.steps
    lines = [f"{stack} / {mode}: {step_ms:.2f} ms of kernels per step",
             "| kernel | ms / step | share |", "|---|---:|---:|"]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        ms = us / 1e3 / args.steps
        lines.append(f"| `{name}` | {ms:.3f} | {100 * ms / step_ms:.1f}% |")
    del model, optimizer, loss_fn
    torch.cuda.empty_cache()
    return "\n".join(lines)


def main() -> None:
    args = _args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_train: needs a CUDA GPU.")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    os.makedirs(args.out, exist_ok=True)
    for mode in args.modes:
        for stack in args.stacks:
            text = profile(stack, mode, args)
            print(text + "\n", flush=True)
            with open(os.path.join(args.out, f"profile_{stack}_{mode}.txt"), "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
