"""Loss curves of several finetune runs on one plot, and how far apart they are.

    python -m benchmarks.compare_runs LABEL=RUN/log.jsonl ... [--plot curves.png] [--last 100]

Issue 17's training-quality check: the default LoRA path (`--lora-precision mixed`) against exact
fp32 adapter math over a 300-step run, with a second exact run of another seed as the measure of
run-to-run noise (`bash benchmarks/gpu_suite.sh lora_curve` makes the three logs). For each pair
of runs it prints the mean absolute difference of their train loss over the last `--last` steps
and of their eval losses; the first run is the one compared with each other run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_losses(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """The run's train loss and eval loss by step, from its log.jsonl."""
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            train[record["step"]] = record["loss"]
        elif record["kind"] == "eval":
            evals[record["step"]] = record["eval_loss"]
    if not train:
        raise ValueError(f"{path}: expected train records (kind 'train'), found none")
    return train, evals


def mean_gap(a: dict[int, float], b: dict[int, float], last: int | None = None) -> float:
    """Mean |a - b| over the steps both runs logged (the last `last` of them when given)."""
    steps = sorted(a.keys() & b.keys())
    if not steps:
        raise ValueError("the two runs logged no step in common")
    steps = steps[-last:] if last else steps
    return statistics.fmean(abs(a[s] - b[s]) for s in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=LOG", help="a label and a log.jsonl")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG here")
    parser.add_argument("--last", type=int, default=100, help="train steps the gap is taken over")
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"expected LABEL=path/to/log.jsonl, got {spec!r}")
        runs[label] = read_losses(Path(path))
    first, *others = runs
    for label, (train, evals) in runs.items():
        final = train[max(train)]
        print(f"{label}: {len(train)} train records, first loss {train[min(train)]:.4f}, "
              f"last {final:.4f}" + (f", last eval {evals[max(evals)]:.4f}" if evals else ""))
    for other in others:
        (train_a, eval_a), (train_b, eval_b) = runs[first], runs[other]
        gap = f"{first} vs {other}: mean |train loss gap| over the last {args.last} steps " \
              f"{mean_gap(train_a, train_b, args.last):.4f}"
        if eval_a.keys() & eval_b.keys():
            gap += f", mean |eval loss gap| {mean_gap(eval_a, eval_b):.4f}"
        print(gap)
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(9, 5), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        for label, (train, evals) in runs.items():
            (line,) = ax.plot(sorted(train), [train[s] for s in sorted(train)], label=label,
                              linewidth=1)
            if evals:
                ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o--",
                        color=line.get_color(), label=f"{label} (eval)")
        ax.set(xlabel="step", ylabel="loss (mean per label token)", title="LoRA loss curves")
        ax.grid(True, alpha=0.4)
        ax.legend()
        figure.savefig(args.plot, format="png", dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
