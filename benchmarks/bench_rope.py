"""Benchmark chronicals::rope against HF's rotary math, eager and under plain torch.compile.

    python -m benchmarks.bench_rope --out results/   (needs a CUDA GPU)
    python -m benchmarks.bench_rope --out results/ --layout interleaved

For each head config (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B) at bf16 and B x S = 8 x 2048
tokens, q and k arrive as HF makes them: the q/k projections' outputs (B, S, H * D), viewed as
(B, S, H, D) and transposed to (B, H, S, D) (non-contiguous). cos/sin are (B, S, D), built from
position ids the way HF's rotary embedding builds them. Variants:

- chronicals: `chronicals.ops.rope.rope` (one kernel for q and k; backward one more);
- eager: `transformers.models.llama.modeling_llama.apply_rotary_pos_emb`, the code the fusion
  replaces;
- compile: `torch.compile(apply_rotary_pos_emb, fullgraph=True)` (plain Inductor).

`--layout interleaved` times the GPT-J layout instead: cos/sin interleaved
(`repeat_interleave(freqs, 2, -1)`, as Cohere builds them), BLT's `apply_rotary_pos_emb` (pairs
(2i, 2i + 1), no casts) as eager, and `rope(..., layout="interleaved")`; results go to
rope-interleaved.json.

Modes: forward (no autograd), and forward + backward: the timed step starts from the projection
outputs (so the view/transpose and any copy the gradient layout forces into the projection's
backward are counted) and ends with the gradients w.r.t. them, fed by upstream gradients laid out
like each variant's outputs (as attention's backward returns them).

Times are medians of `triton.testing.do_bench` (L2 flushed before each repetition) of a CUDA
graph replay of the step: GPU time, as in a training step where the CPU runs ahead of the GPU.
The time of the plain Python call is reported too ("ms_call"); at these sizes it is mostly CPU
dispatch (custom-op and autograd overhead), not kernel time. Bandwidth counts the fewest bytes
the op must move: read q, k, cos, sin and write q', k' (the backward moves the same again),
against a device copy of that many bytes measured in the same run. Each variant's outputs and
gradients are checked against an fp32 truth before it is timed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.harness import check_numerics, copy_tbps, time_graph_and_call, write_json

HEAD_CONFIGS = {
    # name: (heads_q, heads_k, head_dim)
    "qwen2.5-0.5b": (14, 2, 64),
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
}
BF16_ULP = 2.0**-7


def _cos_sin(batch: int, seq: int, head_dim: int, device: str, layout: str
             ) -> tuple[torch.Tensor, ...]:
    """HF's default rotary embedding: cat(freqs, freqs) of positions * inv_freq (interleaved:
    each pair's angle twice in a row), cast to bf16."""
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    freqs = positions[..., None].float() * inv_freq
    if layout == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def _projections(batch: int, seq: int, heads_q: int, heads_k: int, head_dim: int, device: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj / k_proj outputs, (B, S, H * D)."""
    q_lin = torch.randn(batch, seq, heads_q * head_dim, device=device, dtype=torch.bfloat16)
    k_lin = torch.randn(batch, seq, heads_k * head_dim, device=device, dtype=torch.bfloat16)
    return q_lin, k_lin


def _hf_view(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, seq, _ = x.shape
    return x.view(batch, seq, -1, head_dim).transpose(1, 2)


def _run_variant(fn, head_dim, q_lin, k_lin, cos, sin, grads=None):
    """Forward, or forward + backward to the projection outputs when grads are given."""
    if grads is None:
        return fn(_hf_view(q_lin, head_dim), _hf_view(k_lin, head_dim), cos, sin)
    # Fresh leaves per call: no autograd node outlives a call (CUDA-graph capture needs that).
    q_in, k_in = (x.detach().requires_grad_() for x in (q_lin, k_lin))
    out = fn(_hf_view(q_in, head_dim), _hf_view(k_in, head_dim), cos, sin)
    return torch.autograd.grad(out, (q_in, k_in), grads)


def _poison_allocator(nbytes: int) -> None:
    """Leave NaNs in freed cached memory so an output the kernel fails to write shows as NaN."""
    torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(math.nan)


def bench_config(name: str, heads_q: int, heads_k: int, head_dim: int, batch: int, seq: int,
                 rope, hf_rope, layout: str) -> list[dict]:
    device = "cuda"
    # Dynamo's recompile limit (8) counts per code object across torch.compile wrappers; grad
    # mode and input layouts recompile a few times per config.
    torch.compiler.reset()
    variants = {
        "chronicals": rope,
        "eager": hf_rope,
        "compile": torch.compile(hf_rope, fullgraph=True, dynamic=False),
    }
    cos, sin = _cos_sin(batch, seq, head_dim, device, layout)
    elem = 2  # bf16
    tokens = batch * seq
    read = elem * tokens * (heads_q + heads_k) * head_dim + 2 * cos.numel() * elem
    write = elem * tokens * (heads_q + heads_k) * head_dim
    fwd_bytes = read + write

    # Copy ceiling for this many bytes, in this run.
    copy_ceiling = copy_tbps(read, device)

    # Truth: fp32 reference on the same bf16 values.
    q_lin, k_lin = _projections(batch, seq, heads_q, heads_k, head_dim, device)
    q32, k32 = (x.detach().float().requires_grad_() for x in (q_lin, k_lin))
    truth_out = variants["eager"](_hf_view(q32, head_dim), _hf_view(k32, head_dim), cos.float(),
                                  sin.float())
    # Upstream gradients in bf16; the truth sees the same (upcast) values.
    gq = torch.randn(truth_out[0].shape, device=device).to(torch.bfloat16)
    gk = torch.randn(truth_out[1].shape, device=device).to(torch.bfloat16)
    truth_grads = torch.autograd.grad(truth_out, (q32, k32), (gq.float(), gk.float()))
    truth = [t.detach() for t in truth_out] + list(truth_grads)
    eager_out = _run_variant(variants["eager"], head_dim, q_lin, k_lin, cos, sin)
    eager_grads = _run_variant(variants["eager"], head_dim, q_lin, k_lin, cos, sin, (gq, gk))
    eager = [t.detach() for t in eager_out] + list(eager_grads)

    rows = []
    for variant, fn in variants.items():
        _poison_allocator(4 * fwd_bytes)
        out = _run_variant(fn, head_dim, q_lin, k_lin, cos, sin)
        # Upstream gradients laid out like this variant's outputs (empty_like keeps strides).
        grads = tuple(torch.empty_like(o).copy_(g) for o, g in zip(out, (gq, gk)))
        _poison_allocator(4 * fwd_bytes)
        got = [t.detach() for t in out] + list(
            _run_variant(fn, head_dim, q_lin, k_lin, cos, sin, grads)
        )
        for what, g, w, t in zip(("q_out", "k_out", "dq", "dk"), got, eager, truth):
            # Against fp32 truth: no worse than eager's error plus one bf16 ulp.
            check_numerics(f"{name}/{variant}/{what}", g, w, t, rounding=BF16_ULP)
        del out, got

        with torch.no_grad():
            fwd = time_graph_and_call(lambda: _run_variant(fn, head_dim, q_lin, k_lin, cos, sin))
        fwd_bwd = time_graph_and_call(
            lambda: _run_variant(fn, head_dim, q_lin, k_lin, cos, sin, grads)
        )
        for mode, times, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, 2 * fwd_bytes)):
            rows.append({
                "layout": layout, "config": name, "heads_q": heads_q, "heads_k": heads_k, "head_dim": head_dim,
                "batch": batch, "seq": seq, "mode": mode, "variant": variant, "bytes": nbytes,
                "ms": times.graph_ms, "ms_call": times.call_ms,
                "tbps": nbytes / times.graph_ms / 1e9, "copy_tbps": copy_ceiling,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for rope.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--configs", nargs="+", default=list(HEAD_CONFIGS),
                        choices=list(HEAD_CONFIGS))
    parser.add_argument("--layout", choices=("half", "interleaved"), default="half")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope needs a CUDA GPU.")

    import functools

    from chronicals.ops._launch import implementation
    from chronicals.ops.rope import rope

    if args.layout == "interleaved":
        from transformers.models.blt.modeling_blt import apply_rotary_pos_emb
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    rope = functools.partial(rope, layout=args.layout)

    if implementation("cuda") != "triton":
        raise SystemExit("chronicals ops do not run their Triton kernels here.")
    rows = []
    for name in args.configs:
        rows += bench_config(name, *HEAD_CONFIGS[name], args.batch, args.seq, rope,
                             apply_rotary_pos_emb, args.layout)

    compiled = {(r["config"], r["mode"]): r["ms"] for r in rows if r["variant"] == "compile"}
    print(f"\nrope ({args.layout}), bf16, {args.batch} x {args.seq} tokens, "
          f"{torch.cuda.get_device_name()}\n")
    print("| config | mode | variant | ms (graph) | TB/s | % of copy | vs compile | "
          "ms (Python call) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['mode']} | {r['variant']} | {r['ms']:.4f} | "
              f"{r['tbps']:.2f} | {100 * r['tbps'] / r['copy_tbps']:.0f}% | "
              f"{compiled[(r['config'], r['mode'])] / r['ms']:.2f}x | {r['ms_call']:.4f} |")
    print("\ncopy TB/s (same bytes, same run): " + ", ".join(
        f"{n} {next(r['copy_tbps'] for r in rows if r['config'] == n):.2f}" for n in args.configs))

    name = "rope.json" if args.layout == "half" else f"rope-{args.layout}.json"
    write_json(args.out, name, rows, dtype="bfloat16")


if __name__ == "__main__":
    main()
