"""Where a training step's memory goes: the static state, the activations kept for backward (by
shape and dtype), and the peaks of backward and the optimizer step, per stack and mode.

    python -m benchmarks.tuning.memory_breakdown --out DIR [bench_train.py's options]

Each stack and mode is built as `bench_train.py` builds it and run for `--warmup` steps; then one
more step is taken apart: memory allocated before the forward (weights, optimizer state), after
the forward (+ the tensors autograd keeps), the peak of the backward and of the optimizer step.
The kept tensors are counted through `torch.autograd.graph.saved_tensors_hooks` (public API; a
compiled graph's saved tensors pass through it too), each storage once.
"""

from __future__ import annotations

import collections
import gc

import torch

from benchmarks.bench_train import make_batches, parse_args, prepare_hf
from benchmarks.harness import write_json
from chronicals.train import count_label_tokens

GIB = 2**30


def breakdown(stack: str, mode: str, args, device, dtype) -> dict:
    torch.compiler.reset()
    gc.collect()
    torch.cuda.empty_cache()
    model, optimizer, loss_fn = prepare_hf(stack, mode, args, device, dtype, lambda r: None)
    batches = make_batches(args, device)

    def step(batch, hooks=None):
        optimizer.zero_grad(set_to_none=True)
        n = count_label_tokens(batch["labels"])
        if hooks is None:
            loss = loss_fn(batch, n)
        else:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                loss = loss_fn(batch, n)
        return loss

    for i in range(args.warmup):
        step(batches[i % len(batches)]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated() / GIB
    # Kept storages that are not the parameters' (a saved weight, or a view of one, costs nothing).
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kinds: collections.Counter = collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            kinds[(tuple(t.shape), str(t.dtype))] += t.untyped_storage().nbytes()
        return t

    torch.cuda.reset_peak_memory_stats()
    loss = step(batches[0], (pack, lambda t: t))
    torch.cuda.synchronize()
    after_fwd = torch.cuda.memory_allocated() / GIB
    peak_fwd = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    peak_bwd = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    torch.cuda.synchronize()
    peak_opt = torch.cuda.max_memory_allocated() / GIB
    top = [{"shape": list(k[0]), "dtype": k[1], "gib": v / GIB}
           for k, v in kinds.most_common(12)]
    row = {"stack": stack, "mode": mode, "static_gib": static, "after_fwd_gib": after_fwd,
           "peak_fwd_gib": peak_fwd, "peak_bwd_gib": peak_bwd, "peak_opt_gib": peak_opt,
           "saved_gib": sum(kinds.values()) / GIB, "saved_top": top, "loss": loss.item()}
    print(f"{stack:12s} {mode:5s} static {static:6.2f} | after fwd {after_fwd:6.2f} (peak "
          f"{peak_fwd:6.2f}) | peak bwd {peak_bwd:6.2f} | peak opt {peak_opt:6.2f} | saved "
          f"{row['saved_gib']:6.2f} GiB", flush=True)
    for t in top:
        print(f"    {t['gib']:6.3f} GiB  {t['dtype']:15s} {t['shape']}")
    return row


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = [breakdown(stack, mode, args, device, dtype)
            for mode in args.modes for stack in args.stacks]
    write_json(args.out, "memory_breakdown.json", rows)


if __name__ == "__main__":
    main()
