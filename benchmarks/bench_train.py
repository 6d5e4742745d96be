"""End-to-end fine-tuning throughput: HF eager, HF + Inductor, Chronicals, Unsloth; full and LoRA.

Run on a CUDA machine: `python -m benchmarks.bench_train --out DIR` (about 5 minutes on an H200);
`--stacks` / `--modes` pick a subset. `--tiny` runs a 2-layer model on CPU as a smoke test of the
script itself (numbers meaningless). The unsloth stack is asked for by name and needs its packages:
`--stacks hf_compile,chronicals,unsloth --peers DIR`, where DIR holds Unsloth and its dependencies
unpacked (wheels unzipped into one folder; the GPU machine has no package registry).

Workload (the baselines' setup, benchmarks/README.md): a Qwen2.5-0.5B-shaped model (Qwen2Config: hidden 896,
24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings, rope theta 1e6)
or, with `--model llama-3.2-1b`, a Llama-3.2-1B-shaped one (LlamaConfig: hidden 2048, 16 layers,
32 heads, 8 KV heads, head dim 64, intermediate 8192, vocab 128256, tied embeddings, rope theta
5e5, no rope scaling), random init, bf16 weights, fused AdamW, no gradient checkpointing, batches
of 8 (Llama: 4) full rows x 2048 tokens whose ids are Zipf-distributed over the first 5000 ids (so
the loss has something to learn; every token is real, no padding). Modes: full fine-tune, and
LoRA r=32 (alpha 32, all linear layers, PEFT's default fp32 adapters; `--lora-dtype model` keeps
them in bf16). `--tf32` runs fp32 matmuls on TF32 tensor cores in every stack (recorded in the
JSON setup). `--amp` keeps the weights in fp32 and runs the loss function under torch.autocast to
bf16 (HF Trainer's bf16=True).

Stacks share everything but the compiler (and, for unsloth, the model's code): the same batches,
the same initial weights, and the same loop, `chronicals.train_step` around a loss-returning
function:
- hf_eager: the function runs eagerly (HF sdpa attention: the causal flash kernel);
- hf_compile: `torch.compile(backend="inductor")` of that function;
- chronicals: `torch.compile(backend="chronicals")` of it (fusions reported and required), with
  LoRA+ parameter groups in the LoRA mode (the other stacks use one group; the update costs the
  same), its decoder layers compiled once as one region (chronicals/regions.py);
- chronicals_whole: the same, with the whole graph compiled (`compile_loss(regional=False)`);
- unsloth: Unsloth's patched model, the function run eagerly (Unsloth compiles and fuses inside
  the model). Unsloth must be imported before transformers, so each mode runs in its own process
  (`python -m benchmarks.bench_unsloth`, with DIR first on PYTHONPATH) on a copy of the same initial
  weights, saved by this process into a temporary directory with the bundled tokenizer and loaded
  with `FastLanguageModel.from_pretrained` (bf16, no 4-bit, no gradient checkpointing); LoRA through
  `FastLanguageModel.get_peft_model` with the same r, alpha and seven projections. Unsloth's
  adapters are in the model's dtype (bf16) whatever `--lora-dtype` says; every result records its
  adapters' dtype. `--amp` is not offered for it.

Timing: `--warmup` untimed steps (compiles, allocator), then `--steps` steps each timed with CUDA
events (forward + backward + grad norm + AdamW step); tokens/s = rows * seq / median step time.
Warm-up time is the wall time from the start of the first step to the end of the warm-up steps
(compilation and autotuning included; building or loading the model is reported apart, as build
time).
Peak memory is `max_memory_allocated` over the timed steps (after a reset) and over the whole run.
A run fails unless every grad norm is finite and > 0, the loss on batch 0 (batches cycle) fell
between its first and last visit, no graph
is compiled during the timed steps, and (chronicals) rms_norm, swiglu, rope and
linear_cross_entropy all fired or were declined (left to Inductor on purpose: SwiGLU on LoRA's
sums) and none was rejected. `--fusions` turns some off (what one fusion is worth end to end);
only those left on are required.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.harness import write_json

REPO = Path(__file__).resolve().parent.parent

from chronicals.lora_plus import lora_plus_param_groups
from chronicals.train import compile_loss, train_step
from compile_passes._torch_api import unique_graphs_compiled
from compile_passes.backend import FUSION_NAMES, LORA_PRECISIONS

# The stacks run in this process: name -> torch.compile backend of the loss function (None: eager).
STACKS = {"hf_eager": None, "hf_compile": "inductor", "chronicals": "chronicals",
          "chronicals_whole": "chronicals"}
# Stacks whose decoder layers are compiled once, as one region (chronicals/regions.py);
# chronicals_whole is the same backend on the whole graph, hf_compile plain torch.compile.
REGIONAL_STACKS = ("chronicals",)
# Stacks run in a process of their own, by the script named: Unsloth patches transformers when
# imported, so it must come first in a process that has not imported transformers.
PEER_STACKS = {"unsloth": "benchmarks.bench_unsloth"}
MODES = ("full", "lora")
MODELS = ("qwen2.5-0.5b", "llama-3.2-1b")
# Rows of 2048 tokens when --rows is not given; Llama-3.2-1B's baseline (benchmarks/README.md) is
# 4 x 2048.
DEFAULT_ROWS = {"qwen2.5-0.5b": 8, "llama-3.2-1b": 4}
REQUIRED_FUSIONS = ("rms_norm", "swiglu", "rope", "attention", "linear_cross_entropy")
# H200, Qwen2.5-0.5B, this workload (benchmarks/README.md, "Baselines and targets"):
# (full tok/s, full GiB, LoRA tok/s, LoRA GiB).
BASELINES = {"hf_eager": (85_173, 56.4, 56_937, 63.8), "hf_compile": (111_050, 33.0, None, None)}
TARGETS = {"full": (150_000, 18.0), "lora": (180_000, 15.0)}


def parse_args(
    description: str = __doc__.split("\n")[0],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    stacks: Sequence[str] = tuple(STACKS),
) -> argparse.Namespace:
    """The benchmark's options; `extra` adds a caller's own (profile_train.py); `stacks` are those
    the caller can run (profile_train.py: this process's only; with unsloth, `--peers` too)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="directory for the results")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated subset of "
                   f"{','.join(stacks)} (default: {','.join(STACKS)})")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora")
    p.add_argument("--model", choices=MODELS, default=MODELS[0],
                   help="the model's shape (random init); default qwen2.5-0.5b")
    p.add_argument("--rows", type=int, default=None, help="rows per batch (default: 8, or 4 for "
                   "llama-3.2-1b)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    # 3e-4: with bf16 weights of magnitude ~0.02 (one ulp ~1.2e-4), much smaller AdamW steps
    # round away.
    p.add_argument("--lr", type=float, default=3e-4, help="full fine-tune learning rate")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate (of A)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-dtype", choices=("fp32", "model"), default="fp32",
                   help="LoRA adapter weights: fp32 (PEFT's default) or the model's dtype (bf16); "
                   "the unsloth stack's are always the model's")
    p.add_argument("--lora-precision", choices=LORA_PRECISIONS, default="mixed",
                   help="the chronicals stack's backend option lora_precision: mixed (as "
                   "autocast: adapter GEMMs in bf16 against the fp32 weights) or exact (PEFT's "
                   "fp32 adapter math)")
    p.add_argument("--amp", action="store_true",
                   help="fp32 weights, the loss function under torch.autocast to bf16 (HF "
                   "Trainer's bf16=True with a model loaded in fp32), every stack but unsloth")
    p.add_argument("--tf32", action="store_true",
                   help="fp32 matmuls (LoRA's fp32 adapters) on TF32 tensor cores, every stack")
    p.add_argument("--fusions", default=",".join(FUSION_NAMES),
                   help="the chronicals stack's fusions, a comma-separated subset of "
                   f"{','.join(FUSION_NAMES)} (default: all); the others are left to Inductor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="2-layer model, CPU smoke test")
    if "unsloth" in stacks:
        p.add_argument("--peers", metavar="DIR",
                       help="the unsloth stack's packages: a folder holding Unsloth and its "
                       "dependencies unpacked (put first on its PYTHONPATH)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    for name, allowed in (("stacks", stacks), ("modes", MODES), ("fusions", FUSION_NAMES)):
        chosen = getattr(args, name).split(",")
        unknown = set(chosen) - set(allowed)
        if unknown:
            p.error(f"--{name}: unknown {sorted(unknown)}; choose from {list(allowed)}")
        setattr(args, name, chosen)
    if args.rows is None:
        args.rows = DEFAULT_ROWS[args.model]
    if "unsloth" in stacks:
        _check_peers(p, args)
    return args


def _check_peers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The unsloth stack's options: `--peers` names a folder with Unsloth in it, and only then."""
    wanted = "unsloth" in args.stacks
    if wanted and args.peers is None:
        p.error("--stacks unsloth needs --peers DIR: the folder Unsloth and its dependencies were "
                "unpacked into (wheels unzipped into one folder)")
    if not wanted and args.peers is not None:
        p.error("--peers is read by the unsloth stack only; add unsloth to --stacks or drop it")
    if not wanted:
        return
    package = Path(args.peers) / "unsloth" / "__init__.py"
    if not package.is_file():
        p.error(f"--peers {args.peers}: expected a folder holding the unsloth package; there is "
                f"no {package}")
    if args.amp:
        p.error("--amp: the unsloth stack loads bf16 weights (no fp32 weights under autocast); "
                "run it without --amp, or run --amp without unsloth")
    args.peers = str(Path(args.peers).resolve())


def model_config(tiny: bool, model: str = MODELS[0]):
    from transformers import LlamaConfig, Qwen2Config

    if model not in MODELS:
        raise ValueError(f"model_config: model must be one of {list(MODELS)}. Got {model!r}.")
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=6000)
    elif model == "qwen2.5-0.5b":
        shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)
    else:
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256)
    if model == "qwen2.5-0.5b":
        return Qwen2Config(**shape, max_position_embeddings=32768, tie_word_embeddings=True,
                           use_cache=False, rope_theta=1_000_000.0)
    return LlamaConfig(**shape, max_position_embeddings=131072, tie_word_embeddings=True,
                       use_cache=False, rope_theta=500_000.0, rms_norm_eps=1e-5)


def make_batches(args: argparse.Namespace, device: torch.device, count: int = 4) -> list[dict]:
    """`count` batches of full rows; ids drawn with p(k) ~ 1/(k+1) over the first 5000 ids."""
    gen = torch.Generator().manual_seed(args.seed)
    weights = 1.0 / torch.arange(1, 5001, dtype=torch.float64)
    batches = []
    for _ in range(count):
        ids = torch.multinomial(weights, args.rows * args.seq, replacement=True, generator=gen)
        ids = ids.view(args.rows, args.seq).to(device)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def init_model(args: argparse.Namespace, device: torch.device, dtype):
    """The random-init model every stack starts from (same seed, same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with device:  # initialise on the GPU: ~10x faster than on the host for 0.5 B parameters
        model = AutoModelForCausalLM.from_config(model_config(args.tiny, args.model),
                                                 attn_implementation="sdpa")
    return model.to(dtype)


def make_optimizer(model, stack: str, mode: str, args: argparse.Namespace,
                   device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW over the trainable parameters: one group, LoRA+ groups for chronicals' LoRA."""
    lr = args.lora_lr if mode == "lora" else args.lr
    if mode == "lora" and STACKS.get(stack) == "chronicals":
        groups = lora_plus_param_groups(model, lr=lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def build(stack: str, mode: str, args: argparse.Namespace, device: torch.device, dtype):
    model = init_model(args, device, dtype)
    if mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_r, target_modules="all-linear",
            task_type="CAUSAL_LM",
        ), autocast_adapter_dtype=args.lora_dtype == "fp32")
    model.train()
    return model, make_optimizer(model, stack, mode, args, device)


def chronicals_options(stack: str, args: argparse.Namespace, report) -> dict | None:
    """The backend options of `stack` (None for the others): `--fusions`, `--lora-precision`,
    and the report sink."""
    if STACKS[stack] != "chronicals":
        return None
    return {"report": report, "fusions": list(args.fusions),
            "lora_precision": args.lora_precision}


def prepare_hf(stack: str, mode: str, args: argparse.Namespace, device: torch.device, dtype,
               report) -> tuple:
    """This process's stacks: (model, optimizer, loss function) of `stack` and `mode`."""
    model, optimizer = build(stack, mode, args, device, dtype)
    loss_fn = compile_loss(model, backend=STACKS[stack],
                           options=chronicals_options(stack, args, report),
                           regional=stack in REGIONAL_STACKS)
    return model, optimizer, loss_fn


def unique_graphs() -> int:
    return unique_graphs_compiled()


def under_autocast(loss_fn, device: torch.device):
    def amp_loss(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return loss_fn(*args, **kwargs)

    return amp_loss


def run(stack: str, mode: str, args: argparse.Namespace, device: torch.device, dtype,
        prepare: Callable[..., tuple] = prepare_hf) -> dict:
    """One stack and mode: build with `prepare` (bench_unsloth.py passes Unsloth's), warm up,
    time, check."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batches = make_batches(args, device)
    reports = []
    t0 = time.perf_counter()
    model, optimizer, loss_fn = prepare(stack, mode, args, device, dtype, reports.append)
    sync(device)
    build_s = time.perf_counter() - t0
    if args.amp:
        loss_fn = under_autocast(loss_fn, device)

    metrics = []
    t0 = time.perf_counter()
    for i in range(args.warmup):
        metrics.append(train_step(loss_fn, optimizer, [batches[i % len(batches)]]))
    sync(device)
    warmup_s = time.perf_counter() - t0
    graphs_before = unique_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times_ms = []
    for i in range(args.warmup, args.warmup + args.steps):
        batch = batches[i % len(batches)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            metrics.append(train_step(loss_fn, optimizer, [batch]))
            end.record()
            times_ms.append((start, end))
        else:
            t1 = time.perf_counter()
            metrics.append(train_step(loss_fn, optimizer, [batch]))
            metrics[-1].item()
            times_ms.append((time.perf_counter() - t1) * 1e3)
    sync(device)
    if device.type == "cuda":
        times_ms = [s.elapsed_time(e) for s, e in times_ms]
        peak_timed = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_timed = float("nan")
    values = [m.item() for m in metrics]
    recompiles = unique_graphs() - graphs_before
    median_ms = statistics.median(times_ms)
    tokens = args.rows * args.seq
    fired = {}
    if reports:
        for name in reports[0].fired:
            fired[name] = max(r.fired.get(name, 0) for r in reports)
    declined = {r.fusion for report in reports for r in report.declined}
    losses = [v["loss"] for v in values]
    norms = [v["grad_norm"] for v in values]
    problems = []
    if not all(math.isfinite(n) and n > 0 for n in norms):
        problems.append("grad norm not finite and > 0")
    # Batches cycle; the first and the last visit of batch 0 differ only by what was learnt.
    first, last = 0, (len(losses) - 1) // len(batches) * len(batches)
    if not (last > first and losses[last] < losses[first]):
        problems.append(f"loss on batch 0 did not fall (step {first}: {losses[first]:.4f}, "
                        f"step {last}: {losses[last]:.4f})")
    if recompiles:
        problems.append(f"{recompiles} graph(s) compiled during the timed steps")
    if STACKS.get(stack) == "chronicals":
        # LoRA's rewrite fires on PEFT's adapters unless exact math was asked for; under --amp
        # autocast already casts them (the graph has no fp32 adapter GEMMs to rewrite).
        lora = mode == "lora" and args.lora_precision == "mixed" and not args.amp
        missing = [f for f in (*REQUIRED_FUSIONS, *(("lora",) if lora else ()))
                   if f in args.fusions and not fired.get(f) and f not in declined]
        if missing:
            problems.append(f"fusions did not fire: {missing}")
        if any(report.rejected for report in reports):
            problems.append("candidates rejected (see the fusion reports)")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result = {
        "stack": stack,
        "mode": mode,
        "tokens_per_s": tokens / (median_ms / 1e3),
        "median_step_ms": median_ms,
        "step_ms": times_ms,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "peak_gib_timed": peak_timed,
        "peak_gib_run": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else float("nan"),
        "losses": losses,
        "loss_batch0_first_last": [losses[first], losses[last]],
        "grad_norms": norms,
        "recompiles_timed": recompiles,
        "trainable_params": sum(p.numel() for _, p in trainable),
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.")
                                  for n, p in trainable if "lora_" in n}),
        "fusions": fired,
        "fusion_reports": [r.summary() for r in reports],
        "ok": not problems,
        "problems": problems,
    }
    del model, optimizer, loss_fn, metrics
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expected_trainable_params(model, mode: str, lora_r: int) -> int:
    """Parameters a stack must train: all of them (full), or r x (in + out) for each linear but
    the LM head (LoRA on all seven projections, what PEFT's "all-linear" picks)."""
    if mode == "full":
        return sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    return sum(lora_r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def peer_command(stack: str, args: argparse.Namespace, spec: Path,
                 environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run `stack` on `spec` in its own process: the peers'
    folder first on PYTHONPATH, then this repository; the Hugging Face hub offline (the model
    comes from a directory; the GPU machine has no internet); Unsloth's usage statistics off (a
    download) and its generated sources beside the spec, not in the working directory."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [args.peers, str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    env["UNSLOTH_DISABLE_STATISTICS"] = "1"
    env["UNSLOTH_COMPILE_LOCATION"] = str(spec.parent / "unsloth_compiled_cache")
    return [sys.executable, "-m", PEER_STACKS[stack], str(spec)], env


def failed_result(stack: str, mode: str, problem: str) -> dict:
    """The row of a run that produced no measurement."""
    nan = float("nan")
    return {"stack": stack, "mode": mode, "tokens_per_s": nan, "median_step_ms": nan,
            "step_ms": [], "build_s": nan, "warmup_s": nan, "peak_gib_timed": nan,
            "peak_gib_run": nan, "losses": [], "loss_batch0_first_last": [nan, nan],
            "grad_norms": [], "recompiles_timed": 0, "trainable_params": 0,
            "adapter_dtypes": [], "fusions": {}, "fusion_reports": [], "ok": False,
            "problems": [problem]}


def run_peer(stack: str, mode: str, args: argparse.Namespace, device: torch.device,
             dtype) -> dict:
    """`stack` in its own process, from the same initial weights as this process's stacks (saved
    to a temporary directory with the bundled tokenizer); its result read back and checked to
    train what the others train (Unsloth picks what trains in its own loader)."""
    import shutil

    from chronicals.data import default_tokenizer_path

    with tempfile.TemporaryDirectory(prefix=f"bench_{stack}_") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model = init_model(args, device, dtype)
        expected = expected_trainable_params(model, mode, args.lora_r)
        model.save_pretrained(model_dir)
        del model
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(default_tokenizer_path() / name, model_dir / name)
        spec = work / "spec.json"
        spec.write_text(json.dumps({
            "mode": mode, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "model_dir": str(model_dir), "result": str(work / "result.json"),
            "args": vars(args),
        }))
        command, env = peer_command(stack, args, spec)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the other process gets the memory this one cached
        returncode = subprocess.run(command, env=env, cwd=work, check=False).returncode
        if returncode != 0:
            return failed_result(stack, mode, f"{PEER_STACKS[stack]} exited with status "
                                 f"{returncode} (its output is above)")
        result = json.loads((work / "result.json").read_text())
    if result["trainable_params"] != expected:
        result["problems"].append(f"trains {result['trainable_params']:,} parameters; the "
                                  f"workload trains {expected:,}")
        result["ok"] = False
    return result


def main() -> None:
    args = parse_args(stacks=(*STACKS, *PEER_STACKS))
    if args.tiny:
        args.rows, args.seq = min(args.rows, 2), min(args.seq, 64)
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.amp else torch.float32
    if device.type != "cuda" and not args.tiny:
        sys.exit("bench_train: needs a CUDA GPU (or --tiny for a CPU smoke test).")
    import chronicals  # noqa: F401  (registers backend="chronicals" in a source checkout)

    if args.tf32:
        torch.set_float32_matmul_precision("high")

    results = []
    for mode in args.modes:
        for stack in args.stacks:
            print(f"running {stack} / {mode} ...", flush=True)
            if stack in PEER_STACKS:
                result = run_peer(stack, mode, args, device, dtype)
            else:
                result = run(stack, mode, args, device, dtype)
            results.append(result)
            print(f"  {stack} / {mode}: {result['tokens_per_s']:,.0f} tok/s, "
                  f"{result['peak_gib_timed']:.1f} GiB, warm-up {result['warmup_s']:.1f} s, "
                  f"loss {result['loss_batch0_first_last']}", flush=True)
            for summary in result["fusion_reports"]:
                print("  " + summary.replace("\n", "\n  "))
            if result["problems"]:
                print("  FAILED: " + "; ".join(result["problems"]))
    header = ("| stack | mode | tok/s | peak GiB (timed / run) | median step ms | warm-up s "
              "(build s) | batch-0 loss first -> last | baseline tok/s, GiB | ok |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        # The baselines and targets of benchmarks/README.md, for the Qwen2.5-0.5B workload.
        base = BASELINES.get(r["stack"]) if args.model == "qwen2.5-0.5b" else None
        col = 0 if r["mode"] == "full" else 2
        ref = f"{base[col]:,} / {base[col + 1]}" if base and base[col] else "-"
        if r["stack"] == "chronicals" and args.model == "qwen2.5-0.5b":
            target = TARGETS[r["mode"]]
            ref = f"target >= {target[0]:,} / <= {target[1]}"
        lines.append(
            f"| {r['stack']} | {r['mode']} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_gib_timed']:.1f} / {r['peak_gib_run']:.1f} | {r['median_step_ms']:.1f} | "
            f"{r['warmup_s']:.1f} ({r['build_s']:.1f}) | "
            f"{r['loss_batch0_first_last'][0]:.3f} -> {r['loss_batch0_first_last'][1]:.3f} | "
            f"{ref} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, "bench_train.json", results, **setup, dtype=str(dtype),
               float32_matmul_precision=torch.get_float32_matmul_precision(), table=table)
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
