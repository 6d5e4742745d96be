"""RMSNorm subgraphs -> `chronicals::rms_norm`.

Three spellings cover the families in transformers 5.x:
- Llama, Qwen2, Qwen3 (and its q/k norms), Mistral, Phi-3: normalise in fp32, cast to the input
  dtype, multiply by the weight.
- Llama-4: the same computation with the weight on the right (`normed.type_as(x) * weight`).
- Gemma, Gemma-2, Gemma-3: normalise in fp32, multiply by `(1 + weight)` in fp32, cast back.
The eps literal is captured from the graph; the patterns are traced per pair of x and weight
dtypes because in fp32 the casts vanish (canonicalize.py) and the graph has a different shape.

A norm whose input a point-wise op computes (the residual add before a decoder norm) is
declined: Inductor fuses that op into its own norm kernels, which beats writing the sum out for
the fused op (measured in `_rms_norm_extra_check`).
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch.fx import Node

from chronicals.ops import rms_norm as ops
from compile_passes import _torch_api
from compile_passes.fusion import (
    FLOAT_DTYPES,
    Fusion,
    accepts_operands,
    literal_float,
    register_pattern,
    reject,
    shared_intermediate,
)

aten = torch.ops.aten
_EPS = 1e-6  # placeholder value the pattern tracer turns into an "eps" argument


def _rms_norm_pattern_llama(x, weight, eps):
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def _rms_norm_replacement_llama(x, weight, eps):
    return ops.rms_norm(x, weight, literal_float(eps), gemma=False)


def _rms_norm_pattern_llama4(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rms_norm_pattern_gemma(x, weight, eps):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(x)


def _rms_norm_replacement_gemma(x, weight, eps):
    return ops.rms_norm(x, weight, literal_float(eps), gemma=True)




def _rms_norm_extra_check(match) -> bool:
    # The residual add before each decoder norm (and Gemma's embedding scale): Inductor fuses it
    # into its norm kernels, forward and backward. Measured on an H200 (Qwen2.5 0.5B shape,
    # 8 x 2048 tokens, bf16, profile_train.py), kernel time a step with these norms fused /
    # declined: 139.92 / 138.56 ms full fine-tuning, 131.59 / 129.55 ms LoRA.
    if not accepts_operands(match, "x", example="the residual add before a decoder norm",
                            fused_into="its own norm kernels"):
        return False
    x = _torch_api.match_value(match, "x")
    weight = _torch_api.match_value(match, "weight")
    eps = _torch_api.match_value(match, "eps")
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        return reject(match, f"unsupported dtypes x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return reject(
            match, f"weight shape {tuple(weight.shape)} does not match hidden {x.shape[-1]}"
        )
    eps = literal_float(eps)
    if eps is None or eps <= 0:
        return reject(match, f"eps must be a positive float, got {eps!r}")
    if x.device != weight.device:
        return reject(match, f"x on {x.device}, weight on {weight.device}")
    return True


@functools.cache
def _example_inputs(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> list:
    return [torch.empty(2, 8, 16, dtype=x_dtype), torch.empty(16, dtype=weight_dtype), _EPS]


def register(pattern_pass, dtypes) -> None:
    # eps is read from `rsqrt(mean(x^2) + eps)` where the match leaves it out (see match_value).
    _torch_api.scalar_consumers["eps"] = (aten.add.Tensor, 1, aten.mean.dim)
    # Every pair of x and weight dtypes: an fp32 model under autocast to bf16 feeds bf16
    # projections to norms with fp32 weights, and which casts are no-ops shapes the graph.
    for x_dtype, weight_dtype in itertools.product(dtypes, dtypes):
        for search, replace in (
            (_rms_norm_pattern_llama, _rms_norm_replacement_llama),
            (_rms_norm_pattern_llama4, _rms_norm_replacement_llama),
            (_rms_norm_pattern_gemma, _rms_norm_replacement_gemma),
        ):
            register_pattern(
                search,
                replace,
                _example_inputs(x_dtype, weight_dtype),
                pattern_pass,
                extra_check=_rms_norm_extra_check,
                scalar_workaround={"eps": _EPS},
            )


def _is_candidate(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.rsqrt.default


def _diagnose(node: Node) -> str:
    shared = shared_intermediate(next(iter(node.users), node))
    if shared is not None:
        return (
            f"intermediate {shared.name} ({shared.target}) is also used outside the norm, so "
            "fusing would change what it computes"
        )
    return ("rsqrt is not part of an RMSNorm spelling the patterns know (Llama-, Llama-4- or "
            "Gemma-style)")


FUSION = Fusion(
    name="rms_norm",
    register=register,
    fused_ops=lambda: (torch.ops.chronicals.rms_norm.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
)
