"""What every fusion provides to the backend, and helpers its patterns share."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.fx import Node

from compile_passes import _torch_api
from compile_passes.canonicalize import CASTS, strip_noop_casts


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Fusion:
    name: str
    register: Callable[[_torch_api.PatternMatcherPass, tuple[torch.dtype, ...]], None]
    """Registers the fusion's patterns into a pass (called once per pass), traced for inputs of
    the given float dtypes (`pattern_dtypes`: the ones a graph holds)."""
    fused_ops: Callable[[], tuple]
    """The `torch.ops.chronicals.*` overloads a replacement inserts (counted as fired)."""
    is_candidate: Callable[[Node], bool]
    """True for a node left in the graph that marks a subgraph this fusion could have fused."""
    diagnose: Callable[[Node], str]
    """Why a candidate left in the graph was not fused, as far as the graph shows."""
    finalize: Callable[[torch.fx.Graph, GraphFacts], None] | None = None
    """Adjusts the fused nodes to facts of the graph that patterns cannot see (run after the
    pattern pass on the top-level graph)."""
    rewrite: Callable[[torch.fx.Graph, GraphFacts], None] | None = None
    """Rewrites a graph (the top-level one and each checkpointed body) before the pattern pass,
    for a fusion into plain ATen ops that the patterns then see (LoRA's mixed precision)."""
    is_fused: Callable[[Node], bool] | None = None
    """True for a node such a rewrite left that marks one subgraph it rewrote (counted as fired,
    like the `fused_ops` a replacement inserts)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GraphFacts:
    """What the backend knows of a graph beyond its nodes' fake values, which carry no
    requires_grad."""

    training: bool
    """Grad mode is on and an input requires grad: a backward will follow."""
    frozen_inputs: frozenset[str]
    """Names of the top-level placeholders whose tensors require no grad (a frozen weight)."""
    lora_precision: str = "mixed"
    """The backend option: how PEFT's LoRA linears compute ('mixed' or 'exact'; lora.py)."""


SOURCE = "chronicals_source"
"""Key of a placeholder's meta holding Dynamo's name of the input (set by the backend)."""


def input_source(node: Node) -> str:
    """Dynamo's name of the graph input a placeholder stands for, after the module path of a
    parameter (`L_self_modules_q_proj_modules_lora_A_modules_default_parameters_weight_`); ''
    when unknown."""
    return node.meta.get(SOURCE, "") if node.op == "placeholder" else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Reason:
    text: str
    declined: bool
    """True when the subgraph is left to the compiler on purpose, because the compiler does it
    better there (`decline`); False when it could not be fused safely (`reject`)."""


# Reasons given by extra checks during one pattern pass, keyed by the name of the matched
# subgraph's output node.
_REASONS: contextvars.ContextVar[dict[str, Reason] | None] = contextvars.ContextVar(
    "chronicals_rejection_reasons", default=None
)


@contextlib.contextmanager
def collecting_reasons() -> Iterator[dict[str, Reason]]:
    reasons: dict[str, Reason] = {}
    token = _REASONS.set(reasons)
    try:
        yield reasons
    finally:
        _REASONS.reset(token)


def _record(match: _torch_api.Match, reason: Reason) -> bool:
    reasons = _REASONS.get()
    if reasons is not None:
        for node in match.nodes:
            reasons.setdefault(node.name, reason)
    return False


def reject(match: _torch_api.Match, reason: str) -> bool:
    """Record why a structurally matching subgraph is not fused; returns False for extra_check."""
    return _record(match, Reason(reason, declined=False))


def decline(match: _torch_api.Match, reason: str) -> bool:
    """Record that a matching subgraph is left to the compiler, which does better with it there
    (reported as declined, not rejected: strict mode accepts it); returns False."""
    return _record(match, Reason(reason, declined=True))


def reject_node(node: Node, reason: str, *, declined: bool = False) -> None:
    """Record why a candidate node found by a finalize pass (not a pattern) is not fused
    (`declined`: left as written on purpose, as `decline` says)."""
    reasons = _REASONS.get()
    if reasons is not None:
        reasons.setdefault(node.name, Reason(reason, declined=declined))


def accepts_operands(match: _torch_api.Match, *names: str, example: str, fused_into: str) -> bool:
    """True, or False after declining the match when one of its operands `names` is computed by a
    point-wise op (`example` says which, typically). Inductor fuses such an op into its own
    kernel for the subgraph (`fused_into`), while a fused op needs the operand written to memory
    first. A dtype cast on one device counts (PEFT casts its fp32 adapters' sum back to the
    model's dtype), though ATen does not tag it."""
    for name in names:
        node = match.kwargs.get(name)
        target = getattr(node, "target", None)
        if torch.Tag.pointwise in getattr(target, "tags", ()) or _is_cast(node):
            return decline(
                match,
                f"{name} is computed by {target} (e.g. {example}), which Inductor fuses into "
                f"{fused_into}; the fused op would need it in memory first",
            )
    return True


def _is_cast(node: object) -> bool:
    """A tensor's conversion on its own device."""
    if not isinstance(node, Node) or node.target not in CASTS:
        return False
    source, out = val(node.args[0]), val(node)
    return isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and (
        source.device == out.device)


def is_call(node: object, *targets) -> bool:
    """`node` is a call of one of `targets`."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def walk_back(node: object, targets: tuple, kept: list[Node], single_use: bool = False) -> object:
    """Follow `node` back through calls of `targets` (each with one user, if `single_use`),
    appending each to `kept`; the first node that is not one."""
    while is_call(node, *targets) and (not single_use or len(node.users) == 1):
        kept.append(node)
        node = node.args[0]
    return node


def recorded_reason(node: Node) -> Reason | None:
    reasons = _REASONS.get()
    return None if reasons is None else reasons.get(node.name)


def val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, Node) else node


def shared_intermediate(output: Node, depth: int = 8) -> Node | None:
    """The first node among `output`'s producers (up to `depth` steps back) whose result is also
    used outside the chain: the usual reason a look-alike subgraph must not be fused."""
    frontier, seen = [output], set()
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for arg in node.all_input_nodes:
                if arg in seen or arg.op != "call_function":
                    continue
                seen.add(arg)
                if len(arg.users) > 1:
                    return arg
                nxt.append(arg)
        frontier = nxt
    return None


def source_line(node: Node) -> str:
    """The last source line of the node's stack trace (not the ^~~ markers Python 3.11 puts
    under it)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines() if line.strip().strip("^~")]
    return lines[-1] if lines else ""


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes patterns are traced for and every fused op accepts."""


def pattern_dtypes(graphs: Sequence[torch.fx.Graph]) -> tuple[torch.dtype, ...]:
    """The dtypes to trace patterns for to rewrite `graphs`: float32, and each other dtype of
    FLOAT_DTYPES that a value of the graphs has. A pattern traced for a dtype the graphs do not
    hold casts to it (no value of the graph could match) or is the float32 pattern (the casts
    that differ are no-ops, removed from patterns and graphs alike). Tracing each pattern costs
    about 10 ms, and a bf16 model's graphs need two of the three dtypes."""
    held = {torch.float32}
    for graph in graphs:
        for node in graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                held.add(value.dtype)
    return tuple(d for d in FLOAT_DTYPES if d in held)


def register_pattern(
    search_fn: Callable[..., object],
    replace_fn: Callable[..., object],
    example_inputs: list,
    pattern_pass: _torch_api.PatternMatcherPass,
    *,
    extra_check: Callable[[_torch_api.Match], bool],
    scalar_workaround: dict[str, float] | None = None,
) -> None:
    """Register a search/replacement pair, traced and canonicalised like the model graph. A
    match is replaced when `extra_check` accepts it and the fused op accepts its inputs."""
    names = tuple(inspect.signature(replace_fn).parameters)

    def check(match: _torch_api.Match) -> bool:
        return extra_check(match) and _op_accepts(match, replace_fn, names)

    _torch_api.register_replacement(
        search_fn,
        replace_fn,
        example_inputs,
        pattern_pass,
        extra_check=check,
        scalar_workaround=scalar_workaround,
        canonicalize=strip_noop_casts,
    )


def _op_accepts(match: _torch_api.Match, replace_fn: Callable[..., object],
                names: tuple[str, ...]) -> bool:
    """True, or False after rejecting the match when the fused op refuses its inputs with the
    ValueError or TypeError it raises for bad input (e.g. rope's cos and sin that require grad,
    which its autograd setup refuses). The replacement runs on the match's fake values as
    AOTAutograd would run it on the rewritten graph, where the error would fail the user's
    compile of a subgraph that eager runs; rejected, the subgraph is compiled as written."""
    try:
        _torch_api.run_on_match(replace_fn, match, names)
    except (ValueError, TypeError) as refused:
        return reject(match, f"the fused op refuses these inputs: {refused}")
    return True


def literal_float(value: object) -> float | None:
    """A float argument of a matched subgraph as a Python float. Under `dynamic=True` Dynamo
    passes module float attributes (eps, softcap) as symbolic floats; reading one specialises
    the graph on its value (a guard), which is what plain torch.compile does for such scalars."""
    if isinstance(value, (float, torch.SymFloat)):
        return float(value)
    return None
