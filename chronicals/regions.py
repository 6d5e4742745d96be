"""Regional compilation: each repeated decoder layer is traced and compiled once, for all layers.

A decoder's layers are one class called N times with different weights. Compiled as one graph,
every layer is traced by Dynamo, rewritten by the backend's passes and compiled again: compile
time grows with depth (a 24-layer tiny model took 4.2x as long as a 2-layer one). Marking the
layers' class forward as a `torch.compiler.nested_compile_region` makes Dynamo trace the first
layer into a subgraph and call that same subgraph for the others (`invoke_subgraph`); the backend
then rewrites the subgraph once and AOTAutograd and Inductor compile it once. The rest of the model
(embedding, masks, final norm, LM head + loss) stays in the one graph around the layers, so the
LM-head + cross-entropy fusion and the attention mask's proof see what they saw before.

What is repeated: the members of every outermost `nn.ModuleList` of two or more modules of one
class (a transformers decoder's `layers`; not the experts inside a layer). The mark is per model instance: the layers' `forward` attribute
is set to one region-wrapped function per class (one function, so Dynamo can reuse its subgraph),
and removed again by `mark_layer_regions(model, False)`. Outside torch.compile a region is a plain
call. Layers under transformers' gradient checkpointing (enabled before the mark) are compiled
whole, as before: a region inside each layer's checkpoint is not checked yet.

A region is reused only if tracing it has no side effects. With the optional `kernels` package
installed, transformers' `use_kernelized_func` (the attention of most families) wraps forward so
that each call publishes the layer's hub-kernel table in a module-level variable: a write that
Dynamo counts as a side effect, so every layer was traced again. While no hub kernel is selected
(`kernels.kernelize` not called on the model), the table sends every call to the plain function,
so a marked layer's modules call their class's own forward, unwrapped; a kernelized model keeps
the wrapper (and is traced per layer).

`torch.compile(dynamic=True)` and Dynamo's "eager" backend get no regions (`use_regions`).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

# One wrapped forward per layer class: Dynamo reuses a region's subgraph only for calls of the
# same function.
_REGION_FORWARDS: dict[type, object] = {}
_MARK = "_chronicals_region"
logger = logging.getLogger(__name__)


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The members of every outermost ModuleList in `model` that holds two or more modules of one
    class. Lists inside such a member (a mixture-of-experts layer's experts) are part of its
    region, not regions of their own."""
    if isinstance(model, nn.ModuleList) and len(model) > 1 and len({type(m) for m in model}) == 1:
        return list(model)
    layers = []
    for child in model.children():
        layers.extend(repeated_layers(child))
    return layers


def _flatten(args: tuple, kwargs: dict) -> tuple[str, list]:
    """A layer call's arguments as flat values and a layout string that rebuilds them: one
    `name:n` entry per argument (name empty for a positional one), n the length of a tuple
    argument whose members are passed flat (the rotary (cos, sin) pair), -1 for a single value.
    Under Dynamo the layout is a constant."""
    entries, flat = [], []
    for name, value in [*(("", a) for a in args), *kwargs.items()]:
        if isinstance(value, tuple):
            entries.append(f"{name}:{len(value)}")
            flat.extend(value)
        else:
            entries.append(f"{name}:-1")
            flat.append(value)
    return ",".join(entries), flat


def _unflatten(layout: str, flat: tuple) -> tuple[list, dict]:
    args, kwargs, i = [], {}, 0
    for entry in layout.split(",") if layout else ():
        name, n = entry.rsplit(":", 1)
        n = int(n)
        value = flat[i] if n < 0 else tuple(flat[i:i + n])
        i += 1 if n < 0 else n
        if name:
            kwargs[name] = value
        else:
            args.append(value)
    return args, kwargs


def _region_forward(cls: type) -> object:
    """`cls.forward` as a region called with flat arguments. Dynamo (torch 2.13) matches a
    region's later calls to its first by a fingerprint of the arguments; for flat positional
    tensors and constants it is read directly, while keyword or nested arguments (how
    transformers calls a decoder layer) go through a traced pytree flatten on every call, about
    a third of the per-layer compile time of a tiny model."""
    if cls not in _REGION_FORWARDS:
        def flat_forward(self: nn.Module, layout: str, *flat: object) -> object:
            args, kwargs = _unflatten(layout, flat)
            return cls.forward(self, *args, **kwargs)

        region = torch.compiler.nested_compile_region(flat_forward)

        def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
            layout, flat = _flatten(args, kwargs)
            return region(self, layout, *flat)

        _REGION_FORWARDS[cls] = forward
    return _REGION_FORWARDS[cls]


def wraps_kernel_tables(model: nn.Module) -> bool:
    """Whether any module of `model` carries `kernels.use_kernelized_func`'s table (the optional
    `kernels` package installed: transformers' attention classes of most families)."""
    return any(isinstance(vars(m).get("_kernel_funcs"), dict) for m in model.modules())


def _unwrapped_kernel_forward(module: nn.Module) -> object | None:
    """The forward under `kernels.use_kernelized_func`'s wrapper when that wrapper changes nothing
    (no hub kernel selected for `module`), else None."""
    table = vars(module).get("_kernel_funcs")
    plain = getattr(type(module).forward, "__wrapped__", None)
    if not isinstance(table, dict) or plain is None or "forward" in vars(module):
        return None
    if any("forward" in vars(kernel) for kernel in table.values()):
        return None  # kernelized: the wrapper routes calls to the selected kernel
    return plain


def _set_forward(module: nn.Module, forward: object | None) -> None:
    if forward is None:
        del module.forward
        delattr(module, _MARK)
    else:
        module.forward = types.MethodType(forward, module)
        setattr(module, _MARK, True)


def use_regions(regional: bool, dynamic: bool | None, backend: object = "chronicals") -> bool:
    """Whether `compile_loss` and `compile_model` compile the layers as regions: as asked, except
    with `dynamic=True` or Dynamo's "eager" backend (the whole graph then). With every size and
    Python scalar dynamic, torch 2.13's reused layer calls failed in AOTAutograd
    (`aten._local_scalar_dense` on the layers' lifted float attributes), which Dynamo answered
    with graph breaks around every layer, without an error. The "eager" backend runs Dynamo's
    graph as it is, and a region's call (`invoke_subgraph`) does not run outside a compiler
    (torch 2.11 and 2.13 assert that a fake mode is active)."""
    return regional and dynamic is not True and backend != "eager"


def mark_layer_regions(model: nn.Module, enabled: bool = True) -> int:
    """Compile `model`'s repeated layers as one nested region each class (`enabled`), or as plain
    code again (not `enabled`). Returns the number of layers marked (0 when unmarking, when the
    model has no repeated layers, or when they are gradient-checkpointed)."""
    layers = repeated_layers(model)
    if enabled and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        # Not yet checked: a region inside each layer's checkpoint (the fusion counts differ).
        logger.info("chronicals: the layers are gradient-checkpointed; compiled whole, not as "
                    "regions")
        enabled = False
    for layer in layers:
        marked = getattr(layer, _MARK, False)
        if enabled and not marked:
            if "forward" in vars(layer):
                raise ValueError(
                    f"chronicals: layer {type(layer).__name__} has its own `forward` attribute "
                    "(a patched instance); cannot compile it as a region. Pass regional=False."
                )
            _set_forward(layer, _region_forward(type(layer)))
            for module in layer.modules():
                if (plain := _unwrapped_kernel_forward(module)) is not None:
                    _set_forward(module, plain)
        elif not enabled and marked:
            for module in layer.modules():
                if getattr(module, _MARK, False):
                    _set_forward(module, None)
    return len(layers) if enabled else 0
