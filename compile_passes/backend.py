"""The `chronicals` torch.compile backend.

    torch.compile(model_or_loss_fn, backend="chronicals", options={...})

Dynamo graph -> pre-dispatch ATen on Dynamo's fake tensors -> canonicalise (no-op casts, bodies
of checkpointed layers) -> one pattern pass over all enabled fusions -> report -> Inductor
(`compile_fx`) on CUDA, AOTAutograd with eager graphs on CPU.

A model whose decoder layers are one nested compile region (chronicals/regions.py, the default
of compile_loss and compile_model) comes as one graph calling one layer body per layer
(`invoke_subgraph`): the body is rewritten once and compiled once, and the report counts each
fusion once per layer, as for the whole graph.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from compile_passes import _torch_api, autocast
from compile_passes.canonicalize import graph_modules, strip_noop_casts
from compile_passes.fusion import (
    SOURCE,
    Fusion,
    GraphFacts,
    collecting_reasons,
    input_source,
    pattern_dtypes,
    recorded_reason,
    source_line,
)
from compile_passes.report import FusionReport, GraphBreak, Rejection, ReportSink, publish

logger = logging.getLogger("chronicals.compile")

# Without it, a model under gradient checkpointing on transformers 5.25 is split at every
# checkpointed layer and fuses almost nothing (see the function's docstring). Set here, when the
# backend is loaded, because Dynamo reads it while tracing, before any graph reaches the backend.
_torch_api.allow_side_effects_in_checkpointed_regions()

COMPILERS = ("auto", "inductor", "aot_eager")
LORA_PRECISIONS = ("mixed", "exact")


# Every fusion, in the order it is applied and reported: its name -> the module and attribute of
# its `Fusion`. Imported on first compile (`_all_fusions`), so that `import compile_passes` stays
# cheap and the entry point loads the kernels only when a graph is compiled.
_REGISTRY = {
    "rms_norm": ("rms_norm", "FUSION"),
    "swiglu": ("swiglu", "SWIGLU"),
    "geglu": ("swiglu", "GEGLU"),
    "rope": ("rope", "FUSION"),
    "attention": ("attention", "FUSION"),
    "linear_cross_entropy": ("linear_cross_entropy", "FUSION"),
    "lora": ("lora", "FUSION"),
}
FUSION_NAMES = tuple(_REGISTRY)


def _all_fusions() -> dict[str, Fusion]:
    fusions = {}
    for name, (module, attribute) in _REGISTRY.items():
        fusion = getattr(importlib.import_module(f"compile_passes.{module}"), attribute)
        if fusion.name != name:
            raise RuntimeError(
                f"chronicals: compile_passes.{module}.{attribute} is the fusion {fusion.name!r}, "
                f"registered as {name!r}."
            )
        fusions[name] = fusion
    return fusions


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BackendOptions:
    """Options of `torch.compile(..., backend="chronicals", options={...})`."""

    fusions: tuple[str, ...] = FUSION_NAMES
    """Fusions to apply; the rest of the graph is compiled as plain torch.compile would."""
    strict: bool = False
    """Raise when a candidate of an enabled fusion is left unfused, or the pattern stage fails,
    instead of reporting it and compiling the graph as it is."""
    report: ReportSink = "log"
    """Where each graph's FusionReport goes: 'log', 'none', the path of a `.jsonl` file in an
    existing folder (one JSON line appended per graph) or a callable taking the report."""
    compiler: str = "auto"
    """'inductor', 'aot_eager', or 'auto': Inductor when the graph's tensors are on CUDA,
    AOTAutograd with eager graphs otherwise."""
    lora_precision: str = "mixed"
    """How PEFT's LoRA linears compute (the 'lora' fusion). 'mixed': as torch.autocast would,
    the adapter GEMMs in the activation dtype (fp32 accumulation) against the fp32 adapter
    weights cast once in the graph, the gradients delivered to them in fp32. 'exact': PEFT's
    graph as written (with fp32 adapters on a bf16 model: fp32 input cast, GEMMs and sum)."""

    def __post_init__(self) -> None:
        unknown = set(self.fusions) - set(FUSION_NAMES)
        if unknown:
            raise ValueError(
                f"chronicals: unknown fusions {sorted(unknown)}; expected a subset of "
                f"{list(FUSION_NAMES)}."
            )
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"chronicals: compiler must be one of {COMPILERS}. Got {self.compiler!r}."
            )
        if self.lora_precision not in LORA_PRECISIONS:
            raise ValueError(
                f"chronicals: lora_precision must be one of {LORA_PRECISIONS}. Got "
                f"{self.lora_precision!r}."
            )
        if not isinstance(self.strict, bool):
            raise TypeError(f"chronicals: strict must be True or False. Got {self.strict!r}.")
        _check_report(self.report)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> BackendOptions:
        if options is not None and not isinstance(options, dict):
            raise TypeError(
                f"chronicals: options must be a dict. Got {type(options).__name__}: {options!r}."
            )
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ValueError(
                f"chronicals: unknown options {sorted(unknown)}; expected some of {sorted(names)}."
            )
        if "fusions" in options:
            fusions = options["fusions"]
            if isinstance(fusions, str) or not isinstance(fusions, (list, tuple, set, frozenset)):
                raise TypeError(
                    f"chronicals: fusions must be a list of names from {list(FUSION_NAMES)}. Got "
                    f"{fusions!r}."
                )
            options["fusions"] = tuple(fusions)
        return cls(**options)


def _check_report(report: Any) -> None:
    expected = "'log', 'none', the path of a .jsonl file or a callable"
    if callable(report) or report in ("log", "none"):
        return
    if not isinstance(report, (str, os.PathLike)):
        raise TypeError(f"chronicals: report must be {expected}. Got {type(report).__name__}.")
    path = pathlib.Path(report)
    if path.suffix != ".jsonl":
        raise ValueError(f"chronicals: report must be {expected}. Got {str(report)!r}.")
    if not path.absolute().parent.is_dir():
        raise ValueError(
            f"chronicals: report file {str(report)!r} is in a folder that does not exist."
        )


_PASSES: dict[tuple[tuple[str, ...], tuple[torch.dtype, ...]], _torch_api.PatternMatcherPass] = {}
_GRAPH_IDS = itertools.count()


def _pattern_pass(fusions: Sequence[Fusion], dtypes: tuple[torch.dtype, ...]
                  ) -> _torch_api.PatternMatcherPass:
    key = (tuple(f.name for f in fusions), dtypes)
    if key not in _PASSES:
        pattern_pass = _torch_api.PatternMatcherPass(pass_name="chronicals")
        for fusion in fusions:
            fusion.register(pattern_pass, dtypes)
        _PASSES[key] = pattern_pass
    return _PASSES[key]


def _on_cuda(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _implementation(example_inputs: Sequence[Any]) -> str:
    from chronicals.ops import implementation

    return implementation("cuda" if _on_cuda(example_inputs) else "cpu")


def rewrite(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], fusions: Sequence[Fusion],
    lora_precision: str = "mixed",
) -> tuple[torch.fx.GraphModule, dict[str, int], list[Rejection], list[Rejection]]:
    """Trace to pre-dispatch ATen, canonicalise and apply the fusions' rewrites and patterns.
    Returns the graph, the fired counts, and the candidates rejected and declined."""
    agm = _torch_api.trace_pre_dispatch(gm, example_inputs)
    _name_inputs(agm, gm)
    modules = graph_modules(agm)
    pattern_pass = _pattern_pass(fusions, pattern_dtypes([m.graph for m in modules]))
    with collecting_reasons():
        facts = dataclasses.replace(_graph_facts(agm, example_inputs),
                                    lora_precision=lora_precision)
        for module in modules:
            strip_noop_casts(module)
            for fusion in fusions:
                if fusion.rewrite is not None:
                    fusion.rewrite(module.graph, facts)
            pattern_pass.apply(module.graph)
            module.graph.eliminate_dead_code()
        for fusion in fusions:
            if fusion.finalize is not None:
                fusion.finalize(agm.graph, facts)
        for module in modules:
            module.recompile()
        fired = {f.name: 0 for f in fusions}
        rejected, declined = [], []
        calls = _times_run(agm)
        for module in modules:
            for node in module.graph.nodes:
                for fusion in fusions:
                    if node.op == "call_function" and (
                        node.target in fusion.fused_ops()
                        or (fusion.is_fused is not None and fusion.is_fused(node))
                    ):
                        fired[fusion.name] += calls[module]
                    elif fusion.is_candidate(node):
                        recorded = recorded_reason(node)
                        reason = recorded.text if recorded else fusion.diagnose(node)
                        # One entry per run of the node: a layer region's body holds one
                        # candidate for every layer, as the whole graph would.
                        (declined if recorded and recorded.declined else rejected).extend(
                            [Rejection(
                                fusion=fusion.name,
                                node=node.name,
                                reason=reason,
                                source=source_line(node),
                            )] * calls[module]
                        )
    return agm, fired, rejected, declined


def _name_inputs(agm: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Give each placeholder of the traced graph Dynamo's name of its input (`input_source`),
    and each placeholder of a checkpointed layer's or a layer region's body the name of the
    top-level input its first call passes (a region's body is shared by all its layers, whose
    inputs differ only in the layer's index)."""
    for traced, dynamo in zip(_placeholders(agm.graph), _placeholders(gm.graph)):
        traced.meta[SOURCE] = str(dynamo.target)
    for module in graph_modules(agm):  # parents before the bodies they call
        for node in module.graph.nodes:
            first = _torch_api.BODY_OPERANDS.get(node.target)
            if first is None:
                continue
            body = getattr(module, node.args[0].target)
            for inner, outer in zip(_placeholders(body.graph), node.args[first:]):
                if SOURCE not in inner.meta and isinstance(outer, torch.fx.Node) and (
                        input_source(outer)):
                    inner.meta[SOURCE] = input_source(outer)


def _placeholders(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _times_run(agm: torch.fx.GraphModule) -> dict[torch.fx.GraphModule, int]:
    """How often each graph module runs per call of `agm`: a layer region's body (one
    `invoke_subgraph` body for all layers of a class, chronicals/regions.py) once per layer, so
    the report counts fusions per layer as a whole-graph compile does; every other body once per
    call of its parent."""
    times = {agm: 1}
    for module in graph_modules(agm):  # parents before the bodies they call
        for node in module.graph.nodes:
            if node.op == "call_function" and _torch_api.is_higher_order(node.target):
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                        body = getattr(module, arg.target)
                        if isinstance(body, torch.fx.GraphModule):
                            times[body] = times.get(body, 0) + times.get(module, 1)
    return times


def _graph_facts(agm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> GraphFacts:
    placeholders = [n for n in agm.graph.nodes if n.op == "placeholder"]
    tensors = [t if isinstance(t, torch.Tensor) else None for t in example_inputs]
    if len(placeholders) != len(tensors):
        raise RuntimeError(
            f"chronicals: the traced graph has {len(placeholders)} inputs where Dynamo gave "
            f"{len(tensors)}."
        )
    return GraphFacts(
        training=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors),
        frozen_inputs=frozenset(
            p.name for p, t in zip(placeholders, tensors) if t is not None and not t.requires_grad
        ),
    )


def _custom_autograd_function(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The first call of a custom torch.autograd.Function in the Dynamo graph, if any."""
    apply = torch.ops.higher_order.autograd_function_apply
    for module in graph_modules(gm):
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is apply:
                return node
    return None


def chronicals_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    **_: Any,
) -> Callable[..., Any]:
    """The torch.compile backend. Options: see `BackendOptions`."""
    with _torch_api.one_schema_per_region():
        return _compile(gm, example_inputs, BackendOptions.from_options(options))


def _compile(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions
) -> Callable[..., Any]:
    graph_breaks = tuple(
        GraphBreak(reason=reason, source=source)
        for reason, source in _torch_api.new_graph_breaks()
    )
    all_fusions = _all_fusions()
    fusions = [all_fusions[name] for name in FUSION_NAMES if name in opts.fusions]
    error = skipped = None
    declined: list[Rejection] = []
    custom_function = _custom_autograd_function(gm) if torch.is_grad_enabled() else None
    try:
        if custom_function is not None:
            # Pre-dispatch tracing inlines a custom autograd.Function's forward under no_grad
            # and drops its backward: the rewritten graph would lose every gradient through it
            # (Bloom's BloomGelu: no gradient reached its MLPs).
            skipped = (
                "the graph calls a custom torch.autograd.Function "
                f"({source_line(custom_function) or custom_function.name}), whose backward "
                "the pattern stage's tracing would drop; no fusion applied"
            )
            compiled_gm, fired, rejected = gm, {f.name: 0 for f in fusions}, []
        else:
            try:
                # The pattern stage traces with autocast off: the casts autocast makes inside ops
                # are written into the graph first, so the patterns see the dtypes it really
                # computes in.
                explicit = (autocast.make_autocast_explicit(gm, example_inputs) if fusions
                            else gm)
            except autocast.AutocastNotExplicit as failed:
                line = source_line(failed.node) if failed.node is not None else ""
                where = f"{failed.why}: {line}" if line else failed.why
                skipped = (
                    f"torch.autocast changes dtypes in this graph ({where}) in a way the "
                    "backend cannot write out as casts; no fusion applied (load the model in the "
                    "autocast dtype, e.g. bf16, and autocast casts nothing)"
                )
                compiled_gm, fired, rejected = gm, {f.name: 0 for f in fusions}, []
            else:
                compiled_gm, fired, rejected, declined = rewrite(
                    explicit, example_inputs, fusions, opts.lora_precision)
    except Exception as exc:
        if opts.strict:
            raise
        # The user's compile must not break because a pattern stage failed; the report says so
        # loudly (WARNING) and the graph is compiled exactly as written.
        compiled_gm, fired, rejected = gm, {f.name: 0 for f in fusions}, []
        error = f"{type(exc).__name__}: {exc}"
    compiler = opts.compiler
    if compiler == "auto":
        compiler = "inductor" if _on_cuda(example_inputs) else "aot_eager"
    report = FusionReport(
        graph=next(_GRAPH_IDS),
        fired=fired,
        rejected=tuple(rejected),
        declined=tuple(declined),
        implementation=_implementation(example_inputs),
        compiler=compiler,
        lora_precision=_lora_precision(opts, fired, rejected, declined),
        error=error,
        skipped=skipped,
        graph_breaks=graph_breaks,
    )
    if opts.strict and skipped:
        publish(report, opts.report)
        raise RuntimeError("chronicals (strict): " + report.summary())
    if opts.strict and rejected:
        publish(report, opts.report)
        raise RuntimeError(
            "chronicals (strict): candidates left unfused:\n" + report.summary()
        )
    compile_graph = (
        _torch_api.compile_with_inductor if compiler == "inductor"
        else _torch_api.compile_with_aot_eager
    )
    _torch_api.keep_package_id(gm, compiled_gm)
    try:
        compiled = compile_graph(compiled_gm, example_inputs)
    except Exception as exc:
        if opts.strict or compiled_gm is gm or _torch_api.is_dynamo_signal(exc):
            publish(report, opts.report)
            raise
        # A fused op that fails where AOTAutograd or Inductor compile it (its autograd setup,
        # its lowering) must not fail a compile that eager runs: the graph is compiled as
        # written and the report says why, loudly.
        report = dataclasses.replace(
            report, fired={f.name: 0 for f in fusions}, rejected=(), declined=(),
            error=f"compiling the rewritten graph raised {type(exc).__name__}: {exc}",
        )
        publish(report, opts.report)
        return compile_graph(gm, example_inputs)
    publish(report, opts.report)
    return compiled


def _lora_precision(opts: BackendOptions, fired: dict[str, int], rejected: list[Rejection],
                    declined: list[Rejection]) -> str | None:
    """The option, where the graph has LoRA linears the 'lora' fusion saw."""
    seen = fired.get("lora", 0) or any(r.fusion == "lora" for r in (*rejected, *declined))
    return opts.lora_precision if seen else None


def register() -> None:
    """Make `torch.compile(backend="chronicals")` available in this process. Installing the
    package does this through the `torch_dynamo_backends` entry point; this call is for source
    checkouts without an install."""
    _torch_api.ensure_backend_registered("chronicals", chronicals_backend)
