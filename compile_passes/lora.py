"""PEFT's LoRA linears -> the mixed-precision form torch.autocast would compute.

PEFT computes an adapted linear as

    result = base(x)
    result = result + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling   # once per active adapter
    result = result.to(base(x).dtype)

With its default fp32 adapters on a bf16 model every adapted linear casts its input to fp32, runs
both adapter GEMMs in fp32, adds the bf16 base output into an fp32 sum and casts that back: about
a fifth slower and a third more memory than bf16 adapters (measured figures: benchmarks/README.md).

`lora_precision="mixed"` (the default) rewrites each adapted linear into plain ATen ops, which
Inductor compiles:

    result = base(x) + linear(linear(dropout(x), A.to(dt)), (B * scaling).to(dt))

in the activation dtype dt (the base output's). It is what autocast does with PEFT's module: the
adapter GEMMs run in dt with fp32 accumulation, the fp32 adapter weights are cast to dt once per
forward in the graph, `scaling` multiplies B's (rank x out) weight instead of the (tokens x out)
output, and the gradients flow back through the casts, so A and B receive fp32 gradients in their
fp32 parameters. What it gives up: the adapter's contribution is rounded to dt before the sum
(eager rounds the fp32 sum once). Adapters without dropout that read one input (q/k/v, gate/up)
run their A projections as one GEMM against the concatenated A weights, split after. Dropout > 0
is kept per adapter, in dt: one mask per adapter, drawn in the forward and reused by autograd in
the backward, as in PEFT; those adapters read different inputs and are not grouped.

An adapted down_proj whose input is a gated MLP's act(gate) * up gets that product recomputed in
the backward (`_recompute_gated_product`), not kept.

`lora_precision="exact"` leaves PEFT's graph as written; each adapted linear is reported declined.

An adapted linear is recognised by its weights, not only by its shape: A and B must be inputs of
the graph whose Dynamo names hold `lora_A` and `lora_B` of the same module and adapter. Mixed
precision is PEFT's convention for its adapters (autocast would apply it); a low-rank product of
other fp32 weights is the user's own math and is left as written. rsLoRA is a different
`scaling` value and needs nothing else. DoRA is declined: its output is not `base + B(A(x)) * s`
but rescales it by a magnitude over the norm of `W + s B A`, recomputed from the weights each step.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
from torch.fx import Graph, Node

from compile_passes import _torch_api
from compile_passes.canonicalize import CASTS
from compile_passes.fusion import (
    FLOAT_DTYPES,
    Fusion,
    GraphFacts,
    Reason,
    input_source,
    is_call,
    literal_float,
    reject_node,
    val,
    walk_back,
)

aten = torch.ops.aten

_MADE = "chronicals_lora"
"""Key of the node meta set on each node the rewrite makes: 'sum' on an adapter's sum (counted
as fired), 'part' on the others (a lora_B GEMM of fp32 adapters in an fp32 graph with scaling 1
still reads B's weight as it is, and is no candidate left unfused)."""

# Dynamo names a parameter input after its module path, e.g.
# L_self_modules_q_proj_modules_lora_A_modules_default_parameters_weight_.
_WEIGHT = re.compile(r"^(?P<module>.*)_lora_(?P<which>[AB])_modules_(?P<adapter>.+)_parameters_"
                     r"(?P<param>weight|bias)_$")
_MAGNITUDE = re.compile(r"^(?P<module>.*)_lora_magnitude_vector_")


def _lora_weight(node: object, which: str) -> tuple[str, str] | None:
    """(module, adapter) when `node` is the weight of a PEFT lora_A or lora_B layer."""
    if not isinstance(node, Node) or node.op != "placeholder":
        return None
    found = _WEIGHT.match(input_source(node))
    if found is None or found["which"] != which or found["param"] != "weight":
        return None
    return found["module"], found["adapter"]


@dataclasses.dataclass(frozen=True, slots=True)
class _Adapter:
    """One adapter's `result + lora_B(lora_A(dropout(x))) * scaling` in the graph."""

    total: Node
    """The sum `result + ...` (its value is replaced)."""
    result: Node
    x: Node
    """The linear's input in the activation dtype (before PEFT's cast to the adapter dtype)."""
    dropout: Node | None
    a: Node
    b: Node
    b_bias: Node | None
    scaling: float
    chain: tuple[Node, ...]
    """The nodes between x and the sum, the sum first (erased once replaced: the graph's dead
    code elimination keeps a dropout, which is random)."""


def _linear_parts(node: Node) -> tuple[Node, Node, Node | None]:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def _is_cast_of(node: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in CASTS


def _rejected(text: str) -> Reason:
    return Reason(text, declined=False)


def _match(b_linear: Node, dora_modules: set[str]) -> _Adapter | Reason:
    """The adapter whose lora_B projection is `b_linear`, or why it is not rewritten."""
    module, adapter = _lora_weight(b_linear.args[1], "B")
    if module in dora_modules:
        return Reason("DoRA: the output is rescaled by a magnitude over the norm of W + s B A, "
                      "recomputed from the weights each step, not base + B(A(x)) * s; left as "
                      "written", declined=True)
    h, _, b_bias = _linear_parts(b_linear)
    if not (_is_linear(h) and _lora_weight(h.args[1], "A") == (module, adapter)):
        return _rejected(f"lora_B of {adapter!r} does not read its lora_A projection")
    if _linear_parts(h)[2] is not None:
        return _rejected("lora_A has a bias")
    if len(h.users) != 1:
        return _rejected("lora_A's output is used outside the adapter")
    d = h.args[0]
    dropout = d if isinstance(d, Node) and d.target is aten.dropout.default else None
    cast = dropout.args[0] if dropout is not None else d
    x = cast.args[0] if _is_cast_of(cast) else cast
    if dropout is not None and len(dropout.users) != 1:
        return _rejected("the dropped-out input is used outside the adapter")

    (user,) = b_linear.users if len(b_linear.users) == 1 else (None,)
    scaling, out = 1.0, b_linear
    if user is not None and user.target is aten.mul.Tensor and user.args[0] is b_linear:
        scaling = literal_float(user.args[1])
        if scaling is None:
            return _rejected(f"scaling is {user.args[1]!r}, not a number")
        out = user
    (total,) = out.users if len(out.users) == 1 else (None,)
    if (total is None or total.target is not aten.add.Tensor or total.args[1] is not out
            or total.kwargs.get("alpha", 1) != 1):
        return _rejected("the adapter's output is not added once to the base output")

    result, xv, av, bv = (val(n) for n in (total.args[0], x, h.args[1], b_linear.args[1]))
    dtype = getattr(result, "dtype", None)
    if (dtype not in FLOAT_DTYPES or getattr(xv, "dtype", None) != dtype
            or xv.device != result.device
            or av.dtype not in FLOAT_DTYPES or bv.dtype not in FLOAT_DTYPES):
        return _rejected(f"dtypes: result {dtype}, input {getattr(xv, 'dtype', None)}, "
                         f"A {av.dtype}, B {bv.dtype} (need float dtypes, the input's that of "
                         "the result, on its device)")
    total_dtype = val(total).dtype
    for use in total.users:
        keeps_dtype = use.target is aten.add.Tensor and all(
            a is total or getattr(val(a), "dtype", None) == total_dtype for a in use.args[:2])
        if total_dtype != dtype and not (_is_cast_of(use) and val(use).dtype == dtype
                                         or keeps_dtype):
            return _rejected(f"the {total_dtype} sum is used by {use.name}, whose dtype "
                             f"would change with the sum in {dtype}")
    chain = (total, *([out] if out is not b_linear else []), b_linear, h,
             *([dropout] if dropout is not None else []), *([cast] if cast is not x else []))
    return _Adapter(total=total, result=total.args[0], x=x, dropout=dropout, a=h.args[1],
                    b=b_linear.args[1], b_bias=b_bias, scaling=scaling, chain=chain)


def _is_linear(node: object) -> bool:
    return isinstance(node, Node) and node.target is aten.linear.default


def _call(graph: Graph, target, *args) -> Node:
    """A new node computing target(*args), with its fake value (fake tensors dispatch through
    their own mode)."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*torch.fx.node.map_arg(args, val))
    node.meta[_MADE] = "part"
    return node


def _cast(graph: Graph, node: Node, dtype: torch.dtype) -> Node:
    return node if val(node).dtype == dtype else _call(graph, aten.to.dtype, node, dtype)


def _scaled(graph: Graph, weight: Node, scaling: float) -> Node:
    return weight if scaling == 1.0 else _call(graph, aten.mul.Tensor, weight, scaling)


def _rewrite_mixed(graph: Graph, adapter: _Adapter) -> tuple[Node, Node]:
    """Replace the adapter's sum; returns (its input, its lora_A GEMM) for grouping."""
    dtype = val(adapter.result).dtype
    with graph.inserting_before(adapter.total):
        x = adapter.x
        if adapter.dropout is not None:
            x = _call(graph, aten.dropout.default, x, *adapter.dropout.args[1:])
        h = _call(graph, aten.linear.default, x, _cast(graph, adapter.a, dtype))
        b, bias = (None if w is None else _cast(graph, _scaled(graph, w, adapter.scaling), dtype)
                   for w in (adapter.b, adapter.b_bias))
        y = _call(graph, aten.linear.default, h, b, bias)
        total = _call(graph, aten.add.Tensor, adapter.result, y)
    total.meta[_MADE] = "sum"
    total.meta["stack_trace"] = adapter.total.meta.get("stack_trace")
    for use in list(adapter.total.users):
        if _is_cast_of(use) and val(use).dtype == val(total).dtype:
            use.replace_all_uses_with(total)
        else:
            use.replace_input_with(adapter.total, total)
    for node in adapter.chain:
        if not node.users:
            graph.erase_node(node)
    return x, h


def _group_a_projections(graph: Graph, a_gemms: list[tuple[Node, Node]]) -> None:
    """Adapters reading one input run their lora_A GEMMs as one, against the concatenated
    weights (each A cast once, as part of the concatenation), then split."""
    groups: dict[Node, list[Node]] = {}
    for x, h in a_gemms:
        groups.setdefault(x, []).append(h)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x, gemms in groups.items():
        weights = [h.args[1].args[0] if _is_cast_of(h.args[1]) else h.args[1] for h in gemms]
        if len(gemms) < 2 or len({val(w).dtype for w in weights}) != 1:
            continue
        gemms.sort(key=order.__getitem__)
        with graph.inserting_before(gemms[0]):
            cat = _call(graph, aten.cat.default, weights, 0)
            h = _call(graph, aten.linear.default, x, _cast(graph, cat, val(x).dtype))
            parts = _call(graph, aten.split_with_sizes.default, h,
                          [val(w).shape[0] for w in weights], -1)
            for i, gemm in enumerate(gemms):
                gemm.replace_all_uses_with(_call(graph, operator.getitem, parts, i))
        for gemm in gemms:
            graph.erase_node(gemm)


def _rewrite(graph: Graph, facts: GraphFacts) -> None:
    dora = {m["module"] for n in graph.nodes if n.op == "placeholder"
            and (m := _MAGNITUDE.match(input_source(n)))}
    a_gemms = []
    for node in list(graph.nodes):
        if not _is_candidate(node):
            continue
        adapter = _match(node, dora)
        if isinstance(adapter, Reason):
            reject_node(node, adapter.text, declined=adapter.declined)
        elif facts.lora_precision == "exact":
            reject_node(node, "lora_precision='exact': PEFT's adapter math left as written",
                        declined=True)
        else:
            a_gemms.append(_rewrite_mixed(graph, adapter))
    _group_a_projections(graph, a_gemms)
    for x in {x for x, _ in a_gemms}:
        _recompute_gated_product(x)
    graph.eliminate_dead_code()


# Activations of a gated MLP's gate (SwiGLU, GeGLU); the product act(gate) * up feeds down_proj.
_ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.relu.default)


def _recompute_gated_product(x: Node) -> None:
    """An adapted linear's input x = act(gate) * up (down_proj of a gated MLP) is kept for the
    backward only for lora_A's gradient where the base weight is frozen, as PEFT leaves it, while
    gate and up are kept anyway for the product's own gradient: the partitioner is asked to
    recompute the product (and the activation, with any casts between) from them, one
    elementwise kernel, instead of keeping a tokens x intermediate tensor a layer (a trainable
    base weight's gradient reads the recomputed product too). Inductor's partitioner does not
    choose this on its own: it keeps any value a backward GEMM reads."""
    if not (is_call(x, aten.mul.Tensor) and all(isinstance(a, Node) for a in x.args[:2])):
        return
    for operand in x.args[:2]:
        nodes = []
        operand = walk_back(operand, CASTS, nodes, single_use=True)
        if is_call(operand, *_ACTIVATIONS) and len(operand.users) == 1:
            for node in (x, *nodes, operand):
                _torch_api.mark_recomputed(node)
            return


def _is_candidate(node: Node) -> bool:
    """A lora_B projection left in the graph (not one the rewrite made)."""
    return (node.op == "call_function" and _is_linear(node) and _MADE not in node.meta
            and _lora_weight(node.args[1], "B") is not None)


FUSION = Fusion(
    name="lora",
    register=lambda pattern_pass, dtypes: None,
    fused_ops=lambda: (),
    is_candidate=_is_candidate,
    diagnose=lambda node: "not PEFT's LoRA sum result + lora_B(lora_A(x)) * scaling",
    rewrite=_rewrite,
    is_fused=lambda node: node.meta.get(_MADE) == "sum",
)
