"""Compile time of a tiny model's loss by depth: regional (the default) against whole-graph.

    python -m benchmarks.bench_compile_time [--layers 2,24] [--device cpu|cuda] [--repeats 2]

For each depth and mode, a fresh tiny Llama (tests/models.py's shape) gets `compile_loss` and runs
one training step twice; the compile time is the first step's time less the second's. One
1-layer model is compiled first so that the one-time costs of the process (imports, pattern
registration) are paid before any timing. On the CPU the ops run their PyTorch references
(TRITON_INTERPRET=0), so the interpreter's run time does not hide the compile. Issue 18's CPU
target: 24 layers cost at most 2x 2 layers.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch

from chronicals.train import compile_loss
from tests.models import tiny_batch, tiny_model


def compile_seconds(layers: int, regional: bool, device: str) -> float:
    model = tiny_model("llama", num_hidden_layers=layers).to(device)
    loss_fn = compile_loss(model, regional=regional, options={"report": "none"})
    ids, labels = tiny_batch()
    batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
    times = []
    for _ in range(2):
        start = time.perf_counter()
        loss_fn(batch, torch.tensor(20, device=device)).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0] - times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,24")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    depths = [int(n) for n in args.layers.split(",")]
    compile_seconds(1, True, args.device)
    for regional in (True, False):
        best = {n: min(compile_seconds(n, regional, args.device) for _ in range(args.repeats))
                for n in depths}
        row = ", ".join(f"{n} layers {s:.2f} s" for n, s in best.items())
        ratio = best[depths[-1]] / best[depths[0]]
        print(f"{'regional' if regional else 'whole'}: {row}; "
              f"{depths[-1]}/{depths[0]} = {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
