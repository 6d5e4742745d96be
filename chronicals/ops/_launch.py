"""What the ops share: where each op runs, input checks, launch heuristics and the Triton helpers
every kernel uses.

Chronicals ops run their Triton kernels on CUDA tensors. On CPU tensors they run the same Triton
kernels through Triton's interpreter when `TRITON_INTERPRET=1` is set (Triton's own convention,
used by the tests), and otherwise the plain PyTorch definition in `chronicals/reference.py`. That
choice is made per device, stated here once, and reported by `implementation()`; there is no
fallback after a kernel fails.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def implementation(device: torch.device | str) -> str:
    """'triton' on CUDA, 'triton-interpreter' or 'reference' on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "triton-interpreter" if interpreter_on() else "reference"
    raise ValueError(f"Chronicals ops run on CUDA or CPU tensors. Got a tensor on {device}.")


def use_triton(t: torch.Tensor) -> bool:
    return implementation(t.device) != "reference"


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all inputs must be on one device. Got {devices}.")


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16. Got {t.dtype}.")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) as (rows, C) with unit column stride: a view (any row stride) when the leading dims
    collapse, as for a head view, a `chunk(2, -1)` half or a slice of a fused projection; a copy
    otherwise. A 0-dim tensor is one row of one element. The row count is given, not inferred, so
    zero-size dims work (reshape cannot infer -1 when C is 0)."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1] if t.dim() else 1)
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        rows = rows.contiguous()
    return rows


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at
    a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def empty_token_major(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised (B, H, S, D) tensor shaped like x (of x's dtype unless given), stored as
    (B, S, H, D): the layout attention and RoPE write, so the heads' projection reads it as a
    view."""
    batch, heads, seq, head_dim = x.shape
    return x.new_empty((batch, seq, heads, head_dim), dtype=dtype).transpose(1, 2)


@triton.jit
def cast_nearest(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 v cast to DTYPE rounding to nearest-even, as PyTorch and the GPU do. The interpreter
    truncates fp32 -> bf16 conversions, so there the rounding is done on
    the bits first and the conversion is then exact. Truncated values would bias every gradient
    GEMM the same way, which the GPU's round-to-nearest store does not."""
    if INTERPRET:  # noqa: SIM102 (two constexpr branches, as every kernel here writes them)
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)
