#!/usr/bin/env bash
# The GPU machine's share of the work in as few calls as possible: CUDA tests and benchmarks,
# logs and JSON under $OUT. Run from the repository root:
#   bash benchmarks/gpu_suite.sh tests       # CUDA tests (ops, backend through Inductor, attention)  ~9.5 min on an H100 (12-07)
#   bash benchmarks/gpu_suite.sh ops         # rms_norm, swiglu, rope benchmarks                      ~2.5 min
#   bash benchmarks/gpu_suite.sh attention   # attention candidates, 3 model shapes + packed/long rows,
#                                            # Gemma-2 softcap, gpt-oss sinks (new, untimed)   ~3 min
#   bash benchmarks/gpu_suite.sh loss        # linear_cross_entropy, trainable and frozen head, 4 shapes ~8 min
#   bash benchmarks/gpu_suite.sh train       # packing + end-to-end train_step benchmarks             ~9.5 min
#   bash benchmarks/gpu_suite.sh peers       # bench_train LoRA then full beside Unsloth (carry the peers'
#                                            # .peers/peers.tar.xz: ../shared/research/peer-wheels.md) ~9 min
#   bash benchmarks/gpu_suite.sh job         # the finetune job, Qwen2.5-0.5B shape, LoRA r=32       ~2 min
#   bash benchmarks/gpu_suite.sh warmup      # the job twice each, full and LoRA r=32, Qwen2.5-0.5B shape:
#                                            # cold then warm compile cache (warm-up lines)     ~6 min
#   bash benchmarks/gpu_suite.sh lora_curve  # 300-step LoRA job: mixed precision (seed 0), exact fp32
#                                            # (seeds 0, 1); compare with benchmarks/compare_runs.py
#   bash benchmarks/gpu_suite.sh sweep       # RMSNorm fwd and dW-finish configs; LCE tiles vs cuBLAS; LCE
#                                            # frozen-head blocks; LCE GEMM-only bounds at 1% memory ~6 min
#   bash benchmarks/gpu_suite.sh attention_tiles  # Triton attention tiles, 3 shapes          ~6 min
#   bash benchmarks/gpu_suite.sh memory      # chronicals full and LoRA r=32: static, kept, peak memory
# (Times measured on an H200, 2026-11-29. `train` is close to a 10-minute call limit: run it alone.)
# Peer LCE implementations are timed when importable: `pip download --no-deps -d .whl liger-kernel
# cut-cross-entropy` here, carry .whl, and `python3 -m pip install --no-deps .whl/*.whl` there.
# The machine has torch 2.11 / triton 3.6 / transformers 5.17 and no internet: the source tree is
# used in place (import chronicals registers the backend when no entry point is installed).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0

qwen05b() {  # Qwen2.5-0.5B's config (random init) at /tmp/qwen05b
    python3 -c "import transformers; transformers.Qwen2Config(hidden_size=896, \
intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, \
vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, \
rope_theta=1e6).save_pretrained('/tmp/qwen05b')"
}

case "${1:-tests}" in
tests)
    python3 -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
    ;;
ops)
    for op in rms_norm swiglu rope; do
        python3 -m benchmarks.bench_$op --out "$OUT" 2>&1 | tee "$OUT/bench_$op.log" || status=1
    done
    ;;
attention)
    python3 -m benchmarks.bench_attention --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log" || status=1
    ;;
loss)
    for head in trainable frozen; do
        python3 -m benchmarks.bench_linear_cross_entropy --out "$OUT" --head $head 2>&1 \
            | tee "$OUT/bench_lce_$head.log" || status=1
    done
    ;;
train)
    python3 -m benchmarks.bench_packing --out "$OUT" 2>&1 | tee "$OUT/bench_packing.log" || status=1
    python3 -m benchmarks.bench_train --out "$OUT" 2>&1 | tee "$OUT/bench_train.log" || status=1
    ;;
sweep)
    python3 -m benchmarks.tuning.sweep_rms_norm 2>&1 | tee "$OUT/sweep_rms_norm.log" || status=1
    python3 -m benchmarks.tuning.sweep_lce_tiles 2>&1 | tee "$OUT/sweep_lce_tiles.log" || status=1
    python3 -m benchmarks.tuning.sweep_lce_frozen_blocks 2>&1 | tee "$OUT/sweep_lce_frozen.log" || status=1
    python3 -m benchmarks.tuning.bound_linear_cross_entropy --out "$OUT" 2>&1 \
        | tee "$OUT/bound_lce.log" || status=1
    ;;
peers)
    mkdir -p /tmp/peers && tar -xJf .peers/peers.tar.xz -C /tmp/peers
    for mode in lora full; do
        python3 -m benchmarks.bench_train --out "$OUT/$mode" --modes $mode --peers /tmp/peers --steps 8 \
            --stacks hf_eager,hf_compile,chronicals,unsloth 2>&1 | tee "$OUT/bench_$mode.log" \
            || status=1
    done
    ;;
attention_tiles)
    python3 -m benchmarks.tuning.sweep_attention_tiles --out "$OUT" 2>&1 \
        | tee "$OUT/sweep_attention_tiles.log" || status=1
    ;;
memory)
    python3 -m benchmarks.tuning.memory_breakdown --out "$OUT" --stacks chronicals,hf_compile \
        --modes full,lora 2>&1 | tee "$OUT/memory_breakdown.log" || status=1
    ;;
job)
    qwen05b
    python3 -m chronicals finetune --model /tmp/qwen05b --from-config --tokenizer chronicals/data \
        --lora-r 32 --max-len 2048 --batch-size 8 --steps 20 --eval-every 10 \
        --output-dir /tmp/job --no-progress 2>&1 | tee "$OUT/job.log" || status=1
    grep '"compile"' /tmp/job/log.jsonl | tee "$OUT/job_fusions.jsonl"
    ;;
warmup)
    qwen05b
    export XDG_CACHE_HOME=/tmp/warmup_cache  # the job's compile cache, empty at the first run
    rm -rf "$XDG_CACHE_HOME"
    for run in full:0 lora:32; do
        mode=${run%:*} r=${run#*:}
        for cache in cold warm; do
            python3 -m chronicals finetune --model /tmp/qwen05b --from-config \
                --tokenizer chronicals/data --lora-r "$r" --max-len 2048 --batch-size 8 --steps 8 \
                --eval-every 0 --output-dir "/tmp/warmup_${mode}_$cache" --no-progress --no-plot \
                >> "$OUT/warmup.log" 2>&1 || status=1
            grep '"warmup"' "/tmp/warmup_${mode}_$cache/log.jsonl" \
                | sed "s/^/$mode $cache: /" | tee -a "$OUT/warmup.txt"
        done
    done
    ;;
lora_curve)
    qwen05b
    for run in mixed:0 exact:0 exact:1; do
        precision=${run%:*} seed=${run#*:}
        python3 -m chronicals finetune --model /tmp/qwen05b --from-config --tokenizer chronicals/data \
            --lora-r 32 --lora-precision "$precision" --seed "$seed" --max-len 1024 --batch-size 4 \
            --steps 300 --eval-every 50 --output-dir "/tmp/curve_$run" --no-progress --no-plot \
            >> "$OUT/curve.log" 2>&1 || status=1
        cp "/tmp/curve_$run/log.jsonl" "$OUT/curve_${precision}_$seed.jsonl"
    done
    ;;
*)
    echo "usage: $0 tests|ops|attention|loss|train|peers|job|warmup|lora_curve|sweep|attention_tiles|memory" >&2
    exit 2
    ;;
esac
exit $status
