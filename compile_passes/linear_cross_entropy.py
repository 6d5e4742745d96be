"""LM head + cross-entropy -> `chronicals::linear_cross_entropy` (the logits never exist).

The patterns follow transformers' causal-LM loss (`ForCausalLMLoss`): `linear` -> optional
final-logit softcap (Gemma-2) -> `.float()` -> labels padded with -100 and shifted by one (or
`shift_labels` given by the caller) -> flatten -> `cross_entropy` with reduction 'mean', or 'sum'
when `num_items_in_batch` is passed (the division by it stays in the graph).

The fusion can only fire when the logits are used by the loss alone. `torch.compile(model)`
returns them (they are a graph output), so there the report names that as the reason; compile a
function that returns the loss instead.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch.fx import Node

from chronicals.ops import linear_cross_entropy as ops
from compile_passes import _torch_api
from compile_passes.canonicalize import CASTS
from compile_passes.fusion import (
    FLOAT_DTYPES,
    Fusion,
    GraphFacts,
    literal_float,
    register_pattern,
    reject,
)

aten = torch.ops.aten
_SOFTCAP = 17.25  # placeholder value the pattern tracer turns into a "softcap" argument


def _shifted(labels):
    labels = F.pad(labels, (0, 1), value=-100)
    return labels[..., 1:].contiguous()


def _loss(logits, shift_labels, reduction):
    logits = logits.float()
    logits = logits.view(-1, logits.shape[-1])
    shift_labels = shift_labels.view(-1).to(logits.device)
    return F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction=reduction)


def _capped(logits, softcap):
    return torch.tanh(logits / softcap) * softcap


# Search functions: (shift inside or labels pre-shifted) x (mean or sum) x (softcap or not).
def _lce_pattern_hf_mean(hidden, weight, labels):
    return _loss(F.linear(hidden, weight), _shifted(labels), "mean")


def _lce_pattern_hf_sum(hidden, weight, labels):
    return _loss(F.linear(hidden, weight), _shifted(labels), "sum")


def _lce_pattern_hf_preshifted_mean(hidden, weight, labels):
    return _loss(F.linear(hidden, weight), labels, "mean")


def _lce_pattern_hf_preshifted_sum(hidden, weight, labels):
    return _loss(F.linear(hidden, weight), labels, "sum")


def _lce_pattern_gemma2_mean(hidden, weight, labels, softcap):
    return _loss(_capped(F.linear(hidden, weight), softcap), _shifted(labels), "mean")


def _lce_pattern_gemma2_sum(hidden, weight, labels, softcap):
    return _loss(_capped(F.linear(hidden, weight), softcap), _shifted(labels), "sum")


def _lce_pattern_gemma2_preshifted_mean(hidden, weight, labels, softcap):
    return _loss(_capped(F.linear(hidden, weight), softcap), labels, "mean")


def _lce_pattern_gemma2_preshifted_sum(hidden, weight, labels, softcap):
    return _loss(_capped(F.linear(hidden, weight), softcap), labels, "sum")


def _replacement(*, shift: bool, reduction: str, capped: bool):
    def replacement(hidden, weight, labels, softcap=None):
        return ops.linear_cross_entropy(
            hidden,
            weight,
            labels.reshape(hidden.shape[:-1]),
            ignore_index=-100,
            reduction=reduction,
            shift=shift,
            softcap=None if softcap is None else literal_float(softcap),
        )

    if capped:
        return replacement
    # register_replacement needs the replacement's signature to equal the search function's.
    return lambda hidden, weight, labels: replacement(hidden, weight, labels)


_PATTERNS = {
    (True, "mean", False): _lce_pattern_hf_mean,
    (True, "sum", False): _lce_pattern_hf_sum,
    (False, "mean", False): _lce_pattern_hf_preshifted_mean,
    (False, "sum", False): _lce_pattern_hf_preshifted_sum,
    (True, "mean", True): _lce_pattern_gemma2_mean,
    (True, "sum", True): _lce_pattern_gemma2_sum,
    (False, "mean", True): _lce_pattern_gemma2_preshifted_mean,
    (False, "sum", True): _lce_pattern_gemma2_preshifted_sum,
}


def _extra_check(match) -> bool:
    hidden = _torch_api.match_value(match, "hidden")
    weight = _torch_api.match_value(match, "weight")
    labels = _torch_api.match_value(match, "labels")
    if hidden.dtype not in FLOAT_DTYPES or hidden.dtype != weight.dtype:
        return reject(match, f"dtypes hidden {hidden.dtype}, weight {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        return reject(match, f"weight {tuple(weight.shape)} vs hidden {tuple(hidden.shape)}")
    if labels.dtype != torch.int64:
        # cross_entropy refuses other target dtypes; fused, the graph would return a loss instead.
        return reject(match, f"labels dtype {labels.dtype} (cross_entropy takes int64 targets)")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        return reject(match, f"labels {tuple(labels.shape)} vs hidden {tuple(hidden.shape)}")
    if len({hidden.device, weight.device, labels.device}) != 1:
        return reject(match, "hidden, weight and labels are on different devices")
    if any(node.target is aten.tanh.default for node in match.nodes):
        softcap = literal_float(_torch_api.match_value(match, "softcap"))
        if softcap is None or softcap <= 0:
            return reject(match, f"softcap {softcap!r} is not a positive float")
    return True


@functools.cache
def _example_inputs(dtype: torch.dtype, shifted: bool, capped: bool) -> list:
    labels = torch.zeros(2, 8, dtype=torch.int64) if shifted else torch.zeros(16, dtype=torch.int64)
    inputs = [torch.empty(2, 8, 16, dtype=dtype), torch.empty(40, 16, dtype=dtype), labels]
    return inputs + [_SOFTCAP] if capped else inputs


def register(pattern_pass) -> None:
    for dtype, ((shift, reduction, capped), search) in itertools.product(
        FLOAT_DTYPES, _PATTERNS.items()
    ):
        register_pattern(
            search,
            _replacement(shift=shift, reduction=reduction, capped=capped),
            _example_inputs(dtype, shift, capped),
            pattern_pass,
            extra_check=_extra_check,
            scalar_workaround={"softcap": _SOFTCAP} if capped else None,
        )


def _is_candidate(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.cross_entropy_loss.default


def _producer_linear(node: Node, depth: int = 8) -> Node | None:
    """The `linear` producing the logits of a cross_entropy node, through casts and views."""
    current = node.args[0]
    for _ in range(depth):
        if not isinstance(current, Node) or current.op != "call_function":
            return None
        if current.target is aten.linear.default:
            return current
        current = current.args[0]
    return None


def _diagnose(node: Node) -> str:
    linear = _producer_linear(node)
    if linear is None:
        return "the cross-entropy input is not produced by a linear layer (LM head)"
    chain, current = [], node.args[0]
    while current is not linear:
        chain.append(current)
        current = current.args[0]
    chain.append(linear)
    for n in chain:
        if any(u.op == "output" for u in n.users):
            split = _torch_api.resumed_after_graph_break(node)
            if split is not None:
                return (
                    f"a graph break split the function at {split}, and this graph, the rest of "
                    "it, returns the model's output with its logits, so they must exist; remove "
                    "the graph break (the reports list each with Dynamo's reason and source line)"
                )
            return (
                "the logits are a graph output, so they must exist; compile a function that "
                "returns only the loss (see README: 'The loss path')"
            )
        if len(n.users) > 1:
            return f"the logits ({n.name}) are used outside the loss"
    if len(node.args) > 2 or node.kwargs:
        return (
            f"cross_entropy arguments {node.args[2:]} {node.kwargs} differ from HF's causal-LM "
            "loss (class weights, ignore_index other than -100 or label smoothing)"
        )
    if len(linear.args) > 2 and linear.args[2] is not None:
        return "the LM head has a bias, which the fused op does not take"
    between = [n.target for n in chain[:-1] if n.target not in _LOGITS_RESHAPES]
    if aten.tanh.default in between:
        return (
            "the logits' soft-capping is not spelled as Gemma-2's tanh(logits / cap) * cap with "
            "one cap"
        )
    if between:
        return (
            f"the logits pass through {', '.join(map(str, between))} between the LM head and the "
            "loss, which HF's causal-LM loss does not"
        )
    return "the labels are not prepared as HF's causal-LM loss does (pad + shift, or shift_labels)"


# What HF's loss does to the logits besides an optional soft-cap: upcast and flatten.
_LOGITS_RESHAPES = (*CASTS, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _finalize(graph: torch.fx.Graph, facts: GraphFacts) -> None:
    """Choose, per fused loss, whether the op computes hidden's gradient in its forward: when a
    backward follows and the weight is a frozen graph input (LoRA's LM head). The pattern's
    replacement cannot tell, since the graph's values carry no requires_grad."""
    op = torch.ops.chronicals.linear_cross_entropy.default
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not op:
            continue
        weight = node.args[1]
        while weight.op == "call_function" and weight.target in CASTS:
            weight = weight.args[0]  # autocast's cast of an fp32 head is as frozen as the head
        frozen = weight.op == "placeholder" and weight.name in facts.frozen_inputs
        wanted = (
            facts.training and frozen
            and ops.can_take_grad_in_forward(node.args[1].meta["val"], reduction=node.args[6],
                                             softcap=node.args[8], label_smoothing=node.args[10])
        )
        node.args = (*node.args[:-1], wanted)


FUSION = Fusion(
    name="linear_cross_entropy",
    register=register,
    fused_ops=lambda: (torch.ops.chronicals.linear_cross_entropy.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
    finalize=_finalize,
)
