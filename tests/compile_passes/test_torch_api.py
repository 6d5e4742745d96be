"""The adapter's pre-dispatch trace (compile_passes/_torch_api.py) on graphs it once got wrong."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from compile_passes import _torch_api
from tests.compile_passes.harness import compile_fn


def test_vmap_region_is_traced_as_calls_and_the_rest_fuses():
    """Dynamo inlines torch.vmap as functorch's batching calls (transformers' associative_scan
    in Jamba's Mamba layers). Traced by running them, the values they batch lost their producers
    and became constants (AOTAutograd then failed and the graph was compiled with no fusion);
    recorded as calls, with the calls that open and close the vmap level kept, the norm before
    the vmap fuses and values and gradients are eager's."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)

    def fn(x):
        h = norm(x)
        scan = torch.vmap(lambda row: row * row.sum(-1, keepdim=True).sigmoid())(h)
        return (scan * h).square().sum()

    x = torch.randn(3, 5, 24, requires_grad=True)
    loss, report = compile_fn(fn, x)
    assert report.fired["rms_norm"] == 1 and report.error is None, report.summary()
    loss.backward()
    got = [x.grad.clone(), norm.weight.grad.clone()]
    x.grad = norm.weight.grad = None
    expected = fn(x)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(got, [x.grad, norm.weight.grad])


def test_a_trace_that_holds_computed_values_as_constants_is_refused():
    """A fake tensor held as a constant is a value whose producer the trace lost: the graph
    would compute with a trace-time placeholder. The trace is refused with the reason (the
    backend then compiles the graph as written and reports it)."""
    mode = torch._subclasses.FakeTensorMode()
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.lost = mode.from_tensor(torch.ones(2))
    x = gm.graph.placeholder("x")
    gm.graph.output(gm.graph.call_function(torch.ops.aten.add.Tensor, (x, gm.graph.get_attr("lost"))))
    gm.recompile()
    with pytest.raises(_torch_api.TraceLostValues, match="turned 1 computed values into constants"):
        _torch_api._check_no_lost_values(gm, gm)
