"""The sweep of every causal LM family (tests/families.py) through backend='chronicals'.

`sweep(family)` builds the family tiny, compiles its loss, compares loss and gradients with eager
(tests/compile_passes/harness.py) and counts the model's own modules in an eager forward: RMSNorm
calls, gated-MLP activations, attention layers, rotary embeddings, experts. `table(results)`
renders README.md's "Model families" section, which

    TRITON_INTERPRET=0 PYTHONPATH=. python -m tests.compile_passes.sweep README.md

rewrites (on the newest transformers; tests/compile_passes/test_every_family.py checks it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import sys

import torch
import transformers

from tests import families
from tests.compile_passes.harness import (
    Comparison,
    compile_and_compare,
    relative_grad_error,
)

FUSIONS = ("rms_norm", "swiglu", "geglu", "rope", "attention", "linear_cross_entropy")


@dataclasses.dataclass(frozen=True)
class Modules:
    """What the eager forward of a family's tiny model calls."""

    rms_norms: int
    """Calls of modules whose class is an RMSNorm."""
    gated_mlps: int
    """Calls of MLP modules with a gate (gate_proj and up_proj, or gate_up_proj)."""
    attentions: int
    """Calls of modules whose class name ends in Attention (or MLA: LongCat-Flash)."""
    rotary: bool
    """A rotary embedding module ran."""
    experts: bool
    """The config has experts (a mixture of experts)."""


@dataclasses.dataclass(frozen=True)
class Result:
    family: str
    not_swept: str | None = None
    """Why the family is not swept (tests/families.NotSwept), else None."""
    comparison: Comparison | None = None
    rejected: tuple[tuple[str, str], ...] = ()
    """(fusion, reason) of each rejected candidate."""
    modules: Modules | None = None
    rounding_sensitivity: float = 0.0
    """How far eager's gradients move (as `Comparison.grad_err` measures) when every weight
    moves by one fp32 rounding: measured where the compiled gradients differ from eager's by
    more than 1e-5, else 0."""
    compile_error: str | None = None
    """What compiling the loss with the backend raised."""
    plain_compile_error: str | None = None
    """What plain torch.compile (aot_eager) raised on the same loss, where the backend failed."""


def _count_modules(model: torch.nn.Module, batch) -> Modules:
    calls: collections.Counter[str] = collections.Counter()
    hooks = []
    for module in model.modules():
        name = type(module).__name__
        kind = None
        if "rmsnorm" in name.lower():
            kind = "rms_norm"
        elif name.endswith(("Attention", "MLA")):
            kind = "attention"
        elif "rotary" in name.lower():
            kind = "rotary"
        elif hasattr(module, "act_fn") and (
            hasattr(module, "gate_up_proj")
            or (hasattr(module, "gate_proj") and hasattr(module, "up_proj"))
        ):
            kind = "gated_mlp"
        if kind is not None:
            hooks.append(module.register_forward_hook(
                lambda *_, kind=kind: calls.update([kind])))
    try:
        with torch.no_grad():
            model(input_ids=batch[0], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return Modules(
        rms_norms=calls["rms_norm"],
        gated_mlps=calls["gated_mlp"],
        attentions=calls["attention"],
        rotary=calls["rotary"] > 0,
        experts=families.has_experts(model.config),
    )


@functools.cache
def sweep(family: str) -> Result:
    try:
        model = families.build(family)
    except families.NotSwept as e:
        return Result(family, not_swept=str(e))
    batch = families.tiny_batch()
    modules = _count_modules(model, batch)
    try:
        comparison = compile_and_compare(family, torch.float32, model=model, batch=batch)
        comparison = _all_graphs(comparison)
    except Exception as e:  # noqa: BLE001 (any failure of the backend's compile is the result)
        return Result(family, modules=modules, compile_error=_error(e),
                      plain_compile_error=_plain_compile_error(family, batch))
    return Result(
        family,
        comparison=comparison,
        rounding_sensitivity=(
            _rounding_sensitivity(family, batch) if comparison.grad_err > 1e-5 else 0.0),
        rejected=tuple((r.fusion, r.reason) for r in comparison.rejected),
        modules=modules,
    )


def _all_graphs(c: Comparison) -> Comparison:
    """The comparison with fired, declined and rejected summed over every graph compiled."""
    fired = collections.Counter({f: 0 for f in FUSIONS})
    declined: collections.Counter[str] = collections.Counter()
    for report in c.reports:
        fired.update(report.fired)
        declined.update(r.fusion for r in report.declined)
    rejected = tuple(r for report in c.reports for r in report.rejected)
    return dataclasses.replace(c, fired=dict(fired), declined=dict(declined), rejected=rejected)


def _rounding_sensitivity(family: str, batch) -> float:
    """Some graphs amplify rounding (DeepSeek-V4's hyper-connection head: its gradients move by
    2e-5 when its weights move by one ulp), so their compiled gradients, which round
    differently, cannot match eager's to 1e-5."""
    model = families.build(family)
    moved = families.build(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
            p.mul_(1 + sign * torch.finfo(torch.float32).eps)
    grads = []
    for m in (model, moved):
        m(input_ids=batch[0], labels=batch[1], use_cache=False).loss.backward()
        grads.append([torch.zeros(p.shape) if p.grad is None else p.grad for p in m.parameters()])
    return relative_grad_error(grads[1], grads[0])


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def _plain_compile_error(family: str, batch) -> str | None:
    model = families.build(family)
    torch.compiler.reset()
    try:
        loss = torch.compile(
            lambda i, l: model(input_ids=i, labels=l, use_cache=False).loss, backend="aot_eager"
        )(*batch)
        loss.backward()
    except Exception as e:  # noqa: BLE001 (any failure of plain torch.compile is the result)
        return _error(e)
    return None


# README table ----------------------------------------------------------------------------------

BEGIN = "<!-- model-families: generated by tests/compile_passes/sweep.py; do not edit -->"
END = "<!-- /model-families -->"


def _cell(result: Result, *fusions: str) -> str:
    c = result.comparison
    fired = sum(c.fired.get(f, 0) for f in fusions)
    declined = sum(c.declined.get(f, 0) for f in fusions)
    rejected = sum(1 for f, _ in result.rejected if f in fusions)
    if not (fired or declined or rejected):
        return "–"
    parts = [str(fired)]
    if declined:
        parts.append(f"{declined} declined")
    if rejected:
        parts.append(f"{rejected} not fused")
    return ", ".join(parts)


def _short(reason: str) -> str:
    """One line, without the graph's node names (they differ between runs and releases) or where
    packages are installed."""
    reason = re.sub(r"\S*/site-packages/", "", reason)
    reason = re.sub(r"intermediate \w+ \(", "an intermediate (", reason)
    reason = re.sub(r" \(arg\d+_1(, arg\d+_1)*,?( arg)?\w*\)?", "", reason)
    return re.sub(r"\s+", " ", reason).replace("|", "/")[:140]


def note(result: Result) -> str:
    notes = sorted({f"{fusion}: {_short(reason)}" for fusion, reason in result.rejected})
    reports = result.comparison.reports
    for text in sorted({r.skipped for r in reports if r.skipped}):
        notes.insert(0, f"not fused: {_short(text)}")
    for text in sorted({r.error for r in reports if r.error}):
        notes.insert(0, f"fusions failed, compiled unchanged: {_short(text)}")
    breaks = sum(len(r.graph_breaks) for r in reports)
    if breaks:
        reasons = sorted({_short(b.reason)[:80] for r in reports for b in r.graph_breaks})
        notes.insert(0, f"{len(reports)} graphs ({breaks} graph breaks: {'; '.join(reasons)})")
    m = result.modules
    if m.experts:
        notes.insert(0, "mixture of experts")
    return "; ".join(notes)


def table(results: list[Result]) -> str:
    swept = [r for r in results if r.not_swept is None and r.compile_error is None]
    lines = [
        BEGIN,
        (f"transformers {transformers.__version__}: {len(results)} causal LM families in "
         f"`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(swept)} swept. Each cell is how many of that "
         f"fusion fired in the family's tiny model ({families.LAYERS} layer, or one of each kind "
         "a hybrid family mixes); \"declined\" ones "
         "are left to Inductor on purpose (a norm after a residual add), \"not fused\" ones are "
         "explained in the note, and – means the graph has no such subgraph (e.g. LayerNorm "
         "instead of RMSNorm, a plain GELU MLP, no rotary embedding). Every swept family's "
         "compiled loss and gradients match eager (fp32)."),
        "",
        "| family | rms_norm | swiglu / geglu | rope | attention | LM head + CE | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in swept:
        cells = [_cell(r, "rms_norm"), _cell(r, "swiglu", "geglu"), _cell(r, "rope"),
                 _cell(r, "attention"), _cell(r, "linear_cross_entropy")]
        lines.append(f"| {r.family} | " + " | ".join(cells) + f" | {note(r)} |")
    failed = [r for r in results if r.compile_error is not None]
    if failed:
        lines += ["", "Compile fails:", ""]
        for r in failed:
            plain = (f"plain torch.compile fails too ({_short(r.plain_compile_error)})"
                     if r.plain_compile_error else "plain torch.compile works")
            lines.append(f"- {r.family}: {_short(r.compile_error)}; {plain}")
    lines += ["", "Not swept:", ""]
    for r in results:
        if r.not_swept is not None:
            lines.append(f"- {r.family}: {_short(r.not_swept)}")
    lines.append(END)
    return "\n".join(lines)


def readme_section(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        raise ValueError(f"README has no generated section between {BEGIN!r} and {END!r}.")
    return text[start:end + len(END)]


def main(readme: str) -> None:
    results = []
    for family in families.families():
        results.append(sweep(family))
        r = results[-1]
        print(family, r.not_swept or r.compile_error or r.comparison, file=sys.stderr,
              flush=True)
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    text = text.replace(readme_section(text), table(results))
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1])
