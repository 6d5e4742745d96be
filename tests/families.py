"""Every causal LM family of the installed transformers, found in its auto mapping and built tiny.

`discover()` reads transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (model type -> class
name), so a family added in a new release is swept without anyone listing it; the two supported
releases give different sets. `build(family)` makes the family's default config small with odd
sizes (hidden 48 = 3 query heads of 16 with 1 key/value head, MLP 80, vocab 131; 4 experts of
which 2 are routed per token where the family has experts) and one layer, or one of each kind a
hybrid family mixes (attention and linear attention, sliding and global; every fusion is within
a layer, and each CI stage compiles some hundred families). It returns the model, or raises
`NotSwept` with the reason a family is not swept: it is not a decoder-only causal LM (the
decoder of an encoder-decoder model, an encoder), or it cannot be built at this size. Every
dropout and random routing noise is 0, so the compiled and the eager model compute the same
function.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 131
HIDDEN = 48
HEAD_DIM = 16
LAYERS = 1

# Config fields the tiny shape sets wherever a family's config has them (under any of its
# aliases: transformers maps hidden_size to GPT-2's n_embd and the like).
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=80,
    ffn_dim=80,
    num_hidden_layers=LAYERS,
    # LongCat-Flash's layers are pairs of sublayers: num_hidden_layers is 2 * num_layers.
    num_layers=LAYERS,
    num_attention_heads=HIDDEN // HEAD_DIM,
    num_key_value_heads=1,
    head_dim=HEAD_DIM,
    max_position_embeddings=64,
    rotary_dim=8,
    # Multi-head latent attention (DeepSeek-V2/V3 and their kin): a rotary part of 8 channels.
    qk_rope_head_dim=8,
    qk_nope_head_dim=HEAD_DIM,
    v_head_dim=HEAD_DIM,
    kv_lora_rank=32,
    q_lora_rank=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    use_cache=False,
    # Mixture of experts: 4 experts, 2 per token, one shared expert, no dense first layer.
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
    # Qwen4-Exp's token indexer (its indexed-attention layers need one; the default config has
    # none): 2 query heads of 16, the one key head it requires, 8 tokens kept in blocks of 4.
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=HEAD_DIM,
    indexer_budget=8,
    indexer_compress_ratio=4,
    # Randomness that makes two runs of one model differ.
    router_jitter_noise=0.0,
    layerdrop=0.0,
)


_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def has_experts(config) -> bool:
    """The config routes tokens to experts (a mixture of experts)."""
    return any((getattr(config, name, None) or 0) > 1 for name in _EXPERT_COUNTS)


class NotSwept(Exception):
    """A family the sweep does not compile, with the reason."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    """transformers' model type."""
    config_class: str
    model_class: str


def discover() -> dict[str, Family]:
    """The installed transformers' causal LM families, by model type."""
    return {
        name: Family(name, CONFIG_MAPPING_NAMES[name], model)
        for name, model in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
        if name in CONFIG_MAPPING_NAMES
    }


def _has_field(config, name: str) -> bool:
    return name in getattr(config, "attribute_map", {}) or hasattr(config, name)


def _is_randomness(name: str, value: object) -> bool:
    return isinstance(value, float) and not isinstance(value, bool) and (
        "dropout" in name or name.endswith(("pdrop", "_drop"))
    )


def _layer_kinds(config) -> dict:
    """The layers a hybrid family's tiny model needs to have one of each kind its full-size
    config mixes (attention and linear attention, sliding-window and global attention), in the
    order the full-size model first uses them; {} for a family with one kind of layer. With one
    layer, Qwen3-Next's tiny model had only a linear-attention layer (no rotary embedding to
    fuse), and Flint's only a global one (its sliding-window layers are those that rotate)."""
    if _has_field(config, "attn_layer_period"):
        # Jamba: Mamba layers with an attention layer every attn_layer_period, experts every
        # expert_layer_period; layer 0 Mamba with a dense MLP, layer 1 attention with experts.
        return dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                    expert_layer_period=2, expert_layer_offset=1)
    kinds = getattr(config, "layer_types", None)
    settable = "layer_types" not in getattr(config, "attribute_map", {}) and not isinstance(
        getattr(type(config), "layer_types", None), property)
    if settable and isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        kinds = list(dict.fromkeys(kinds))
        return dict(num_hidden_layers=len(kinds), layer_types=kinds)
    return {}


def _tiny(config_cls, model_cls=None, **overrides):
    """config_cls with the tiny shape set on it and, recursively, on the configs it nests (an
    MoE's ffn_config, a multimodal model's text and vision configs)."""
    default = config_cls()
    shape = {**_SHAPE, **_layer_kinds(default), **overrides}
    if getattr(default, "head_dim", None) == getattr(default, "qk_rope_head_dim", None):
        # Multi-head latent attention whose rotary embedding is sized by head_dim (LongCat-Flash):
        # it stays the rotary part's width.
        shape["head_dim"] = shape["qk_rope_head_dim"]
    kwargs = {k: v for k, v in shape.items() if _has_field(default, k)}
    # Sizes a config derives (a property: Falcon's head_dim, xLSTM's v_head_dim) follow the
    # fields they derive from; LongCat-Flash's num_hidden_layers, 2 * num_layers, has a setter,
    # but set to 1 it left no layer.
    for name in list(kwargs):
        attribute = getattr(config_cls, name, None)
        if isinstance(attribute, property) and (
                attribute.fset is None or name == "num_hidden_layers"):
            del kwargs[name]
    kwargs.update({k: 0.0 for k, v in vars(default).items() if _is_randomness(k, v)})
    for name, sub_cls in (getattr(default, "sub_configs", None) or {}).items():
        if sub_cls is transformers.AutoConfig:
            # Any config may go there (Gemma-3's vision tower, Fuyu's text model): the default's.
            sub_cls = type(getattr(default, name, None))
        if isinstance(sub_cls, type) and issubclass(sub_cls, transformers.PreTrainedConfig):
            kwargs[name] = _tiny(sub_cls, **overrides).to_dict()
    if model_cls is not None:
        sdpa = getattr(model_cls, "_supports_sdpa", False)
        kwargs["attn_implementation"] = "sdpa" if sdpa else "eager"
    return config_cls(**kwargs)


def tiny_config(family: Family, **overrides):
    config_cls = getattr(transformers, family.config_class)
    model_cls = getattr(transformers, family.model_class)
    if getattr(config_cls(), "is_encoder_decoder", False):
        raise NotSwept(f"the decoder of an encoder-decoder model ({family.model_class})")
    text_cls = getattr(model_cls, "config_class", None) or config_cls
    if text_cls is not config_cls and getattr(config_cls, "sub_configs", None):
        # A multimodal family whose causal LM is its text model (Llama-4, Qwen3.5, Emu3): built
        # from the text config, once (under the family that maps that config, where there is one).
        same = [name for name, f in discover().items() if f.config_class == text_cls.__name__]
        if same:
            raise NotSwept(f"{family.model_class} is the text model swept as {same[0]}")
        config_cls = text_cls
    return _tiny(config_cls, model_cls, **overrides)


# A tiny model above this size has dimensions the tiny shape does not reach (and would take
# minutes to build and compile).
_MAX_PARAMETERS = 2_000_000
# Key/value heads tried in turn: grouped-query attention (3 query heads share 1), then
# multi-head, for families that have no GQA (multi-head latent attention).
_KV_HEADS = (1, HIDDEN // HEAD_DIM)
# The one-layer shape of a hybrid family, whose config then derives its layer types again.
_ONE_LAYER = dict(num_hidden_layers=LAYERS, layer_types=None)


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model in `dtype`; raises NotSwept with the reason where there is none
    (the reason of the first shape tried)."""
    family = discover()[name]
    first = None
    # One layer of each kind first, then one layer (MiMo-V2-Flash's sliding-window layers do not
    # build at the tiny shape).
    for layers in ({}, _ONE_LAYER):
        for kv_heads in _KV_HEADS:
            try:
                return _build(family, dtype, seed, num_key_value_heads=kv_heads, **layers)
            except NotSwept as e:
                first = first or e
                if not str(e).startswith(("cannot be built", "its forward fails")):
                    raise first from None
    raise first


def _build(family: Family, dtype: torch.dtype, seed: int, **overrides) -> torch.nn.Module:
    try:
        config = tiny_config(family, **overrides)
        model_cls = getattr(transformers, family.model_class)
        with torch.device("meta"):
            size = sum(p.numel() for p in model_cls(config).parameters())
        if size > _MAX_PARAMETERS:
            raise NotSwept(f"not tiny: {size:,} parameters at the tiny shape (sizes its config "
                           "names otherwise)")
        torch.manual_seed(seed)
        model = model_cls(config)
    except NotSwept:
        raise
    except Exception as e:
        raise NotSwept(f"cannot be built tiny: {type(e).__name__}: {_first_line(e)}") from e
    _check_causal(model)
    return model.to(dtype)


def _first_line(e: Exception) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:200]


def tiny_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def _check_causal(model: torch.nn.Module) -> None:
    """A decoder-only LM's logits at a position do not depend on later tokens: change the last
    token, and the earlier logits must stay (to rounding: a mixture of experts' grouped matmuls
    group the batch's tokens by expert, so the sums of one token may change order)."""
    ids, _ = tiny_batch(batch=1, seq=6)
    changed = ids.clone()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    with torch.no_grad():
        try:
            a, b = (model(input_ids=x, use_cache=False).logits for x in (ids, changed))
        except Exception as e:
            raise NotSwept(f"its forward fails on token ids: {type(e).__name__}: "
                           f"{_first_line(e)}") from e
    if (a[:, :-1] - b[:, :-1]).abs().max() > 1e-5 * a.abs().max():
        raise NotSwept("not causal: the last token changes earlier logits (an encoder)")


@functools.cache
def families() -> tuple[str, ...]:
    return tuple(discover())
