"""What every benchmark shares: timing, the correctness checks run before timing, and the JSON
written with the run's setup.

Timing. At the benchmarks' sizes a plain Python call of a custom op with autograd costs more CPU
time (dispatch, autograd bookkeeping) than its kernels take on the GPU, so timing the call
measures the CPU. In a training step the CPU runs ahead of the GPU and that overhead is hidden;
replaying a CUDA graph of the step measures what the GPU does. `time_graph_and_call` reports both.
The step must be capturable: no CPU synchronisation, and no autograd node that outlives a call
(make fresh leaves with `x.detach().requires_grad_()` inside the step and take gradients with
`torch.autograd.grad`). A step that cannot be captured raises; nothing is skipped. Steps too large
or too stateful to capture (a training step, a whole model) are timed with CUDA events after
warm-up: `cuda_ms`, `median_cuda_ms`.

Correctness. A result is timed only after it matches eager PyTorch: `check_numerics` (elementwise,
against a higher-precision truth: no worse than eager plus one rounding) or `relative_max_error`.

JSON. `write_json` writes {"meta": the device and library versions plus the run's settings,
"results": ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from triton.testing import do_bench


class Timing(NamedTuple):
    graph_ms: float  # median of a CUDA-graph replay of the step: GPU time
    call_ms: float  # median of a plain Python call of the step: mostly CPU dispatch when small


def copy_tbps(nbytes: int, device: torch.device | str = "cuda") -> float:
    """TB/s of a device-to-device copy of `nbytes` of random bf16, counting bytes read plus
    written: the bandwidth ceiling the op benchmarks compare against, measured in their run."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def time_call(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> float:
    """Median ms of a Python call of `fn` (`triton.testing.do_bench`: warmup and rep in ms, L2
    flushed before each repetition), after one untimed call (compilation, autotuning)."""
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def time_graph_and_call(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> Timing:
    """Median ms of a Python call of `fn` and of a CUDA-graph replay of it, both `time_call`'s
    way. Before capture, `fn` runs three times on a side stream, as PyTorch's CUDA-graph docs
    require (lazy initialisation, autotuning and compilation happen outside the graph)."""
    call = time_call(fn, warmup, rep)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay = do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    return Timing(graph_ms=replay, call_ms=call)


def cuda_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """ms of one call of `fn` between two CUDA events on the current stream, and its result."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), result


def median_cuda_ms(fn: Callable[[], Any], warmup: int = 2, reps: int = 10) -> float:
    """Median `cuda_ms` of `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(cuda_ms(fn)[0] for _ in range(reps))


def check_numerics(
    label: str, got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
    rounding: float = 2.0**-8,
) -> None:
    """The numerics rule of the tests, elementwise: `got` no further from `truth` (a
    higher-precision computation) than eager's result plus one rounding of the output dtype
    (`rounding` relative: half a bf16 ulp, as GPU stores round to nearest), and never NaN.
    Raises AssertionError: the result is wrong, so it is not timed."""
    if got.shape != truth.shape or torch.isnan(got).any():
        raise AssertionError(f"{label}: shape {tuple(got.shape)} or NaN; expected "
                             f"{tuple(truth.shape)}, finite; not timing it")
    truth = truth.double()
    err = (got.double() - truth).abs()
    allowed = (eager.double() - truth).abs() + rounding * truth.abs() + 1e-6
    if not bool((err <= allowed).all()):
        bad, worst = int((err > allowed).sum()), float((err - allowed).max())
        raise AssertionError(f"{label}: {bad} elements outside eager's error + one rounding "
                             f"(the worst by {worst:.3e}); not timing it")


def relative_max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    scale = want.float().abs().max().clamp(min=1e-30)
    return float((got.float() - want.float()).abs().max() / scale)


def environment() -> dict[str, Any]:
    """The device and library versions a result was measured with."""
    import transformers
    import triton

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_json(directory: Path | str, name: str, results: Any, **setup: Any) -> Path:
    """`directory`/`name`: {"meta": `environment()` and `setup`, "results": `results`}."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**environment(), **setup}, "results": results},
                               indent=1))
    return path


def sweep_shapes(
    doc: str, shapes: Sequence[tuple[int, ...]], sweep: Callable[..., None], default: str
) -> None:
    """The command line of a sweep over problem shapes: `--shapes` picks indices into `shapes`
    (`default`: comma-separated), each run by `sweep(*shape)` on a CUDA GPU; `doc`'s first
    paragraph is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shapes", default=default, help=f"indices into {list(shapes)}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog}: needs a CUDA GPU.")
    for index in map(int, args.shapes.split(",")):
        sweep(*shapes[index])
        torch.cuda.empty_cache()
