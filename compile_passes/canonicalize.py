"""Graph clean-up run before pattern matching, on the model graph and on every pattern.

Hugging Face code casts with `.to(dtype)` (or `.type_as(x)`) whether or not the dtype changes, and slices with
`hidden_states[:, slice(0, None), :]`. In a pre-dispatch ATen graph those become `aten.to.*` and
`aten.alias` nodes that return their input. In fp32 such a no-op cast ties later users of a
residual to the cast node, which hides every RMSNorm but one from the patterns. Removing them
gives one canonical form per computation.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

_TO_OPS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other)
# Every conversion of a tensor: `x.to(...)`, which pre-dispatch ATen keeps, and `_to_copy` below it.
CASTS = (*_TO_OPS, aten._to_copy.default)


def _returns_input(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is aten.alias.default:
        return True
    if node.target not in (*_TO_OPS, aten.type_as.default) or node.kwargs.get("copy", False):
        return False
    src, out = node.args[0], node.meta.get("val")
    src_val = src.meta.get("val") if isinstance(src, Node) else None
    if not isinstance(src_val, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    return (src_val.dtype, src_val.device, src_val.layout) == (out.dtype, out.device, out.layout)


def strip_noop_casts(gm: GraphModule) -> int:
    """Replace casts and aliases that return their input by the input. Returns how many."""
    removed = 0
    for node in list(gm.graph.nodes):
        if _returns_input(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed


def graph_modules(gm: GraphModule) -> list[GraphModule]:
    """The graph and every subgraph (bodies of checkpointed layers and other HOPs)."""
    return [m for m in gm.modules() if isinstance(m, GraphModule)]
