"""The autocast interpreter: a Dynamo graph compiled under torch.autocast (or holding autocast
regions of its own) rewritten so that it computes without autocast what it computes with it.

Autocast casts inside ops (a matmul's inputs to bf16, a softmax's to fp32); a pattern traced with
autocast off would not see those dtypes, and a fused op swapped in for a region would miss the
casts. `make_autocast_explicit` runs the graph on fake tensors with and without autocast, node by
node, and writes each cast autocast makes in as a `.to(dtype)` node before the pattern stage
(compile_passes/backend.py). The private names it needs come from `_torch_api`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from compile_passes import _torch_api


def _autocast_regions(gm: torch.fx.GraphModule) -> bool:
    enter = _torch_api.ENTER_AUTOCAST
    return any(
        n.op == "call_function" and n.target is enter
        for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
    )


class AutocastNotExplicit(Exception):
    """A node whose autocast casts could not be written into the graph, and why."""

    def __init__(self, node: torch.fx.Node | None, why: str) -> None:
        super().__init__(why)
        self.node = node
        self.why = why  # str(self) may carry the notes fx's Interpreter adds to errors


def _dtypes(value: Any) -> tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in _torch_api.tensor_leaves(value))


_FAILED = object()


class _AutocastCasts(torch.fx.Interpreter):
    """Runs a Dynamo graph on fake tensors twice over, node by node: as it runs (the ambient
    autocast on, the graph's own autocast regions entered) and with autocast off. Where a node's
    output dtypes differ, autocast cast its floating inputs inside the op (to the lower dtype for
    matmul-like ops, to fp32 for the ops it keeps in fp32); that cast is inserted before the node
    as `.to(dtype)`, and the node is run again without autocast to check that it now gets
    autocast's dtypes. The environment holds the values without autocast, so each node sees the
    inputs the rewritten graph gives it. The bodies of checkpointed layers are rewritten the same
    way. `made` maps (input node, dtype) to the cast inserted for it, shared with the bodies' runs
    (so it also says whether anything was inserted)."""

    def __init__(self, gm: torch.fx.GraphModule,
                 made: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node]) -> None:
        super().__init__(gm)
        self.made = made
        self.entered: list[Any] = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().run(*args, **kwargs)
        finally:
            while self.entered:  # a failure inside a region must not leave autocast on
                self.entered.pop().__exit__(None, None, None)

    def call_function(self, target, args, kwargs):
        if target is _torch_api.ENTER_AUTOCAST:
            ctx = super().call_function(target, args, kwargs)
            self.entered.append(ctx)
            return ctx
        if target is _torch_api.EXIT_AUTOCAST:
            self.entered.remove(args[0])
            return super().call_function(target, args, kwargs)
        if target is torch.ops.higher_order.tag_activation_checkpoint:
            body, *body_args = args
            return _AutocastCasts(body, self.made).run(*body_args)
        if target is _torch_api.INVOKE_SUBGRAPH:
            # A layer region's body, shared by all layers: the casts are written in at the first
            # call and found in `made` at the others (the same dtypes reach every layer).
            body, _, *body_args = args
            return tuple(_AutocastCasts(body, self.made).run(*body_args))
        if _torch_api.is_higher_order(target) and any(
            isinstance(a, torch.fx.GraphModule) for a in args
        ):
            raise AutocastNotExplicit(None, f"the body of {target.name()} is not checked")
        return super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module") or (
            n.target is _torch_api.ENTER_AUTOCAST
            or n.target is _torch_api.EXIT_AUTOCAST
            or n.target is torch.ops.higher_order.tag_activation_checkpoint
            or n.target is _torch_api.INVOKE_SUBGRAPH
        ):
            return super().run_node(n)
        wanted = _dtypes(super().run_node(n))
        plain = self._run_plain(n)
        if plain is not _FAILED and _dtypes(plain) == wanted:
            return plain
        floating = {d for d in wanted if d.is_floating_point}
        if len(floating) != 1:
            raise AutocastNotExplicit(
                n, f"{n.name} is {', '.join(map(str, wanted))} under autocast and "
                f"{'an error' if plain is _FAILED else ', '.join(map(str, _dtypes(plain)))} without"
            )
        self._cast_inputs(n, floating.pop())
        plain = self._run_plain(n)
        if plain is _FAILED or _dtypes(plain) != wanted:
            raise AutocastNotExplicit(
                n, f"{n.name} is {', '.join(map(str, wanted))} under autocast, and casting its "
                "inputs does not reproduce that"
            )
        return plain

    def _run_plain(self, n: torch.fx.Node) -> Any:
        # An op that fails on its uncast inputs (bmm of fp32 by bf16, which autocast's cast makes
        # valid) is expected here; fake tensors would log each such failure as an error.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            with _torch_api.ambient_autocast_off():
                return super().run_node(n)
        except Exception:  # noqa: BLE001 (any failure: the op needs autocast's cast, see above)
            return _FAILED
        finally:
            fake_log.setLevel(level)

    def _cast_inputs(self, n: torch.fx.Node, dtype: torch.dtype) -> None:
        def cast(arg: torch.fx.Node) -> torch.fx.Node:
            value = self.env.get(arg)
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and value.dtype != dtype):
                return arg
            if (arg, dtype) not in self.made:
                with n.graph.inserting_before(n):
                    made = n.graph.call_method("to", (arg, dtype))
                self.env[made] = value.to(dtype)
                self.made[(arg, dtype)] = made
            return self.made[(arg, dtype)]

        n.args = torch.fx.node.map_arg(n.args, cast)
        n.kwargs = torch.fx.node.map_arg(n.kwargs, cast)


def make_autocast_explicit(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> torch.fx.GraphModule:
    """A copy of a Dynamo graph that computes without autocast what it computes with it (the
    ambient autocast it is compiled under, and its own autocast regions), with the casts autocast
    makes inside ops written in as `.to(dtype)` nodes. The pattern stage traces with autocast off
    and sees the dtypes the graph really has. The graph itself when autocast is off everywhere or
    casts nothing. Raises `AutocastNotExplicit` for a node whose casts cannot be written in."""
    ambient = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if not ambient and not _autocast_regions(gm):
        return gm
    explicit = copy.deepcopy(gm)
    made: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
    fake_mode, inputs = _torch_api.fake_inputs(example_inputs)
    with fake_mode, torch.no_grad():
        _AutocastCasts(explicit, made).run(*inputs)
    if not made:
        return gm
    for module in explicit.modules():
        if isinstance(module, torch.fx.GraphModule):
            module.graph.lint()
            module.recompile()
    return explicit
