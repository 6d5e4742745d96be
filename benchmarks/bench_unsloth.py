"""bench_train.py's unsloth stack: one mode, in a process of its own.

bench_train.py starts it (`python -m benchmarks.bench_unsloth SPEC.json`, see its `peer_command`)
with the folder holding Unsloth first on PYTHONPATH. SPEC.json holds bench_train's parsed options,
the mode, the device and dtype, the directory of the initial model bench_train saved (the same
weights its other stacks start from, with the bundled tokenizer), and where to write the result.
Unsloth patches transformers' model classes when it is imported, so it is imported here before
anything imports transformers, and this process runs nothing else. Batches, loop, timing and
checks are bench_train's `run`; only the model and its loading are Unsloth's:
`FastLanguageModel.from_pretrained` (no 4-bit, no gradient checkpointing) and, for LoRA,
`FastLanguageModel.get_peft_model` with bench_train's r and alpha on the seven projections.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The linears PEFT's "all-linear" adapts in the benchmark's models (every one but the LM head).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.bench_unsloth SPEC.json (bench_train.py --stacks "
                 f"unsloth writes the spec and starts this). Got arguments {sys.argv[1:]}.")
    spec = json.loads(Path(sys.argv[1]).read_text())
    import unsloth  # noqa: I001  (first: it patches transformers, which the imports below load)
    from unsloth import FastLanguageModel

    import torch
    import transformers
    from benchmarks.bench_train import make_optimizer, run

    from chronicals.train import compile_loss

    args = argparse.Namespace(**spec["args"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if args.tf32:
        torch.set_float32_matmul_precision("high")

    def prepare(stack, mode, args, device, dtype, report):
        model, _tokenizer = FastLanguageModel.from_pretrained(
            spec["model_dir"], max_seq_length=args.seq, dtype=dtype, load_in_4bit=False,
            full_finetuning=mode == "full", use_gradient_checkpointing=False,
        )
        if mode == "lora":
            model = FastLanguageModel.get_peft_model(
                model, r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0,
                target_modules=LORA_TARGETS, bias="none", use_gradient_checkpointing=False,
                random_state=args.seed,
            )
        model.train()
        # Unsloth fuses inside the model; the loss function runs eagerly, as hf_eager's does.
        return model, make_optimizer(model, stack, mode, args, device), compile_loss(
            model, backend=None)

    result = run("unsloth", spec["mode"], args, device, dtype, prepare)
    result["versions"] = {"unsloth": unsloth.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__}
    # Unsloth may change global matmul settings when imported; what this run had is recorded.
    result["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
