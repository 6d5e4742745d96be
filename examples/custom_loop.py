"""A custom training loop around `chronicals.train_step`: LoRA with LoRA+ rates on packed rows.

    python examples/custom_loop.py

A tiny randomly initialised Qwen2-shaped model, the bundled HumanEval data and tokenizer, so it
runs anywhere (under a minute on a 2-core CPU); with a real model from `from_pretrained` the same
loop fine-tunes it. (Adapters on a random base learn little: the loss moves slowly here.)
"""

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

import chronicals
from chronicals.attention import PACKED_ATTENTION, register_packed_attention
from chronicals.data import (
    default_data_path,
    default_tokenizer_path,
    load_records,
    tokenize_records,
)

torch.manual_seed(0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))

optimizer = torch.optim.AdamW(
    chronicals.lora_plus_param_groups(model, lr=2e-3), fused=device.type == "cuda"
)
loss_fn = chronicals.compile_loss(model)  # torch.compile(backend="chronicals"), built once

batches = packed.batches(2, seed=0)  # shuffled micro-batches of 2 rows of 1024 tokens
for step in range(len(batches) // 2):
    micro_batches = [b.model_inputs(device) for b in batches[2 * step : 2 * step + 2]]
    metrics = chronicals.train_step(loss_fn, optimizer, micro_batches, max_grad_norm=1.0)
    if step % 5 == 0:
        print(f"step {step}: {metrics.item()}")  # reading the metrics is the only host sync
