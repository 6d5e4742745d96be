"""Packed vs padded fine-tuning throughput, and packed attention vs dense-mask sdpa.

Run on a CUDA machine: `python -m benchmarks.bench_packing --out DIR` (about 4 minutes on an H200).

Workload: a Qwen2.5-0.5B-shaped model (Qwen2Config: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936), random init, bf16 weights, fused AdamW, no checkpointing.
Example lengths are log-normal (median 300, sigma 1.0 by default) capped at max_len 2048, seeded;
token ids are Zipf-distributed over the first 5000 ids, so the loss has something to learn.

Variants (each from the same initial weights, fresh optimizer; "compiled" = `torch.compile` of
the loss function, plain Inductor):
- padded-to-longest (eager): batches of `--rows` examples right-padded to the longest (rounded up
  to 64), pad labels ignored, no attention_mask, HF sdpa (is_causal: the flash kernel).
- padded-to-max_len (eager, compiled): the same, padded to max_len. Compiled padded batches use
  this: a width per batch means a dynamic-shape graph (its compile took 54 s for 2 layers against
  15 s for packed), and HF materialises a causal mask under compile anyway.
- packed (eager, compiled): examples from the same law packed by `chronicals.packing.pack` (BFD),
  batches of `--rows` full rows of max_len, `chronicals_varlen` attention.
- packed-sdpa (eager): the same packed rows through HF sdpa with its dense document mask.

Throughput counts real tokens only (no pad slots): sum of tokens / sum of step times over the timed
steps (forward + backward + clip + AdamW step, CUDA events). Before timing, one untimed pass runs
the same batches (compiles, allocator). A run must also train: every grad norm finite and > 0, and
the mean loss of the last half of the timed steps below the first half. Compiles during the timed
steps are counted and reported.

Attention only: forward + backward of one layer's attention on the same packed batches
(B=rows, S=max_len, 14 query heads, 2 KV heads, head_dim 64, bf16): chronicals_varlen vs HF sdpa
with the dense document mask it builds, vs FlexAttention with a document block mask, and
unisolated causal flash over whole rows (what packing without isolation would cost: a floor, not
a correct option). Correctness of the packed path is checked against an fp32 reference first.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from benchmarks.harness import cuda_ms, median_cuda_ms, write_json
from chronicals._torch_private import mark_dynamic
from chronicals.attention import (
    PACKED_ATTENTION,
    implementation,
    use_packed_attention,
    varlen_attention,
)
from chronicals.packing import PackedBatch, pack
from compile_passes._torch_api import unique_graphs_compiled

VOCAB = 151936


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for results.json")
    p.add_argument("--rows", type=int, default=8, help="rows (packed) / examples (padded) per step")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--median", type=float, default=300.0, help="median example length")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of lengths")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (24 = Qwen2.5-0.5B)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--attention-batches", type=int, default=6)
    p.add_argument("--attention-only", action="store_true", help="skip the training variants")
    return p.parse_args()


# ----------------------------------------------------------------------------- data


def make_examples(args: argparse.Namespace, count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(count, generator=gen, dtype=torch.float64)
    lengths = (math.log(args.median) + args.sigma * normal).exp().clamp(2, args.max_len).long()
    # Zipf over 5000 ids: p(rank r) ~ 1 / r.
    probs = 1.0 / torch.arange(1, 5001, dtype=torch.float64)
    ids = torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=gen)
    return [chunk.tolist() for chunk in ids.split(lengths.tolist())]


def padded_batches(examples: list[list[int]], rows: int, width: int | None) -> list[dict]:
    """Right-padded batches of `rows` examples: to `width`, or to the longest rounded up to 64."""
    out = []
    for i in range(0, len(examples) - rows + 1, rows):
        group = examples[i : i + rows]
        w = width if width is not None else -(-max(len(e) for e in group) // 64) * 64
        ids = torch.zeros(rows, w, dtype=torch.long)
        labels = torch.full((rows, w), -100, dtype=torch.long)
        for r, e in enumerate(group):
            ids[r, : len(e)] = torch.tensor(e)
            labels[r, : len(e)] = ids[r, : len(e)]
        out.append({"inputs": {"input_ids": ids, "labels": labels},
                    "dynamic": ("input_ids", 1) if width is None else None,
                    "tokens": sum(len(e) for e in group), "slots": ids.numel()})
    return out


def packed_batches(batches: list[PackedBatch], *, with_boundaries: bool) -> list[dict]:
    out = []
    for b in batches:
        if with_boundaries:
            # model_inputs keeps cu_seq_lens_q and _k one tensor, as the attention expects.
            inputs, dynamic = b.model_inputs("cuda"), ("cu_seq_lens_q", 0)
        else:  # HF sdpa path: position_ids only, from which it builds the dense mask
            inputs, dynamic = {"input_ids": b.input_ids, "labels": b.labels,
                               "position_ids": b.position_ids}, None
        out.append({"inputs": inputs, "dynamic": dynamic, "tokens": b.stats.real_tokens,
                    "slots": b.stats.slots})
    return out


# ----------------------------------------------------------------------------- training


def graphs_compiled() -> int:
    return unique_graphs_compiled()


def run_variant(name, model, init_state, batches, args, *, compiled: bool) -> dict:
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)

    def loss_fn(inputs):
        return model(**inputs, use_cache=False).loss

    step_loss = torch.compile(loss_fn) if compiled else loss_fn

    def to_device(batch):
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch["inputs"].items()}
        if compiled and batch["dynamic"] is not None:
            # One dynamic graph up front instead of a recompile when the first batch with another
            # width (padded) or segment count (packed) arrives.
            key, dim = batch["dynamic"]
            mark_dynamic(inputs[key], dim)
            if key == "input_ids":
                mark_dynamic(inputs["labels"], dim)
        return inputs

    def step(inputs):
        loss = step_loss(inputs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm.detach()

    timed = batches[: args.steps]
    if len(timed) < args.steps:
        raise RuntimeError(f"{name}: only {len(timed)} batches for {args.steps} timed steps")
    # Warm-up: one untimed pass over the very batches that are timed, so every compile, cuBLAS
    # plan and allocator block for their shapes exists before the clock starts.
    torch.cuda.reset_peak_memory_stats()
    graphs_start = graphs_compiled()
    t0 = time.perf_counter()
    for b in timed:
        step(to_device(b))
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    graphs_before = graphs_compiled()
    times, losses, norms, tokens, slots = [], [], [], 0, 0
    for b in timed:
        inputs = to_device(b)
        ms, (loss, norm) = cuda_ms(lambda: step(inputs))
        times.append(ms)
        losses.append(loss)
        norms.append(norm)
        tokens += b["tokens"]
        slots += b["slots"]
    losses = [float(x) for x in losses]
    norms = [float(x) for x in norms]
    half = len(losses) // 2
    trains = (all(math.isfinite(n) and n > 0 for n in norms)
              and statistics.mean(losses[half:]) < statistics.mean(losses[:half]))
    return {
        "variant": name,
        "compiled": compiled,
        "tokens_per_s": tokens / (sum(times) / 1e3),
        "median_step_ms": statistics.median(times),
        "real_tokens": tokens,
        "slots": slots,
        "slot_efficiency": tokens / slots,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "warmup_s": warm_s,
        "graphs_compiled_in_warmup": graphs_before - graphs_start,
        "compiles_in_timed_steps": graphs_compiled() - graphs_before,
        "losses": losses,
        "grad_norms": norms,
        "trains": trains,
    }


# ----------------------------------------------------------------------------- attention only


def attention_bench(batches: list[PackedBatch], args: argparse.Namespace) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads, head_dim, scale = 14, 2, 64, 64**-0.5

    class _Attn(torch.nn.Module):  # what HF's attention functions read off the module
        num_key_value_groups = heads // kv_heads
        is_causal = True

    module = _Attn()
    flex = torch.compile(flex_attention)
    rows, width = batches[0].input_ids.shape
    pos = torch.arange(width, device="cuda")
    results: dict[str, list[float]] = {k: [] for k in (
        "chronicals_varlen", "varlen_exact_max", "sdpa_dense_mask", "flex_block_mask",
        "flex_block_mask_build", "causal_rows_unisolated")}
    cost_ratio = []
    check = None
    for b in batches:
        cu = b.cu_seqlens.cuda()
        seg_len = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double()
        cost_ratio.append(float((seg_len**2).sum() / (rows * width**2)))

        def qkv(h):
            return (torch.randn(rows, width, h, head_dim, device="cuda", dtype=torch.bfloat16)
                    .transpose(1, 2).requires_grad_())

        q, k, v = qkv(heads), qkv(kv_heads), qkv(kv_heads)
        grad = torch.randn(rows, width, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        segment = (torch.searchsorted(cu, torch.arange(rows * width, device="cuda",
                                                       dtype=torch.int32), right=True) - 1)
        segment = segment.view(rows, width)
        dense = ((segment[:, :, None] == segment[:, None, :]) & (pos[:, None] >= pos[None, :]))
        dense = dense[:, None]

        def doc_causal(bi, hi, qi, ki):
            return (segment[bi, qi] == segment[bi, ki]) & (qi >= ki)

        def build():
            return create_block_mask(doc_causal, rows, None, width, width, device="cuda",
                                     _compile=True)

        block_mask = build()
        fns = {
            "chronicals_varlen": lambda: varlen_attention(q, k, v, cu, scale=scale),
            "varlen_exact_max": lambda: _flash_exact_max(q, k, v, cu, b.max_seqlen, scale),
            "sdpa_dense_mask": lambda: sdpa_attention_forward(module, q, k, v, dense,
                                                              scaling=scale)[0],
            "flex_block_mask": lambda: flex(q, k, v, block_mask=block_mask, scale=scale,
                                            enable_gqa=True).transpose(1, 2),
            "causal_rows_unisolated": lambda: sdpa_attention_forward(module, q, k, v, None,
                                                                     scaling=scale)[0],
        }
        if check is None:  # correctness before timing: bf16 packed vs fp32 reference
            out = fns["chronicals_varlen"]().float()
            ref_fp32 = sdpa_attention_forward(module, q.float(), k.float(), v.float(), dense,
                                              scaling=scale)[0]
            ref_bf16 = fns["sdpa_dense_mask"]().float()
            err, ref_err = (out - ref_fp32).abs().max().item(), (ref_bf16 - ref_fp32).abs().max()
            check = {"max_err_vs_fp32": err, "sdpa_bf16_max_err_vs_fp32": float(ref_err)}
            if not err <= 2 * float(ref_err) + 1e-3:
                raise RuntimeError(f"packed attention disagrees with the fp32 reference: {check}")
        for key, fn in fns.items():
            results[key].append(_time_fwd_bwd(fn, (q, k, v), grad))
        results["flex_block_mask_build"].append(median_cuda_ms(build))
    out = {k: statistics.median(v) for k, v in results.items()}
    out["scaling"] = _scaling(rows, width, heads, kv_heads, head_dim, scale)
    out["implementation"] = implementation(torch.empty(1, 1, 1, 64, device="cuda",
                                                       dtype=torch.bfloat16))
    out["sum_len_sq_over_rows_S_sq"] = statistics.median(cost_ratio)
    out["check"] = check
    return out


def _scaling(rows, width, heads, kv_heads, head_dim, scale) -> list[dict]:
    """chronicals_varlen on rows filled with documents of one length L: the work is
    rows * (width / L) * L^2, so time should fall about in proportion to L / width."""
    def qkv(h):
        return (torch.randn(rows, width, h, head_dim, device="cuda", dtype=torch.bfloat16)
                .transpose(1, 2).requires_grad_())

    q, k, v = qkv(heads), qkv(kv_heads), qkv(kv_heads)
    grad = torch.randn(rows, width, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = []
    for length in (128, 256, 512, 1024, width):
        cu = torch.arange(0, rows * width + 1, length, device="cuda", dtype=torch.int32)
        ms = _time_fwd_bwd(lambda: varlen_attention(q, k, v, cu, scale=scale), (q, k, v), grad)
        exact = _time_fwd_bwd(lambda: _flash_exact_max(q, k, v, cu, length, scale), (q, k, v),
                              grad)
        out.append({"doc_len": length, "ms": ms, "exact_max_ms": exact,
                    "work_ratio": length / width})
    return out


def _flash_exact_max(q, k, v, cu, max_seqlen, scale):
    """chronicals_varlen's kernel call with the grid sized by the longest segment, not the row."""
    rows, heads, width, head_dim = q.shape
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], head_dim) for t in (q, k, v)]
    out = torch.ops.aten._flash_attention_forward(
        *flat, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)[0]
    return out.view(rows, width, heads, head_dim)


def _time_fwd_bwd(fn, inputs, grad) -> float:
    return median_cuda_ms(lambda: torch.autograd.grad(fn(), inputs, grad))


# ----------------------------------------------------------------------------- main


def train_runs(args, full, padded, padded_full) -> tuple[list[dict], dict]:
    """Every training variant (see the module docstring) and the loss check before them."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        hidden_size=896, num_hidden_layers=args.layers, num_attention_heads=14,
        num_key_value_heads=2, intermediate_size=4864, vocab_size=VOCAB,
        max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                             dtype=torch.bfloat16).cuda()
    model.train()
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Same batch, same weights: packed attention and HF's isolated sdpa path give the same loss.
    probe = full[0].model_inputs("cuda")
    with torch.no_grad():
        loss_sdpa = model(**{k: probe[k] for k in ("input_ids", "labels", "position_ids")},
                          use_cache=False).loss.item()
        use_packed_attention(model)
        loss_varlen = model(**probe, use_cache=False).loss.item()
        model.set_attn_implementation("sdpa")
    if not abs(loss_varlen - loss_sdpa) <= 1e-2 * abs(loss_sdpa):
        raise RuntimeError(f"packed loss {loss_varlen} != HF sdpa packed loss {loss_sdpa}")

    # Compiled padded batches are padded to max_len: padding to the longest gives a new width
    # per batch, i.e. a dynamic-shape graph whose compile took 54 s for 2 layers (vs 15 s packed).
    plan = [("padded-to-longest", "sdpa", padded, (False,)),
            ("padded-to-max_len", "sdpa", padded_full, (False, True)),
            ("packed", PACKED_ATTENTION, packed_batches(full, with_boundaries=True), (False, True)),
            ("packed-sdpa", "sdpa", packed_batches(full, with_boundaries=False), (False,))]
    runs = []
    for compiled in ([False] if args.no_compile else [False, True]):
        for name, attn, batches, modes in plan:
            if compiled not in modes:
                continue
            model.set_attn_implementation(attn if attn == "sdpa" else PACKED_ATTENTION)
            torch.compiler.reset()
            label = f"{name} {'compiled' if compiled else 'eager'}"
            print(f"running {label} ...", flush=True)
            runs.append(run_variant(label, model, init_state, batches, args, compiled=compiled))

    return runs, {"varlen": loss_varlen, "sdpa_dense": loss_sdpa}


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_packing needs a CUDA GPU.")
    import transformers

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    per_variant = args.steps
    # Enough examples for the padded variant's batches; packing the same pool gives fewer,
    # fuller rows (the shortfall is what packing saves).
    examples = make_examples(args, per_variant * args.rows, args.seed)
    packed = pack(examples, max_len=args.max_len)
    full = [b for b in packed.batches(args.rows, seed=args.seed) if b.stats.rows == args.rows]
    padded = padded_batches(examples, args.rows, None)
    padded_full = padded_batches(examples, args.rows, args.max_len)
    seed = args.seed
    while len(full) < max(per_variant, args.attention_batches):
        seed += 1  # top up packed batches from another pool drawn from the same law
        more = pack(make_examples(args, per_variant * args.rows, seed), max_len=args.max_len)
        full += [b for b in more.batches(args.rows, seed=seed) if b.stats.rows == args.rows]

    runs, loss_check = ([], {}) if args.attention_only else train_runs(
        args, full, padded, padded_full)
    attn = attention_bench(full[: args.attention_batches], args)
    pool = {"examples": len(examples), "padded_efficiency":
            sum(b["tokens"] for b in padded) / sum(b["slots"] for b in padded),
            "packed": packed.stats.as_dict()}
    write_json(args.out, "bench_packing.json",
               {"loss_check": loss_check, "pool": pool, "runs": runs, "attention_ms": attn},
               args=vars(args))

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {args.layers} layers, {args.rows} x {args.max_len}; "
          f"lengths log-normal median {args.median:g} sigma {args.sigma:g}")
    print(f"pool: padded slot efficiency {pool['padded_efficiency']:.1%}; packed "
          f"{packed.stats.efficiency:.1%} ({packed.stats.rows} rows, lower bound "
          f"{packed.stats.min_rows})\n")
    print("| variant | real tok/s | median step ms | slot eff. | peak GiB | trains | "
          "compiles in timed |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['median_step_ms']:.1f} | "
              f"{r['slot_efficiency']:.1%} | {r['peak_gib']:.1f} | {r['trains']} | "
              f"{r['compiles_in_timed_steps']} |")
    print(f"\nattention fwd+bwd per layer, {args.rows} x {args.max_len}, 14/2 heads, d 64, bf16 "
          f"(sum len^2 / rows S^2 = {attn['sum_len_sq_over_rows_S_sq']:.3f}):")
    print("| path | ms |\n|---|---|")
    for key in ("chronicals_varlen", "varlen_exact_max", "sdpa_dense_mask", "flex_block_mask",
                "flex_block_mask_build", "causal_rows_unisolated"):
        print(f"| {key} | {attn[key]:.3f} |")
    print("\nchronicals_varlen on rows of equal documents:")
    print("| doc len | ms | ms, grid sized by doc len | work vs one doc per row |")
    print("|---|---|---|---|")
    for row in attn["scaling"]:
        print(f"| {row['doc_len']} | {row['ms']:.3f} | {row['exact_max_ms']:.3f} | "
              f"{row['work_ratio']:.3f} |")
    print(f"\ncheck: {attn['check']}; loss check {loss_check}")
    failed = [r["variant"] for r in runs if not r["trains"]]
    if failed:
        raise SystemExit(f"did not train (grad norm or loss): {failed}")


if __name__ == "__main__":
    main()
