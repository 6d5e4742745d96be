"""Full fine-tuning sharded with PyTorch FSDP2 over every process of a torchrun launch.

    torchrun --nproc-per-node 2 examples/fsdp.py   # 2 CPU processes (gloo) or 2 GPUs (NCCL)

A tiny randomly initialised Qwen2-shaped model on the bundled HumanEval data and tokenizer, so it
runs on CPUs (about a minute for 2 processes on 2 cores); with a real model from
`from_pretrained` the same loop fine-tunes it. Each rank trains on its own packed rows of every
global batch; `train_step(data_parallel=...)` makes the step equal one process running them all.
The sharded state is saved with torch.distributed.checkpoint at the end (`fsdp-checkpoint/`).
"""

import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

import chronicals
from chronicals.attention import PACKED_ATTENTION, register_packed_attention
from chronicals.data import (
    default_data_path,
    default_tokenizer_path,
    load_records,
    tokenize_records,
)
from chronicals.distributed import save_checkpoint, shard_model

if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # the same initial weights on every rank
tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_path())
examples = tokenize_records(load_records(default_data_path()), tokenizer)  # loss on completions
packed = chronicals.pack(
    [{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
    max_len=1024, pad_id=tokenizer.pad_token_id,
)

register_packed_attention()  # documents in a row never attend to each other
config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
model = AutoModelForCausalLM.from_config(config, attn_implementation=PACKED_ATTENTION).to(device)
model = shard_model(model)  # one FSDP2 unit per decoder layer, the root holds embedding and head

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = chronicals.compile_loss(model)  # backend="chronicals" on the sharded model

batches = packed.batches(1, seed=0)  # the same shuffle on every rank: one row per micro-batch
per_step = world * 2  # each rank accumulates 2 micro-batches of the global batch
for step in range(len(batches) // per_step):
    global_batch = batches[step * per_step : (step + 1) * per_step]
    mine = [b.model_inputs(device) for b in global_batch[rank::world]]
    metrics = chronicals.train_step(loss_fn, optimizer, mine, max_grad_norm=1.0,
                                    data_parallel=dist.group.WORLD)
    if step % 5 == 0:
        values = metrics.item()  # the same on every rank: loss and tokens of the global batch
        if rank == 0:
            print(f"step {step}: {values}")

save_checkpoint("fsdp-checkpoint", model, optimizer, step=step + 1)
dist.destroy_process_group()
