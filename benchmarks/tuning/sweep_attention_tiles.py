"""Tiles of Chronicals' Triton attention kernels (chronicals/ops/attention_triton.py `_tiles`),
measured: the forward, dQ and dK/dV kernels each over (rows, cols, warps, stages), the other two
kernels held at their current tiles, at model shapes (bf16, transformers' layout, causal, GQA).

Run on a CUDA machine: `python -m benchmarks.tuning.sweep_attention_tiles [--out DIR]` (one
Triton compile per config; 20 valid configs per kernel and shape at head dims <= 128, 12 above;
the Qwen2.5-7B and Gemma-2 shapes took about 4 minutes on an H100, 2026-12-08). Times
are `triton.testing.do_bench` medians (L2 flushed) of the kernel wrappers `forward` and
`backward` called directly (no autograd, no op dispatch). Every config's output is checked against
the current tiles' before it is timed; a config the device cannot run (shared memory, registers)
is reported as such. The printed best per kernel and head dim is what
`_tiles` should hold.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.bench_attention import SHAPES, packed_positions
from benchmarks.harness import write_json
from chronicals.ops import attention as ops
from chronicals.ops import attention_triton as kern


def configs(d: int):
    rows = (64, 128) if d <= 128 else (32, 64)
    cols = (32, 64, 128) if d <= 128 else (32, 64)
    for r, c, w, st in itertools.product(rows, cols, (4, 8), (2, 3) if d <= 128 else (1, 2)):
        if r % c == 0:  # the kernels' constraint (`_Tiles.checked`)
            yield kern._Tiles(r, c, w, st)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b,gemma-2-2b-softcap",
                        help="comma-separated names of benchmarks/bench_attention.py's SHAPES")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        b, hq, hk, s, d, packed, softcap, _sinks = SHAPES[name]
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16
                                     ).transpose(1, 2) for h in (hq, hk, hk, hq))
        spans = ops.document_spans(packed_positions(b, s).cuda(), b) if packed else None
        scale = d ** -0.5
        current = kern._tiles(q)

        def fwd(tiles=None):
            return kern.forward(q, k, v, spans, scale, 0, softcap, tiles)

        out, lse = fwd()

        def bwd(tiles=None):
            return kern.backward(dout, q, k, v, out, lse, spans, scale, 0, softcap, tiles)[:3]

        grads = list(bwd())
        ref = {0: [out], 1: grads, 2: grads}
        for which in range(3):
            for tiles in configs(d):
                chosen = list(current)
                chosen[which] = tiles

                def call(chosen=tuple(chosen), which=which):
                    return fwd(chosen[0])[:1] if which == 0 else bwd(chosen[1:])

                try:
                    got = call()
                    err = max(float((a.float() - r.float()).norm() / r.float().norm())
                              for a, r in zip(got, ref[which]))
                    ms = do_bench(call, warmup=10, rep=50, return_mode="median")
                # A config the device cannot run is reported, whatever Triton raised.
                except Exception as exc:  # noqa: BLE001
                    print(f"{name:20s} {('fwd', 'dq', 'dkdv')[which]:5s} {tiles} "
                          f"{type(exc).__name__}")
                    continue
                if err > 1e-2:
                    raise SystemExit(f"{name} {tiles}: differs from the current tiles by {err}")
                row = {"shape": name, "kernel": ("fwd", "dq", "dkdv")[which],
                       "tiles": list(tiles), "ms": ms, "current": tiles == current[which]}
                rows.append(row)
                print(f"{name:20s} {row['kernel']:5s} {tiles} {ms:.3f} ms"
                      f"{'  (current)' if row['current'] else ''}", flush=True)
        for kernel in ("fwd", "dq", "dkdv"):
            mine = [r for r in rows if r["shape"] == name and r["kernel"] == kernel]
            best = min(mine, key=lambda r: r["ms"])
            cur = next((r for r in mine if r["current"]), None)
            print(f"BEST {name:20s} {kernel:5s} {best['tiles']} {best['ms']:.3f} ms; current "
                  f"{cur['ms'] if cur else float('nan'):.3f} ms", flush=True)
    if args.out:
        write_json(Path(args.out), "sweep_attention_tiles.json", rows)


if __name__ == "__main__":
    main()
