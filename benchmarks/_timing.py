"""Timing shared by the op benchmarks: GPU time of a step (CUDA-graph replay) and its Python call.

At the benchmarks' sizes a plain Python call of a custom op with autograd costs more CPU time
(dispatch, autograd bookkeeping) than its kernels take on the GPU, so timing the call measures the
CPU. In a training step the CPU runs ahead of the GPU and that overhead is hidden; replaying a CUDA
graph of the step measures what the GPU does. Both are reported.

The step must be capturable: no CPU synchronisation, and no autograd node that outlives a call
(make fresh leaves with `x.detach().requires_grad_()` inside the step and take gradients with
`torch.autograd.grad`). A step that cannot be captured raises; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


def time_graph_and_call(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> Timing:
    """Median ms of a Python call of `fn` and of a CUDA-graph replay of it.

    `triton.testing.do_bench` (warmup and rep in ms, L2 flushed before each repetition) times
    both. Before capture, `fn` runs three times on a side stream, as PyTorch's CUDA-graph docs
    require (lazy initialisation, autotuning and compilation happen outside the graph).
    """
    fn()
    torch.cuda.synchronize()
    call = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
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
