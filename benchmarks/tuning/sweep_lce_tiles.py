"""Sweep the linear-cross-entropy kernels' tile configuration against a cuBLAS GEMM of the size.

    python -m benchmarks.tuning.sweep_lce_tiles

The forward is a GEMM (tokens x H) @ (H x vocab) whose output tiles are reduced on the fly (online
log-sum-exp, label logit) instead of stored; the backward's dlogits kernel shares its main loop and
tiles, then cuBLAS forms dW and dh. This times, as CUDA-graph replays, bf16: cuBLAS `h @ w.T` into
a preallocated output (one GEMM, logits stored), and the op's forward and forward + backward under
candidate tile configurations (fwd + bwd is four GEMM-sized passes, so 4x the GEMM is its floor).
Every configuration's lse is checked against the default's. It changes nothing in the op; it is
how `_tiles` is picked.
"""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

import chronicals.ops.linear_cross_entropy as lce
from benchmarks.harness import sweep_shapes, time_graph_and_call
from chronicals.ops._lce_common import LossOptions

SHAPES = [(16384, 896, 151936), (8192, 4096, 128256)]
# (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages)
CONFIGS = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),  # asks 262 KB of shared memory: does not fit on an H200 (227 KB)
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
]


def _fwd(h, w, labels, tiles=None):
    return lce._lce_fwd(h, w, labels, None, LossOptions(), tiles=tiles)


def _fwd_bwd(h, w, labels, tiles=None):
    loss, lse = _fwd(h, w, labels, tiles)
    return lce._lce_bwd(torch.ones_like(loss), h, w, labels, lse, None, LossOptions(), True, True,
                        tiles=tiles)


def sweep(N: int, H: int, V: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    logits = torch.empty(N, V, device="cuda", dtype=torch.bfloat16)
    gemm = time_graph_and_call(lambda: torch.mm(h, w.T, out=logits)).graph_ms
    tflop = 2 * N * H * V / 1e12
    print(f"\n{N}x{H}x{V}: cuBLAS GEMM {gemm:.3f} ms ({tflop / gemm * 1e3:.0f} TFLOP/s)")
    print("| config | fwd ms | fwd / GEMM | fwd+bwd ms | fwd+bwd / GEMM | max abs lse diff |")
    print("|---|---:|---:|---:|---:|---:|")
    _, want = _fwd(h, w, labels)
    for cfg in CONFIGS:
        tiles = lce._Tiles(*cfg)
        try:
            diff = (_fwd(h, w, labels, tiles)[1] - want).abs().max().item()
        except OutOfResources as err:
            print(f"| {cfg} | does not fit: {err} | | | | |")
            continue
        if not diff < 1e-2:
            raise AssertionError(f"{cfg}: lse differs from the default config's by {diff:.3e}")
        fwd = time_graph_and_call(lambda: _fwd(h, w, labels, tiles)).graph_ms
        both = time_graph_and_call(lambda: _fwd_bwd(h, w, labels, tiles)).graph_ms
        print(f"| {cfg} | {fwd:.3f} | {fwd / gemm:.2f} | {both:.3f} | {both / gemm:.2f} "
              f"| {diff:.2e} |")


def main() -> None:
    sweep_shapes(__doc__, SHAPES, sweep, default="0,1")


if __name__ == "__main__":
    main()
