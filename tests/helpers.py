"""Shared test helpers: devices to run on and the numerics rule.

The numerics rule: on random inputs, compare the kernel and eager PyTorch in the same dtype against
an fp32/fp64 truth; the kernel's error must be no worse than eager's plus a small tolerance. Never
NaN; non-power-of-two shapes always. In the Triton interpreter loads are upcast to fp32 (its bf16
arithmetic is wrong) and one bf16 ulp is allowed (its stores truncate).
"""

from __future__ import annotations

import torch

# Relative spacing of each dtype (one ulp at 1.0). In the Triton interpreter bf16 stores truncate
# instead of rounding (they keep the top 16 bits of the fp32 value), so bf16 results may be one
# ulp off.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def devices() -> list[str]:
    """CPU always (through the Triton interpreter); CUDA too where there is a GPU."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def assert_no_worse_than_eager(
    name: str, out: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, *, atol: float,
    ulps: float = 1.0,
) -> None:
    """The numerics rule: the kernel's error against an fp64 truth is, element by element, no
    worse than eager PyTorch's error in the same dtype, plus `atol` and `ulps` units of the output
    dtype's spacing at the truth's magnitude. Never NaN. Reports the worst element."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    truth = truth.double().cpu()
    err = (out.double().cpu() - truth).abs()
    allowed = (eager.double().cpu() - truth).abs() + atol + ulps * ULP[out.dtype] * truth.abs()
    excess = err - allowed
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{name}: error {err.flatten()[worst]:.3e} exceeds allowed {allowed.flatten()[worst]:.3e} "
        f"at flat index {worst} (truth {truth.flatten()[worst]:.6e}, out "
        f"{out.double().cpu().flatten()[worst]:.6e}, eager {eager.double().cpu().flatten()[worst]:.6e})"
    )


def count_frozen_lce_calls(monkeypatch) -> list:
    """A list that gets an entry each time linear_cross_entropy's frozen-head path (hidden's
    gradient computed in the forward) runs."""
    import chronicals.ops.linear_cross_entropy as lce

    calls = []
    real = lce._lce_fwd_d_hidden
    monkeypatch.setattr(lce, "_lce_fwd_d_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls




def packages_on_for_tiny_models() -> bool:
    """Whether the finetune job keeps compile packages for the tiny models on this stack
    (chronicals/warmup.py, CompilePackages): not where the optional `kernels` package wraps the
    models' attention."""
    from chronicals.regions import wraps_kernel_tables
    from tests.models import tiny_model

    return not wraps_kernel_tables(tiny_model("llama"))
