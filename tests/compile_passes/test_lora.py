"""The LoRA rewrite (compile_passes/lora.py) on PEFT models of several families.

Mixed precision (the default) is checked against what it claims to be, eager PEFT under
torch.autocast(bf16), by the numerics rule (tests/helpers.py): against an fp32 truth, the
compiled error is no worse than twice autocast's plus one bf16 unit. The exact option leaves
PEFT's graph alone and is held to the same rule against eager PEFT without autocast.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import peft
import pytest
import torch
from torch import nn

import compile_passes
from chronicals.train import compile_loss
from compile_passes import _torch_api
from compile_passes.backend import BackendOptions
from tests.compile_passes.harness import compile_fn
from tests.helpers import ULP
from tests.models import LAYERS, tiny_batch, tiny_model

aten = torch.ops.aten
ADAPTED = 7 * LAYERS  # q, k, v, o, gate, up, down in every layer


def _lora_model(family: str = "llama", dtype: torch.dtype = torch.bfloat16, *,
                fp32_adapters: bool = True, **lora) -> peft.PeftModel:
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                "init_lora_weights": False, **lora})
    return peft.get_peft_model(tiny_model(family, dtype), config,
                               autocast_adapter_dtype=fp32_adapters)


@dataclasses.dataclass
class Step:
    loss: float
    grads: dict[str, torch.Tensor]
    """The trainable parameters' gradients."""
    report: compile_passes.FusionReport | None = None


def _step(model, *, options: dict | None = None, autocast: bool = False) -> Step:
    """One forward and backward (where a parameter is trained) of the tiny batch; compiled with
    backend='chronicals' (strict unless `options` say otherwise) when `options` is given, under
    torch.autocast(bf16) when `autocast`."""

    def loss_fn(ids, labels):
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    fn = loss_fn
    if options is not None:
        torch.compiler.reset()
        compile_passes.clear_fusion_reports()
        fn = torch.compile(loss_fn, backend="chronicals",
                           options={"report": "none", "strict": True, **options})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(*tiny_batch())
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    report = compile_passes.fusion_reports()[-1] if options is not None else None
    return Step(loss.item(), grads, report)


def _compare(model, options: dict, *, reference_autocast: bool) -> Step:
    """Compile `model` with `options`; check it against eager (under autocast when
    `reference_autocast`) by the numerics rule, and its adapters' gradients are fp32 where the
    adapters are and nonzero. Returns the compiled step."""
    dtype = next(model.parameters()).dtype
    eager, truth = copy.deepcopy(model), copy.deepcopy(model).float()
    compiled = _step(model, options=options)
    reference = _step(eager, autocast=reference_autocast)
    exact = _step(truth)
    ulp = ULP[dtype]
    assert abs(compiled.loss - exact.loss) <= (
        2 * abs(reference.loss - exact.loss) + ulp * abs(exact.loss)), (compiled, reference, exact)
    params = dict(model.named_parameters())
    for name, truth_grad in exact.grads.items():
        got, ref = compiled.grads[name], reference.grads[name]
        assert got is not None and got.dtype == params[name].dtype, name
        assert got.abs().sum() > 0, name
        err = float((got.float() - truth_grad).norm() / truth_grad.norm())
        err_ref = float((ref.float() - truth_grad).norm() / truth_grad.norm())
        assert err <= 2 * err_ref + ulp, (name, err, err_ref)
    return compiled


@pytest.fixture
def graphs(monkeypatch):
    """The rewritten graphs handed to AOTAutograd, in order."""
    seen = []
    real = _torch_api.compile_with_aot_eager

    def recording(gm, example_inputs):
        seen.append(gm)
        return real(gm, example_inputs)

    monkeypatch.setattr(_torch_api, "compile_with_aot_eager", recording)
    return seen


def _linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is aten.linear.default]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_mixed_fires_per_adapted_linear_and_matches_autocast(family, graphs):
    model = _lora_model(family)
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.dtype == torch.float32  # PEFT's default: fp32 adapters, bf16 model
    step = _compare(model, {}, reference_autocast=True)
    assert step.report.fired["lora"] == ADAPTED and step.report.rejected == ()
    assert step.report.lora_precision == "mixed" and "lora precision: mixed" in (
        step.report.summary())
    # Every GEMM runs in bf16; q/k/v and gate/up run their lora_A projections as one GEMM each:
    # per layer 7 base, 4 lora_A (qkv, o, gate_up, down) and 7 lora_B GEMMs.
    linears = _linears(graphs[-1])
    assert {n.meta["val"].dtype for n in linears} == {torch.bfloat16}
    assert len(linears) == 18 * LAYERS
    splits = [n for n in graphs[-1].graph.nodes if n.target is aten.split_with_sizes.default]
    assert sorted(len(n.users) for n in splits) == [2] * LAYERS + [3] * LAYERS


def test_exact_leaves_pefts_fp32_math_and_matches_eager(graphs):
    step = _compare(_lora_model(), {"lora_precision": "exact"}, reference_autocast=False)
    report = step.report
    assert report.fired["lora"] == 0 and report.lora_precision == "exact"
    lora = [r for r in report.declined if r.fusion == "lora"]
    assert len(lora) == ADAPTED and all("lora_precision='exact'" in r.reason for r in lora)
    fp32_gemms = [n for n in _linears(graphs[-1]) if n.meta["val"].dtype == torch.float32]
    assert len(fp32_gemms) == 2 * ADAPTED


@pytest.mark.parametrize("lora_alpha", [4, 8])
def test_fp32_model_matches_eager_to_rounding(lora_alpha):
    """In fp32 nothing is cast; with lora_alpha = r (scaling 1, the job's default) B's weight is
    used as it is. Only the LoRA fusion runs: the other fusions' kernels sum in other orders, and
    their rounding, carried back to layer 0's adapters, reached this tolerance on one element
    in 256 (their numerics are tested in their own files)."""
    model = _lora_model(dtype=torch.float32, lora_alpha=lora_alpha)
    eager = copy.deepcopy(model)
    compiled, reference = _step(model, options={"fusions": ("lora",)}), _step(eager)
    assert compiled.report.fired["lora"] == ADAPTED and compiled.report.rejected == ()
    assert abs(compiled.loss - reference.loss) <= 1e-5 * abs(reference.loss)
    for name, grad in reference.grads.items():
        torch.testing.assert_close(compiled.grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["bf16 adapters", "rslora", "lora_bias", "trainable lm_head"])
def test_variants_fire_and_match_autocast(variant):
    kwargs = {
        "bf16 adapters": {"fp32_adapters": False},
        "rslora": {"use_rslora": True},
        "lora_bias": {"lora_bias": True},
        "trainable lm_head": {"modules_to_save": ["lm_head"]},
    }[variant]
    model = _lora_model(**kwargs)
    step = _compare(model, {}, reference_autocast=True)
    assert step.report.fired["lora"] == ADAPTED
    assert step.report.fired["linear_cross_entropy"] == 1
    if variant == "trainable lm_head":
        assert any("lm_head" in name for name in step.grads)


def test_peft_dora_is_left_as_written():
    """DoRA is declined with its reason. On torch 2.11 PEFT's DoRA traces into one graph and each
    adapted linear's two lora_B projections (of x, and of an identity for the weight norm) are
    declined; on 2.13 it breaks the graph at every adapted linear (peft 0.21 calls
    `str.startswith` in `dequantize_module_weight`, which Dynamo does not trace) and the pieces
    pass lora_A and lora_B as plain arguments, which are not recognised. Either way PEFT's math
    runs as written."""
    _compare(_lora_model(use_dora=True), {"strict": False}, reference_autocast=False)
    reports = compile_passes.fusion_reports()
    assert sum(report.fired["lora"] for report in reports) == 0
    assert not any(r.fusion == "lora" for report in reports for r in report.rejected)
    declined = [r for report in reports for r in report.declined if r.fusion == "lora"]
    assert len(declined) in (0, 2 * ADAPTED)
    assert all(r.reason.startswith("DoRA") for r in declined)


class _PeftNamed(nn.Module):
    """A base linear and one adapter under PEFT's module names (lora_A/lora_B["default"])."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(16, 16, bias=False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(16, 4, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(4, 16, bias=False)})


class _DoRALike(_PeftNamed):
    """PEFT's names with a DoRA magnitude vector beside the adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_magnitude_vector = nn.ModuleDict({"default": nn.Linear(1, 16, bias=False)})

    def forward(self, x):
        magnitude = self.lora_magnitude_vector["default"].weight.view(-1)
        return (self.base(x) + self.lora_B["default"](self.lora_A["default"](x)) * 2.0) * magnitude


def test_dora_in_one_graph_is_declined_with_reason():
    x = torch.randn(3, 16)
    module = _DoRALike()
    y, report = compile_fn(module, x, strict=True)
    (declined,) = report.declined
    assert report.fired["lora"] == 0 and declined.reason.startswith("DoRA")
    torch.testing.assert_close(y, module(x), rtol=0, atol=0)


def test_one_active_adapter_of_several():
    model = _lora_model()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.set_adapter("default")
    step = _step(model, options={})
    assert step.report.fired["lora"] == ADAPTED
    params = dict(model.named_parameters())
    others = [n for n in params if ".other." in n]
    assert others and all(params[n].grad is None for n in others)


def test_two_active_adapters_are_each_rewritten():
    model = _lora_model()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear",
                                                init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    step = _compare(model, {}, reference_autocast=True)
    assert step.report.fired["lora"] == 2 * ADAPTED
    assert any(".other." in name for name in step.grads)


def test_merged_adapters_leave_nothing_to_rewrite_and_unmerged_fire_again():
    model = _lora_model()
    model.merge_adapter()
    step = _step(model, options={})
    assert step.report.fired["lora"] == 0 and step.report.lora_precision is None
    assert not any(r.fusion == "lora" for r in step.report.declined + step.report.rejected)
    model.unmerge_adapter()
    assert _step(model, options={}).report.fired["lora"] == ADAPTED


def test_checkpointed_layers_are_rewritten_inside_their_bodies():
    model = _lora_model()
    model.train()
    # As the finetune job does (chronicals/cli.py): transformers hooks the embeddings' output to
    # require grad, which only reentrant checkpointing needs and which breaks the graph.
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
    step = _compare(model, {}, reference_autocast=True)
    assert step.report.fired["lora"] == ADAPTED


# SwiGLU through torch.compile's whole graph; GeGLU (gelu, tanh) through compile_loss's decoder
# layer regions (the finetune job's path).
@pytest.mark.parametrize("family, regional", [("llama", False), ("gemma", True)])
def test_gated_product_into_an_adapter_is_recomputed_not_kept(family, regional):
    """down_proj's input act(gate) * up is kept only for its lora_A's gradient, and gate and up
    are kept for the product's own: under Inductor's partitioner the backward recomputes the
    product, so of the MLP's (tokens x intermediate) activations two a layer are kept, not
    three; loss and gradients still match autocast's eager PEFT."""
    model = _lora_model(family)
    intermediate = model.get_base_model().config.intermediate_size
    options = {"compiler": "inductor"}
    if regional:
        loss_fn = compile_loss(model, options={"report": "none", **options})
        fn = lambda ids, labels: loss_fn({"input_ids": ids, "labels": labels},
                                         torch.tensor(int((labels[:, 1:] != -100).sum())))
    else:
        step = _compare(model, options, reference_autocast=True)
        assert step.report.fired["lora"] == ADAPTED
        fn = torch.compile(lambda ids, labels: model(input_ids=ids, labels=labels,
                                                     use_cache=False).loss,
                           backend="chronicals", options={"report": "none", **options})
    fn(*tiny_batch()).backward()  # compiled here; the next call only runs
    kept = {}

    def keep(t):
        kept[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = fn(*tiny_batch())
    tokens = tiny_batch()[0].numel()
    mlp = [s for s in kept.values() if s and s[-1] == intermediate
           and math.prod(s) == tokens * intermediate]
    assert len(mlp) == 2 * LAYERS, sorted(kept.values())
    loss.backward()
    down_a = model.get_base_model().model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert down_a.grad is not None and down_a.grad.abs().sum() > 0


class _Proj(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_dropout_uses_one_mask_in_forward_and_backward():
    """With a zero base weight and A = B = I (scaling 1), the output is dropout(x) and x's
    gradient is dropout's backward of the output gradient: both must show the same mask."""
    features = 8
    model = _Proj(features).to(torch.bfloat16)
    nn.init.zeros_(model.proj.weight)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=features, lora_alpha=features, target_modules=["proj"], lora_dropout=0.5))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(features))
        layer.lora_B["default"].weight.copy_(torch.eye(features))
    # Nonzero inputs, so a zero output marks a dropped element.
    x = (torch.rand(4, 16, features) + 0.5).bfloat16().requires_grad_()
    g = torch.randn(4, 16, features, dtype=torch.bfloat16)
    y, report = compile_fn(model, x, strict=True)
    y.backward(g)
    assert report.fired["lora"] == 1
    kept = y != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.equal(y, torch.where(kept, 2 * x, 0).detach())
    assert torch.equal(x.grad, torch.where(kept, 2 * g, 0))
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


class _LookAlike(_PeftNamed):
    """`base(x) + lora_B(lora_A(x)) * 2` with PEFT's names, but lora_A's output also returned."""

    def forward(self, x):
        h = self.lora_A["default"](x)
        return self.base(x) + self.lora_B["default"](h) * 2.0, h


class _LowRank(nn.Module):
    """The same math on weights PEFT did not make: the user's own, left as written."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(16, 16, bias=False)
        self.down = nn.Linear(16, 4, bias=False)
        self.up = nn.Linear(4, 16, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x.float())) * 2.0


def test_look_alikes_are_left_as_written():
    x = torch.randn(3, 16)
    module = _LookAlike()
    (y, _h), report = compile_fn(module, x)
    assert report.fired["lora"] == 0
    (rejection,) = report.rejected
    assert rejection.fusion == "lora" and "lora_A's output is used outside" in rejection.reason
    torch.testing.assert_close(y, module(x)[0])

    low_rank = _LowRank().to(torch.bfloat16)
    for layer in (low_rank.down, low_rank.up):
        layer.float()
    y, report = compile_fn(low_rank, x.bfloat16(), strict=True)
    assert report.fired["lora"] == 0 and report.rejected == () and report.declined == ()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, low_rank(x.bfloat16()), rtol=0, atol=0)


def test_lora_precision_option_is_checked():
    assert BackendOptions().lora_precision == "mixed"
    with pytest.raises(ValueError, match="lora_precision must be one of"):
        BackendOptions(lora_precision="fp32")
