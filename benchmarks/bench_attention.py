"""Causal attention, forward and forward + backward, every candidate kernel at model shapes.

Run on a CUDA machine: `python -m benchmarks.bench_attention --out DIR` (about 3 minutes on an
H100). Per shape (B x Hq/Hk heads x S x D, bf16, transformers' layout: q/k/v are transposed views
of (B, S, H, D) projections; GQA without repeating K/V where the kernel allows):
- sdpa_cudnn, sdpa_flash: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` pinned to
  one backend with `torch.nn.attention.sdpa_kernel` (what eager transformers runs);
- flex: compiled FlexAttention with a causal (and document) block mask;
- masked_compiled: what a compiled transformers model ran before the attention fusion: sdpa with
  the dense (B, 1, S, S) boolean mask it builds under tracing, compiled with Inductor;
- chronicals: `chronicals::attention` (its kernel named in the row), rows and packed documents;
- chronicals_triton: the same op with its Triton kernel forced (chronicals/ops/attention_triton.py).
Soft-capped shapes (Gemma-2: scores c * tanh(s / c)) have no sdpa candidates: flex gets the cap as
a score_mod, masked_compiled is transformers' eager attention compiled. Shapes with attention sinks
(gpt-oss: a learned logit per head in the softmax's sum, random here) have neither sdpa nor flex:
masked_compiled is gpt-oss's eager attention (cat with the sinks, row max, softmax, last column
dropped) compiled, and the sinks' gradient is checked with the others.
Packed shapes hold documents of log-normal lengths (median ~S/8) in each row and pass position_ids.
Times are medians of CUDA-graph replays with L2 flushed (`harness.time_graph_and_call`; the
packed chronicals rows: Python calls, since the op syncs once to count documents); TFLOP/s
count the causal half of the S x S square (4 * B * Hq * D * S^2 / 2 forward, 2.5x that forward +
backward), for packed rows the sum over documents. Each candidate's output and gradients are
checked against the first candidate's before it is timed (relative norm error <= 1e-2 in bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import time_call, time_graph_and_call, write_json
from chronicals import reference
from chronicals.ops import attention as ops

# name -> (B, Hq, Hk, S, D, packed, softcap, sinks)
SHAPES = {
    "qwen2.5-0.5b": (8, 14, 2, 2048, 64, False, 0.0, False),
    "llama-3.2-1b": (4, 32, 8, 2048, 64, False, 0.0, False),
    "qwen2.5-7b": (2, 28, 4, 4096, 128, False, 0.0, False),
    "qwen2.5-0.5b-packed": (8, 14, 2, 2048, 64, True, 0.0, False),
    "gemma-2-2b-softcap": (4, 8, 4, 2048, 256, False, 50.0, False),
    "gpt-oss-20b-sinks": (2, 64, 8, 2048, 64, False, 0.0, True),
    "long-16k-packed": (1, 14, 2, 16384, 64, True, 0.0, False),
    "long-32k-packed": (1, 14, 2, 32768, 64, True, 0.0, False),
}


def packed_positions(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        pos = []
        while len(pos) < s:
            n = max(1, int(math.exp(torch.randn(1, generator=g).item() * 0.8) * s / 8))
            pos.extend(range(n))
        rows.append(pos[:s])
    return torch.tensor(rows)


def causal_flops(pos: torch.Tensor | None, b: int, hq: int, s: int, d: int) -> float:
    """Forward FLOPs of the visible (causal, same-document) score entries: 4 * Hq * D each."""
    if pos is None:
        pairs = b * s * (s + 1) / 2
    else:
        lengths = []
        for row in pos.tolist():
            n = 0
            for i, p in enumerate(row):
                if i and p != row[i - 1] + 1:
                    lengths.append(n)
                    n = 0
                n += 1
            lengths.append(n)
        pairs = sum(n * (n + 1) / 2 for n in lengths)
    return 4 * hq * d * pairs


def candidates(pos: torch.Tensor | None, s: int, softcap: float, sinks: bool):
    """name -> fn(q, k, v, sink logits or None)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def pinned(backend):
        def run(q, k, v, _sinks):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    out = {}
    if pos is None and not softcap and not sinks:
        out["sdpa_cudnn"] = pinned(SDPBackend.CUDNN_ATTENTION)
        out["sdpa_flash"] = pinned(SDPBackend.FLASH_ATTENTION)
    dev = "cuda"
    if pos is None:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
    else:
        doc = torch.zeros_like(pos)
        doc[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).cumsum(-1)
        doc = doc.to(dev)

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc[b, qi] == doc[b, ki])
    block_mask = create_block_mask(mask_mod, pos.shape[0] if pos is not None else None, None, s,
                                   s, device=dev)
    def cap(score, b, h, qi, ki):
        return softcap * torch.tanh(score / softcap)

    flex = torch.compile(flex_attention)
    if not sinks:
        out["flex"] = lambda q, k, v, _sinks: flex(q, k, v, block_mask=block_mask,
                                                   enable_gqa=True,
                                                   score_mod=cap if softcap else None)
    if s <= 4096:
        dense = reference.attention_mask(None if pos is None else pos.to(dev),
                                         pos.shape[0] if pos is not None else 1, s, 0,
                                         torch.device(dev))

        def eager(q, k, v, sink_logits):  # transformers' eager_attention_forward
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            w = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
            if softcap:
                w = softcap * torch.tanh(w / softcap)
            w = w.masked_fill(~dense, torch.finfo(w.dtype).min)
            if sink_logits is None:
                return torch.softmax(w, -1, dtype=torch.float32).to(q.dtype) @ v
            # gpt-oss's: the sinks as a last column, less the row max, dropped after the softmax
            # (in fp32 here, gpt-oss's in bf16: the reference of the candidates' error check)
            column = sink_logits.reshape(1, -1, 1, 1).expand(*w.shape[:-1], 1)
            w = torch.cat([w, column], dim=-1)
            w = w - w.max(dim=-1, keepdim=True).values
            return torch.softmax(w, -1, dtype=torch.float32)[..., :-1].to(q.dtype) @ v

        out["masked_compiled"] = torch.compile(eager if softcap or sinks else (
            lambda q, k, v, _sinks: F.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                   enable_gqa=True)))
    p = None if pos is None else pos.to(dev)
    cap_arg = softcap or None
    out["chronicals"] = lambda q, k, v, sk: ops.attention(q, k, v, p, softcap=cap_arg, sinks=sk)
    out["chronicals_triton"] = out["chronicals"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        b, hq, hk, s, d, packed, softcap, sinks = SHAPES[name]
        torch.compiler.reset()  # each shape compiles flex afresh, within Dynamo's recompile limit
        pos = packed_positions(b, s) if packed else None
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for h in (hq, hk, hk))
        dout = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        sink = torch.randn(hq, device="cuda", dtype=torch.bfloat16) if sinks else None
        inputs = (q, k, v) if sink is None else (q, k, v, sink)
        flops = causal_flops(pos, b, hq, s, d)
        kernel = ops.kernel(q, packed, 0, softcap, sinks)
        ref = None
        for cand, fn in candidates(pos, s, softcap, sinks).items():
            # The forced kernel must hold for the backward too: both run inside.
            def forced(cand=cand):
                return (ops.forced_kernel("triton") if cand == "chronicals_triton"
                        else contextlib.nullcontext())

            def fwd(fn=fn, forced=forced):
                with forced():
                    return fn(q, k, v, sink)

            def fwd_bwd(fn=fn, forced=forced):
                with forced():
                    leaves = [t.detach().requires_grad_() for t in inputs]
                    o = fn(*leaves[:3], leaves[3] if sink is not None else None)
                    return torch.autograd.grad(o, leaves, dout)

            try:
                got = [fwd(), *fwd_bwd()]
            # A candidate that cannot run this shape is reported, whatever it raised.
            except Exception as exc:  # noqa: BLE001
                rows.append({"shape": name, "candidate": cand, "error": f"{type(exc).__name__}: "
                             f"{str(exc)[:200]}"})
                print(f"{name:22s} {cand:16s} error {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if ref is None:
                ref = got
            err = max(float((a.float() - r.float()).norm() / r.float().norm())
                      for a, r in zip(got, ref))
            if err > 1e-2:
                raise SystemExit(f"{name} {cand}: differs from the first candidate by {err:.3e}")
            if packed and cand == "chronicals" and kernel == "flash-varlen":
                # flash-varlen counts the documents on the host (one sync a call), which a CUDA
                # graph cannot capture: timed as Python calls, the sync's bubble included.
                t_f = time_call(fwd)
                t_fb = time_call(fwd_bwd)
            else:
                t_f = time_graph_and_call(fwd).graph_ms
                t_fb = time_graph_and_call(fwd_bwd).graph_ms
            row = {"shape": name, "candidate": cand + (f" ({kernel})" if cand == "chronicals"
                                                        else ""),
                   "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                   "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_tflops": 3.5 * flops / t_fb / 1e9,
                   "max_err_vs_first": err}
            rows.append(row)
            print(f"{name:22s} {row['candidate']:28s} fwd {t_f:7.3f} ms {row['fwd_tflops']:6.1f} "
                  f"TF/s | fwd+bwd {t_fb:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TF/s | err {err:.1e}",
                  flush=True)
    write_json(out_dir, "bench_attention.json", rows, cudnn=torch.backends.cudnn.version(),
               shapes={n: SHAPES[n] for n in args.shapes.split(",")})


if __name__ == "__main__":
    main()
