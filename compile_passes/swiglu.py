"""Gated MLP activations -> `chronicals::swiglu` / `chronicals::geglu`.

Llama-family MLPs compute `silu(gate) * up`; Phi-3 computes `up * silu(gate)` on the two halves
of a fused `gate_up_proj` (`chunk(2, -1)`, so gate and up are strided views, which the kernel
reads in place); Gemma uses tanh-GELU (GeGLU). Both operand orders are registered for both.
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


def _geglu_pattern_gemma(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _geglu_pattern_swapped(gate, up):
    return up * F.gelu(gate, approximate="tanh")


def _geglu_replacement(gate, up):
    return ops.geglu(gate, up)


def _extra_check(match) -> bool:
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


@functools.cache
def _example_inputs(dtype: torch.dtype) -> list:
    return [torch.empty(2, 8, 24, dtype=dtype), torch.empty(2, 8, 24, dtype=dtype)]


def _register(patterns, replacement):
    def register(pattern_pass) -> None:
        for dtype in FLOAT_DTYPES:
            for search in patterns:
                register_pattern(
                    search,
                    replacement,
                    _example_inputs(dtype),
                    pattern_pass,
                    extra_check=_extra_check,
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
    register=_register((_swiglu_pattern_llama, _swiglu_pattern_phi3), _swiglu_replacement),
    fused_ops=lambda: (torch.ops.chronicals.swiglu.default,),
    is_candidate=_candidate(aten.silu.default),
    diagnose=_diagnose,
)

GEGLU = Fusion(
    name="geglu",
    register=_register((_geglu_pattern_gemma, _geglu_pattern_swapped), _geglu_replacement),
    fused_ops=lambda: (torch.ops.chronicals.geglu.default,),
    is_candidate=_candidate(aten.gelu.default),
    diagnose=_diagnose,
)
