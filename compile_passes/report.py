"""What the backend did to each graph: fusions fired, candidates rejected and why.

One `FusionReport` per compiled graph is kept in memory (the newest 64) and logged once, as
"chronicals: fused 5 rms_norm, 2 swiglu, 2 rope, 1 linear_cross_entropy; rejected 0", with
"; declined ..." when candidates were left to the compiler on purpose, and a line per graph break
Dynamo met (a model split into several graphs fuses nothing that spans a break).
`fusion_reports()` returns them as data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Callable

logger = logging.getLogger("chronicals.compile")

_HISTORY: collections.deque[FusionReport] = collections.deque(maxlen=64)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Rejection:
    """A subgraph that looked like a fusion candidate but was left as it was."""

    fusion: str
    node: str
    reason: str
    source: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GraphBreak:
    """A place where Dynamo ended a graph and went on in Python: the compiled function runs as
    several graphs, and no fusion can span the break (an LM head + loss whose logits are passed
    from one graph to the next must keep them)."""

    reason: str
    """Dynamo's explanation, as it gives it."""
    source: str
    """The innermost user frame where it broke: "file:line in function: code"."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FusionReport:
    graph: int
    """Sequence number of the compiled graph in this process."""
    fired: dict[str, int]
    """Fusion name -> number of replacements, for every enabled fusion (0 included)."""
    rejected: tuple[Rejection, ...]
    """Candidates that could not be fused safely (strict mode raises on them)."""
    implementation: str
    """Where the Chronicals ops of this graph run: 'triton', 'triton-interpreter' or 'reference'."""
    compiler: str
    """What compiled the rewritten graph: 'inductor' or 'aot_eager'."""
    error: str | None = None
    """Set when the pattern stage failed, or compiling the rewritten graph did, and the graph
    was compiled unchanged (non-strict)."""
    skipped: str | None = None
    """Set when no fusion was tried on the graph, with the reason (e.g. torch.autocast)."""
    declined: tuple[Rejection, ...] = ()
    """Candidates left to the compiler on purpose, because it does better with them there (e.g.
    a SwiGLU whose operands are LoRA's sums, which Inductor fuses into the activation)."""
    lora_precision: str | None = None
    """How PEFT's LoRA linears of this graph compute, where the graph has any and the 'lora'
    fusion is enabled: 'mixed' (as autocast: adapter GEMMs in the activation dtype against the
    fp32 weights cast once, fp32 gradients) or 'exact' (PEFT's math as written)."""
    graph_breaks: tuple[GraphBreak, ...] = ()
    """Graph breaks Dynamo met since the previous graph compiled with this backend, each reported
    once until torch.compiler.reset(). Dynamo meets a break before it compiles the graphs on
    either side, so the break shows in the report of a graph near it, not always the one it cut."""

    def summary(self) -> str:
        fused = ", ".join(f"{n} {name}" for name, n in self.fired.items())
        text = f"chronicals graph {self.graph}: fused {fused}; rejected {len(self.rejected)}"
        if self.declined:
            names = collections.Counter(r.fusion for r in self.declined)
            text += "; declined " + ", ".join(f"{n} {name}" for name, n in names.items())
        lora = f", lora precision: {self.lora_precision}" if self.lora_precision else ""
        text += f" [ops: {self.implementation}, compiler: {self.compiler}{lora}]"
        # A candidate in a layer region's body is rejected once per layer: one line, counted.
        for r, times in collections.Counter(self.rejected).items():
            text += f"\n  rejected {r.fusion} at {r.node}: {r.reason}"
            if r.source:
                text += f" ({r.source})"
            if times > 1:
                text += f" [in {times} layers]"
        for reason in sorted({r.reason for r in self.declined}):
            text += f"\n  declined: {reason}"
        if self.error:
            text += f"\n  fusions failed, graph compiled unchanged: {self.error}"
        if self.skipped:
            text += f"\n  not fused: {self.skipped}"
        for b in self.graph_breaks:
            text += f"\n  graph break at {b.source}: {b.reason}"
        return text

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


ReportSink = str | Callable[[FusionReport], None]


def publish(report: FusionReport, sink: ReportSink) -> None:
    """Keep the report and send it where the user asked: 'log' (logger `chronicals.compile` at
    INFO, WARNING when something was rejected or failed), 'none', a callable, or a file path to
    which one JSON line is appended."""
    _HISTORY.append(report)
    if sink == "none":
        return
    if sink == "log":
        noteworthy = report.rejected or report.error or report.skipped or report.graph_breaks
        level = logging.WARNING if noteworthy else logging.INFO
        logger.log(level, "%s", report.summary())
    elif callable(sink):
        try:
            sink(report)
        except Exception as e:
            raise RuntimeError(
                f"chronicals: the report callable {sink!r} (options['report']) raised "
                f"{type(e).__name__}: {e}"
            ) from e
    else:
        try:
            with open(sink, "a", encoding="utf-8") as f:
                f.write(report.to_json() + "\n")
        except OSError as e:
            raise RuntimeError(
                f"chronicals: could not append the report to {sink} (options['report']): {e}"
            ) from e


def fusion_reports() -> list[FusionReport]:
    """Reports of the graphs compiled with backend='chronicals' in this process, oldest first."""
    return list(_HISTORY)


def clear_fusion_reports() -> None:
    _HISTORY.clear()
