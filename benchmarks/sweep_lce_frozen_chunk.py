"""Sweep the logits chunk of linear_cross_entropy's frozen-weight path, against the two-pass path.

    python benchmarks/sweep_lce_frozen_chunk.py [--shapes 0,2]

With a frozen weight (LoRA's LM head) and a scalar loss the op computes d_hidden in its forward
(`_lce_fwd_d_hidden`): per chunk of whole vocab rows, a cuBLAS GEMM writes the logits, a Triton
pass turns them into lse, losses and dlogits in place, and a second GEMM writes d_hidden. This
times it, bf16, as CUDA-graph replays, for several chunk budgets (`_LOGITS_CHUNK_ELEMENTS`), with
its peak extra memory, beside the path it replaces (fused forward, then the backward's recompute
and dh GEMMs, `need_d_weight=False`) and the chunk's parts: the two GEMMs alone over all tokens.
Every budget's d_hidden is checked against the two-pass path's. It changes nothing in the op; it
is how `_LOGITS_CHUNK_ELEMENTS` is picked.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from _timing import time_graph_and_call

import chronicals.ops.linear_cross_entropy as lce

SHAPES = [(16384, 896, 151936), (16384, 2048, 128256), (8192, 4096, 128256), (8192, 2304, 256000)]
BUDGETS = [1 << 25, 1 << 26, 1 << 27, 1 << 28]
_OPTS = (-100, "mean", False, None, 0.0, 0.0)  # ignore_index, reduction, shift, softcap, z, ls


def _two_pass(h, w, labels):
    loss, lse = lce._lce_fwd(h, w, labels, None, *_OPTS)
    d_hidden, _ = lce._lce_bwd(torch.ones_like(loss), h, w, labels, lse, None, *_OPTS, True,
                               False)
    return loss, d_hidden


def _one_pass(h, w, labels):
    loss, _, d_hidden = lce._lce_fwd_d_hidden(h, w, labels, None, *_OPTS)
    return loss, d_hidden


def _gemm_ms(h, w) -> tuple[float, float]:
    """cuBLAS logits = h @ w.T and d_hidden = logits @ w over the whole batch (logits stored)."""
    logits = torch.empty(h.shape[0], w.shape[0], device="cuda", dtype=torch.bfloat16)
    d_hidden = torch.empty_like(h)
    return (time_graph_and_call(lambda: torch.mm(h, w.T, out=logits)).graph_ms,
            time_graph_and_call(lambda: torch.mm(logits, w, out=d_hidden)).graph_ms)


def _peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    kept = sum(t.numel() * t.element_size() for t in out)
    return (torch.cuda.max_memory_allocated() - before - kept) / 2**30


def sweep(N: int, H: int, V: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[torch.rand(N, device="cuda") < 0.1] = -100
    gemm1, gemm2 = _gemm_ms(h, w)
    logits_gib = N * V * 2 / 2**30
    want_loss, want = _two_pass(h, w, labels)
    two = time_graph_and_call(lambda: _two_pass(h, w, labels)).graph_ms
    print(f"\n{N}x{H}x{V} bf16: cuBLAS logits GEMM {gemm1:.3f} ms, d_hidden GEMM {gemm2:.3f} ms "
          f"(whole batch); two-pass path {two:.3f} ms, "
          f"{_peak_extra_gib(lambda: _two_pass(h, w, labels)):.3f} GiB extra")
    print("| chunk elements | rows | ms | vs two-pass | extra GiB | % of logits | "
          "max d_hidden diff / max | loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    scale = want.abs().max().item()
    for budget in BUDGETS:
        with mock.patch.object(lce, "_LOGITS_CHUNK_ELEMENTS", budget):
            loss, got = _one_pass(h, w, labels)
            diff = (got.float() - want.float()).abs().max().item() / scale
            ms = time_graph_and_call(lambda: _one_pass(h, w, labels)).graph_ms
            extra = _peak_extra_gib(lambda: _one_pass(h, w, labels))
        rows = max(1, min(N, budget // V))
        print(f"| {budget} | {rows} | {ms:.3f} | {two / ms:.2f}x | {extra:.3f} | "
              f"{100 * extra / logits_gib:.2f}% | {diff:.2e} | "
              f"{abs(loss.item() - want_loss.item()):.2e} |")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="0,1,2,3", help=f"indices into {SHAPES}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_lce_frozen_chunk: needs a CUDA GPU.")
    for index in map(int, args.shapes.split(",")):
        sweep(*SHAPES[index])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
