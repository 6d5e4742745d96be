"""The training step: a function, not a trainer.

`train_step` takes one optimizer step from one or more micro-batches and keeps no state of its own:
the model, optimizer and scheduler carry all of it, so checkpointing them is checkpointing the run.
The loss of a step is the mean over every real label token of all its micro-batches, so
accumulating 4 micro-batches gives the gradients of one batch holding the same tokens. A label equal
to `IGNORE_INDEX` (-100, the ignore index of Hugging Face's causal-LM loss) is not a real token.
It never reads a value back from the device; `StepMetrics` does that when asked.

The loss comes from `compile_loss(model)`, which compiles a function returning only the loss with
`torch.compile(backend="chronicals")`. Returning only the loss matters: a compiled graph that
returns the logits must materialise them, which stops the LM-head + cross-entropy fusion from firing
(tests/compile_passes/test_linear_cross_entropy.py shows the rejection). Build it once per model and
reuse it every step.

A custom loop:

    loss_fn = compile_loss(model)
    optimizer = torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4), fused=True)
    for micro_batches in batches:
        metrics = train_step(loss_fn, optimizer, micro_batches, max_grad_norm=1.0)
    print(metrics.item())
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from chronicals._torch_private import is_backend_failure, is_graph_break_in_region, mark_dynamic
from chronicals.attention import PACKED_ATTENTION
from chronicals.regions import mark_layer_regions, use_regions

IGNORE_INDEX = -100
"""Label of a position the loss skips (prompt, padding): -100, as Hugging Face's causal-LM loss."""
# Document boundaries of packed rows (chronicals.packing), named as HF forwards them to attention.
_VARIABLE_LENGTH_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k")
_PACKED_MAX_LENGTHS = ("max_length_q", "max_length_k")
_OWN_CODE_IDS = itertools.count(1)

LossFn = Callable[[Mapping[str, Tensor], Tensor], Tensor]
"""`loss_fn(batch, num_items_in_batch) -> loss`: the summed token loss of `batch` divided by
`num_items_in_batch` (a 0-d device tensor)."""


@dataclasses.dataclass(frozen=True, slots=True)
class StepMetrics:
    """What one `train_step` measured. Tensors stay on the device until `item()` reads them."""

    loss: Tensor
    """0-d fp32: mean loss per label token over all micro-batches of the step."""
    grad_norm: Tensor
    """0-d fp32: L2 norm of all gradients before clipping."""
    num_tokens: Tensor
    """0-d int64: label tokens the loss is averaged over (labels != IGNORE_INDEX after the causal
    shift), summed over the micro-batches. Input tokens per second are for the caller to count on
    the host, where it knows which slots of its rows are padding."""
    lr: float
    """Learning rate this step used, of the optimizer's first parameter group."""
    skipped: bool = False
    """The loss or gradient norm was NaN or infinite and `train_step(skip_nonfinite=True)` did not
    step the optimizer."""

    def item(self) -> dict[str, float]:
        """Read the values to Python numbers (one device sync)."""
        loss, grad_norm, tokens = torch.stack(
            [self.loss.float(), self.grad_norm.float(), self.num_tokens.float()]
        ).tolist()
        return {"loss": loss, "grad_norm": grad_norm, "num_tokens": int(tokens), "lr": self.lr}


def compile_loss(
    model: nn.Module,
    *,
    backend: str | None = "chronicals",
    options: Mapping[str, object] | None = None,
    dynamic: bool | None = None,
    regional: bool = True,
) -> LossFn:
    """A function `(batch, num_items_in_batch) -> loss` for a Hugging Face causal LM (or a PEFT
    model wrapping one), compiled with `torch.compile(backend=backend)`; `backend=None` runs eager.

    `batch` holds the model inputs: `input_ids` and `labels` of shape (rows, seq), plus
    `attention_mask` for padded rows or `position_ids` (and no mask) for packed rows. The model is
    called with `use_cache=False`: a cache in the graph adds KV outputs, and with a cache HF does
    not derive the packed documents' mask from `position_ids`.

    `regional` (default): the model's repeated decoder layers are compiled once, as one region
    all layers call (chronicals/regions.py), so compile time hardly grows with depth; the graph
    around them (embedding, masks, final norm, LM head + loss) is compiled as before. False:
    every layer is traced and compiled in one whole graph, as with `dynamic=True`. The choice
    marks `model` (its layers' `forward`), so the last `compile_loss` or `compile_model` call on a
    model decides it.

    Build it once per model: each call of `compile_loss` makes a new compiled function, with a
    compile cache of its own (Dynamo would otherwise share one cache among all of them and, past
    its recompile limit, run the later ones eagerly without a word). A model sharded with FSDP2
    (`chronicals.distributed.shard_model`) gets `chronicals.distributed.compile_sharded_loss`,
    which keeps the LM-head + cross-entropy fusion; its layers are compiled whole.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from chronicals.distributed import compile_sharded_loss

        compiled = compile_sharded_loss(model, backend=backend, options=options, dynamic=dynamic)
        if backend is None:
            return compiled
    else:
        def loss_fn(batch: Mapping[str, Tensor], num_items_in_batch: Tensor) -> Tensor:
            return model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False).loss

        if backend is None:
            return loss_fn
        kwargs = {} if options is None else {"options": dict(options)}

        def compile_whole_or_regional(regions: bool) -> Callable:
            mark_layer_regions(model, regions)
            return torch.compile(own_code(loss_fn), backend=backend, dynamic=dynamic, **kwargs)

        regional = use_regions(regional, dynamic, backend)
        compiled = compile_whole_or_regional(regional)
        if regional:
            strict = bool((options or {}).get("strict", False))
            compiled = _whole_graph_if_regions_fail(model, compiled, compile_whole_or_regional,
                                                    strict)

    def compiled_loss_fn(batch: Mapping[str, Tensor], num_items_in_batch: Tensor) -> Tensor:
        # Packed rows hold a different number of documents per batch: the length of their
        # boundaries is dynamic from the start, or the second batch would compile a second graph.
        for key in _VARIABLE_LENGTH_INPUTS:
            if key in batch:
                mark_dynamic(batch[key], 0)
        if _PACKED_MAX_LENGTHS[0] in batch and _attention(model) == PACKED_ATTENTION:
            # The longest document of the batch, a Python int that changes per batch. The
            # chronicals_varlen attention does not read it, but passed into a layer region it is
            # a constant of the region, and each new value would compile the graph again.
            batch = {k: v for k, v in batch.items() if k not in _PACKED_MAX_LENGTHS}
        return compiled(batch, num_items_in_batch)

    return compiled_loss_fn


def _whole_graph_if_regions_fail(model: nn.Module, regional: Callable,
                                 compile_as: Callable[[bool], Callable], strict: bool) -> Callable:
    """`regional`, or the whole graph compiled instead, with a warning saying why, where the
    layer region cannot be compiled: Dynamo refuses a region whose own code breaks the graph (a
    region must be captured whole; e.g. GPT-J, CodeGen and JetMoE on transformers 5.25), or, not
    `strict`, the backend fails on the graph with regions. Both come while the first call is
    compiled, before anything of it has run, so the call is simply made again."""
    compiled = regional

    def call(batch: Mapping[str, Tensor], num_items_in_batch: Tensor) -> Tensor:
        nonlocal compiled
        try:
            return compiled(batch, num_items_in_batch)
        except Exception as e:
            if compiled is not regional:
                raise
            if is_graph_break_in_region(e):
                why = "their code breaks the graph"
            elif is_backend_failure(e) and not strict:
                why = "the backend failed on the graph with layer regions"
            else:
                raise
            reason = " ".join(str(e).split())[:300]
            warnings.warn(
                f"compile_loss: {type(model).__name__}'s decoder layers cannot be compiled as "
                f"one region: {why} ({reason}). Compiling the whole graph instead (as "
                "regional=False does): every layer is traced and compiled.",
                stacklevel=3,
            )
            compiled = compile_as(False)
            return compiled(batch, num_items_in_batch)

    return call


def _attention(model: nn.Module) -> str | None:
    """The attention implementation of a transformers model (or a PEFT model wrapping one)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def own_code(fn: Callable) -> Callable:
    """A copy of the function `fn` with a code object of its own, to compile.

    Dynamo keeps its compiled graphs on the code object of the function it compiles, and gives up
    on a code object after `torch._dynamo.config.recompile_limit` (8) guard failures: every
    function made by one `def` in a factory shares its code object, so the 9th differently
    configured compile (a new model, other options) would silently run eagerly. A copy per
    compiled function keeps their caches apart. Its code is also named apart (`loss_fn_3`):
    Dynamo remembers which input sizes changed by file, line and code name, and under one name a
    second model would start with the first one's dynamic dimensions (and, in a layer region on
    torch 2.13, fail where a dimension dynamic in one input meets a static one in another)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_OWN_CODE_IDS)}")
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return copy


def count_label_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Label tokens a causal-LM loss scores: position t predicts label t + 1, so the first label
    of each row is never scored. labels: (..., seq) -> 0-d int64, on labels' device."""
    return (labels[..., 1:] != ignore_index).sum()


def _check_batches(
    where: str, batches: Iterable[Mapping[str, Tensor]]
) -> list[Mapping[str, Tensor]]:
    """`batches` as a list (an iterator is read once), each a mapping with `input_ids` and
    `labels`; `where` ("train_step: micro_batches") starts the error messages."""
    if isinstance(batches, Mapping):
        raise TypeError(
            f"{where} must be a sequence of micro-batch dicts. Got one dict (keys "
            f"{sorted(batches)}); pass [batch] for a single micro-batch."
        )
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"{where} must be a sequence of micro-batch dicts. Got {type(batches).__name__}."
        )
    batches = list(batches)
    if not batches:
        raise ValueError(f"{where} must hold at least one batch. Got none.")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{where}[{i}] must be a dict of model inputs. Got {type(batch).__name__}."
            )
        if "labels" not in batch or "input_ids" not in batch:
            raise ValueError(
                f"{where}[{i}] must have 'input_ids' and 'labels'. Got keys {sorted(batch)}."
            )
    return batches


def train_step(
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[Mapping[str, Tensor]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = None,
    skip_nonfinite: bool = False,
    data_parallel: torch.distributed.ProcessGroup | None = None,
) -> StepMetrics:
    """One optimizer step from `micro_batches`, with no host sync.

    The step starts from zero gradients: `optimizer.zero_grad(set_to_none=True)` drops whatever
    sits on the optimizer's parameters (a stray `.backward()`, the partial gradients of a call
    that raised), so no step mixes in another's. Every micro-batch's summed token loss is divided
    by the label-token count of all micro-batches together (labels != `IGNORE_INDEX`, -100 as in
    Hugging Face; counted on the device), so the gradients equal those of one batch holding the
    same tokens. Then: gradient norm (clipped to `max_grad_norm` if given), `optimizer.step()`,
    `optimizer.zero_grad(set_to_none=True)` again so the gradients' memory is free between steps,
    `scheduler.step()`.

    Args:
        loss_fn: from `compile_loss(model)`, made once.
        optimizer: any torch optimizer over the trainable parameters.
        micro_batches: a list (or any iterable, read once) of one or more dicts of model inputs
            with `input_ids` and `labels`, on the model's device; one dict alone is an error.
        scheduler: stepped once after the optimizer.
        max_grad_norm: clip the total L2 gradient norm to this (> 0); None: no clipping.
        skip_nonfinite: read the loss and gradient norm on the host (one device sync) and, if
            either is NaN or infinite, drop the gradients without stepping the optimizer (its
            weights and moments stay finite); the scheduler still steps, and
            `StepMetrics.skipped` says so. Without it a non-finite step updates the weights,
            and the caller finds out when it reads the metrics.
        data_parallel: the process group whose ranks each run their own micro-batches of one
            global batch, with gradients averaged over its ranks (as FSDP2 and DDP do by
            default). The label-token count is summed over the group (an all-reduce, no host
            sync) and each rank's loss is scaled so that the averaged gradients, the loss and
            `num_tokens` are those of one process running the global batch; the gradient norm
            (and clipping) covers the whole model when its gradients are DTensors (FSDP2).
            Call it on every rank of the group. None: this process alone.
    """
    micro_batches = _check_batches("train_step: micro_batches", micro_batches)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"train_step: max_grad_norm must be > 0 or None. Got {max_grad_norm}.")

    # Setting grads to None costs nothing (no kernel), unlike zeroing them in place.
    optimizer.zero_grad(set_to_none=True)
    num_tokens = torch.stack([count_label_tokens(mb["labels"]) for mb in micro_batches]).sum()
    ranks = 1
    if data_parallel is not None:
        torch.distributed.all_reduce(num_tokens, group=data_parallel)
        ranks = torch.distributed.get_world_size(data_parallel)
    # A step whose labels are all ignored gets loss 0 and zero gradients, not 0/0 = NaN. Each of
    # `ranks` ranks divides by 1/ranks of the global count: the average of their gradients is
    # then the global batch's gradient.
    denominator = num_tokens.clamp(min=1)
    if ranks > 1:
        denominator = denominator / ranks
    loss = torch.zeros((), dtype=torch.float32, device=num_tokens.device)
    for mb in micro_batches:
        mb_loss = loss_fn(mb, denominator)
        mb_loss.backward()
        loss = loss + mb_loss.detach().float()
    if ranks > 1:
        torch.distributed.all_reduce(loss, group=data_parallel)
        loss = loss / ranks

    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        raise ValueError(
            "train_step: no parameter of the optimizer received a gradient; are the trainable "
            "parameters the ones the loss depends on?"
        )
    if max_grad_norm is None:
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    else:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    if isinstance(grad_norm, DTensor):
        # FSDP2's gradients are DTensors: their norm is one too, already reduced over the ranks
        # (replicated); its local value is the norm of the whole model's gradients.
        grad_norm = grad_norm.full_tensor()

    lr = float(optimizer.param_groups[0]["lr"])
    skipped = skip_nonfinite and not bool(torch.isfinite(torch.stack([loss, grad_norm.float()]))
                                          .all())
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None and skipped:
        with warnings.catch_warnings():
            # A skipped first step calls the scheduler before any optimizer step, on purpose.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step",
                                    UserWarning)
            scheduler.step()
    elif scheduler is not None:
        scheduler.step()
    return StepMetrics(loss=loss, grad_norm=grad_norm.float(), num_tokens=num_tokens, lr=lr,
                       skipped=skipped)


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite (or the weights became so): the run
    stops rather than train on, and save, garbage."""


def evaluate_loss(
    loss_fn: LossFn, model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> Tensor:
    """Mean loss per label token (labels != `IGNORE_INDEX`) over `batches`, in eval mode without
    gradients: a 0-d tensor on the device (no host sync). `batches` are as `train_step`'s
    micro-batches. The model's train/eval mode is restored afterwards."""
    batches = _check_batches("evaluate_loss: batches", batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            one = torch.ones((), dtype=torch.int64, device=batches[0]["labels"].device)
            # num_items_in_batch=1 makes the loss the summed token loss of the batch.
            total = torch.stack([loss_fn(b, one).float() for b in batches]).sum()
            count = torch.stack([count_label_tokens(b["labels"]) for b in batches]).sum()
    finally:
        model.train(was_training)
    return total / count.clamp(min=1)


__all__ = [
    "IGNORE_INDEX",
    "LossFn",
    "StepMetrics",
    "TrainingDiverged",
    "compile_loss",
    "count_label_tokens",
    "evaluate_loss",
    "train_step",
]
