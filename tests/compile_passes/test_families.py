"""Every model family, compiled with backend='chronicals': each fusion fires exactly as often as
the architecture says, nothing is rejected, and loss and gradients match eager."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.compile_passes.harness import compile_and_compare
from tests.models import DECLINED, EXPECTED, FAMILIES, LAYERS, tiny_batch, tiny_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _compiled(family: str, dtype: torch.dtype):
    return compile_and_compare(family, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_fusion_fires_and_matches_eager(family, dtype):
    result = _compiled(family, dtype)
    result.assert_counts(family)
    result.assert_matches_eager(dtype)


@pytest.mark.parametrize(
    "enable",
    [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}],
    ids=["default", "use_reentrant_false"],
)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_gradient_checkpointing(family, enable):
    """Checkpointing turned on as users do (TRL does it by default). On transformers 5.25 each
    attention layer sets and resets a module-level variable (`kernels`' use_kernelized_func);
    without the Dynamo setting the backend makes on load, every checkpointed layer is a graph
    break and almost nothing fuses."""
    result = compile_and_compare(family, torch.float32, checkpointing=enable)
    result.assert_counts(family, checkpointed=True)
    result.assert_matches_eager(torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2"])
def test_dynamic_sequence_length(family):
    """Gemma-2's scale and softcap reach its eager attention as symbolic floats (Dynamo lifts
    float attributes to inputs): the fused op takes them as constants, as plain torch.compile
    specialises such scalars."""
    result = compile_and_compare(family, torch.float32, seq=20, dynamic=True)
    result.assert_counts(family)
    result.assert_matches_eager(torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_model_in_the_autocast_dtype_fuses_under_autocast(family):
    """HF Trainer's bf16=True runs the forward under torch.autocast; for a model already in bf16
    autocast casts nothing, so every fusion still applies and the result is eager's."""
    model = tiny_model(family, torch.bfloat16)
    ids, labels = tiny_batch()
    plain = model(input_ids=ids, labels=labels, use_cache=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = model(input_ids=ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(under, plain, rtol=0, atol=0)  # the premise: no cast changes it
    result = compile_and_compare(family, torch.bfloat16, autocast=torch.bfloat16)
    result.assert_counts(family)
    result.assert_matches_eager(torch.bfloat16)


def test_fusions_option_limits_what_is_rewritten():
    result = compile_and_compare("llama", torch.float32, options={"fusions": ["rms_norm"]})
    assert result.fired == {"rms_norm": EXPECTED["llama"]["rms_norm"]}
    result.assert_matches_eager(torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_inductor_every_fusion_fires_and_matches_eager(family, dtype):
    """On CUDA the rewritten graph goes through Inductor (compile_fx) and the ops run their
    Triton kernels: the path users take."""
    result = compile_and_compare(family, dtype, device="cuda")
    if dtype == torch.float32:
        # The CUDA attention kernels take fp16/bf16: an fp32 model's attention is left to
        # Inductor, rejected with that reason in each layer; every other fusion fires.
        assert [r.fusion for r in result.rejected] == ["attention"] * LAYERS, result.rejected
        assert all("float16/bfloat16" in r.reason for r in result.rejected), result.rejected
        expected = (dict(EXPECTED[family], attention=0), DECLINED[family])
        assert (result.fired, result.declined) == expected, result
    else:
        result.assert_counts(family)
    result.assert_matches_eager(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_cuda_model_in_the_autocast_dtype_fuses_under_autocast(family):
    """CUDA's autocast lists differ from the CPU's; a bf16 model under autocast to bf16 still
    fuses everything and matches eager through Inductor."""
    result = compile_and_compare(family, torch.bfloat16, device="cuda", autocast=torch.bfloat16)
    result.assert_counts(family)
    result.assert_matches_eager(torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_fp32_model_under_autocast_fuses_in_the_autocast_dtypes(family):
    """HF Trainer's bf16=True with a model loaded in fp32: autocast runs the projections in bf16
    (bf16 SwiGLU operands, bf16 q/k against fp32 cos/sin, a bf16 LM head). Its casts are written
    into the graph before the pattern stage, so every fusion sees the dtypes the model computes
    in, fires as without autocast, and the result matches eager under the same autocast."""
    result = compile_and_compare(family, torch.float32, autocast=torch.bfloat16)
    result.assert_counts(family)
    result.assert_matches_eager(torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_cuda_fp32_model_under_autocast_fuses_in_the_autocast_dtypes(family):
    """The same through Inductor with CUDA's autocast lists."""
    result = compile_and_compare(family, torch.float32, device="cuda", autocast=torch.bfloat16)
    result.assert_counts(family)
    result.assert_matches_eager(torch.bfloat16)
