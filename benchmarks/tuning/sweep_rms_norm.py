"""Sweep the RMSNorm kernels' launch configurations: the forward's, and the dW finish's.

    python -m benchmarks.tuning.sweep_rms_norm --hidden 896 8192 --part fwd dw

Forward: for each hidden size (bf16, 16384 rows), every candidate (BLOCK_ROWS, BLOCK_COLS,
NUM_BLOCKS, num_warps) is checked against `chronicals.reference.rms_norm` (at least 99% of outputs
bit-equal, as bench_rms_norm.py requires of the op) and then timed as a CUDA-graph replay, beside
`torch.compile` of the reference and a plain copy of the same bytes in the same run. The
configuration the op picks today is marked.

dW finish: the whole backward op (dx and dW) is timed with each candidate (BLOCK_ROWS, BLOCK_COLS,
num_warps) of `_rms_norm_dw_kernel`, beside the same backward finishing with PyTorch's
`partial.sum(0).to(dtype)` and the backward of a frozen weight (no dW at all). Every candidate's
dW is checked against the exact sum of the partials: no further from it than PyTorch's finish
plus one bf16 ulp (the fp32 summation order differs).

Use it to choose `chronicals/ops/rms_norm.py`'s heuristics; it changes nothing itself.
"""

from __future__ import annotations

import argparse
import functools

import torch

import chronicals.ops.rms_norm as rms
from benchmarks.harness import copy_tbps, time_graph_and_call
from chronicals import reference


def candidates(hidden: int) -> list[tuple[int, int, int, int]]:
    block_cols = min(rms.next_power_of_2(hidden), rms._MAX_BLOCK_COLS)
    out = []
    for rows in (1, 2, 4, 8, 16, 32):
        for warps in (1, 2, 4, 8, 16, 32):
            per_thread = rows * block_cols // (32 * warps)
            if 4 <= per_thread <= 64:
                out.append((rows, block_cols, 1, warps))
    if hidden > 2048:  # column-looped variants: two passes over the row, smaller register tiles
        for cols, warps in ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (2048, 16), (4096, 8),
                            (4096, 16)):
            out.append((1, cols, -(-hidden // cols), warps))
    return out


def sweep_fwd(hidden: int, rows: int, eps: float, ceiling: float) -> None:
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    want = reference.rms_norm(x, w, eps)
    torch.compiler.reset()
    compiled = torch.compile(functools.partial(reference.rms_norm, eps=eps), dynamic=False)
    with torch.no_grad():
        base = time_graph_and_call(lambda: compiled(x, w)).graph_ms
    # The same bytes moved by a plain copy (x read, y written), graph-timed like the kernels: at
    # small sizes no kernel reaches the large-copy ceiling, and this says how close one can get.
    y = torch.empty_like(x)
    copy = time_graph_and_call(lambda: y.copy_(x)).graph_ms
    nbytes = 2 * x.numel() * x.element_size()
    current = rms._fwd_config(rows, hidden, rms._FWD_MAX_BLOCK_COLS)
    print(f"\nhidden {hidden}: torch.compile {1e3 * base:.1f} us; same-size copy "
          f"{1e3 * copy:.1f} us ({nbytes / copy / 1e9:.2f} TB/s, "
          f"{100 * nbytes / copy / 1e9 / ceiling:.0f}% of the {ceiling:.2f} TB/s 2 GiB copy); "
          f"op's config {current}")
    print("| BLOCK_ROWS | BLOCK_COLS | NUM_BLOCKS | warps | us | vs compile | % of ceiling "
          "| equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg in candidates(hidden):
        got = rms._rms_norm_fwd(x, w, eps, False, config=cfg)
        equal = (got == want).double().mean().item()
        if equal < 0.99:
            raise AssertionError(f"config {cfg}: only {equal:.4f} of outputs equal eager's")
        ms = time_graph_and_call(lambda: rms._rms_norm_fwd(x, w, eps, False, config=cfg)).graph_ms
        mark = " (op)" if cfg == current else ""
        print(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[3]}{mark} | {1e3 * ms:.1f} "
              f"| {base / ms:.3f}x | {100 * nbytes / ms / 1e9 / ceiling:.0f}% | {equal:.4f} |")


DW_CANDIDATES = [(rows, cols, warps) for rows in (32, 64, 128, 256) for cols in (8, 16, 32, 64)
              for warps in (2, 4, 8) if 4 <= rows * cols // (32 * warps) <= 64]


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(t.double().abs().clamp_min(1e-30))) - 7)


def sweep_dw(hidden: int, rows: int, eps: float) -> None:
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    partials = []

    def torch_finish(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        partials.append(partial.clone())
        return partial.sum(0).to(dtype)

    def bwd(finish_dw=None, compute_dw: bool = True):
        return rms._rms_norm_bwd(dy, x, w, eps, False, compute_dw, finish_dw=finish_dw)

    want = bwd(torch_finish)[1]
    old = time_graph_and_call(lambda: bwd(torch_finish)).graph_ms
    # The partials' exact sum: a candidate may round differently from PyTorch's sum (another fp32
    # order), but must be no further from it than PyTorch's plus one bf16 ulp.
    truth = partials[0].double().sum(0)
    allowed = (want.double() - truth).abs() + bf16_ulp(truth)
    no_dw = time_graph_and_call(lambda: bwd(compute_dw=False)).graph_ms
    current = rms._dw_config()
    print(f"\nhidden {hidden}: backward with PyTorch's sum + cast {1e3 * old:.1f} us; without dW "
          f"{1e3 * no_dw:.1f} us; op's config {current}")
    print("| BLOCK_ROWS | BLOCK_COLS | warps | us | vs sum + cast |")
    print("|---:|---:|---:|---:|---:|")
    for cfg in DW_CANDIDATES:
        finish = functools.partial(rms._finish_dw, config=cfg)
        excess = ((bwd(finish)[1].double() - truth).abs() - allowed).max().item()
        if excess > 0:
            raise AssertionError(f"config {cfg}: dW further from the exact sum of the "
                                 f"partials than PyTorch's finish + 1 ulp (by {excess:.2e})")
        ms = time_graph_and_call(lambda: bwd(finish)).graph_ms
        mark = " (op)" if cfg == current else ""
        print(f"| {cfg[0]} | {cfg[1]} | {cfg[2]}{mark} | {1e3 * ms:.1f} | {old / ms:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 2048, 4096, 8192])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--part", nargs="+", choices=("fwd", "dw"), default=["fwd", "dw"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_rms_norm: needs a CUDA GPU.")
    ceiling = copy_tbps(2 * 2**30) if "fwd" in args.part else 0.0
    for hidden in args.hidden:
        if "fwd" in args.part:
            sweep_fwd(hidden, args.rows, args.eps, ceiling)
        if "dw" in args.part:
            sweep_dw(hidden, args.rows, args.eps)


if __name__ == "__main__":
    main()
