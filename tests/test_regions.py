"""Regional compilation (chronicals/regions.py): a decoder layer is compiled once for all layers,
every fusion still fires in each layer and on the graph around them, and the loss and gradients
are eager's."""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from chronicals.regions import mark_layer_regions, repeated_layers
from chronicals.train import compile_loss
from tests.compile_passes.harness import RecordingBackend
from tests.models import VOCAB, tiny_model

LAYERS = 4


def _batch(rows: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _layer_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return list(gm.graph.find_nodes(op="call_function",
                                    target=torch.ops.higher_order.invoke_subgraph))


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(batch, torch.tensor(20))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layers_compile_once_every_fusion_fires_and_gradients_are_eagers(family):
    torch.compiler.reset()
    model = tiny_model(family, num_hidden_layers=LAYERS)
    backend = RecordingBackend()
    loss_fn = compile_loss(model, backend=backend)
    batch = _batch()
    loss, grads = _loss_and_grads(model, loss_fn, batch)

    # One graph; its layers are one body, called once per layer.
    (gm,) = backend.graphs
    calls = _layer_calls(gm)
    assert len(calls) == LAYERS
    assert len({getattr(gm, call.args[0].target) for call in calls}) == 1
    # One report for the model, counting each fusion once per layer: RMSNorm in every layer's
    # input norm (the region's input) and the final norm (Qwen3: and q/k norms), the rest once
    # per layer, the LM head + loss once on the graph around the layers.
    (report,) = backend.reports
    norms_per_layer = 3 if family == "qwen3" else 1
    assert report.fired == {
        "rms_norm": norms_per_layer * LAYERS + 1, "swiglu": LAYERS, "geglu": 0, "rope": LAYERS,
        "attention": LAYERS, "linear_cross_entropy": 1, "lora": 0,
    }, report.summary()
    assert report.rejected == () and report.error is None
    # The post-attention norm follows the residual add: declined in each layer.
    assert len(report.declined) == LAYERS

    eager_loss, eager_grads = _loss_and_grads(model, compile_loss(model, backend=None), batch)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Later batches run the compiled graph: no second compile.
    for seed in (2, 3):
        _loss_and_grads(model, loss_fn, _batch(seed=seed))
    assert len(backend.graphs) == 1


def test_regional_false_compiles_the_whole_graph():
    torch.compiler.reset()
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    compile_loss(model, backend="chronicals")  # marks the layers
    backend = RecordingBackend()
    loss_fn = compile_loss(model, backend=backend, regional=False)
    loss_fn(_batch(), torch.tensor(20)).backward()
    (gm,) = backend.graphs
    assert _layer_calls(gm) == []
    (report,) = backend.reports
    assert report.fired["attention"] == report.fired["rope"] == LAYERS
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_dynamic_true_compiles_the_whole_graph_in_one_piece():
    # With every size and scalar dynamic, torch 2.13's reused layer regions failed in AOTAutograd
    # and Dynamo broke the graph around every layer, without an error: no regions then.
    torch.compiler.reset()
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    backend = RecordingBackend()
    loss_fn = compile_loss(model, backend=backend, dynamic=True)
    compiled = []
    for rows, seq in ((2, 12), (3, 17)):  # a second size: no second compile
        g = torch.Generator().manual_seed(rows)
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        loss_fn({"input_ids": ids, "labels": ids}, torch.tensor(rows * seq)).backward()
        compiled.append(len(backend.graphs))
    # The backend may be called twice for the first batch: Dynamo restarts its analysis once to
    # specialise Python float scalars (its tensorify pass) and compiles again; the graph that runs
    # is the last, and the second size reuses it.
    assert compiled[0] == compiled[1] >= 1, compiled
    gm, report = backend.graphs[-1], backend.reports[-1]
    assert _layer_calls(gm) == []
    assert report.fired["attention"] == report.fired["rope"] == report.fired["swiglu"] == LAYERS
    assert report.fired["linear_cross_entropy"] == 1
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_dynamos_eager_backend_gets_the_whole_graph_and_matches_eager():
    # Dynamo's "eager" backend (what users pick to debug graph breaks) runs its graph as it is,
    # and a region's call cannot run outside a compiler: torch asserted on a fake mode.
    torch.compiler.reset()
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    batch, n = {"input_ids": ids, "labels": ids}, torch.tensor(24)
    want = compile_loss(model, backend=None)(batch, n)
    got = compile_loss(model, backend="eager")(batch, n)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_repeated_layers_are_the_decoder_layers():
    model = tiny_model("llama", num_hidden_layers=3)
    assert repeated_layers(model) == list(model.model.layers)
    assert mark_layer_regions(model) == 3
    assert mark_layer_regions(model) == 3  # marking twice changes nothing
    forwards = {layer.forward.__func__ for layer in model.model.layers}
    assert len(forwards) == 1  # one function for all: Dynamo reuses its subgraph
    assert mark_layer_regions(model, False) == 0
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert repeated_layers(tiny_model("llama", num_hidden_layers=1)) == []


def test_a_layer_call_reaches_its_region_as_flat_leaves_and_is_rebuilt():
    # Dynamo (2.13) matches a region's later calls to its first directly when every argument is
    # a tensor, a constant or a module; keyword or nested arguments cost a traced pytree flatten
    # per call. transformers passes keywords and the rotary (cos, sin) pair.
    from chronicals.regions import _flatten, _unflatten

    h, cos, sin, mask = (torch.randn(2, 3) for _ in range(4))
    args = (h,)
    kwargs = {"attention_mask": mask, "position_ids": None, "position_embeddings": (cos, sin),
              "use_cache": False, "empty": (), "scale": 0.5}
    layout, flat = _flatten(args, kwargs)
    assert isinstance(layout, str)
    assert all(isinstance(v, (torch.Tensor, type(None), bool, float)) for v in flat)
    got_args, got_kwargs = _unflatten(layout, tuple(flat))
    assert len(got_args) == 1 and got_args[0] is h
    assert list(got_kwargs) == list(kwargs)
    assert got_kwargs["position_embeddings"][0] is cos
    assert got_kwargs["position_embeddings"][1] is sin
    assert got_kwargs["empty"] == () and got_kwargs["scale"] == 0.5
    assert got_kwargs["attention_mask"] is mask and got_kwargs["position_ids"] is None
    assert _unflatten(*_flatten((), {})) == ([], {})

    # A marked layer computes what its class's forward does, called the way transformers calls it.
    model = tiny_model("llama", num_hidden_layers=2)
    layer = model.model.layers[0]
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    rotary = model.model.rotary_emb(x, pos)
    want = type(layer).forward(layer, x, attention_mask=None, position_embeddings=rotary)
    mark_layer_regions(model)
    got = layer(x, attention_mask=None, position_embeddings=rotary)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_many_compile_loss_calls_each_compile():
    """Dynamo keeps compiled graphs per code object and, past its recompile limit (8), runs a
    function eagerly without a word; each compile_loss must have a cache of its own."""
    torch.compiler.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    calls = 10
    for i in range(calls):
        # Differently configured models (hidden size), one compile_loss each.
        model = tiny_model("llama", hidden_size=32 + 16 * i, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=48)
        loss_fn = compile_loss(model, backend=counting_backend, regional=False)
        with torch.no_grad():
            loss_fn(_batch(), torch.tensor(20))
    assert len(compiles) == calls


def test_regions_under_autocast_fuse_as_the_whole_graph():
    """fp32 weights under bf16 autocast (bench_train.py --amp): the casts autocast makes are
    written into the one layer body, and every fusion fires as without autocast."""
    torch.compiler.reset()
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    backend = RecordingBackend()
    loss_fn = compile_loss(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(_batch(), torch.tensor(20))
    loss.backward()
    (report,) = backend.reports
    assert report.skipped is None and report.error is None, report.summary()
    assert report.fired["rope"] == report.fired["swiglu"] == LAYERS, report.summary()
    assert report.fired["linear_cross_entropy"] == 1, report.summary()
    assert all(p.grad is not None for p in model.parameters())


def test_experts_inside_a_layer_are_not_regions_of_their_own():
    inner = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(inner))
    layers = torch.nn.ModuleList([layer, torch.nn.Sequential(torch.nn.Linear(2, 2),
                                                            torch.nn.Sequential(inner))])
    model = torch.nn.Sequential(layers)
    assert repeated_layers(model) == list(layers)


def test_a_layer_that_breaks_the_graph_is_compiled_whole_with_a_warning():
    # Dynamo refuses a region whose code breaks the graph (GPT-J's, CodeGen's and JetMoE's
    # layers on transformers 5.25); compile_loss then compiles the whole graph and says why.
    model = tiny_model("llama", num_hidden_layers=2)
    layer_cls = type(model.model.layers[0])

    @torch.compiler.disable
    def not_traced() -> None:  # a call Dynamo does not trace: a graph break
        pass

    class Breaking(layer_cls):
        def forward(self, *args, **kwargs):
            not_traced()
            return super().forward(*args, **kwargs)

    for layer in model.model.layers:
        layer.__class__ = Breaking
    reference = copy.deepcopy(model)
    batch = _batch()
    want, want_grads = _loss_and_grads(reference, compile_loss(reference, backend=None), batch)
    torch.compiler.reset()
    loss_fn = compile_loss(model, options={"report": "none"})
    with pytest.warns(UserWarning, match="cannot be compiled as one region: their code breaks"):
        got, grads = _loss_and_grads(model, loss_fn, batch)
    assert not any(getattr(layer, "_chronicals_region", False) for layer in model.model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _kernelized_func_model(kernels):
    """Two layers whose attention-like module is wrapped by `kernels.use_kernelized_func`, as
    transformers' attention classes are when the `kernels` package is installed."""

    @kernels.use_kernel_forward_from_hub("chronicals_test_scale")
    def scale(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @kernels.use_kernelized_func(scale)
    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return scale(self.proj(x))

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = Mixer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mixer(x)

    return torch.nn.Sequential(torch.nn.ModuleList([Layer(), Layer()]))


def test_hub_kernel_wrapper_is_bypassed_in_regions_while_no_kernel_is_selected():
    kernels = pytest.importorskip("kernels")
    model = _kernelized_func_model(kernels)
    layers = model[0]
    x = torch.randn(3, 4)
    want = layers[1](layers[0](x))
    wrapped = type(layers[0].mixer).forward
    assert hasattr(wrapped, "__wrapped__")  # kernels' wrapper is there to bypass

    assert mark_layer_regions(model) == 2
    for layer in layers:
        assert layer.mixer.forward.__func__ is wrapped.__wrapped__
    torch.testing.assert_close(layers[1](layers[0](x)), want)
    mark_layer_regions(model, False)
    assert all("forward" not in vars(layer.mixer) for layer in layers)

    # A selected hub kernel (what kernels.kernelize sets) keeps the wrapper that routes to it.
    for layer in layers:
        (kernel,) = vars(layer.mixer)["_kernel_funcs"].values()
        kernel.forward = types.MethodType(lambda self, x: 3 * x, kernel)
    mark_layer_regions(model)
    assert all("forward" not in vars(layer.mixer) for layer in layers)
    want = x
    for layer in layers:
        want = want + 3 * layer.mixer.proj(want)
    torch.testing.assert_close(layers[1](layers[0](x)), want)


_REUSE_SCRIPT = """
import sys
import torch
from chronicals.train import compile_loss
from tests.models import tiny_batch, tiny_model
model = tiny_model(sys.argv[1], num_hidden_layers=4)
ids, labels = tiny_batch()
loss_fn = compile_loss(model, backend="aot_eager")
loss_fn({"input_ids": ids, "labels": labels}, torch.tensor(20)).backward()
"""


@pytest.mark.skipif("reuse_hash_fn" not in inspect.signature(
    torch.compiler.nested_compile_region).parameters,
    reason="this torch's Dynamo traces every call of a region (reuse came with torch 2.13)")
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_dynamo_traces_one_layer_and_reuses_it_for_the_others(family):
    # Dynamo reuses a region's trace only when tracing it had no side effects; with the `kernels`
    # package installed, transformers' attention wrapper wrote a module-level variable in every
    # layer, and each layer was traced again. TORCH_LOGS is torch's public switch for the log
    # that says which it did.
    env = {**os.environ, "TORCH_LOGS": "+hierarchical_compile", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, family], check=False, env=env,
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not eligible" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("subgraph_reuse: cache hit") == 3, proc.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cuda_regional_inductor_matches_whole_graph(family, lora):
    """On the GPU the backend hands region bodies to Inductor (on the CPU tests: AOTAutograd with
    eager graphs): a bf16 model's regional loss and gradients match the whole graph's, and the
    same fusions fire (LoRA: PEFT's fp32 adapters, rewritten to mixed precision in both)."""
    import peft

    def build():
        model = tiny_model(family, torch.bfloat16, num_hidden_layers=LAYERS)
        if lora:
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, target_modules="all-linear"))
            for name, p in model.named_parameters():
                if "lora_B" in name:  # B starts at 0: give the adapters a gradient to compare
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(0))
        return model.cuda()

    batch = {k: v.cuda() for k, v in _batch(rows=2, seq=64).items()}
    results = []
    for regional in (True, False):
        torch.compiler.reset()
        model, reports = build(), []
        loss_fn = compile_loss(model, regional=regional, options={"report": reports.append})
        loss = loss_fn(batch, torch.tensor(100, device="cuda"))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, reports[-1]))
    (loss, grads, report), (whole_loss, whole_grads, whole_report) = results
    assert report.compiler == "inductor" and report.rejected == ()
    for fusion in ("swiglu", "rope", "attention", "linear_cross_entropy", "lora"):
        assert report.fired.get(fusion) == whole_report.fired.get(fusion), report.summary()
    assert report.fired["lora"] == (7 * LAYERS if lora else 0)
    torch.testing.assert_close(loss.float(), whole_loss.float(), rtol=2e-2, atol=2e-2)
    assert grads.keys() == whole_grads.keys() and grads
    for name, grad in whole_grads.items():
        assert grads[name].dtype == grad.dtype, name
        err = (grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert err < 5e-2, (name, float(err))


def test_a_backend_failing_on_regions_gets_the_whole_graph_with_a_warning():
    def no_regions(gm, example_inputs):
        if _layer_calls(gm):
            raise RuntimeError("this backend takes no layer regions")
        return gm.forward

    torch.compiler.reset()
    model = tiny_model("llama", num_hidden_layers=2)
    loss_fn = compile_loss(model, backend=no_regions)
    with pytest.warns(UserWarning, match="the backend failed on the graph with layer regions"):
        loss_fn(_batch(), torch.tensor(20)).backward()
    assert all("forward" not in vars(layer) for layer in model.model.layers)
