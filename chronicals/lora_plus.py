"""LoRA+ optimizer parameter groups (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of
Large Models", 2024).

LoRA learns W + B @ A. LoRA+ shows that giving B a learning rate `ratio` times larger than A's
(ratio 16 in the paper's experiments) trains faster and better than one shared rate. The groups
here follow the rules of the paper's released code:

| group       | trainable parameters                                 | lr           | decay |
|-------------|------------------------------------------------------|--------------|-------|
| `lora_A`    | `lora_A` factors of linear layers                    | lr           | yes   |
| `lora_B`    | `lora_B` factors of linear layers                    | ratio * lr   | yes   |
| `embedding` | `lora_embedding_A/B` factors, trainable embeddings   | embedding_lr | yes   |
| `no_decay`  | 1-D parameters: biases, norm weights, DoRA magnitude | ratio * lr   | no    |
| `other`     | other matrices (e.g. a fully trained `lm_head`)      | lr           | yes   |

Weight decay applies to matrices only (ndim >= 2); decaying biases and norm gains pulls them to 0,
which is not a regulariser. Parameters are classified by the PEFT naming scheme
(`<module>.lora_A.<adapter>.weight`), so any PEFT LoRA model works, and the groups are plain dicts,
so any torch optimizer takes them.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from torch import nn

_A, _B = "lora_A", "lora_B"
_EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")


def _factor(name: str) -> tuple[str | None, str]:
    """(kind, pairing key) of a parameter name: kind is 'A', 'B', 'embedding_A', 'embedding_B' or
    None; the key is the name with the factor component blanked, equal for an A and its B."""
    parts = name.split(".")
    found = [(i, p) for i, p in enumerate(parts) if p in (_A, _B, *_EMBEDDING_FACTORS)]
    if len(found) > 1:
        raise ValueError(
            f"lora_plus_param_groups: parameter {name!r} names more than one LoRA factor "
            f"({', '.join(p for _, p in found)}); cannot tell which learning rate it gets."
        )
    if not found:
        if any(p.lower().startswith("lora_") and p != "lora_magnitude_vector" for p in parts):
            raise ValueError(
                f"lora_plus_param_groups: parameter {name!r} looks like a LoRA parameter but is "
                f"neither a {_A} nor a {_B} factor; cannot tell which learning rate it gets."
            )
        return None, name
    i, part = found[0]
    key = ".".join(parts[:i] + ["*"] + parts[i + 1 :])
    if part in _EMBEDDING_FACTORS:
        return f"embedding_{part[-1]}", key
    return part[-1], key


def _check_rate(name: str, value: object, *, zero_ok: bool = False) -> float:
    """`value` as a float if it is a finite real number > 0 (>= 0 with `zero_ok`), else a clear
    error: a NaN or infinite rate or decay turns the weights into NaN at the first step."""
    bound = ">= 0" if zero_ok else "> 0"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"lora_plus_param_groups: {name} must be a finite real number {bound}. Got "
            f"{value!r} ({type(value).__name__})."
        )
    if not math.isfinite(value) or not (value >= 0 if zero_ok else value > 0):
        raise ValueError(
            f"lora_plus_param_groups: {name} must be a finite real number {bound}. Got {value}."
        )
    return float(value)


def lora_plus_param_groups(
    model: nn.Module,
    *,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a PEFT LoRA model with LoRA+ learning rates.

    Args:
        model: a model with PEFT LoRA layers (`peft.get_peft_model(...)`); only parameters with
            `requires_grad` are grouped.
        lr: learning rate of the A factors and of other trainable matrices.
        ratio: lr(B) / lr(A); the paper uses 16.
        weight_decay: applied to matrices (ndim >= 2) only.
        embedding_lr: learning rate of LoRA factors on embedding layers and of trainable
            embeddings (1e-6 in the paper's code: embeddings need a much smaller rate).

    Returns:
        A list of dicts `{"name", "params", "lr", "weight_decay"}` (empty groups left out), ready
        for any `torch.optim` optimizer; LR schedulers scale every group, keeping the ratio.

    Raises:
        TypeError: `model` is not a `torch.nn.Module`; a rate or `weight_decay` is not a real
            number (a bool, a string, None).
        ValueError: no trainable LoRA parameters; an A factor without its B (or the reverse); a
            name that names two factors or an unknown `lora_*` component; lr, ratio or
            embedding_lr not finite and > 0; weight_decay not finite and >= 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lora_plus_param_groups: model must be a torch.nn.Module. Got {type(model).__name__}."
        )
    lr = _check_rate("lr", lr)
    ratio = _check_rate("ratio", ratio)
    embedding_lr = _check_rate("embedding_lr", embedding_lr)
    weight_decay = _check_rate("weight_decay", weight_decay, zero_ok=True)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {
        "lora_A": [], "lora_B": [], "embedding": [], "no_decay": [], "other": []
    }
    a_keys: dict[str, str] = {}  # pairing key -> parameter name
    b_keys: dict[str, str] = {}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, param in trainable:
        kind, key = _factor(name)
        if kind is not None:
            (a_keys if kind.endswith("A") else b_keys)[key] = name
        if kind in ("A", "B"):
            groups[f"lora_{kind}"].append(param)
        elif kind is not None or id(param) in embedding_weights:
            groups["embedding"].append(param)
        elif param.ndim < 2:
            groups["no_decay"].append(param)
        else:
            groups["other"].append(param)
    if not a_keys and not b_keys:
        shown = ", ".join(n for n, _ in trainable[:5]) or "none"
        raise ValueError(
            "lora_plus_param_groups: the model has no trainable LoRA parameters (expected names "
            f"with '.{_A}.' and '.{_B}.', as peft.get_peft_model makes). Trainable parameters: "
            f"{shown}{' ...' if len(trainable) > 5 else ''}."
        )
    unpaired = sorted({**a_keys, **b_keys}[k] for k in a_keys.keys() ^ b_keys.keys())
    if unpaired:
        raise ValueError(
            f"lora_plus_param_groups: every trainable A factor needs its trainable B factor (and "
            f"the reverse); {len(unpaired)} unpaired, e.g. {unpaired[0]!r}."
        )
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "embedding": (embedding_lr, weight_decay),
        "no_decay": (lr * ratio, 0.0),
        "other": (lr, weight_decay),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]
