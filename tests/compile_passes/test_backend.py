"""The backend itself: options, the report, failure handling and registration."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import compile_passes
from chronicals.warmup import sources_hash
from compile_passes import _torch_api, autocast
from tests.compile_passes.harness import compile_fn


def _norm(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_option_names_are_the_registered_fusions_in_order():
    # BackendOptions validates names without importing the kernels; both come from one registry,
    # and each registered fusion carries the name it is registered under.
    from compile_passes import backend

    fusions = backend._all_fusions()
    assert backend.FUSION_NAMES == tuple(fusions)
    assert all(fusion.name == name for name, fusion in fusions.items())


def test_report_is_data_and_goes_to_a_file_or_callable(tmp_path):
    x, w = torch.randn(4, 24), torch.randn(24)
    seen = []
    compile_fn(_norm, x, w, report=seen.append)
    assert [r.fired["rms_norm"] for r in seen] == [1]
    assert compile_passes.fusion_reports()[-1] is seen[0]
    path = tmp_path / "report.jsonl"
    compile_fn(_norm, x, w, report=str(path))
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["fired"]["rms_norm"] == 1
    assert "fused 1 rms_norm" in seen[0].summary()


def test_a_failing_report_sink_is_named(tmp_path):
    x, w = torch.randn(4, 24), torch.randn(24)

    def sink(report):
        raise ValueError("disk full")

    with pytest.raises(Exception, match=r"report callable .*options\['report'\]\) raised "
                                        r"ValueError: disk full"):
        compile_fn(_norm, x, w, report=sink)
    path = tmp_path / "report.jsonl"
    path.mkdir()  # a folder where the file should be: the append fails
    with pytest.raises(Exception, match=r"could not append the report to .*report.jsonl"):
        compile_fn(_norm, x, w, report=str(path))


def test_report_is_logged_once_per_graph(caplog):
    x, w = torch.randn(4, 24), torch.randn(24)
    with caplog.at_level("INFO", logger="chronicals.compile"):
        compile_fn(_norm, x, w, report="log")
    records = [r for r in caplog.records if r.name == "chronicals.compile"]
    assert len(records) == 1 and "fused 1 rms_norm" in records[0].getMessage()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fusions": ["rmsnorm"]}, "unknown fusions"),
        ({"fusions": "rms_norm"}, "list of names"),
        ({"compiler": "tvm"}, "compiler must be one of"),
        ({"stict": True}, "unknown options"),
        ({"report": 3}, "report must be"),
        ({"report": "logs"}, r"report must be 'log', 'none', the path of a .jsonl file"),
        ({"report": "/no/such/folder/r.jsonl"}, "in a folder that does not exist"),
        ({"strict": "false"}, "strict must be True or False. Got 'false'"),
        ({"fusions": None}, "fusions must be a list of names"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(Exception, match=message):
        compile_fn(_norm, torch.randn(4, 24), torch.randn(24), **options)


def test_options_must_be_a_dict():
    with pytest.raises(Exception, match=r"options must be a dict. Got list"):
        torch.compile(_norm, backend="chronicals", options=["strict"])(
            torch.randn(4, 24), torch.randn(24)
        )


def _autocast_norm(x, w):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _norm(x @ w.diag(), w)


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_casts_are_written_into_the_graph(where, dtype):
    """The pattern stage traces with autocast off. With fp32 inputs autocast to bf16 runs the
    matmul in bf16; that cast is written into the graph first, so the norm after it is fused in
    the dtypes it really has (bf16 x, fp32 w). With bf16 inputs autocast casts nothing. Either
    way the result is eager's under autocast, bit for bit, whether the region is in the compiled
    function or around its call."""
    x, w = torch.randn(4, 24).to(dtype), torch.randn(24).to(dtype)
    if where == "inside":
        out, report = compile_fn(_autocast_norm, x, w)
        expected = _autocast_norm(x, w)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, report = compile_fn(lambda a, b: _norm(a @ b.diag(), b), x, w)
            expected = _norm(x @ w.diag(), w)
    assert report.fired["rms_norm"] == 1 and report.skipped is None, report
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_that_cannot_be_written_out_compiles_unfused_and_says_so(monkeypatch):
    """If casting a node's inputs does not give it autocast's dtypes, nothing is fused, the report
    names the node, strict mode raises, and autocast is left as it was."""
    monkeypatch.setattr(autocast._AutocastCasts, "_cast_inputs", lambda self, n, dtype: None)
    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(_autocast_norm, x, w)
    assert report.fired["rms_norm"] == 0
    assert report.skipped.startswith(
        "torch.autocast changes dtypes in this graph (matmul is torch.bfloat16 under autocast, "
        "and casting its inputs does not reproduce that: "
    ), report.skipped
    torch.testing.assert_close(out, _autocast_norm(x, w), rtol=0, atol=0)
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(Exception, match=r"(?s)strict.*torch.autocast changes dtypes"):
        compile_fn(_autocast_norm, x, w, strict=True)


def test_autocast_inside_a_checkpointed_body_is_written_out():
    """A cast autocast makes inside a checkpointed layer is written into the layer's body."""

    def layer(x, w):
        return x + _norm(x @ w.diag(), w).float()

    def fn(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.utils.checkpoint.checkpoint(layer, x, w, use_reentrant=False)

    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(fn, x, w)
    assert report.fired["rms_norm"] == 1 and report.skipped is None, report
    torch.testing.assert_close(out, fn(x, w), rtol=0, atol=0)


class _KernelTable:
    """A module-level table a layer points at its kernels while it runs, and restores after, as
    transformers 5.25's attention layers do through `kernels.use_kernelized_func`. The table
    holds objects, so Dynamo cannot check that the layer restores it."""

    def __init__(self):
        self.active = None


class _Kernel:
    pass


_TABLE, _NORM_KERNEL = _KernelTable(), _Kernel()


def _layer_that_sets_and_restores_a_global(x, w):
    previous, _TABLE.active = _TABLE.active, {"rms_norm": _NORM_KERNEL}
    out = x + _norm(x, w)
    _TABLE.active = previous
    return out


def test_a_checkpointed_layer_with_a_python_side_effect_stays_in_one_graph():
    """Dynamo refuses a side effect inside a checkpointed region ("HOP: Unsafe side effect") and
    breaks the graph there, unless the setting the backend turns on when it is loaded lets the
    side effect run once, in the forward. Then the layer is one graph, its norm fuses, and the
    result and gradients are eager's."""

    def fn(x, w):
        return torch.utils.checkpoint.checkpoint(
            _layer_that_sets_and_restores_a_global, x, w, use_reentrant=False
        )

    x, w = torch.randn(4, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    x_eager, w_eager = (t.detach().clone().requires_grad_() for t in (x, w))
    torch.compiler.reset()
    compile_passes.clear_fusion_reports()
    out = torch.compile(fn, backend="chronicals", options={"report": "none"})(x, w)
    (report,) = compile_passes.fusion_reports()
    assert report.fired["rms_norm"] == 1 and report.rejected == (), report.summary()
    assert report.graph_breaks == (), report.summary()
    assert _TABLE.active is None
    expected = fn(x_eager, w_eager)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close((x.grad, w.grad), (x_eager.grad, w_eager.grad))


def _forward_with_a_graph_break(hidden, weight, labels):
    """A model's forward: returns its loss and its logits, after a data-dependent check."""
    if not torch.isfinite(hidden).all().item():  # Tensor.item() is a graph break
        raise ValueError("non-finite hidden states")
    logits = F.linear(hidden, weight)
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return {
        "loss": F.cross_entropy(logits.float().view(-1, weight.shape[0]), labels.view(-1),
                                ignore_index=-100),
        "logits": logits,
    }


def test_a_graph_break_is_reported_with_its_reason_and_source_line():
    """A graph break splits the forward: the report names the break (Dynamo's reason, the user's
    line), and the LM head + loss in the graph after it is rejected for the split, not with the
    advice to return only the loss, which the compiled function already does."""

    def loss_fn(hidden, weight, labels):
        return _forward_with_a_graph_break(hidden, weight, labels)["loss"]

    hidden, weight = torch.randn(2, 6, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (2, 6))
    reports = []
    torch.compiler.reset()
    loss = torch.compile(loss_fn, backend="chronicals", options={"report": reports.append})(
        hidden, weight, labels
    )
    torch.testing.assert_close(loss, loss_fn(hidden, weight, labels))
    lines, first = inspect.getsourcelines(_forward_with_a_graph_break)
    (index,) = [i for i, text in enumerate(lines) if ".item()" in text]
    where = f"{__file__}:{first + index} in _forward_with_a_graph_break"
    (graph_break,) = [b for r in reports for b in r.graph_breaks]
    assert graph_break.source == f"{where}: {lines[index].strip()}"
    assert "Tensor.item()" in graph_break.reason
    assert any(f"graph break at {where}" in r.summary() for r in reports)
    (rejection,) = [x for r in reports for x in r.rejected]
    assert rejection.fusion == "linear_cross_entropy"
    assert rejection.reason.startswith(f"a graph break split the function at {where}, ")
    assert "graph output" not in rejection.reason
    with pytest.raises(Exception, match=r"(?s)strict.*a graph break split the function"):
        torch.compiler.reset()
        torch.compile(loss_fn, backend="chronicals", options={"strict": True})(
            hidden, weight, labels
        )


def _featureless_loss(hidden, head, labels):
    """An LM head + loss on hidden states with no features (H = 0): every logit is 0, which
    eager computes; the fused op wants at least one hidden column."""
    logits = F.linear(hidden, head).float()
    return F.cross_entropy(logits.view(-1, head.shape[0]), labels.view(-1), ignore_index=-100)


def _norm_with_infinite_eps(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float("inf"))).to(x.dtype)


@pytest.mark.parametrize(
    "fn, make_inputs, rejected, reason, fired",
    [
        (_featureless_loss,
         lambda: (torch.randn(2, 6, 0), torch.randn(40, 0), torch.randint(0, 40, (2, 6))),
         "linear_cross_entropy", "weight must have at least one vocab row and hidden column",
         {"linear_cross_entropy": 0}),
        (_norm_with_infinite_eps, lambda: (torch.randn(4, 24), torch.randn(24)),
         "rms_norm", "eps must be finite and > 0", {"rms_norm": 0}),
    ],
    ids=["lce_featureless", "rms_norm_infinite_eps"],
)
def test_a_candidate_the_fused_op_refuses_is_rejected_and_compiled_as_written(
        fn, make_inputs, rejected, reason, fired):
    """Subgraphs the patterns match but the fused op refuses (its fake raises), which eager runs:
    the candidate is rejected with the op's reason and the rest of the graph still fuses
    (the pattern stage used to fail, leaving the whole graph unfused, and strict mode raised the
    op's bare error); strict mode raises with the reason."""
    inputs = make_inputs()
    out, report = compile_fn(fn, *inputs)
    torch.testing.assert_close(out, fn(*inputs))
    assert report.error is None, report.summary()
    assert {k: report.fired[k] for k in fired} == fired, report.summary()
    (rejection,) = report.rejected
    assert rejection.fusion == rejected and reason in rejection.reason
    assert rejection.reason.startswith("the fused op refuses these inputs: ")
    with pytest.raises(Exception, match=r"(?s)strict.*" + re.escape(reason)):
        compile_fn(fn, *inputs, strict=True)


def test_tracing_under_autocast_keeps_the_dtypes_of_a_region_that_turns_it_off():
    """Inside an autocast(enabled=False) region the matmul runs in fp32. Traced under an outer
    autocast its value must not look bf16, or the cast back to bf16 after it looks like a no-op
    and is dropped (the CUDA run of HF's rotary embeddings then fed fp32 cos/sin to rope)."""

    def fn(x, w):
        with torch.autocast("cpu", enabled=False):
            y = x.float() @ w.float()
        return y.to(x.dtype) * 2

    dtypes = {}

    def backend(gm, example_inputs):
        traced = _torch_api.trace_pre_dispatch(gm, example_inputs)
        for n in traced.graph.nodes:
            if isinstance(n.meta.get("val"), torch.Tensor):
                dtypes[str(n.target)] = n.meta["val"].dtype
        return gm

    torch.compiler.reset()
    x, w = torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(fn, backend=backend)(x, w)
    assert dtypes["aten.matmul.default"] == torch.float32


def test_a_region_that_turns_autocast_off_still_fuses():
    def norm_with_autocast_off(x, w):
        with torch.autocast("cpu", enabled=False):
            return _norm(x, w)

    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(norm_with_autocast_off, x, w)
    assert report.fired["rms_norm"] == 1 and report.skipped is None
    torch.testing.assert_close(out, _norm(x, w))


def test_failed_pattern_stage_compiles_the_graph_unchanged_and_says_so(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(_torch_api, "trace_pre_dispatch", broken)
    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(_norm, x, w)
    assert report.error == "RuntimeError: tracer exploded"
    assert report.fired["rms_norm"] == 0
    torch.testing.assert_close(out, _norm(x, w))
    with pytest.raises(Exception, match="tracer exploded"):
        compile_fn(_norm, x, w, strict=True)


def test_rewritten_graph_that_fails_to_compile_is_compiled_unchanged(monkeypatch):
    """A fused op that fails only where AOTAutograd compiles the rewritten graph (e.g. in its
    autograd setup): without strict the graph is compiled as written and the report says why."""
    plain = _torch_api.compile_with_aot_eager

    def failing_on_fused_ops(gm, example_inputs):
        if any(str(n.target).startswith("chronicals.") for n in gm.graph.nodes):
            raise ValueError("rms_norm: refused at compile time")
        return plain(gm, example_inputs)

    monkeypatch.setattr(_torch_api, "compile_with_aot_eager", failing_on_fused_ops)
    x, w = torch.randn(4, 24), torch.randn(24)
    out, report = compile_fn(_norm, x, w)
    assert report.fired["rms_norm"] == 0
    assert report.error == (
        "compiling the rewritten graph raised ValueError: rms_norm: refused at compile time"
    )
    torch.testing.assert_close(out, _norm(x, w))
    with pytest.raises(Exception, match="refused at compile time"):
        compile_fn(_norm, x, w, strict=True)


def test_entry_point_works_in_a_fresh_process():
    """After installation, backend='chronicals' resolves with no import of ours."""
    script = textwrap.dedent(
        """
        import sys, torch
        def norm(x, w):
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        assert "chronicals" not in sys.modules and "compile_passes" not in sys.modules
        x, w = torch.randn(4, 24), torch.randn(24)
        out = torch.compile(norm, backend="chronicals", options={"report": "none"})(x, w)
        torch.testing.assert_close(out, norm(x, w))
        import compile_passes
        print(compile_passes.fusion_reports()[-1].fired["rms_norm"])
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/",
        timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_inductor_compiles_the_rewritten_graph():
    """Inductor asserts each custom op's real strides against its fake; aot_eager does not.
    One small model through Inductor on CPU keeps the fakes honest."""
    from tests.compile_passes.harness import compile_and_compare

    result = compile_and_compare("qwen3", torch.float32, options={"compiler": "inductor"})
    result.assert_counts("qwen3")
    result.assert_matches_eager(torch.float32)


def test_inductor_cache_keys_carry_our_sources(monkeypatch):
    """Inductor's and AOTAutograd's on-disk caches hash the graph, not our ops' backward formulas
    or kernels: compile_with_inductor adds a hash of our sources to their keys through a no-op
    post-grad pass, and keeps a pass the user set (running it, and joining its uuid)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = {}
    monkeypatch.setattr(_torch_api, "compile_fx",
                        lambda gm, inputs, config_patches: seen.update(config_patches))
    _torch_api.compile_with_inductor(torch.fx.GraphModule({}, torch.fx.Graph()), [])
    key = seen["post_grad_custom_post_pass"]
    assert key.uuid() == sources_hash().encode() and len(key.uuid()) == 64  # sha256, in hex

    class UserPass(CustomGraphPass):
        def __init__(self):
            self.ran = 0

        def __call__(self, graph):
            self.ran += 1

        def uuid(self):
            return "user"

    user = UserPass()
    wrapped = _torch_api._SourcesInCacheKey(user, b"ours")
    wrapped(torch.fx.Graph())
    assert user.ran == 1 and wrapped.uuid() == (b"ours", "user")
    # A plain function has no uuid: Inductor then does not cache, and neither do we.
    assert _torch_api._SourcesInCacheKey(lambda graph: None, b"ours").uuid() is None


class _TanhGelu(torch.autograd.Function):
    """A custom autograd.Function as Bloom's BloomGelu is one (its own backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        d = 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)
        return grad * d


def _norm_then_custom_function(x, w, up):
    return _TanhGelu.apply(_norm(x, w) @ up).sum()


def test_custom_autograd_function_keeps_its_gradients_unfused():
    """Pre-dispatch tracing runs a custom autograd.Function's forward under no_grad and drops
    its backward: with a fusion applied, no gradient reached Bloom's MLPs. Such a graph is
    compiled as written, and the report says why; without grad the norm fuses."""
    x, w, up = torch.randn(4, 24), torch.randn(24), torch.randn(24, 8)
    args = [t.clone().requires_grad_() for t in (x, w, up)]
    out, report = compile_fn(_norm_then_custom_function, *args)
    out.backward()
    expected = [t.clone().requires_grad_() for t in (x, w, up)]
    _norm_then_custom_function(*expected).backward()
    for got, want in zip(args, expected):
        torch.testing.assert_close(got.grad, want.grad)
    assert report.fired["rms_norm"] == 0
    assert report.skipped.startswith("the graph calls a custom torch.autograd.Function "), report
    with torch.no_grad():
        out, report = compile_fn(_norm_then_custom_function, x, w, up)
    assert report.fired["rms_norm"] == 1 and report.skipped is None, report
    torch.testing.assert_close(out, _norm_then_custom_function(x, w, up))


@pytest.mark.parametrize("first", ["compile_passes", "chronicals", "compile_passes.backend"])
def test_source_checkout_imports_in_any_order(first):
    """Without an installed entry point (a source checkout on PYTHONPATH, as on the GPU machine),
    importing chronicals registers the backend; that must work whichever package is imported
    first (a circular import once broke `import compile_passes` there)."""
    script = textwrap.dedent(
        f"""
        import importlib.metadata as metadata
        every = metadata.entry_points
        def without_ours(**selection):
            found = every(**selection)
            if selection.get("group") == "torch_dynamo_backends":
                return metadata.EntryPoints(e for e in found if e.name != "chronicals")
            return found
        metadata.entry_points = without_ours
        import {first}
        import chronicals
        import torch
        from torch._dynamo.backends.registry import lookup_backend
        print(lookup_backend("chronicals").__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("compile_passes")
