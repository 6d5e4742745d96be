"""LM head + cross-entropy, forward + backward: Chronicals vs eager vs torch.compile vs peers.

    python -m benchmarks.bench_linear_cross_entropy --out DIR [--shapes 0,2] [--variants ...]
        [--head trainable|frozen]

For each (tokens, hidden, vocab) shape, in bf16, with hidden requiring grad, the weight too
(`--head trainable`) or not (`--head frozen`: LoRA's LM head, no dW), and 10% of the labels
ignored, every variant is first checked against eager (loss and both gradients, max
error relative to eager's largest value), then timed with `triton.testing.do_bench` (median, grads
reset to None before each run so no accumulation kernel is timed) and measured for peak memory
beyond its inputs and gradients (`max_memory_allocated` after a reset, minus what was allocated
before the call, minus the gradients). The extra memory is also given as a share of the bf16
logits [tokens, vocab] that the fused variants avoid. TFLOP/s counts the FLOPs of the GEMMs eager
runs, 6 * tokens * hidden * vocab (three GEMMs; two and 4 * ... for a frozen head), so recompute
shows up as a lower rate.

`compile_chunked` is plain torch.compile with Inductor's auto-chunker on (default settings).
Peers are optional: Liger's LigerFusedLinearCrossEntropyLoss and Apple's cut_cross_entropy are
used when importable (otherwise the table says why the import failed).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import relative_max_error, write_json

SHAPES = [  # (tokens, hidden, vocab): Qwen2.5-0.5B, Llama-3.2-1B, Llama-3-8B, Gemma-2-2B LM heads
    (16384, 896, 151936),
    (16384, 2048, 128256),
    (8192, 4096, 128256),
    (8192, 2304, 256000),
]
VARIANTS = ("chronicals", "eager", "compile", "compile_chunked", "liger", "cce", "cce_exact")
IGNORED = 0.1
GIB = 1024**3

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _eager(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def _make_variant(name: str) -> LossFn | str:
    """The loss function of a variant, or why it is unavailable."""
    if name == "chronicals":
        from chronicals.ops.linear_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y)
    if name == "eager":
        return _eager
    if name == "compile":
        return torch.compile(_eager)
    if name == "compile_chunked":
        # Inductor's auto-chunker (torch >= 2.11, experimental, off by default): it splits the
        # LM head + CE's backward graph into token chunks so [tokens, vocab] is never whole.
        # A function of its own, so Dynamo's cache never hands it plain compile's graph.
        def _chunked(h, w, y):
            return _eager(h, w, y)

        return torch.compile(_chunked, options={"auto_chunker.enable": True})
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return f"not importable: {e}"
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        return lambda h, w, y: liger(w, h, y)
    if name in ("cce", "cce_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError as e:
            return f"not importable: {e}"
        if name == "cce":
            # CCE's default: backward tiles whose softmax is below a bf16-eps threshold are skipped.
            return lambda h, w, y: cce(h, w, y, ignore_index=-100, reduction="mean")
        # No filtering: every tile is computed, as Chronicals does.
        return lambda h, w, y: cce(h, w, y, ignore_index=-100, reduction="mean", filter_eps=None)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def _inputs(tokens: int, hidden: int, vocab: int, head: str, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) / math.sqrt(hidden))
    w = w.to(torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    y[torch.rand(tokens, device="cuda", generator=gen) < IGNORED] = -100
    return h.requires_grad_(), w.requires_grad_(head == "trainable"), y


def _run(fn: LossFn, h, w, y):
    h.grad = None
    w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach().float(), h.grad, w.grad


def _rel_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    return None if ref is None else relative_max_error(x, ref)


def _extra_memory(fn: LossFn, h, w, y) -> int:
    """Peak bytes allocated during forward + backward beyond inputs, gradients and the loss."""
    h.grad = None
    w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(h, w, y).backward()
    torch.cuda.synchronize()
    grads = sum(g.numel() * g.element_size() for g in (h.grad, w.grad) if g is not None)
    return torch.cuda.max_memory_allocated() - before - grads


def bench_shape(
    tokens: int, hidden: int, vocab: int, variants: list[str], head: str
) -> list[dict]:
    from triton.testing import do_bench

    h, w, y = _inputs(tokens, hidden, vocab, head)
    ref = _run(_eager, h, w, y)
    logits_bytes = tokens * vocab * 2
    flops = (6 if head == "trainable" else 4) * tokens * hidden * vocab
    rows = []
    for name in variants:
        row = dict(tokens=tokens, hidden=hidden, vocab=vocab, head=head, variant=name)
        fn = _make_variant(name)
        if isinstance(fn, str):
            rows.append(dict(row, status=fn))
            continue
        try:
            loss, dh, dw = _run(fn, h, w, y)  # also the warm-up: compiles and autotunes
            errors = dict(err_loss=_rel_err(loss, ref[0]), err_dh=_rel_err(dh, ref[1]),
                          err_dw=_rel_err(dw, ref[2]))
            del loss, dh, dw
            extra = _extra_memory(fn, h, w, y)
            ms = do_bench(lambda: fn(h, w, y).backward(), warmup=25, rep=200,
                          grad_to_none=[t for t in (h, w) if t.requires_grad],
                          return_mode="median")
        except torch.cuda.OutOfMemoryError as error:
            rows.append(dict(row, status=f"out of memory: {str(error).splitlines()[0]}"))
            continue
        finally:
            h.grad = None
            w.grad = None
            torch.cuda.empty_cache()
        rows.append(dict(
            row, status="ok", ms=ms, tflops=flops / ms / 1e9, extra_gib=extra / GIB,
            extra_pct_logits=100 * extra / logits_bytes, **errors,
        ))
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        ("| tokens | hidden | vocab | head | variant | ms | TFLOP/s | extra GiB | % of logits | "
         "err loss | err dh | err dw |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = f"| {r['tokens']} | {r['hidden']} | {r['vocab']} | {r['head']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{first} {r['status']} | | | | | | |")
            continue
        lines.append(
            f"{first} {r['ms']:.2f} | {r['tflops']:.0f} | {r['extra_gib']:.3f} | "
            f"{r['extra_pct_logits']:.2f}% | {r['err_loss']:.1e} | {r['err_dh']:.1e} | "
            f"{'-' if r['err_dw'] is None else format(r['err_dw'], '.1e')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="directory for linear_cross_entropy_<head>.json")
    parser.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))),
                        help=f"comma-separated indices into {SHAPES}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--head", choices=("trainable", "frozen"), default="trainable",
                        help="whether the LM head weight requires grad (default: trainable)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {VARIANTS}")
    rows = []
    for index in map(int, args.shapes.split(",")):
        rows += bench_shape(*SHAPES[index], variants, args.head)
        print(_table(rows), flush=True)
    write_json(args.out, f"linear_cross_entropy_{args.head}.json", rows, ignored=IGNORED)


if __name__ == "__main__":
    main()
