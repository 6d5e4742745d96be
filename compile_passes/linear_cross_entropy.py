"""LM head + cross-entropy -> `chronicals::linear_cross_entropy` (the logits never exist).

The patterns follow transformers' causal-LM loss (`ForCausalLMLoss`): `linear` -> what the family
does to its logits (nothing; Gemma-2's final-logit softcap; Granite's division by
`config.logits_scaling`; Cohere's multiplication by `logit_scale`) -> `.float()` -> labels padded
with -100 and shifted by one (or `shift_labels` given by the caller) -> `.view(-1)` ->
`cross_entropy` with reduction 'mean', or 'sum' when `num_items_in_batch` is passed (the division
by it stays in the graph).

The graph pairs row i of the flattened logits (row i of hidden flattened to [N, H]) with element
i of the flattened labels, shifted along the labels' own last dim. The replacement keeps that
pairing whatever the layouts: the op's in-kernel shift (along hidden.shape[:-2]'s rows) is used
only when the labels' shape is provably hidden.shape[:-1]; otherwise the labels are shifted in
the graph (an int op over N labels) and handed to the op flattened, unshifted.

The fusion can only fire when the logits are used by the loss alone. `torch.compile(model)`
returns them (they are a graph output), so there the report names that as the reason; compile a
function that returns the loss instead.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
from collections.abc import Callable

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


def _shifted(labels):
    labels = F.pad(labels, (0, 1), value=-100)
    return labels[..., 1:].contiguous()


def _loss(logits, shift_labels, reduction):
    logits = logits.float()
    logits = logits.view(-1, logits.shape[-1])
    shift_labels = shift_labels.view(-1).to(logits.device)
    return F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction=reduction)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Head:
    """What a model family does to its LM head's output before the loss."""

    family: str
    logits: Callable[..., torch.Tensor]
    """(logits, *scalar) -> the logits as the family's model computes them."""
    scalar: str | None = None
    """The name of the family's scalar (a pattern argument), if it has one."""
    placeholder: float = 0.0
    """The scalar's value while the pattern is traced (the tracer turns it into the argument);
    a value no other constant of the pattern has."""
    scalar_op: object = None
    """The op that takes the scalar as its second argument, the linear's output as its first."""
    options: Callable[[float], dict] = lambda value: {}
    """The op's keyword arguments for a value of the scalar."""
    valid: Callable[[float], bool] = lambda value: True


_HEADS = (
    _Head(family="hf", logits=lambda logits: logits),
    _Head(family="gemma2", logits=lambda logits, softcap: torch.tanh(logits / softcap) * softcap,
          scalar="softcap", placeholder=17.25, scalar_op=aten.div.Tensor,
          options=lambda c: dict(softcap=c), valid=lambda c: 0 < c < math.inf),
    # GraniteForCausalLM: `logits = logits / self.config.logits_scaling`.
    _Head(family="granite", logits=lambda logits, logits_scaling: logits / logits_scaling,
          scalar="logits_scaling", placeholder=13.375, scalar_op=aten.div.Tensor,
          options=lambda s: dict(logit_scale=1.0 / s), valid=lambda s: s != 0 and math.isfinite(s)),
    # CohereForCausalLM, Cohere2ForCausalLM: `logits = logits * self.logit_scale`.
    _Head(family="cohere", logits=lambda logits, logit_scale: logits * logit_scale,
          scalar="logit_scale", placeholder=0.3125, scalar_op=aten.mul.Tensor,
          options=lambda s: dict(logit_scale=s), valid=math.isfinite),
)
_REDUCTIONS = ("mean", "sum")


def _signed(fn, head: _Head, name: str):
    """fn(hidden, weight, labels, *scalar) with the signature register_replacement reads: the
    argument names, the head's scalar among them."""
    names = ["hidden", "weight", "labels", *([head.scalar] if head.scalar else [])]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])
    fn.__name__ = fn.__qualname__ = name
    return fn


def _search(head: _Head, shifted: bool, reduction: str):
    def search(hidden, weight, labels, *scalar):
        labels = _shifted(labels) if shifted else labels
        return _loss(head.logits(F.linear(hidden, weight), *scalar), labels, reduction)

    kind = "shifted" if shifted else "preshifted"
    return _signed(search, head, f"_lce_pattern_{head.family}_{kind}_{reduction}")


def _replacement(head: _Head, shifted: bool, reduction: str):
    def replacement(hidden, weight, labels, *scalar):
        options = head.options(literal_float(scalar[0])) if scalar else {}
        tokens = hidden.shape[:-1]
        # The op shifts along the last dim of hidden.shape[:-1]; the graph along the labels'.
        in_op_shift = shifted and _torch_api.known_equal(labels.shape, tokens)
        if shifted and not in_op_shift:
            labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if not _torch_api.known_equal(labels.shape, tokens):
            labels = labels.reshape(tokens)  # row-major, as the graph's view(-1) flattens
        return ops.linear_cross_entropy(
            hidden, weight, labels, ignore_index=-100, reduction=reduction, shift=in_op_shift,
            **options,
        )

    return _signed(replacement, head, f"_lce_replacement_{head.family}")


def _scalar(match, head: _Head) -> float | None:
    """The head's scalar in a match as a Python float (None if it is not one)."""
    return literal_float(_torch_api.match_value(match, head.scalar))


def _extra_check(match, head: _Head) -> bool:
    hidden = _torch_api.match_value(match, "hidden")
    weight = _torch_api.match_value(match, "weight")
    labels = _torch_api.match_value(match, "labels")
    if hidden.dtype not in FLOAT_DTYPES or hidden.dtype != weight.dtype:
        return reject(match, f"dtypes hidden {hidden.dtype}, weight {weight.dtype}")
    if hidden.dim() < 2:
        return reject(match, f"hidden {tuple(hidden.shape)} is one token without a token dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        return reject(match, f"weight {tuple(weight.shape)} vs hidden {tuple(hidden.shape)}")
    if labels.dtype != torch.int64:
        # cross_entropy refuses other target dtypes; fused, the graph would return a loss instead.
        return reject(match, f"labels dtype {labels.dtype} (cross_entropy takes int64 targets)")
    if not _torch_api.known_equal((labels.numel(),), (math.prod(hidden.shape[:-1]),)):
        return reject(match, f"labels {tuple(labels.shape)} are not provably one per token of "
                             f"hidden {tuple(hidden.shape)}")
    if len({hidden.device, weight.device, labels.device}) != 1:
        return reject(match, "hidden, weight and labels are on different devices")
    if head.scalar is not None:
        value = _scalar(match, head)
        if value is None or not head.valid(value):
            return reject(match, f"{head.family}'s {head.scalar} {value!r} is not a float the "
                                 "fused op takes")
    return True


@functools.cache
def _example_inputs(dtype: torch.dtype, shifted: bool, head: _Head) -> list:
    labels = torch.zeros(2, 8, dtype=torch.int64) if shifted else torch.zeros(16, dtype=torch.int64)
    inputs = [torch.empty(2, 8, 16, dtype=dtype), torch.empty(40, 16, dtype=dtype), labels]
    return inputs + [head.placeholder] if head.scalar else inputs


def register(pattern_pass, dtypes) -> None:
    for head in _HEADS:
        if head.scalar is not None:  # read as `linear(...) <scalar_op> scalar`
            _torch_api.scalar_consumers[head.scalar] = (head.scalar_op, 1, aten.linear.default)
    for dtype, head, shifted, reduction in itertools.product(
        dtypes, _HEADS, (True, False), _REDUCTIONS
    ):
        register_pattern(
            _search(head, shifted, reduction),
            _replacement(head, shifted, reduction),
            _example_inputs(dtype, shifted, head),
            pattern_pass,
            extra_check=functools.partial(_extra_check, head=head),
            scalar_workaround={head.scalar: head.placeholder} if head.scalar else None,
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
    if any(n.target is aten.reshape.default for n in chain[:-1]):
        return "the logits are flattened with reshape, where HF's causal-LM loss uses view"
    return (
        "the labels are not prepared as HF's causal-LM loss does (F.pad(labels, (0, 1), "
        "value=-100)[..., 1:].contiguous().view(-1), or shift_labels.view(-1))"
    )


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
        args = node.normalized_arguments(
            graph.owning_module, normalize_to_only_use_kwargs=True).kwargs
        weight = args["weight"]
        while weight.op == "call_function" and weight.target in CASTS:
            weight = weight.args[0]  # autocast's cast of an fp32 head is as frozen as the head
        frozen = weight.op == "placeholder" and weight.name in facts.frozen_inputs
        wanted = facts.training and frozen and ops.frozen_head_path_supports(
            args["weight"].meta["val"], reduction=args["reduction"], softcap=args["softcap"],
            label_smoothing=args["label_smoothing"])
        node.args, node.kwargs = (), {**args, "d_hidden_in_forward": wanted}


FUSION = Fusion(
    name="linear_cross_entropy",
    register=register,
    fused_ops=lambda: (torch.ops.chronicals.linear_cross_entropy.default,),
    is_candidate=_is_candidate,
    diagnose=_diagnose,
    finalize=_finalize,
)
