"""Gated activations of the MLP: SwiGLU `silu(gate) * up` and GeGLU `gelu_tanh(gate) * up`.

Both activations have the form `act(g) = g * sigmoid(z(g))`:

    silu:       z = g                                   dz/dg = 1
    gelu_tanh:  z = 2k (g + c g^3),  k = sqrt(2/pi),    dz/dg = 2k (1 + 3c g^2),  c = 0.044715

(`0.5 (1 + tanh(u)) = sigmoid(2u)`, so the tanh-approximated GELU needs no tanh; that also avoids
the cancellation of `2 sigmoid(2u) - 1` near 0). With `s = sigmoid(z)`:

    out   = g s up
    dup   = dy g s
    dgate = dy up (s + g s (1 - s) dz/dg)

One forward and one backward kernel serve both activations through the constexpr `ACTIVATION`.
The backward recomputes `s` from `gate`: only `gate` and `up` are saved for backward.

Numerics: every input is upcast to fp32 right after loading, all arithmetic is fp32, and each output
is rounded once to the inputs' dtype (eager PyTorch rounds `act(gate)` before the product, so the
fused forward is at least as accurate). Outputs are contiguous.

Layout: `gate` and `up` (and `grad_out`) may be strided views as long as their last dim is
contiguous, e.g. Phi-3's `gate, up = gate_up.chunk(2, -1)` (row stride 2 I): the kernels take a row
stride per tensor instead of copying. Leading dims are flattened where they collapse into one row
dim; otherwise that tensor is copied to contiguous first. `swiglu_gate_up(gate_up)` takes Phi-3's
unsplit projection and returns d(gate_up) as one tensor whose two halves the backward kernel writes
(through `swiglu` on the views, autograd would concatenate dgate and dup in an extra pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from chronicals import reference
from chronicals.ops._launch import as_rows, check_float, check_same_device, use_triton

# Elements per program: 2048 over 4 warps is 16 elements (two 16-byte bf16 loads) per thread per
# tensor. Swept on an H200 (bf16, 16384 x {4864, 8192, 14336}, blocks 1024-8192, 4-16 warps): 1024
# or 2048 with 4 warps reach 4.15-4.35 TB/s in both directions, at the device copy's 4.25 TB/s;
# 8192 with 4 warps falls to 2-3 TB/s (register pressure), 4096 x 8 warps is 3-4% slower on GeGLU.
_BLOCK_SIZE = 2048
_NUM_WARPS = 4
# A row-strided launch tiles each row separately; a block size that pads a row by more than this
# fraction leaves too many lanes idle (e.g. I = 4864 would pad to 8192 with 4096-wide blocks).
_MAX_ROW_PADDING = 1 / 16


@triton.jit
def _activation_arg(gate, ACTIVATION: tl.constexpr):
    """`z` and `dz/dgate` such that `act(gate) = gate * sigmoid(z)`."""
    if ACTIVATION == "silu":
        z = gate
        dz = tl.full(gate.shape, 1.0, tl.float32)
    else:
        # gelu_tanh: 0.5 (1 + tanh(u)) = sigmoid(2u), u = k (g + c g^3); 1.5957691216057308 = 2k.
        gate_sq = gate * gate
        z = 1.5957691216057308 * gate * (1.0 + 0.044715 * gate_sq)
        dz = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * gate_sq)
    return z, dz


@triton.jit
def _sigmoid_and_complement(z):
    """`sigmoid(z)` and `1 - sigmoid(z)`, both to fp32 relative accuracy, without overflow.

    `1 - s` computed as such loses the low bits when s is near 1: at z = 6.7 it is 1.2e-3 with an
    absolute error of 6e-8, which made GeGLU's dgate 5 fp32 ulps off. With e = exp(-|z|) <= 1,
    the larger of the pair is 1 / (1 + e) and the smaller e / (1 + e)."""
    e = tl.exp(-tl.abs(z))
    large = 1.0 / (1.0 + e)
    small = e * large
    positive = z >= 0
    return tl.where(positive, large, small), tl.where(positive, small, large)


@triton.jit
def _program_block(n_cols, blocks_per_row, BLOCK_SIZE: tl.constexpr):
    """(row, columns, mask) of this program. The 1D grid runs over (row, column block); a
    contiguous launch is one row of all elements. int64 offsets: a Phi-3 gate_up of 65536 tokens x
    2 x 17920 already spans 2.3e9 > 2**31 elements."""
    pid = tl.program_id(0).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return pid // blocks_per_row, cols, cols < n_cols


@triton.jit
def _load_fp32(ptr, row, stride_row, cols, mask):
    return tl.load(ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gated_act_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_gate_row,
    stride_up_row,
    stride_out_row,
    n_cols,
    blocks_per_row,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row, cols, mask = _program_block(n_cols, blocks_per_row, BLOCK_SIZE)
    gate = _load_fp32(gate_ptr, row, stride_gate_row, cols, mask)
    up = _load_fp32(up_ptr, row, stride_up_row, cols, mask)
    z, _ = _activation_arg(gate, ACTIVATION)
    # The forward needs no `1 - s`: 1 / (1 + e^-z) is accurate to fp32 for every z (e^-z = inf
    # gives 0, as eager's silu does). The branch-free form keeps GeGLU at copy speed on an H200
    # (bf16, 16384 x 4864-14336: 115-326 us, as torch.compile), where `_sigmoid_and_complement`'s
    # extra work made it 3% slower.
    sig = 1.0 / (1.0 + tl.exp(-z))
    out = gate * sig * up
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    grad_out_ptr,
    gate_ptr,
    up_ptr,
    grad_gate_ptr,
    grad_up_ptr,
    stride_grad_out_row,
    stride_gate_row,
    stride_up_row,
    stride_grad_gate_row,
    stride_grad_up_row,
    n_cols,
    blocks_per_row,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row, cols, mask = _program_block(n_cols, blocks_per_row, BLOCK_SIZE)
    dy = _load_fp32(grad_out_ptr, row, stride_grad_out_row, cols, mask)
    gate = _load_fp32(gate_ptr, row, stride_gate_row, cols, mask)
    up = _load_fp32(up_ptr, row, stride_up_row, cols, mask)
    z, dz = _activation_arg(gate, ACTIVATION)
    sig, sig_complement = _sigmoid_and_complement(z)
    act = gate * sig
    d_act = sig + act * sig_complement * dz
    grad_gate = dy * up * d_act
    grad_up = dy * act
    grad_gate_ptr += row * stride_grad_gate_row + cols
    grad_up_ptr += row * stride_grad_up_row + cols
    tl.store(grad_gate_ptr, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def _check_inputs(op: str, gate: Tensor, up: Tensor, grad_out: Tensor | None = None) -> None:
    tensors = {"gate": gate, "up": up} if grad_out is None else {
        "grad_out": grad_out, "gate": gate, "up": up}
    check_float(op, **tensors)
    for name, t in tensors.items():
        if t.dtype != gate.dtype:
            raise TypeError(
                f"{op}: {name} must have gate's dtype {gate.dtype}. Got {t.dtype}.")
        if t.shape != gate.shape:
            raise ValueError(
                f"{op}: {name} must have gate's shape {tuple(gate.shape)}. Got {tuple(t.shape)}.")
    check_same_device(op, **tensors)


def _rows_view(out: Tensor) -> Tensor:
    """An output as (rows, cols): always a view (`view` raises where `reshape` would copy)."""
    return out.view(-1, out.shape[-1] if out.dim() else 1)


def _launch_layout(*tensors: Tensor) -> tuple[list[int], int, int, int, int]:
    """Row strides, n_rows, n_cols, blocks_per_row and block size for 2D `tensors` of one shape.

    When every tensor is contiguous the launch sees one row of all elements, so no block is
    padded but the last. Plain int arithmetic: on triton 3.9 `triton.cdiv` and
    `triton.next_power_of_2` are ConstexprFunctions costing 8 us per call from Python, and this
    launch is CPU-bound below ~0.2 ms of GPU work."""
    n_rows, n_cols = tensors[0].shape
    if n_rows == 1 or all(t.stride(0) == n_cols for t in tensors):
        n_rows, n_cols = 1, n_rows * n_cols
    block = min(_BLOCK_SIZE, 1 << (n_cols - 1).bit_length())
    while block > 1024 and -(-n_cols // block) * block > n_cols * (1 + _MAX_ROW_PADDING):
        block //= 2
    strides = [t.stride(0) if n_rows > 1 else 0 for t in tensors]
    return strides, n_rows, n_cols, -(-n_cols // block), block


def _gated_act_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    gate2, up2, out2 = as_rows(gate), as_rows(up), _rows_view(out)
    strides, n_rows, n_cols, blocks_per_row, block = _launch_layout(gate2, up2, out2)
    _gated_act_fwd_kernel[(n_rows * blocks_per_row,)](
        gate2, up2, out2, *strides, n_cols, blocks_per_row,
        ACTIVATION=activation, BLOCK_SIZE=block, num_warps=_num_warps(block),
    )
    return out


def _gated_act_bwd(
    grad_out: Tensor, gate: Tensor, up: Tensor, grad_gate: Tensor, grad_up: Tensor,
    activation: str,
) -> None:
    """Writes into grad_gate and grad_up, which may be row-strided views (halves of d(gate_up))."""
    if grad_gate.numel() == 0:
        return
    tensors = [as_rows(t) for t in (grad_out, gate, up)]
    tensors += [_rows_view(grad_gate), _rows_view(grad_up)]
    strides, n_rows, n_cols, blocks_per_row, block = _launch_layout(*tensors)
    _gated_act_bwd_kernel[(n_rows * blocks_per_row,)](
        *tensors, *strides, n_cols, blocks_per_row,
        ACTIVATION=activation, BLOCK_SIZE=block, num_warps=_num_warps(block),
    )


def _num_warps(block: int) -> int:
    # At least 8 elements (16 bytes of bf16) per thread, up to _NUM_WARPS warps.
    return max(1, min(_NUM_WARPS, block // 256))


def _reference_bwd(
    grad_out: Tensor, gate: Tensor, up: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    """What eager autograd computes for `reference.swiglu` / `reference.geglu`, in their dtype."""
    grad_act = grad_out * up
    if activation == "silu":
        grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
        act = F.silu(gate)
    else:
        grad_gate = torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh")
        act = F.gelu(gate, approximate="tanh")
    return grad_gate.contiguous(), (grad_out * act).contiguous()


def _forward(op: str, gate: Tensor, up: Tensor, activation: str) -> Tensor:
    _check_inputs(op, gate, up)
    if use_triton(gate):
        return _gated_act_fwd(gate, up, activation)
    ref = reference.swiglu if activation == "silu" else reference.geglu
    return ref(gate, up).contiguous()


def _backward(
    op: str, grad_out: Tensor, gate: Tensor, up: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    _check_inputs(op, gate, up, grad_out)
    if use_triton(gate):
        grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grad_up = torch.empty_like(grad_gate)
        _gated_act_bwd(grad_out, gate, up, grad_gate, grad_up, activation)
        return grad_gate, grad_up
    return _reference_bwd(grad_out, gate, up, activation)


@torch.library.custom_op("chronicals::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _forward("swiglu", gate, up, "silu")


@torch.library.custom_op("chronicals::geglu", mutates_args=())
def _geglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _forward("geglu", gate, up, "gelu_tanh")


@torch.library.custom_op("chronicals::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _backward("swiglu_backward", grad_out, gate, up, "silu")


@torch.library.custom_op("chronicals::geglu_backward", mutates_args=())
def _geglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _backward("geglu_backward", grad_out, gate, up, "gelu_tanh")


def _fake_forward(op: str):
    def fake(gate: Tensor, up: Tensor) -> Tensor:
        _check_inputs(op, gate, up)
        return gate.new_empty(gate.shape)  # contiguous, like the kernel's output

    return fake


def _fake_backward(op: str):
    def fake(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        _check_inputs(op, gate, up, grad_out)
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)

    return fake


_swiglu_op.register_fake(_fake_forward("swiglu"))
_geglu_op.register_fake(_fake_forward("geglu"))
_swiglu_backward_op.register_fake(_fake_backward("swiglu_backward"))
_geglu_backward_op.register_fake(_fake_backward("geglu_backward"))


def _setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    # Only the inputs: the backward recomputes the activation from gate.
    ctx.save_for_backward(*inputs)


def _swiglu_autograd(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = ctx.saved_tensors
    return torch.ops.chronicals.swiglu_backward(grad_out, gate, up)


def _geglu_autograd(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = ctx.saved_tensors
    return torch.ops.chronicals.geglu_backward(grad_out, gate, up)


_swiglu_op.register_autograd(_swiglu_autograd, setup_context=_setup_context)
_geglu_op.register_autograd(_geglu_autograd, setup_context=_setup_context)


# Phi-3's MLP splits one projection, `gate, up = gate_up.chunk(2, -1)`. Through `swiglu` on those
# views, autograd's chunk backward concatenates dgate and dup: 2 more reads and 2 more writes of
# (tokens, I) on top of the backward's 5, which Inductor avoids by fusing the concatenation. The
# `swiglu_gate_up` op takes gate_up itself and its backward writes both halves of d(gate_up).


def _halves(op: str, gate_up: Tensor) -> tuple[Tensor, Tensor]:
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"{op}: gate_up must have an even last dim (gate and up side by side). "
            f"Got shape {tuple(gate_up.shape)}.")
    gate, up = gate_up.chunk(2, -1)
    return gate, up


@torch.library.custom_op("chronicals::swiglu_gate_up", mutates_args=())
def _swiglu_gate_up_op(gate_up: Tensor) -> Tensor:
    return _forward("swiglu_gate_up", *_halves("swiglu_gate_up", gate_up), "silu")


@torch.library.custom_op("chronicals::swiglu_gate_up_backward", mutates_args=())
def _swiglu_gate_up_backward_op(grad_out: Tensor, gate_up: Tensor) -> Tensor:
    op = "swiglu_gate_up_backward"
    gate, up = _halves(op, gate_up)
    _check_inputs(op, gate, up, grad_out)
    if not use_triton(gate_up):
        return torch.cat(_reference_bwd(grad_out, gate, up, "silu"), dim=-1)
    grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    _gated_act_bwd(grad_out, gate, up, *grad_gate_up.chunk(2, -1), "silu")
    return grad_gate_up


@_swiglu_gate_up_op.register_fake
def _(gate_up: Tensor) -> Tensor:
    gate, up = _halves("swiglu_gate_up", gate_up)
    _check_inputs("swiglu_gate_up", gate, up)
    return gate_up.new_empty(gate.shape)


@_swiglu_gate_up_backward_op.register_fake
def _(grad_out: Tensor, gate_up: Tensor) -> Tensor:
    gate, up = _halves("swiglu_gate_up_backward", gate_up)
    _check_inputs("swiglu_gate_up_backward", gate, up, grad_out)
    return gate_up.new_empty(gate_up.shape)


def _swiglu_gate_up_autograd(ctx, grad_out: Tensor) -> Tensor:
    (gate_up,) = ctx.saved_tensors
    return torch.ops.chronicals.swiglu_gate_up_backward(grad_out, gate_up)


_swiglu_gate_up_op.register_autograd(_swiglu_gate_up_autograd, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) * up`, fused. gate, up: (..., I), same shape, dtype and device, last dim
    contiguous (other strides free, e.g. halves of a `chunk(2, -1)`). Returns a contiguous
    (..., I) tensor in the inputs' dtype, computed in fp32 and rounded once."""
    return torch.ops.chronicals.swiglu(gate, up)


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """`gelu(gate, approximate="tanh") * up` (Gemma's MLP), fused. Shapes and numerics as
    `swiglu`."""
    return torch.ops.chronicals.geglu(gate, up)


def swiglu_gate_up(gate_up: Tensor) -> Tensor:
    """`silu(gate) * up` with `gate, up = gate_up.chunk(2, -1)` (Phi-3's MLP). gate_up: (..., 2 I),
    last dim contiguous. Returns a contiguous (..., I) tensor, numerics as `swiglu`; the gradient
    of gate_up comes back as one contiguous (..., 2 I) tensor, written in place by the kernel."""
    return torch.ops.chronicals.swiglu_gate_up(gate_up)
