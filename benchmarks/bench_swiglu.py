"""Benchmark chronicals' SwiGLU / GeGLU against eager PyTorch and plain torch.compile (Inductor).

    python -m benchmarks.bench_swiglu --out results/      # CUDA; package installed or PYTHONPATH=.

For each activation and intermediate size I (tokens x I, bf16), times the forward and forward +
backward of `act(gate) * up` three ways: the eager reference (`chronicals.reference`), the same
reference under `torch.compile` (Inductor fuses it into one kernel per direction) and the fused
chronicals op. The Phi-3 form `gate, up = gate_up.chunk(2, -1)` is timed at one size, two ways for
chronicals: `swiglu` on the row-strided views (autograd then concatenates dgate and dup) and
`swiglu_gate_up` on gate_up (its backward writes d(gate_up) directly). Each chronicals op is
timed eagerly and inside `torch.compile` (as the chronicals backend runs it). Forward + backward
starts from fresh leaves and ends with `torch.autograd.grad` of them, fed by a fixed dy.

Every variant and mode is timed two ways (`benchmarks/harness.py`), both medians of
`triton.testing.do_bench` (which clears L2 between runs): a CUDA-graph replay of the step
("ms (graph)", JSON `*_ms_graph`), the GPU time, as in a training step where the CPU runs ahead of
the GPU; and a plain Python call ("ms (Python call)", JSON `*_ms_call`), which for small steps is
mostly CPU dispatch (custom-op and autograd overhead), not kernel time. Bandwidth, "vs compile"
and "of copy BW" use the graph time. Achieved bandwidth counts the fewest bytes each pass must
move: forward reads gate and up and writes out (3 tensors), forward + backward adds reading dy,
gate, up and writing dgate, dup (8 tensors in all); it is compared with a device-to-device copy
measured in the same run. Every variant is checked against an fp64 truth (no worse than eager plus
one bf16 rounding) before it is timed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import check_numerics, copy_tbps, time_graph_and_call, write_json
from chronicals import reference
from chronicals.ops import implementation
from chronicals.ops.swiglu import geglu, swiglu, swiglu_gate_up

# Intermediate sizes: Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B.
SIZES = (4864, 8192, 14336)
PHI3_SIZE = 8192  # Phi-3-mini's intermediate size; its MLP chunks one (tokens, 2 I) projection
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "swiglu": (swiglu, reference.swiglu),
    "geglu": (geglu, reference.geglu),
}
TENSORS_MOVED = {"fwd": 3, "fwd+bwd": 8}
WARMUP_MS, REP_MS = 50, 300  # do_bench's warm-up and measuring time per timing


def _inputs(tokens: int, size: int, chunked: bool, device: torch.device):
    """The leaf tensors (bf16, requiring grad) and dy. Contiguous: gate and up. Chunked: one
    (tokens, 2 size) gate_up tensor, split inside the timed function as Phi-3's MLP does."""
    shapes = [(tokens, 2 * size)] if chunked else [(tokens, size), (tokens, size)]
    leaves = tuple(
        torch.randn(shape, device=device, dtype=torch.bfloat16).requires_grad_()
        for shape in shapes
    )
    dy = torch.randn(tokens, size, device=device, dtype=torch.bfloat16)
    return leaves, dy


def _on_leaves(act: Callable, chunked: bool) -> Callable:
    """`act` as a function of the leaves, so torch.compile sees the chunk (and fuses its
    backward, the concatenation of dgate and dup) exactly as in a compiled Phi-3 MLP."""
    if not chunked:
        return act

    def phi3_mlp_act(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, -1)
        assert gate.stride() == (gate_up.shape[-1], 1), "must run on row-strided views"
        return act(gate, up)

    return phi3_mlp_act


def check_correctness(label: str, variants: dict[str, Callable], leaves, dy) -> None:
    """Forward and gradients of every variant against fp64 truth, on the benchmark's inputs."""
    eager = variants["eager"]
    # Leave NaN in the caching allocator's freed blocks so an unwritten output element shows.
    torch.full((dy.numel() * 4,), float("nan"), device=dy.device, dtype=dy.dtype)
    truth_leaves = tuple(t.detach().double().requires_grad_() for t in leaves)
    truth = eager(*truth_leaves)
    truth_grads = torch.autograd.grad(truth, truth_leaves, dy.double())
    truth = truth.detach()
    eager_out = eager(*leaves)
    eager_grads = torch.autograd.grad(eager_out, leaves, dy)
    for name, fn in variants.items():
        out = fn(*leaves)
        check_numerics(f"{label} {name} forward", out, eager_out, truth)
        for g, e, t in zip(torch.autograd.grad(out, leaves, dy), eager_grads, truth_grads):
            check_numerics(f"{label} {name} backward", g, e, t)
    torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    if implementation(device) != "triton":
        raise RuntimeError(f"chronicals runs {implementation(device)} on {device}, not Triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 would time the interpreter; unset it")
    copy_tbs = copy_tbps(2 * 2**30, device)
    cases = [(act, size, False) for act in args.activations for size in args.sizes]
    if args.phi3_size:
        cases.append(("swiglu", args.phi3_size, True))
    rows = []
    for act, size, chunked in cases:
        # Dynamo's recompile limit (8) counts per code object across torch.compile wrappers; each
        # case compiles twice (grad and no-grad), so start every case from a clean cache rather
        # than let a later case fall back to eager.
        torch.compiler.reset()
        fused, ref = ACTIVATIONS[act]
        eager = _on_leaves(ref, chunked)
        # A fresh compiled function per case, static shapes: the baseline is Inductor's kernel for
        # exactly this shape, as in a real training graph.
        compiled = torch.compile(_on_leaves(ref, chunked), dynamic=False, fullgraph=True)
        # Chronicals eager pays torch.library's Python dispatch and autograd layers on the CPU
        # (~0.1 ms a call), which shows in the Python-call time where the GPU work is shorter (not
        # in the graph time); inside a compiled graph (how compile_passes uses the ops)
        # AOTAutograd calls the forward and backward ops directly.
        variants = {
            "eager": eager,
            "torch.compile": compiled,
            f"chronicals {act}": _on_leaves(fused, chunked),
            f"chronicals {act} in torch.compile": torch.compile(
                _on_leaves(fused, chunked), dynamic=False, fullgraph=True),
        }
        if chunked:
            variants["chronicals swiglu_gate_up"] = swiglu_gate_up
            variants["chronicals swiglu_gate_up in torch.compile"] = torch.compile(
                swiglu_gate_up, dynamic=False, fullgraph=True)
        leaves, dy = _inputs(args.tokens, size, chunked, device)
        label = f"{act} I={size}{' chunked' if chunked else ''}"
        check_correctness(label, variants, leaves, dy)
        elements = args.tokens * size
        for mode, tensors in TENSORS_MOVED.items():
            row = {"activation": act, "tokens": args.tokens, "intermediate": size,
                   "layout": "chunk(2,-1) views" if chunked else "contiguous", "mode": mode}
            for name, fn in variants.items():
                if mode == "fwd":
                    def step(fn=fn, leaves=leaves):
                        with torch.no_grad():
                            return fn(*leaves)
                else:
                    def step(fn=fn, leaves=leaves, dy=dy):
                        # Fresh leaves per call: no autograd node outlives a call (CUDA-graph
                        # capture needs that).
                        fresh = tuple(t.detach().requires_grad_() for t in leaves)
                        return torch.autograd.grad(fn(*fresh), fresh, dy)
                times = time_graph_and_call(step, warmup=WARMUP_MS, rep=REP_MS)
                ms = times.graph_ms
                row[f"{name}_ms_graph"] = ms
                row[f"{name}_ms_call"] = times.call_ms
                row[f"{name}_tbs"] = tensors * elements * dy.element_size() / (ms * 1e-3) / 1e12
            # One table row per chronicals variant, each against the same eager and compile times.
            for name in [name for name in variants if name.startswith("chronicals")]:
                ms, tbs = row[f"{name}_ms_graph"], row[f"{name}_tbs"]
                fused_row = dict(
                    row, chronicals_op=name.removeprefix("chronicals "),
                    chronicals_ms_graph=ms, chronicals_ms_call=row[f"{name}_ms_call"],
                    chronicals_tbs=tbs, chronicals_of_copy=tbs / copy_tbs,
                    speedup_vs_compile=row["torch.compile_ms_graph"] / ms)
                rows.append(fused_row)
                print(_format_row(fused_row), flush=True)
        del leaves, dy
        torch.cuda.empty_cache()
    return {
        "dtype": "bfloat16",
        "copy_tbs": copy_tbs,
        "timing": f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms, L2 "
                  "cleared per run; *_ms_graph: CUDA-graph replay of the step (GPU time; TB/s and "
                  "speedups use it), *_ms_call: plain Python call",
        "bytes_counted": "fwd: gate, up, out; fwd+bwd: + dy, gate, up, dgate, dup",
        "rows": rows,
    }


HEADER = (
    "| act | I | layout | chronicals op | mode | eager ms (graph) | compile ms (graph) "
    "| chronicals ms (graph) | compile TB/s | chronicals TB/s | vs compile | of copy BW "
    "| ms (Python call) eager / compile / chronicals |\n" + "|---" * 13 + "|"
)


def _format_row(r: dict) -> str:
    return (
        f"| {r['activation']} | {r['intermediate']} | {r['layout']} | {r['chronicals_op']} "
        f"| {r['mode']} "
        f"| {r['eager_ms_graph']:.3f} | {r['torch.compile_ms_graph']:.3f} "
        f"| {r['chronicals_ms_graph']:.3f} "
        f"| {r['torch.compile_tbs']:.2f} | {r['chronicals_tbs']:.2f} "
        f"| {r['speedup_vs_compile']:.2f}x | {100 * r['chronicals_of_copy']:.0f}% "
        f"| {r['eager_ms_call']:.3f} / {r['torch.compile_ms_call']:.3f} "
        f"/ {r['chronicals_ms_call']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for bench_swiglu.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--activations", nargs="+", choices=list(ACTIVATIONS),
                        default=list(ACTIVATIONS))
    parser.add_argument("--phi3-size", type=int, default=PHI3_SIZE,
                        help="intermediate size of the chunked (Phi-3) case; 0 skips it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    result = run(args)
    rows = result.pop("rows")
    print(f"\ncopy bandwidth {result['copy_tbs']:.2f} TB/s (read + write), "
          f"{torch.cuda.get_device_name()}")
    print("\n" + HEADER + "\n" + "\n".join(_format_row(r) for r in rows))
    write_json(args.out, "bench_swiglu.json", rows, **result)


if __name__ == "__main__":
    main()
