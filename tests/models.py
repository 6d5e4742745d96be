"""Tiny Hugging Face decoders of each family, built from configs (no downloads).

Every family shares the same small shape: hidden 64, 2 layers, 4 query heads and 2 KV heads of
head_dim 16, vocab 128. `EXPECTED` says how many of each fusion a model's graph must fire,
`DECLINED` how many it must leave to Inductor on purpose.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
LAYERS = 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    attn_implementation="sdpa",
    use_cache=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, model class, extra config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # Gemma-2 has no sdpa path in transformers (it soft-caps attention logits): its eager
        # attention is fused.
        {"sliding_window": 64, "final_logit_softcapping": 30.0, "attn_implementation": "eager"},
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 64}),
    # Interleaved (GPT-J layout) partial rotary: half of each head's channels rotated.
    "glm": ("GlmConfig", "GlmForCausalLM", {}),
}

# Fusions each family's graph holds: one rms_norm per layer norm (2 per layer) plus the final
# norm; Qwen3 and Gemma3 add q/k norms (2 more per layer); Gemma2/3 add pre/post feed-forward
# norms (2 more per layer).
_NORMS = {
    "qwen3": 4 * LAYERS + 1,
    "gemma2": 4 * LAYERS + 1,
    "gemma3": 6 * LAYERS + 1,
}
# A norm whose input a point-wise op computes is declined (left to Inductor, which fuses that op
# into its norm kernels): 2 per layer in every family follow a residual add (the input norms
# after layer 0, the post-attention norms or, in Gemma2/3, the pre-feed-forward norms, and the
# final norm), and the Gemmas' layer-0 input norm follows the embedding scale. The norms fed by
# the embedding lookup or straight by a projection fire.
DECLINED = {family: {"rms_norm": 2 * LAYERS + family.startswith("gemma")} for family in FAMILIES}
EXPECTED = {
    family: {
        "rms_norm": _NORMS.get(family, 2 * LAYERS + 1) - DECLINED[family]["rms_norm"],
        "swiglu": 0 if family.startswith("gemma") else LAYERS,
        "geglu": LAYERS if family.startswith("gemma") else 0,
        "rope": LAYERS,
        "attention": LAYERS,
        "linear_cross_entropy": 1,
        "lora": 0,  # no adapters (tests/compile_passes/test_lora.py adds them)
    }
    for family in FAMILIES
}


def checkpointed_counts(family: str) -> tuple[dict[str, int], dict[str, int]]:
    """EXPECTED and DECLINED of the model under gradient checkpointing. Each layer's input norm
    reads the layer's input, a placeholder of the checkpointed body, and the final norm reads
    the last body's output: these fire."""
    moved = LAYERS + family.startswith("gemma")
    fired = {**EXPECTED[family], "rms_norm": EXPECTED[family]["rms_norm"] + moved}
    return fired, {"rms_norm": DECLINED[family]["rms_norm"] - moved}


def tiny_config_kwargs() -> dict:
    """The shared tiny shape, for a config of a family not listed here."""
    return dict(_COMMON)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype)
    return model


def tiny_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels
