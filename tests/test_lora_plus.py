"""LoRA+ parameter groups on PEFT models: who is in which group, at which rate and decay."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from chronicals.lora_plus import lora_plus_param_groups
from tests.models import tiny_model


def _peft(**lora_kwargs):
    model = tiny_model("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora_kwargs)
    return peft.get_peft_model(model, config)


def _by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}, {
        g["name"]: (g["lr"], g["weight_decay"]) for g in groups
    }


def test_linear_lora_rates_and_membership():
    model = _peft(target_modules=["q_proj", "v_proj", "down_proj"])
    groups = lora_plus_param_groups(model, lr=1e-4, ratio=16.0, weight_decay=0.1)
    members, settings = _by_name(model, groups)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(members) == {"lora_A", "lora_B"}
    assert members["lora_A"] | members["lora_B"] == trainable
    assert members["lora_A"] and all(".lora_A." in n for n in members["lora_A"])
    assert members["lora_B"] and all(".lora_B." in n for n in members["lora_B"])
    # 2 layers x 3 target modules, one A and one B each.
    assert len(members["lora_A"]) == len(members["lora_B"]) == 6
    assert settings["lora_A"] == (1e-4, 0.1)
    assert settings["lora_B"] == (pytest.approx(16e-4), 0.1)


def test_embedding_factors_biases_and_saved_modules():
    model = _peft(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"],
                  bias="lora_only")
    groups = lora_plus_param_groups(model, lr=2e-4, ratio=8.0, weight_decay=0.01,
                                    embedding_lr=1e-6)
    members, settings = _by_name(model, groups)

    assert members["embedding"] == {
        n for n, _ in model.named_parameters() if "lora_embedding_" in n
    }
    assert len(members["embedding"]) == 2
    assert settings["embedding"] == (1e-6, 0.01)
    # Qwen2's q_proj has a bias; bias="lora_only" trains it: 1-D, so B's rate without decay.
    assert members["no_decay"] and all(n.endswith("q_proj.base_layer.bias")
                                       for n in members["no_decay"])
    assert settings["no_decay"] == (pytest.approx(16e-4), 0.0)
    # The fully trained lm_head copy is a plain matrix: A's rate, decayed.
    assert members["other"] and all("lm_head" in n for n in members["other"])
    assert settings["other"] == (2e-4, 0.01)


def test_groups_drive_any_optimizer():
    model = _peft(target_modules=["q_proj"])
    groups = lora_plus_param_groups(model, lr=1e-3)
    for opt in (torch.optim.AdamW(groups), torch.optim.SGD(groups, lr=0.0)):
        rates = {g["name"]: g["lr"] for g in opt.param_groups}
        assert rates == {"lora_A": 1e-3, "lora_B": pytest.approx(16e-3)}
    # A scheduler scales every group alike, so the ratio survives.
    opt = torch.optim.AdamW(lora_plus_param_groups(model, lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(16.0)


def test_only_trainable_parameters():
    model = _peft(target_modules=["q_proj"])
    groups = lora_plus_param_groups(model, lr=1e-3)
    assert all(p.requires_grad for g in groups for p in g["params"])
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    assert frozen > 0


def test_no_lora_parameters_is_an_error():
    with pytest.raises(ValueError, match="no trainable LoRA parameters"):
        lora_plus_param_groups(tiny_model("qwen2"), lr=1e-3)


def test_frozen_lora_is_an_error():
    model = _peft(target_modules=["q_proj"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA parameters"):
        lora_plus_param_groups(model, lr=1e-3)


class _Named(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.params = nn.ParameterDict({n: nn.Parameter(torch.zeros(2, 2)) for n in names})

    def named_parameters(self, *args, **kwargs):
        return iter((n.replace("__", "."), p) for n, p in self.params.items())


def test_unpaired_factor_is_an_error():
    model = _peft(target_modules=["q_proj"])
    name = next(n for n, _ in model.named_parameters() if ".lora_B." in n)
    model.get_parameter(name).requires_grad_(False)
    with pytest.raises(ValueError, match="unpaired"):
        lora_plus_param_groups(model, lr=1e-3)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["m__lora_A__lora_B__weight"], "more than one LoRA factor"),
        (["m__lora_C__default__weight"], "neither a lora_A nor a lora_B"),
    ],
)
def test_ambiguous_names_are_an_error(names, match):
    with pytest.raises(ValueError, match=match):
        lora_plus_param_groups(_Named(names), lr=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": 0.0}, ValueError, r"ratio must be a finite real number > 0. Got 0.0."),
        ({"ratio": float("inf")}, ValueError, r"ratio must be .* Got inf."),
        ({"lr": float("nan")}, ValueError, r"lr must be a finite real number > 0. Got nan."),
        ({"embedding_lr": -1e-6}, ValueError, r"embedding_lr must be .* > 0. Got -1e-06."),
        ({"weight_decay": -1.0}, ValueError, r"weight_decay must be .* >= 0. Got -1.0."),
        ({"weight_decay": float("nan")}, ValueError, r"weight_decay must be .* Got nan."),
        ({"lr": "1e-3"}, TypeError, r"lr must be a finite real number > 0. Got '1e-3' \(str\)."),
        ({"lr": None}, TypeError, r"lr must be .* Got None \(NoneType\)."),
        ({"ratio": "16"}, TypeError, r"ratio must be .* Got '16' \(str\)."),
        ({"weight_decay": None}, TypeError, r"weight_decay must be .* >= 0. Got None"),
        ({"weight_decay": True}, TypeError, r"weight_decay must be .* Got True \(bool\)."),
    ],
)
def test_bad_rates_are_an_error(kwargs, error, match):
    model = _peft(target_modules=["q_proj"])
    with pytest.raises(error, match=match):
        lora_plus_param_groups(model, **{"lr": 1e-3, **kwargs})


def test_zero_weight_decay_and_integer_rates_are_fine():
    model = _peft(target_modules=["q_proj"])
    groups = lora_plus_param_groups(model, lr=1, ratio=16, weight_decay=0)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1.0, 0.0), (16.0, 0.0)]


def test_model_must_be_a_module():
    model = _peft(target_modules=["q_proj"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module. Got list."):
        lora_plus_param_groups(list(model.parameters()), lr=1e-3)
