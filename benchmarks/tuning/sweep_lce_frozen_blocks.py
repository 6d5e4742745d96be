"""Sweep the logits blocks of linear_cross_entropy's frozen-weight path, against the two-pass path.

    python -m benchmarks.tuning.sweep_lce_frozen_blocks [--shapes 0,2]

With a frozen weight (LoRA's LM head) and a scalar loss the op computes d_hidden in its forward
(`_lce_fwd_d_hidden`): per chunk of tokens, over blocks of vocab columns, a cuBLAS GEMM writes the
block's logits, a Triton pass turns them into exp(l - running max) and a second GEMM adds them
times W into an fp32 accumulator [tokens, H]. This times it, bf16, as CUDA-graph replays and as
Python calls, for several memory budgets (block and accumulator together) and token counts per
chunk, with its peak extra memory, beside the path it replaces for softcap + label smoothing
(fused forward, then the backward's recompute and dh GEMMs, `need_d_weight=False`) and the two
GEMMs alone over all tokens. Every configuration's d_hidden and loss are checked against the
two-pass path's. It changes nothing in the op; it is how `_frozen_blocks`'s constants are picked
(`default` rows: what it chooses).
"""

from __future__ import annotations

import torch

import chronicals.ops.linear_cross_entropy as lce
import chronicals.ops.linear_cross_entropy_frozen as frozen_head
from benchmarks.harness import sweep_shapes, time_graph_and_call
from chronicals.ops._lce_common import LossOptions

SHAPES = [(16384, 896, 151936), (16384, 2048, 128256), (8192, 4096, 128256), (8192, 2304, 256000)]
BUDGETS_MIB = [16, 32, 48]
ROWS = [512, 1024, 2048, 4096]
_OPTS = LossOptions()  # the defaults: mean over the labels that are not -100


def _two_pass(h, w, labels):
    loss, lse = lce._lce_fwd(h, w, labels, None, _OPTS)
    d_hidden, _ = lce._lce_bwd(torch.ones_like(loss), h, w, labels, lse, None, _OPTS, True,
                               False)
    return loss, d_hidden


def _one_pass(h, w, labels, blocks=None):
    loss, _, d_hidden = frozen_head._lce_fwd_d_hidden(h, w, labels, None, _OPTS, blocks=blocks)
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


def _configs(N: int, H: int, V: int):
    """(budget bytes, rows) pairs that fit a 256-column block, after (None, None): the default."""
    yield None, None
    for mib in BUDGETS_MIB:
        budget = mib << 20
        for rows in ROWS:
            if rows <= N and (budget - 4 * rows * H) // (2 * rows) >= 256:
                yield budget, rows


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
    print("| block + acc MiB | rows x cols | graph ms | call ms | vs two-pass | extra GiB | "
          "% of logits | max d_hidden diff / max | loss diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    scale = want.abs().max().item()
    for budget, rows in _configs(N, H, V):
        blocks = frozen_head._frozen_blocks(N, H, V, 2)
        if rows is not None:
            blocks = (rows, frozen_head._frozen_cols(budget, rows, H, V, 2))
        loss, got = _one_pass(h, w, labels, blocks)
        diff = (got.float() - want.float()).abs().max().item() / scale
        timing = time_graph_and_call(lambda: _one_pass(h, w, labels, blocks))
        extra = _peak_extra_gib(lambda: _one_pass(h, w, labels, blocks))
        used = 4 * blocks[0] * H + 2 * blocks[0] * blocks[1]
        label = f"{blocks[0]} x {blocks[1]}" + (" (default)" if rows is None else "")
        ms = timing.graph_ms
        print(f"| {used / 2**20:.1f} | {label} | {ms:.3f} | {timing.call_ms:.3f} | "
              f"{two / ms:.2f}x | {extra:.3f} | "
              f"{100 * extra / logits_gib:.2f}% | {diff:.2e} | "
              f"{abs(loss.item() - want_loss.item()):.2e} |", flush=True)
        torch.cuda.empty_cache()


def main() -> None:
    sweep_shapes(__doc__, SHAPES, sweep, default="0,1,2,3")


if __name__ == "__main__":
    main()
