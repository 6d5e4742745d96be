"""The one place that touches private PyTorch APIs.

Everything the backend needs from `torch._dynamo`, `torch._inductor`, `torch._functorch`,
`torch._guards` and `torch.fx.experimental` is imported or wrapped here, so a torch upgrade
changes this file and no other. Checked on torch 2.11 and 2.13 in CI (.ci/run's two stages); the
test suite also passed on 2.12.1 once, by hand.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
from torch._functorch.aot_autograd import make_boxed_func
from torch._guards import HopDispatchSetCache, TracingContext, detect_fake_mode
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import Match, PatternMatcherPass
from torch._inductor.pattern_matcher import register_replacement as _register_replacement
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "BODY_OPERANDS",
    "ENTER_AUTOCAST",
    "EXIT_AUTOCAST",
    "INVOKE_SUBGRAPH",
    "Match",
    "PatternMatcherPass",
    "allow_side_effects_in_checkpointed_regions",
    "ambient_autocast_off",
    "compile_with_aot_eager",
    "compile_with_inductor",
    "ensure_backend_registered",
    "fake_inputs",
    "is_dynamo_signal",
    "is_higher_order",
    "keep_package_id",
    "known_equal",
    "mark_recomputed",
    "new_graph_breaks",
    "register_replacement",
    "resumed_after_graph_break",
    "run_on_match",
    "size_hint",
    "tensor_leaves",
    "trace_pre_dispatch",
]

logger = logging.getLogger("chronicals.compile")

# The call of a nested compile region (a decoder layer, chronicals/regions.py):
# invoke_subgraph(body, identifier, *operands).
INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph

# The higher-order ops that call a body, and where their operands start:
# tag_activation_checkpoint(body, *operands) of a checkpointed layer; invoke_subgraph(body,
# identifier, *operands) of a layer region.
BODY_OPERANDS = {torch.ops.higher_order.tag_activation_checkpoint: 1, INVOKE_SUBGRAPH: 2}


# The graph nodes that enter and leave an autocast region (torch.autocast inside the compiled code).
ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in a nested structure of tuples, lists and dicts (an fx node's output)."""
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def is_higher_order(target: object) -> bool:
    """Whether an FX node's target is a higher-order op (it may call a graph module body)."""
    return isinstance(target, torch._ops.HigherOrderOperator)

# torch 2.13 added `pattern_name`; 2.11 does not accept it.
_REGISTER_TAKES_NAME = "pattern_name" in inspect.signature(_register_replacement).parameters


def ensure_backend_registered(name: str, compiler_fn: Callable[..., Any]) -> None:
    """Register `compiler_fn` as `torch.compile(backend=name)` unless a backend of that name is
    registered already (`register_backend` asserts on duplicates)."""
    if name not in _COMPILER_FNS:
        register_backend(compiler_fn=compiler_fn, name=name)


def allow_side_effects_in_checkpointed_regions() -> None:
    """Let Dynamo keep a gradient-checkpointed region that has a Python side effect in one graph
    (`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`) instead of breaking
    the graph at the region, which splits the model, and runs the region eagerly.

    transformers 5.25 depends on `kernels`, whose `use_kernelized_func` wraps the forward of every
    attention module (Llama, Qwen3, Gemma2, ...) in a set and a reset of a module-level variable.
    Inside a checkpointed decoder layer Dynamo refuses that mutation ("HOP: Unsafe side effect"),
    because eager checkpointing would redo it when the backward recomputes the layer. With the
    flag the side effect runs once, in the forward, and the recompute redoes only tensor
    operations. For a set followed by its reset the two are the same. Layers that write state
    (a KV cache) are kept from doing so under checkpointing by transformers itself, so that a
    recompute does not write twice.

    The flag is process-wide Dynamo configuration, read while Dynamo traces, before any backend
    sees a graph: it is set when the backend is loaded (`import chronicals`, or the first
    `torch.compile(backend="chronicals")` through the entry point) and applies to every
    torch.compile in the process from then on."""
    config = torch._dynamo.config
    if not config.skip_fwd_side_effects_in_bwd_under_checkpoint:
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        logger.info(
            "chronicals: set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint"
            " = True, so a checkpointed layer with a Python side effect stays in one graph"
        )


# What `new_graph_breaks` has read of Dynamo's list: how much, its last entry (the list is
# cleared by torch.compiler.reset() and may then grow past that length), and the breaks returned.
_graph_breaks_read: tuple[int, Any, set[tuple[str, str]]] = (0, None, set())


def new_graph_breaks() -> list[tuple[str, str]]:
    """Graph breaks Dynamo met that no earlier call returned since torch.compiler.reset(), as
    (reason, source): Dynamo's explanation, and the innermost user frame where it broke
    ("file:line in function: code"). Dynamo records every break in
    `torch._dynamo.utils.graph_break_reasons`, the list `torch._dynamo.explain` reads, and
    records one again each time it restarts a frame: each is returned once."""
    global _graph_breaks_read
    from torch._dynamo.utils import graph_break_reasons

    length, last, seen = _graph_breaks_read
    if not (0 < length <= len(graph_break_reasons) and graph_break_reasons[length - 1] is last):
        length, seen = 0, set()  # cleared since the last call
    breaks = []
    for entry in graph_break_reasons[length:]:
        reason = " ".join(line.strip() for line in entry.reason.splitlines() if line.strip())
        source = ""
        if entry.user_stack:
            frame = entry.user_stack[-1]
            source = f"{frame.filename}:{frame.lineno} in {frame.name}"
            if frame.line:
                source += f": {frame.line.strip()}"
        if (reason, source) not in seen:
            seen.add((reason, source))
            breaks.append((reason, source))
    last = graph_break_reasons[-1] if graph_break_reasons else None
    _graph_breaks_read = (len(graph_break_reasons), last, seen)
    return breaks


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+, in (?P<name>\S+)')


def resumed_after_graph_break(node: torch.fx.Node) -> str | None:
    """Where the function whose rest this node's graph computes was split by a graph break
    ("file:line in function"), or None when the graph is not such a rest. Dynamo compiles the
    code after a graph break as a new function named `torch_dynamo_resume_in_<function>_at_<line>`,
    which is the outermost frame of its nodes' stack traces."""
    from torch._dynamo.resume_execution import TORCH_DYNAMO_RESUME_IN_PREFIX

    root = _FRAME.search(node.meta.get("stack_trace") or "")
    if root is None or not root["name"].startswith(TORCH_DYNAMO_RESUME_IN_PREFIX + "_"):
        return None
    split = re.fullmatch(r"(?P<function>.+)_at_(?P<line>\d+)",
                         root["name"][len(TORCH_DYNAMO_RESUME_IN_PREFIX) + 1:])
    if split is None:
        return None
    return f"{root['file']}:{split['line']} in {split['function']}"


@contextlib.contextmanager
def _checkpoint_bodies_traceable(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Let `make_fx(pre_dispatch=True)` trace through gradient-checkpointed regions.

    Dynamo puts each checkpointed layer in a `tag_activation_checkpoint` body whose metadata
    lacks `_checkpoint_context_fn`; the pre-dispatch trace then fails with a KeyError on torch
    2.11 and 2.13. For the duration of the trace each body gets a policy that recomputes
    everything, which is what plain checkpointing means; it is removed afterwards.
    """
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        create_selective_checkpoint_contexts,
    )

    def recompute_all(ctx, op, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    patched = []
    for module in gm.modules():
        if (isinstance(module, torch.fx.GraphModule) and module is not gm
                and "_checkpoint_context_fn" not in module.meta):
            module.meta["_checkpoint_context_fn"] = (
                lambda: create_selective_checkpoint_contexts(recompute_all)
            )
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.meta.pop("_checkpoint_context_fn", None)


def fake_inputs(example_inputs: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Dynamo's fake mode (or a new one) and the example inputs as its fake tensors."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [
        fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs
    ]
    return fake_mode, inputs


def trace_pre_dispatch(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> torch.fx.GraphModule:
    """Trace a Dynamo graph to pre-dispatch ATen on the fake tensors Dynamo used.

    Pre-dispatch ATen is the level where `linear`, `silu` and `cross_entropy_loss` are still
    single nodes and autograd has not been traced, so a custom op swapped in here brings its own
    registered backward. The graph is run node by node (an fx Interpreter) with node metadata
    preserved, so each traced node keeps the user's stack trace of the node it came from (the
    report's source lines; `resumed_after_graph_break`).
    """
    fake_mode, inputs = fake_inputs(example_inputs)
    with (_checkpoint_bodies_traceable(gm), fake_mode, ambient_autocast_off(),
          _vmap_recorded(gm), torch.fx.traceback.preserve_node_meta()):
        traced = make_fx(torch.fx.Interpreter(gm).run, pre_dispatch=True)(*inputs)
    _check_no_lost_values(gm, traced)
    return traced


def _runs_vmap(gm: torch.fx.GraphModule) -> bool:
    """The Dynamo graph inlines torch.vmap: functorch's batching calls
    (torch._functorch.predispatch's `_add_batch_dim`, `_remove_batch_dim`)."""
    return any(
        getattr(node.target, "__name__", None) == "_add_batch_dim"
        for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
    )


def _vmap_recorded(gm: torch.fx.GraphModule) -> contextlib.AbstractContextManager:
    """For a graph that inlines torch.vmap (transformers' associative_scan in Jamba's Mamba
    layers), the state torch.export traces in: functorch's batching calls are then recorded as
    calls, as Dynamo wrote them, instead of run. Run, they batch the values under the trace, which
    loses their producers and holds the scan's steps as constants (torch 2.13)."""
    if not _runs_vmap(gm):
        return contextlib.nullcontext()
    from torch._export.utils import _compiling_state_context
    from torch._functorch import predispatch

    # The calls that open and close a vmap level return the level (a constant once traced), so
    # dead-code elimination would drop them and leave the batching calls outside any level.
    for fn in (predispatch._vmap_increment_nesting, predispatch._vmap_decrement_nesting):
        torch.fx.node.has_side_effect(fn)
    return _compiling_state_context()


class TraceLostValues(RuntimeError):
    """The pre-dispatch trace turned values the graph computes into constants."""


def _check_no_lost_values(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule) -> None:
    """Raise TraceLostValues where the trace holds a fake tensor as a constant: a value computed
    from the inputs whose producer make_fx did not record, so the graph would compute with its
    trace-time placeholder instead (AOTAutograd then fails on it: "expected FakeTensor for
    arg"). Seen, before `_vmap_recorded`, where Dynamo inlines torch.vmap: Jamba's scan steps came
    out as constants. The backend then compiles the graph as written and reports why."""
    lost = [
        node
        for module in traced.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "get_attr"
        and isinstance(getattr(module, node.target, None), torch._subclasses.FakeTensor)
    ]
    if not lost:
        return
    vmap = _runs_vmap(gm)
    where = sorted({_user_frame(user) for node in lost for user in node.users} - {""})
    raise TraceLostValues(
        f"the pre-dispatch trace turned {len(lost)} computed values "
        f"{'of a torch.vmap region ' if vmap else ''}into constants "
        f"(at {'; '.join(where) or 'lines not recorded'})"
    )


def _user_frame(node: torch.fx.Node) -> str:
    """`file:line in function` of the innermost frame of the node's stack trace outside torch."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', node.meta.get("stack_trace") or "")
    outside = [f for f in frames if "/torch/" not in pathlib.Path(f[0]).as_posix()]
    if not outside:
        return ""
    file, line, function = outside[-1]
    return f"{file}:{line} in {function}"


@contextlib.contextmanager
def ambient_autocast_off() -> Iterator[None]:
    """Autocast off around pre-dispatch tracing. The tracer records the graph's own autocast
    regions without entering them, so an ambient autocast would cast every value, even inside a
    region that turns it off, and the values would carry dtypes that occur nowhere at run time
    (a cast the graph needs would then look like a no-op). The backend traces only graphs whose
    casts autocast makes are written in (`make_autocast_explicit`), so without it they are exact."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def trace_pattern(fn: Callable[..., Any], args: Sequence[Any], **_: Any) -> torch.fx.GraphModule:
    """The tracer `register_replacement` uses for search and replacement functions: the same
    pre-dispatch level as the model graph, autocast off as there (patterns are registered on
    first use, which may be inside the user's autocast). torch 2.13 passes `get_decomp_fn`, 2.11
    does not."""
    with ambient_autocast_off():
        return make_fx(fn, pre_dispatch=True)(*args)


def register_replacement(
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    pass_: PatternMatcherPass,
    *,
    extra_check: Callable[[Match], bool],
    scalar_workaround: dict[str, float] | None = None,
    canonicalize: Callable[[torch.fx.GraphModule], None],
) -> None:
    def trace_fn(fn, args, **kwargs):
        traced = trace_pattern(fn, args)
        canonicalize(traced)
        return traced

    kwargs: dict[str, Any] = {}
    if _REGISTER_TAKES_NAME:
        kwargs["pattern_name"] = search_fn.__name__
    _register_replacement(
        search_fn,
        replace_fn,
        list(example_inputs),
        trace_fn,
        pass_,
        extra_check=extra_check,
        scalar_workaround=scalar_workaround,
        skip_duplicates=True,
        **kwargs,
    )


def known_equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two shapes (ints or, under dynamic shapes, SymInts) are equal for every value their
    symbols can take. False when they differ or it cannot be proved; either way no guard is
    added, so the compiled graph is not specialised on the answer."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def match_outputs(match: Match) -> list[torch.fx.Node]:
    """The graph nodes bound to a pattern's outputs (one per output, in order)."""
    return [n for n in match.output_nodes() if n is not None]


def match_value(match: Match, name: str) -> Any:
    """The fake value of a matched argument (a tensor's shape, dtype and device), or the literal.

    A scalar argument (eps, softcap) whose value differs from the pattern's placeholder value is
    matched as a literal when the match is re-checked at the real shapes, and torch 2.11 then
    leaves it out of `match.kwargs` (2.13 fills it in). Such a value is read from the matched
    node that consumes it: see `scalar_consumers`.
    """
    if name in match.kwargs:
        node = match.kwargs[name]
        return node.meta["val"] if isinstance(node, torch.fx.Node) else node
    target, index, first_arg_op = scalar_consumers[name]
    for node in match.nodes:
        first = node.args[0] if node.args else None
        if node.target is target and getattr(first, "target", None) is first_arg_op:
            return node.args[index]
    raise KeyError(f"{name} is neither an argument nor a literal of the match")


def run_on_match(fn: Callable[..., Any], match: Match, names: Sequence[str]) -> None:
    """Call `fn` with the match's values of `names` as AOTAutograd will give them to the fused op
    in the rewritten graph: its fake tensors, each requiring grad where the traced value does,
    and its literals. So the op's fake (shape, dtype and option checks) runs, and, where an input
    requires grad, its autograd setup. The fake in `meta["val"]` is detached; make_fx records
    requires_grad in `meta["tensor_meta"]` (False inside a no_grad region)."""
    values = [match_value(match, name) for name in names]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    fake_mode = detect_fake_mode(tensors) if tensors else None
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for i, name in enumerate(names):
            node = match.kwargs.get(name)
            meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
            if isinstance(values[i], torch.Tensor) and getattr(meta, "requires_grad", False):
                values[i] = values[i].detach().requires_grad_()
        fn(*values)


# Scalar argument name -> (op that consumes it, the scalar's position among its args, the op
# producing its first arg). Each fusion registers its own scalars (rms_norm.py's eps,
# linear_cross_entropy.py's logit scales).
scalar_consumers: dict[str, tuple[Any, int, Any]] = {}


def _nop(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    return make_boxed_func(gm)


@contextlib.contextmanager
def one_schema_per_region() -> Iterator[None]:
    """Check each layer region's body for input mutation once, not once per layer.

    Under autograd, every `invoke_subgraph` call re-traces its body to a schema only to refuse a
    body that mutates its inputs (torch 2.11 and 2.13, `maybe_run_autograd`): with one body for
    24 layers that is 24 identical traces in each of the backend's pre-dispatch trace and
    AOTAutograd's two passes, two thirds of a 24-layer tiny model's compile on the CPU. The
    schema depends only on the body and its operands' types, shapes, dtypes and gradient needs,
    so it is kept per those for the duration of one compile."""
    if "gen_schema" in vars(INVOKE_SUBGRAPH):  # inside another compile's: its cache serves
        yield
        return
    schemas: dict[tuple, Any] = {}
    generate = INVOKE_SUBGRAPH.gen_schema

    def key(value: Any) -> Any:
        # Sizes may be symbolic (dynamic shapes): SymInts do not hash, their expressions do.
        if isinstance(value, torch.Tensor):
            return ("tensor", str(tuple(value.shape)), str(tuple(value.stride())), value.dtype,
                    value.device, value.requires_grad)
        if isinstance(value, (int, str, type(None), torch.SymInt)):
            return (type(value), str(value))
        return (type(value), id(value))

    def gen_schema(subgraph: Any, identifier: Any, *operands: Any) -> Any:
        k = (id(subgraph), identifier, tuple(key(o) for o in operands))
        if k not in schemas:
            schemas[k] = (subgraph, generate(subgraph, identifier, *operands))
        return schemas[k][1]

    INVOKE_SUBGRAPH.gen_schema = gen_schema
    try:
        yield
    finally:
        del INVOKE_SUBGRAPH.gen_schema


def _regions_ready_for_aot(gm: torch.fx.GraphModule) -> None:
    """Let AOTAutograd compile a graph whose layer regions (`invoke_subgraph` bodies, see
    chronicals/regions.py) the backend has traced to pre-dispatch ATen and rewritten.

    Two things of that trace would mislead it (torch 2.11 and 2.13): the trace cached each body
    under its identifier in Dynamo's tracing context, where AOTAutograd would find the traced
    body and its autograd wrapper instead of the rewritten one; and the body's outputs carry
    `val`s traced below autograd, which say requires_grad=False, from which AOTAutograd would
    build a backward with no incoming gradients ("outs_to_grad length (1) != tangents length
    (0)"). The cache is emptied and those `val`s dropped: AOTAutograd then reads the outputs'
    gradient needs by running the body on its fake inputs, once per region."""
    bodies = [
        getattr(module, node.args[0].target)
        for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.find_nodes(op="call_function", target=INVOKE_SUBGRAPH)
    ]
    if not bodies:
        return
    context = TracingContext.try_get()
    if context is not None:
        context.hop_dispatch_set_cache = HopDispatchSetCache()
    for body in bodies:
        (outputs,) = next(reversed(body.graph.find_nodes(op="output"))).args
        for out in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
            if isinstance(out, torch.fx.Node):
                out.meta.pop("val", None)


def mark_recomputed(node: torch.fx.Node) -> None:
    """Ask AOTAutograd's min-cut partitioner (Inductor's) to recompute `node` in the backward
    instead of keeping its output: the node meta that selective activation checkpointing sets
    (`recompute`, `ac_graph_id`), which tracing copies onto the ATen nodes the node becomes. A
    node a checkpointed region tagged already keeps its tag. Id 0: a tagged node that a later
    checkpointed region reads is kept for it (the partitioner saves at a region's boundary)."""
    if "recompute" not in node.meta:
        node.meta["recompute"] = torch.utils.checkpoint.CheckpointPolicy.MUST_RECOMPUTE
        node.meta["ac_graph_id"] = 0


def compile_with_aot_eager(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """AOTAutograd with eager forward and backward graphs (the CPU path)."""
    _regions_ready_for_aot(gm)
    return aot_autograd(fw_compiler=_nop, bw_compiler=_nop)(gm, example_inputs)


class _SourcesInCacheKey(CustomGraphPass):
    """A post-grad pass that changes nothing, for its uuid: a hash of the fused ops' and the
    backend's sources, which Inductor and AOTAutograd put in their cache keys. Those caches hash
    the graph, and our ops' backward formulas and kernels live outside it, so without this a
    compiled artifact cached on disk could outlive the code it was built against (a changed op
    schema then fails at run time). A pass the user set already runs inside it, and its uuid
    joins ours (None, which turns the caches off, where it has none)."""

    def __init__(self, inner: Any, sources: bytes) -> None:
        self.inner = inner
        self.sources = sources

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> Any:
        if self.inner is None:
            return self.sources
        inner = self.inner.uuid() if isinstance(self.inner, CustomGraphPass) else None
        return None if inner is None else (self.sources, inner)


def compile_with_inductor(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """AOTAutograd + Inductor, as plain `torch.compile` would run after our passes, with the
    sources of our ops in the cache keys (`_SourcesInCacheKey`)."""
    # Imported here: importing chronicals at module level would register the backend of a
    # source checkout (chronicals/__init__.py) while compile_passes.backend is half imported.
    from chronicals.warmup import sources_hash

    key = _SourcesInCacheKey(inductor_config.post_grad_custom_post_pass,
                             sources_hash().encode())
    _regions_ready_for_aot(gm)
    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": key})


def keep_package_id(traced: torch.fx.GraphModule, rewritten: torch.fx.GraphModule) -> None:
    """Give the rewritten graph the id Dynamo gave the graph it traced. With Dynamo's compile
    packages on (`torch._dynamo.config.caching_precompile`, which the finetune job turns on),
    Dynamo saves a compiled graph's code with that id, and AOTAutograd files the compiled graph
    for the package under the id of the graph it compiles: the rewritten one, a new module.
    Without the id carried over, the package finds no compiled graph and a warm start compiles
    everything again."""
    package_id = getattr(traced, "_backend_id", None)
    if package_id is not None and rewritten is not traced:
        rewritten._backend_id = package_id


def is_dynamo_signal(exc: BaseException) -> bool:
    """An exception Dynamo raises through a backend to steer its own tracing (e.g. a restart
    after it specialised a float under dynamic shapes), which the backend must let through."""
    return isinstance(exc, torch._dynamo.exc.TorchDynamoException)


def unique_graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (to check that none compile while timing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def size_hint(size: int | torch.SymInt) -> int:
    """A concrete value for a (possibly symbolic) size: the example value Dynamo traced with,
    read without adding a guard. torch 2.11 calls the reader `hint_int`, 2.13
    `optimization_hint`."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental import symbolic_shapes

    read = getattr(symbolic_shapes, "hint_int", None) or symbolic_shapes.optimization_hint
    return int(read(size))
