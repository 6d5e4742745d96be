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


def _region_forward(cls: type) -> object:
    if cls not in _REGION_FORWARDS:
        _REGION_FORWARDS[cls] = torch.compiler.nested_compile_region(cls.forward)
    return _REGION_FORWARDS[cls]


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
            layer.forward = types.MethodType(_region_forward(type(layer)), layer)
            setattr(layer, _MARK, True)
        elif not enabled and marked:
            del layer.forward
            delattr(layer, _MARK)
    return len(layers) if enabled else 0
