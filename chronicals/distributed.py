"""Chronicals under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), launched with torchrun.

    model = shard_model(model)                          # one FSDP unit per decoder layer + root
    loss_fn = compile_loss(model)                       # as on one GPU
    metrics = train_step(loss_fn, optimizer, micro_batches, data_parallel=dist.group.WORLD)
    save_checkpoint(path, model, optimizer, scheduler)  # sharded, torch.distributed.checkpoint
    load_checkpoint(path, model, optimizer, scheduler)

Each rank trains on its own micro-batches; `train_step(data_parallel=...)` divides every rank's
loss by the label tokens of all ranks together, so the averaged gradients FSDP2 reduce-scatters
are those of one process running the whole global batch (tests/test_distributed.py).

Why `compile_loss` splits a sharded model's loss in two compiled functions: FSDP2 all-gathers a
unit's weights in eager hooks around its `forward`, and Dynamo does not trace those hooks, so every
call of a sharded decoder layer ends a graph. Compiling `model(**batch).loss` whole then leaves
the causal LM's `forward` split at the backbone call, and its last graph returns the logits (the
forward's output holds them): they must exist, and the LM-head + cross-entropy fusion is rejected.
`compile_sharded_loss` instead runs, inside the root unit's forward hooks (so the embedding, final
norm and LM head are gathered the way FSDP2 gathers any weight), one compiled function for the
backbone's hidden states and one for the head and the model's own loss function; the second
returns only the loss, so the fusion fires on the gathered head weight.

What the graph split costs: each decoder layer is a graph of its own, so the causal mask of padded
rows, built in the backbone's first graph, reaches the layer's graph as an input, and the attention
pass rejects the `sdpa` call (it cannot prove an input's values causal). Packed rows with
`PACKED_ATTENTION` do not go through that pass. Norms, SwiGLU and RoPE fire inside the layers.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

logger = logging.getLogger(__name__)

# The root unit's method that computes the loss; FSDP2 runs its forward hooks around it.
_LOSS_METHOD = "chronicals_sharded_loss"
# Written by dcp.save once every rank's shards are on disk: a folder without it is incomplete.
_DCP_METADATA = ".metadata"


def shard_model(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard a transformers causal LM (or a PEFT model wrapping one) with FSDP2, in place: one
    unit per decoder layer (the classes the model lists in `_no_split_modules`), then the whole
    model as the root unit, which holds the embedding, the final norm and the LM head (sharding
    the head as a unit of its own would end a graph between it and the loss). Returns `model`.

    `fully_shard_kwargs` go to every `fully_shard` call (`mesh`, `reshard_after_forward`,
    `mp_policy`, ...). Call it after PEFT's `get_peft_model` and before building the optimizer:
    the optimizer must hold the sharded parameters.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "shard_model: torch.distributed is not initialised; launch with torchrun and call "
            "torch.distributed.init_process_group() first."
        )
    if isinstance(model, FSDPModule):
        raise ValueError(f"shard_model: {type(model).__name__} is already sharded.")
    from chronicals.hf import _causal_lm

    layer_classes = set(getattr(_causal_lm(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            "shard_model: found no decoder layer to shard; expected modules of the classes in "
            f"the model's _no_split_modules. Got {sorted(layer_classes) or 'none listed'} in "
            f"{type(model).__name__}."
        )
    for layer in layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    logger.info("shard_model: %d decoder layers (%s) and the root sharded over %d ranks",
                len(layers), ", ".join(sorted({type(m).__name__ for m in layers})),
                dist.get_world_size())
    return model


def compile_sharded_loss(
    model: nn.Module,
    *,
    backend: str | None = "chronicals",
    options: Mapping[str, object] | None = None,
    dynamic: bool | None = None,
):
    """`compile_loss` for a model whose root is an FSDP2 unit (see the module docstring); the
    same contract: `(batch, num_items_in_batch) -> loss`. `compile_loss` calls it for such a
    model. The head must be what the model's forward applies before its loss function, unscaled:
    a model with a logit softcap or scale, or whose head is not a linear layer, is refused."""
    from chronicals.hf import _causal_lm, check_plain_head
    from chronicals.train import own_code

    if not isinstance(model, FSDPModule):
        raise TypeError(
            "compile_sharded_loss: expected a model sharded with FSDP2 (an FSDPModule, e.g. from "
            f"shard_model). Got {type(model).__name__}."
        )
    lm = _causal_lm(model)
    head = check_plain_head(lm, "compile_sharded_loss")
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            "compile_sharded_loss: a model whose forward soft-caps the logits before its loss "
            f"is not supported (final_logit_softcapping={softcap}); the head and loss are "
            "computed here without the forward's own code between them."
        )
    backbone = lm.get_decoder()
    vocab_size = lm.config.get_text_config().vocab_size

    def hidden_states(inputs: Mapping[str, Tensor]) -> Tensor:
        return backbone(**inputs, use_cache=False).last_hidden_state

    def head_loss(hidden: Tensor, labels: Tensor, num_items_in_batch: Tensor) -> Tensor:
        return lm.loss_function(logits=head(hidden), labels=labels, vocab_size=vocab_size,
                                num_items_in_batch=num_items_in_batch)

    if backend is not None:
        kwargs = {"backend": backend, "dynamic": dynamic}
        if options is not None:
            kwargs["options"] = dict(options)
        # Each with a compile cache of its own (chronicals.train.own_code).
        hidden_states = torch.compile(own_code(hidden_states), **kwargs)
        head_loss = torch.compile(own_code(head_loss), **kwargs)

    def sharded_loss(self: nn.Module, batch: Mapping[str, Tensor],
                     num_items_in_batch: Tensor) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return head_loss(hidden_states(inputs), batch["labels"], num_items_in_batch)

    setattr(model, _LOSS_METHOD, types.MethodType(sharded_loss, model))
    register_fsdp_forward_method(model, _LOSS_METHOD)
    return getattr(model, _LOSS_METHOD)


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    step: int,
) -> None:
    """Save the sharded model and optimizer state with torch.distributed.checkpoint: every rank
    writes its own shards into `directory` (on storage all ranks see); no rank gathers the full
    model. Call it on every rank. The scheduler's state and `step` are saved beside them."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": step}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dcp.save(state, checkpoint_id=os.fspath(directory))


def load_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> int:
    """Load what `save_checkpoint` wrote into the sharded `model`, `optimizer` (and `scheduler`),
    in place, on every rank; returns the saved step. The model must be sharded as when it was
    saved or otherwise (DCP reshards), and the optimizer built over its sharded parameters."""
    path = Path(directory)
    if not (path / _DCP_METADATA).is_file():
        raise FileNotFoundError(
            f"load_checkpoint: {path} is not a complete torch.distributed.checkpoint folder (no "
            f"{_DCP_METADATA}, which dcp.save writes last); pass the folder save_checkpoint wrote."
        )
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": -1}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


__all__ = ["compile_sharded_loss", "load_checkpoint", "save_checkpoint", "shard_model"]
