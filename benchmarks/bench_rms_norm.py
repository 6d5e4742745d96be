"""Benchmark chronicals::rms_norm against eager PyTorch and plain torch.compile (Inductor).

    python -m benchmarks.bench_rms_norm --out results/

Variants, all on the same inputs (bf16 x and weight, Llama-style cast order):
  chronicals  `chronicals.ops.rms_norm.rms_norm` (Triton forward and backward kernels)
  eager       `chronicals.reference.rms_norm`, the arithmetic of HF's `LlamaRMSNorm` (checked
              against the transformers module below before timing)
  compile     `torch.compile(chronicals.reference.rms_norm)`, default Inductor, static shapes

Modes: forward (no autograd), and forward+backward: fresh leaves x and w, the forward, and
`torch.autograd.grad` to dx and dW fed by a fixed dy.

Each step is timed two ways (`benchmarks/harness.py`), both medians of `triton.testing.do_bench`
(which flushes L2 between runs): a CUDA-graph replay of the step ("ms (graph)", JSON "ms_graph"),
the GPU time, as in a training step where the CPU runs ahead of the GPU; and a plain Python call
("ms (Python call)", JSON "ms_call"), which at these sizes is mostly CPU dispatch (custom-op and
autograd overhead), not kernel time. Bandwidth, % of copy and "vs compile" use the graph time.
Bandwidth counts the bytes a fused implementation must move: forward reads x and w and writes y;
forward+backward adds reading dy, x and w and writing dx and dW. The ceiling is a device-to-device
copy of a large tensor measured in the same run (bytes read + written). Every variant's output and
gradients are checked against eager's before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from benchmarks.harness import copy_tbps, relative_max_error, time_graph_and_call, write_json
from chronicals import reference
from chronicals.ops.rms_norm import rms_norm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 2048, 4096, 8192])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy probe")
    return parser.parse_args(argv)


def check_against_hf(x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
    """The eager variant is HF's LlamaRMSNorm arithmetic: same output, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=w.dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        expected = module(x)
    got = reference.rms_norm(x, w, eps)
    if not torch.equal(got, expected):
        raise AssertionError("chronicals.reference.rms_norm differs from HF LlamaRMSNorm")


def check_variant(
    name: str, fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, eps: float
) -> None:
    """Refuse to time a variant whose output or gradients disagree with eager's."""
    x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x_, w_)
    dx, dw = torch.autograd.grad(y, (x_, w_), dy)
    ex, ew = x.detach().requires_grad_(), w.detach().requires_grad_()
    ey = reference.rms_norm(ex, ew, eps)
    edx, edw = torch.autograd.grad(ey, (ex, ew), dy)
    if y.dtype != ey.dtype or y.shape != ey.shape:
        raise AssertionError(f"{name}: output {y.dtype} {tuple(y.shape)} != eager's")
    if name == "chronicals":
        # Same rounding as HF; only a last-bit rstd difference may flip a rare element. (Inductor
        # drops the intermediate cast by default, so plain compile differs in ~1/4 of them.)
        same = (y == ey).double().mean().item()
        if same < 0.99:
            raise AssertionError(f"{name}: only {same:.4f} of forward outputs equal eager's")
    # Eager rounds intermediate products in bf16, so compare at bf16 resolution.
    for got, want, label in ((y, ey, "y"), (dx, edx, "dx"), (dw, edw, "dw")):
        err = relative_max_error(got, want)
        if not err < 2e-2:
            raise AssertionError(f"{name}: {label} differs from eager by {err:.3e} (relative max)")


def bench_case(
    args: argparse.Namespace, hidden: int, variants: dict, copy_tbps: float
) -> list[dict]:
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.rows, hidden, device="cuda", dtype=dtype)
    w = (1.0 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    dy = torch.randn_like(x)
    check_against_hf(x, w, args.eps)
    for name, fn in variants.items():
        check_variant(name, fn, x, w, dy, args.eps)

    elem = x.element_size()
    fwd_bytes = 2 * x.numel() * elem + w.numel() * elem
    bwd_bytes = 3 * x.numel() * elem + 2 * w.numel() * elem
    results = []
    for name, fn in variants.items():

        def fwd_bwd(fn=fn):
            # Fresh leaves per call: no autograd node outlives a call (CUDA-graph capture needs that).
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(fn(xg, wg), (xg, wg), dy)

        with torch.no_grad():
            fwd = time_graph_and_call(lambda fn=fn: fn(x, w))
        fwd_bwd_t = time_graph_and_call(fwd_bwd)
        for mode, times, nbytes in (
            ("forward", fwd, fwd_bytes), ("forward+backward", fwd_bwd_t, fwd_bytes + bwd_bytes)
        ):
            tbps = nbytes / (times.graph_ms * 1e-3) / 1e12
            results.append({
                "rows": args.rows, "hidden": hidden, "dtype": args.dtype, "mode": mode,
                "variant": name, "ms_graph": times.graph_ms, "ms_call": times.call_ms,
                "bytes": nbytes, "tbps": tbps, "fraction_of_copy": tbps / copy_tbps,
            })
    return results


def print_table(results: list[dict], copy_tbps: float) -> None:
    print(f"\ncopy ceiling: {copy_tbps:.2f} TB/s (device-to-device copy, read + write)\n")
    print("| hidden | mode | variant | ms (graph) | TB/s | % of copy | vs compile "
          "| ms (Python call) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    compiled = {
        (r["hidden"], r["mode"]): r["ms_graph"] for r in results if r["variant"] == "compile"
    }
    for r in results:
        speedup = compiled[(r["hidden"], r["mode"])] / r["ms_graph"]
        print(
            f"| {r['hidden']} | {r['mode']} | {r['variant']} | {r['ms_graph']:.4f} "
            f"| {r['tbps']:.2f} | {100 * r['fraction_of_copy']:.0f}% | {speedup:.2f}x "
            f"| {r['ms_call']:.4f} |"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_rms_norm: needs a CUDA GPU (times Triton kernels on the device).")
    torch.manual_seed(0)
    eager = functools.partial(reference.rms_norm, eps=args.eps)
    ceiling = copy_tbps(int(args.copy_gib * 2**30))
    results = []
    for hidden in args.hidden:
        # Dynamo's recompile limit (8) counts per code object across torch.compile wrappers; each
        # size compiles twice (grad and no-grad), so start every size from a clean cache rather than
        # let a later size fall back to eager.
        torch.compiler.reset()
        variants = {
            "chronicals": functools.partial(rms_norm, eps=args.eps),
            "eager": eager,
            # A fresh static-shape compile per size, so no variant times a dynamic-shape kernel.
            "compile": torch.compile(eager, dynamic=False),
        }
        results += bench_case(args, hidden, variants, ceiling)
    print_table(results, ceiling)
    path = write_json(
        args.out, "bench_rms_norm.json", results, copy_tbps=ceiling,
        timing="triton.testing.do_bench medians (warmup 25 ms, rep 200 ms, L2 flushed): "
               "ms_graph = CUDA-graph replay of the step (GPU time), ms_call = Python call",
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
