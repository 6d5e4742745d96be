"""The one place that touches private PyTorch APIs.

Everything the backend needs from `torch._dynamo`, `torch._inductor`, `torch._functorch`,
`torch._guards` and `torch.fx.experimental` is imported or wrapped here, so a torch upgrade
changes this file and no other. Checked on torch 2.11 and 2.13 in CI (research/compile-backend.md
§5); the test suite also passed on 2.12.1 once, by hand.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
from torch._functorch.aot_autograd import make_boxed_func
from torch._guards import detect_fake_mode
from torch._inductor.compile_fx import compile_fx
from torch._inductor.pattern_matcher import Match, PatternMatcherPass
from torch._inductor.pattern_matcher import register_replacement as _register_replacement
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = [
    "Match",
    "PatternMatcherPass",
    "compile_with_aot_eager",
    "compile_with_inductor",
    "ensure_backend_registered",
    "register_replacement",
    "trace_pre_dispatch",
]

# torch 2.13 added `pattern_name`; 2.11 does not accept it.
_REGISTER_TAKES_NAME = "pattern_name" in inspect.signature(_register_replacement).parameters


def ensure_backend_registered(name: str, compiler_fn: Callable[..., Any]) -> None:
    """Register `compiler_fn` as `torch.compile(backend=name)` unless a backend of that name is
    registered already (`register_backend` asserts on duplicates)."""
    if name not in _COMPILER_FNS:
        register_backend(compiler_fn=compiler_fn, name=name)


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
        if isinstance(module, torch.fx.GraphModule) and module is not gm:
            if "_checkpoint_context_fn" not in module.meta:
                module.meta["_checkpoint_context_fn"] = (
                    lambda: create_selective_checkpoint_contexts(recompute_all)
                )
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.meta.pop("_checkpoint_context_fn", None)


def _fake_inputs(example_inputs: Sequence[Any]) -> tuple[Any, list[Any]]:
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
    registered backward.
    """
    fake_mode, inputs = _fake_inputs(example_inputs)
    with _checkpoint_bodies_traceable(gm), fake_mode, _ambient_autocast_off():
        return make_fx(gm, pre_dispatch=True)(*inputs)


@contextlib.contextmanager
def _ambient_autocast_off() -> Iterator[None]:
    """Autocast off around pre-dispatch tracing. The tracer records the graph's own autocast
    regions without entering them, so an ambient autocast would cast every value, even inside a
    region that turns it off, and the values would carry dtypes that occur nowhere at run time
    (a cast the graph needs would then look like a no-op). The backend traces only graphs whose
    dtypes autocast does not change (`autocast_changes_dtypes`), so without it they are exact."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def trace_pattern(fn: Callable[..., Any], args: Sequence[Any], **_: Any) -> torch.fx.GraphModule:
    """The tracer `register_replacement` uses for search and replacement functions: the same
    pre-dispatch level as the model graph. torch 2.13 passes `get_decomp_fn`, 2.11 does not."""
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


def _autocast_regions(gm: torch.fx.GraphModule) -> bool:
    enter = torch.amp.autocast_mode._enter_autocast
    return any(
        n.op == "call_function" and n.target is enter
        for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
    )


class _UncheckedBody(Exception):
    pass


class _DtypeRecorder(torch.fx.Interpreter):
    """Runs a Dynamo graph on fake tensors and records each node's output dtypes, with its
    autocast regions as written or turned off; the bodies of checkpointed layers are walked the
    same way."""

    def __init__(self, gm: torch.fx.GraphModule, autocast: bool, record: dict) -> None:
        super().__init__(gm)
        self.autocast = autocast
        self.record = record

    def call_function(self, target, args, kwargs):
        if target is torch.amp.autocast_mode._enter_autocast and not self.autocast:
            args = (args[0], args[1] if len(args) > 1 else None, False, *args[3:])
        if target is torch.ops.higher_order.tag_activation_checkpoint:
            body, *body_args = args
            return _DtypeRecorder(body, self.autocast, self.record).run(*body_args)
        if isinstance(target, torch._ops.HigherOrderOperator) and any(
            isinstance(a, torch.fx.GraphModule) for a in args
        ):
            raise _UncheckedBody(f"the body of {target.name()} is not checked")
        return super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        leaves = torch.utils._pytree.tree_leaves(out)
        self.record[n] = tuple(t.dtype for t in leaves if isinstance(t, torch.Tensor))
        return out


class AutocastChange(NamedTuple):
    """A node of a Dynamo graph whose output dtypes torch.autocast changes."""

    node: torch.fx.Node
    under: tuple[torch.dtype, ...]
    without: tuple[torch.dtype, ...]


def autocast_changes_dtypes(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> AutocastChange | str | None:
    """Whether torch.autocast changes any dtype in a Dynamo graph: the graph's torch.autocast
    regions, and autocast itself when the graph is compiled while it is on (it then runs under it
    without saying so). The graph is run twice on fake tensors, with its autocast and without.
    None when every node (checkpointed bodies included) gets the same dtypes, as for a model
    already in the autocast dtype; else the first node whose dtypes change, or why the graph
    could not be checked."""
    ambient = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if not ambient and not _autocast_regions(gm):
        return None
    fake_mode, inputs = _fake_inputs(example_inputs)
    with_autocast: dict[torch.fx.Node, tuple] = {}
    without: dict[torch.fx.Node, tuple] = {}
    try:
        with fake_mode, torch.no_grad():
            _DtypeRecorder(gm, True, with_autocast).run(*inputs)
            with _ambient_autocast_off():
                _DtypeRecorder(gm, False, without).run(*inputs)
    except _UncheckedBody as unchecked:
        return str(unchecked)
    for node, dtypes in with_autocast.items():
        if without.get(node) != dtypes:
            return AutocastChange(node, dtypes, without.get(node, ()))
    return None


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


# Scalar argument name -> (op that consumes it, the scalar's position among its args, the op
# producing its first arg).
scalar_consumers: dict[str, tuple[Any, int, Any]] = {
    "eps": (torch.ops.aten.add.Tensor, 1, torch.ops.aten.mean.dim),  # rsqrt(mean(x^2) + eps)
    "softcap": (torch.ops.aten.div.Tensor, 1, torch.ops.aten.linear.default),  # tanh(z / c) * c
}


def _nop(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    return make_boxed_func(gm)


def compile_with_aot_eager(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """AOTAutograd with eager forward and backward graphs (the CPU path)."""
    return aot_autograd(fw_compiler=_nop, bw_compiler=_nop)(gm, example_inputs)


def compile_with_inductor(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """AOTAutograd + Inductor, as plain `torch.compile` would run after our passes."""
    return compile_fx(gm, example_inputs)


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Compile `tensor`'s dimension `dim` as dynamic from the first graph on (no recompile when
    its length changes), unless Dynamo finds it must be static."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def unique_graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (to check that none compile while timing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal flash attention over variable-length segments (PyTorch's own flash kernel, CUDA).

    q: (T, Hq, D), k/v: (T, Hkv, D), cu_seqlens: int32 (segments + 1,) boundaries shared by q
    and k. Returns (T, Hq, D). Calls `aten._flash_attention_forward`, whose signature is the same
    on torch 2.11 and 2.13 (the public `torch.nn.attention.varlen` wrapper's is not).
    """
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False,
        scale=scale,
        window_size_left=-1 if sliding_window is None else sliding_window - 1,
        window_size_right=-1 if sliding_window is None else 0,
    )[0]
