"""Compile a tiny model's loss with backend='chronicals' and compare it with eager.

The truth is the same model in fp32 (fp64 is too slow through the interpreter and adds nothing
at these sizes). In fp32 the compiled model must match eager to rounding; in bf16/fp16 its error
against the fp32 truth must be no worse than eager's in the same dtype, by the numerics rule
(twice eager's error plus one unit of the dtype at the gradient's scale).
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import torch

import chronicals  # noqa: F401  (registers backend="chronicals" where no entry point is installed)
import compile_passes
from compile_passes.backend import chronicals_backend
from tests.helpers import ULP
from tests.models import DECLINED, EXPECTED, checkpointed_counts, tiny_batch, tiny_model


@dataclasses.dataclass
class Comparison:
    fired: dict[str, int]
    declined: dict[str, int]
    rejected: tuple
    loss: float
    loss_eager: float
    loss_truth: float
    grad_err: float
    """max over parameters of ||g - g_truth|| / ||g_truth||, compiled model"""
    grad_err_eager: float
    """the same for eager in the same dtype"""
    reports: tuple = ()
    """Every graph's FusionReport, the one counted above last (a model that breaks into several
    graphs has one each)."""

    def assert_counts(self, family: str, checkpointed: bool = False) -> None:
        """Exactly the family's fusions fired and declined (tests/models.py), none rejected."""
        expected = (
            checkpointed_counts(family) if checkpointed else (EXPECTED[family], DECLINED[family])
        )
        assert (self.fired, self.declined) == expected, self
        assert self.rejected == (), self.rejected

    def assert_matches_eager(self, dtype: torch.dtype) -> None:
        if dtype == torch.float32:
            assert abs(self.loss - self.loss_eager) <= 1e-5 * abs(self.loss_eager)
            assert self.grad_err <= 1e-5, self
            return
        loss_allowed = 2 * abs(self.loss_eager - self.loss_truth) + ULP[dtype] * abs(self.loss_truth)
        assert abs(self.loss - self.loss_truth) <= loss_allowed, self
        assert self.grad_err <= 2 * self.grad_err_eager + ULP[dtype], self


class RecordingBackend:
    """The chronicals backend, keeping each graph it is given and each report it makes."""

    def __init__(self) -> None:
        self.graphs, self.reports = [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return chronicals_backend(gm, example_inputs, {"report": self.reports.append})


def _loss_fn(model):
    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss

    return loss_fn


def _grads(model) -> list[torch.Tensor]:
    """Every parameter's gradient in fp32; zeros for one the loss does not reach (an expert no
    token was routed to), so a gradient where eager has none counts as an error."""
    return [
        torch.zeros(p.shape, device=p.device) if p.grad is None else p.grad.float()
        for p in model.parameters()
    ]


def compile_and_compare(
    family: str,
    dtype: torch.dtype,
    *,
    seq: int = 12,
    options: dict | None = None,
    checkpointing: dict | None = None,
    dynamic: bool | None = None,
    device: str = "cpu",
    autocast: torch.dtype | None = None,
    model: torch.nn.Module | None = None,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Comparison:
    """`autocast`: the compiled and the eager forward run under torch.autocast to that dtype (as
    HF Trainer's bf16=True does), the truth without it. `checkpointing`: the keyword arguments of
    `model.gradient_checkpointing_enable` for the compiled model ({} for transformers' default),
    None for no checkpointing. `model` and `batch`: a model of a family not in tests/models.py
    (already in `dtype`) and its (input_ids, labels)."""
    torch.compiler.reset()
    model = (tiny_model(family, dtype) if model is None else model).to(device)
    eager = copy.deepcopy(model)
    truth = copy.deepcopy(model).float()
    if checkpointing is not None:
        model.train()
        model.gradient_checkpointing_enable(**checkpointing)
    ids, labels = (t.to(device) for t in (batch or tiny_batch(seq=seq)))
    compiled = torch.compile(
        _loss_fn(model),
        backend="chronicals",
        dynamic=dynamic,
        options={"report": "none", **(options or {})},
    )
    compile_passes.clear_fusion_reports()
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        loss = compiled(ids, labels)
    loss.backward()
    # Under dynamic=True Dynamo may trace twice (it restarts once a float such as eps is
    # specialised); the graph that runs is the last one compiled.
    report = compile_passes.fusion_reports()[-1]
    losses = []
    for m, cast in ((eager, autocast), (truth, None)):
        with torch.autocast(device, dtype=cast, enabled=cast is not None):
            out = _loss_fn(m)(ids, labels)
        out.backward()
        losses.append(out.item())

    g, g_eager, g_truth = _grads(model), _grads(eager), _grads(truth)
    return Comparison(
        fired=report.fired,
        declined=dict(collections.Counter(r.fusion for r in report.declined)),
        rejected=report.rejected,
        loss=loss.item(),
        loss_eager=losses[0],
        loss_truth=losses[1],
        grad_err=relative_grad_error(g, g_truth),
        grad_err_eager=relative_grad_error(g_eager, g_truth),
        reports=tuple(compile_passes.fusion_reports()),
    )


def relative_grad_error(grads: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    """max over parameters of ||g - g_truth|| / ||g_truth||. A gradient that is zero in exact
    arithmetic is rounding noise in both (a key bias: softmax ignores what it adds to every
    score of a row; BioGPT's is 3e-11 against O(1e-2) for the weights), so each error is
    relative to at least 1e-4 of the largest parameter's gradient."""
    floor = 1e-4 * max((t.norm() for t in truth), default=torch.tensor(0.0)).clamp(min=1e-30)
    return max(float((g - t).norm() / torch.maximum(t.norm(), floor))
               for g, t in zip(grads, truth))


def compile_fn(fn, *args, **options):
    """Compile `fn` with backend='chronicals', run it on args, and return (output, report)."""
    torch.compiler.reset()
    compile_passes.clear_fusion_reports()
    out = torch.compile(fn, backend="chronicals", options={"report": "none", **options})(*args)
    return out, compile_passes.fusion_reports()[-1]
