"""Gated MLP activations -> `chronicals::swiglu` / `chronicals::geglu`.

Llama-family MLPs compute `silu(gate) * up`; Gemma uses tanh-GELU (GeGLU). Both operand orders
are registered for both. Phi-3 computes `up * silu(gate)` on the two halves of a fused
`gate_up_proj` (`gate, up = gate_up.chunk(2, -1)`): that whole subgraph becomes
`chronicals::swiglu_gate_up(gate_up)`, whose backward writes d(gate_up) in one tensor (through
`swiglu` on the two views, autograd would concatenate dgate and dup: 4 more passes over
(tokens, I)). Its patterns are registered first, so they win over the two-operand ones; when a
half is used elsewhere, the two-operand pattern still fuses the product on the views.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.fx import Node

from chronicals.ops import swiglu as ops
from compile_passes import _torch_api
from compile_passes.fusion import (
    FLOAT_DTYPES,
    Fusion,
    accepts_operands,
    register_pattern,
    reject,
    shared_intermediate,
)

aten = torch.ops.aten


def _swiglu_pattern_llama(gate, up):
    return F.silu(gate) * up


def _swiglu_pattern_phi3(gate, up):
    return up * F.silu(gate)


def _swiglu_replacement(gate, up):
    return ops.swiglu(gate, up)


def _swiglu_gate_up_pattern_phi3(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return up * F.silu(gate)


def _swiglu_gate_up_pattern_llama(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def _swiglu_gate_up_replacement(gate_up):
    return ops.swiglu_gate_up(gate_up)


def _geglu_pattern_gemma(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _geglu_pattern_swapped(gate, up):
    return up * F.gelu(gate, approximate="tanh")


def _geglu_replacement(gate, up):
    return ops.geglu(gate, up)


def _accepts_operands(match, *names: str) -> bool:
    """`accepts_operands` for LoRA's `base(x) + lora_B(lora_A(x)) * scaling` (or its cast).
    Measured on an H200 (Qwen2.5 0.5B shape, LoRA r=32 on every linear): with bf16 adapters
    142.3 ms a step with the fusion, 137.8 without, against 139.0 for plain Inductor; with PEFT's
    fp32 adapters, whose sum is cast back to bf16, 197.89 ms of kernels a step with the fusion
    and 190.13 without (profile_train.py)."""
    return accepts_operands(match, *names, example="LoRA's base + adapter sum",
                            fused_into="the activation")


def _extra_check(match) -> bool:
    if not _accepts_operands(match, "gate", "up"):
        return False
    gate = _torch_api.match_value(match, "gate")
    up = _torch_api.match_value(match, "up")
    if gate.dtype not in FLOAT_DTYPES or gate.dtype != up.dtype:
        return reject(match, f"dtypes gate {gate.dtype}, up {up.dtype} (need one float dtype)")
    if gate.shape != up.shape:
        return reject(
            match, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ (broadcast)"
        )
    if gate.device != up.device:
        return reject(match, f"gate on {gate.device}, up on {up.device}")
    if gate.dim() == 0 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return reject(match, "gate/up last dimension is not contiguous")
    return True


def _only(match, target) -> Node:
    (node,) = [n for n in match.nodes if n.target is target]
    return node


def _gate_up_check(match) -> bool:
    """The pattern matcher matches integer arguments as wildcards: the chunk must be into 2 along
    the last dim, and the activation must read the first half."""
    if not _accepts_operands(match, "gate_up"):
        return False
    gate_up = _torch_api.match_value(match, "gate_up")
    if gate_up.dtype not in FLOAT_DTYPES:
        return reject(match, f"dtype {gate_up.dtype} (need a float dtype)")
    chunk = _only(match, aten.chunk.default)
    chunks, dim = chunk.args[1], chunk.args[2] if len(chunk.args) > 2 else 0
    if chunks != 2 or dim not in (-1, gate_up.dim() - 1):
        return reject(match, f"chunk({chunks}, dim={dim}) is not two halves of the last dim")
    if _only(match, aten.silu.default).args[0].args[1] != 0:
        return reject(match, "the activation reads the second half of gate_up")
    if gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        return reject(match, "gate_up's last dimension is odd or not contiguous")
    return True


@functools.cache
def _example_inputs(dtype: torch.dtype, n_inputs: int) -> list:
    size = 48 // n_inputs  # gate and up of 24, or gate_up of 48
    return [torch.empty(2, 8, size, dtype=dtype) for _ in range(n_inputs)]


def _register(*groups):
    """groups: (patterns, replacement, extra_check, number of inputs), in order of priority."""

    def register(pattern_pass, dtypes) -> None:
        for patterns, replacement, extra_check, n_inputs in groups:
            for dtype in dtypes:
                for search in patterns:
                    register_pattern(
                        search,
                        replacement,
                        _example_inputs(dtype, n_inputs),
                        pattern_pass,
                        extra_check=extra_check,
                    )

    return register


def _candidate(target):
    def is_candidate(node: Node) -> bool:
        if node.op != "call_function" or node.target is not target:
            return False
        if target is aten.gelu.default and node.kwargs.get("approximate") != "tanh":
            return False
        return any(u.target is aten.mul.Tensor for u in node.users)

    return is_candidate


def _diagnose(node: Node) -> str:
    if len(node.users) > 1:
        return (
            f"the activation {node.name} is used {len(node.users)} times, not only by the product"
        )
    shared = shared_intermediate(next(iter(node.users)))
    if shared is not None and shared is not node:
        return f"{shared.name} is used outside the gated product"
    return "the product's operands have different shapes, dtypes or layouts"


SWIGLU = Fusion(
    name="swiglu",
    register=_register(
        (
            (_swiglu_gate_up_pattern_phi3, _swiglu_gate_up_pattern_llama),
            _swiglu_gate_up_replacement, _gate_up_check, 1,
        ),
        ((_swiglu_pattern_llama, _swiglu_pattern_phi3), _swiglu_replacement, _extra_check, 2),
    ),
    fused_ops=lambda: (
        torch.ops.chronicals.swiglu.default, torch.ops.chronicals.swiglu_gate_up.default
    ),
    is_candidate=_candidate(aten.silu.default),
    diagnose=_diagnose,
)

GEGLU = Fusion(
    name="geglu",
    register=_register(
        ((_geglu_pattern_gemma, _geglu_pattern_swapped), _geglu_replacement, _extra_check, 2),
    ),
    fused_ops=lambda: (torch.ops.chronicals.geglu.default,),
    is_candidate=_candidate(aten.gelu.default),
    diagnose=_diagnose,
)
