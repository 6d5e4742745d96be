"""`compile_model`: the chronicals backend for trainers that call `model(**batch)`.

    model = chronicals.compile_model(model)
    Trainer(model=model, ...)       # or TRL's SFTTrainer, or an Accelerate loop

`torch.compile(model, backend="chronicals")` returns the logits, so they must exist and the
LM-head + cross-entropy fusion cannot fire; it also hides the forward's signature from Trainer,
which then drops every dataset column. `compile_model` keeps the model object, its class and its
`forward` signature, and routes each call:

- training with `labels`: a compiled function that returns only the loss, computed by the
  model's own loss function (so `num_items_in_batch` from gradient accumulation and
  `shift_labels` from context parallelism mean what they mean to the model). The output's
  `logits` is None, as Liger's fused loss leaves it.
- TRL's fused LM head (`model(..., fused_lm_head=True)`, which TRL's trainers call for their
  loss and metrics): a compiled function that runs the backbone and scores each label with
  `chronicals.ops.linear_cross_entropy(reduction="none")`, returning per-token log-probabilities.
  Entropy and top-1 accuracy need the full softmax row, which the op does not keep (they would
  take another pass over the vocabulary): they come back as NaN, so TRL's `entropy` and
  `mean_token_accuracy` metrics are skipped (TRL logs nan; it reads the fields unconditionally, so
  None would crash it), and one log line says so.
- anything else without a KV cache (evaluation): the compiled forward, logits included.
- calls with a KV cache (`generate`): the model's own eager forward. Each decoding step has a new
  cache length, so compiling it would trade one graph per length for kernels tuned to training.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from chronicals.ops.linear_cross_entropy import linear_cross_entropy
from chronicals.regions import mark_layer_regions, use_regions
from chronicals.train import own_code

logger = logging.getLogger(__name__)

# Set on the causal LM by compile_model, so a second call can tell.
_COMPILED = "_chronicals_compiled"
# The pre-hook renames TRL's `fused_lm_head=True` to this keyword (see _fused_head_hook).
_FUSED_HEAD = "_chronicals_fused_lm_head"
# Outputs a loss-only call would drop; a call asking for one gets the full forward.
_EXTRA_OUTPUTS = ("output_attentions", "output_hidden_states", "output_router_logits")
# Config fields that rescale the logits before the loss (TRL's fused head reads the same ones);
# the chronicals op takes a softcap but no scale.
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclasses.dataclass
class FusedHeadOutput(ModelOutput):
    """What a `fused_lm_head=True` call returns: the fields TRL's fused LM head defines. Per-token
    fields are shaped like the scored labels, (batch, seq - 1), or (batch, seq) with
    `shift_labels`, and are 0 where the label is -100."""

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    mean_logits: Tensor | None = None
    is_top1: Tensor | None = None
    label_mask: Tensor | None = None
    aux_loss: Tensor | None = None


def compile_model(model: nn.Module, *, dynamic: bool | None = None, regional: bool = False,
                  **options: Any) -> nn.Module:
    """Run `model`'s forward through `torch.compile(backend="chronicals")`, in place; returns
    `model` itself.

    `model` is a transformers causal LM (`...ForCausalLM`) or a PEFT model wrapping one. `options`
    are the backend's (`fusions`, `strict`, `report`, `compiler`), `dynamic` is torch.compile's.
    `regional`: the repeated decoder layers are compiled once for all of them
    (chronicals/regions.py), as `compile_loss` does by default. Off by default here: with it, on
    torch 2.13 with transformers 5.25, Trainer's and Accelerate's graphs still came whole and a
    `generate` after a compiled evaluation forward failed (fake tensors met real ones); not yet
    understood. Default (False), and with `dynamic=True`: the whole model is traced and compiled as
    one graph.
    The wrapper sits on the causal LM inside a PEFT model, where TRL puts its fused LM head too;
    a second call on the same model changes nothing (the first call's options stay).
    """
    lm = _causal_lm(model)
    if getattr(lm, _COMPILED, False):
        logger.info("chronicals.compile_model: %s is already compiled; left as it is",
                    type(lm).__name__)
        return model
    mark_layer_regions(lm, use_regions(regional, dynamic))
    kwargs = {"backend": "chronicals", "dynamic": dynamic}
    if options:
        kwargs["options"] = dict(options)
    # The class's forward (TRL may replace lm.forward), as a copy with a compile cache of its own
    # (see own_code): every model of the class shares the class's code object.
    forward = own_code(type(lm).forward).__get__(lm)
    signature = inspect.signature(forward)

    def loss_only(inputs: Mapping[str, Any]) -> Tensor:
        return forward(**inputs).loss

    loss_fn = torch.compile(own_code(loss_only), **kwargs)
    forward_fn = torch.compile(forward, **kwargs)
    fused_head_fn = torch.compile(functools.partial(own_code(_fused_head), lm), **kwargs)

    metrics_skipped_logged = False

    @functools.wraps(type(lm).forward)
    def chronicals_forward(self, *args, **call_kwargs):
        nonlocal metrics_skipped_logged
        inputs = _as_keywords(signature, args, call_kwargs)
        fused_head = inputs.pop(_FUSED_HEAD, False)
        inputs.pop("fused_lm_head", None)  # False when TRL's own wrapper is not in between
        if fused_head:
            if not metrics_skipped_logged:
                metrics_skipped_logged = True
                logger.warning(
                    "chronicals.compile_model: TRL's entropy and mean_token_accuracy metrics are "
                    "skipped (logged as nan): the fused LM head returns log-probabilities only "
                    "(the op keeps no softmax rows)"
                )
            return fused_head_fn(inputs)
        if inputs.get("past_key_values") is not None:
            return forward(**inputs)
        # Without a cache argument, HF would build one (config.use_cache), which adds the KV
        # tensors to the graph's outputs and turns off its packed-sequence (position_ids) mask.
        inputs.setdefault("use_cache", False)
        if (
            self.training
            and inputs.get("labels") is not None
            and not inputs["use_cache"]
            and not any(inputs.get(name) for name in _EXTRA_OUTPUTS)
            and inputs.get("return_dict") is not False
        ):
            return CausalLMOutputWithPast(loss=loss_fn(inputs), logits=None)
        return forward_fn(**inputs)

    lm.forward = types.MethodType(chronicals_forward, lm)
    lm.register_forward_pre_hook(_fused_head_hook, with_kwargs=True)
    setattr(lm, _COMPILED, True)
    return model


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM of `model` (itself, or the one inside a PEFT model)."""
    from transformers import PreTrainedModel

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(lm, PreTrainedModel) or lm.get_output_embeddings() is None:
        raise TypeError(
            "chronicals.compile_model: expected a transformers causal LM (a PreTrainedModel with "
            f"an LM head) or a PEFT model wrapping one. Got {type(model).__name__}"
            + ("" if lm is model else f" wrapping {type(lm).__name__}") + "."
        )
    return lm


def _as_keywords(
    signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by name (the compiled functions take keywords only)."""
    if not args:
        return dict(kwargs)
    bound = signature.bind(*args, **kwargs)
    inputs = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"chronicals.compile_model: extra positional arguments {value!r}.")
        else:
            inputs[name] = value
    return inputs


def _fused_head_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """TRL's trainers replace `forward` of the causal LM with their fused LM head, which runs
    when called with `fused_lm_head=True` and otherwise calls the forward it replaced (ours).
    Renaming the flag sends those calls through that fallback to our forward, which answers
    them with the chronicals op; the flag stays False for TRL's wrapper."""
    if not kwargs.get("fused_lm_head"):
        return None
    return args, {**kwargs, "fused_lm_head": False, _FUSED_HEAD: True}


def check_plain_head(lm: nn.Module, where: str) -> nn.Linear:
    """The LM head of `lm` if its logits are `hidden @ W.T` with no bias and no rescaling
    (a logit softcap is allowed: the op takes it); else a ValueError starting with `where`."""
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    scales = {name: getattr(config, name) for name in _LOGIT_SCALES
              if getattr(config, name, None) not in (None, 1, 1.0)}
    if scales or getattr(head, "bias", None) is not None or not isinstance(head, nn.Linear):
        raise ValueError(
            f"{where} needs a plain linear LM head without bias or logit scaling. Got "
            f"{type(head).__name__}, bias {getattr(head, 'bias', None) is not None}, scales "
            f"{scales}."
        )
    return head


def _fused_head(lm: nn.Module, inputs: dict[str, Any]) -> FusedHeadOutput:
    """TRL's fused-LM-head contract on the chronicals op: per-token log-probabilities of the
    next-token labels (or of `shift_labels`, already shifted), and the loss they sum to."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    shift_labels = inputs.pop("shift_labels", None)
    num_items_in_batch = inputs.pop("num_items_in_batch", None)
    if labels is None and shift_labels is None:
        raise ValueError(
            "chronicals.compile_model: fused_lm_head=True needs labels or shift_labels. Got "
            f"neither (keys {sorted(inputs)})."
        )
    head = check_plain_head(lm, "chronicals.compile_model: fused_lm_head=True")
    config = lm.config.get_text_config()
    inputs["use_cache"] = False
    hidden = lm.base_model(**inputs).last_hidden_state
    shifted = shift_labels is None
    scored = labels if shifted else shift_labels
    token_loss = linear_cross_entropy(
        hidden, head.weight, scored, reduction="none", shift=shifted,
        softcap=getattr(config, "final_logit_softcapping", None),
    )
    if shifted:  # position t scores label t + 1; the last position scores nothing
        token_loss, scored = token_loss[:, :-1], scored[:, 1:]
    log_probs = -token_loss
    mask = scored != -100
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    nan = torch.full_like(log_probs, float("nan")).detach()
    return FusedHeadOutput(
        loss=token_loss.sum() / denominator,
        log_probs=log_probs,
        entropy=nan,
        is_top1=nan,
        label_mask=mask,
    )
