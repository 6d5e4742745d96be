"""Fused LM head + cross-entropy: CE(hidden @ weight.T, labels) without the [tokens, vocab] logits.

Math, per token n with label y and fp32 logits l = a h_n W^T (a a logit scale, 1 without one:
Cohere multiplies by it, Granite divides; then l <- c tanh(l / c) with a softcap c):

    lse_n  = log sum_v exp(l_v)
    loss_n = (1 - eps) (lse_n - l_y) + eps (lse_n - mean_v l_v) + z lse_n^2   (0 when y is ignored)
    dloss_n / dl_v = p_v (1 + 2 z lse_n) - (1 - eps) [v == y] - eps / V,     p_v = exp(l_v - lse_n)

times 1 - (l_v / c)^2 under a softcap, and times a for the gradient of h_n W^T. `reduction` sums
the token losses and divides the sum by the number of valid tokens ("mean"), by
`num_items_in_batch` when given, or not at all ("sum"); "none" returns them per token. Counts stay
on the device: nothing syncs with the host.

Forward (Triton): programs tile (token blocks) x (vocab splits). Each loops over its vocab range in
BLOCK_V tiles; a tile is a `tl.dot` over H (bf16/fp16 operands on tensor cores, fp32 accumulator),
then an online log-sum-exp per token, the label's logit and, for label smoothing, the sum of the
logits. The (tile, k step) loops are one flattened loop, so the software pipeline keeps loading
while a finished tile is reduced. Operands come through TMA descriptors where the hardware and
the tensors' alignment allow (`_tma_ok`), through pointers otherwise. A second small kernel merges
the [4, splits, N] fp32 partials into lse [N] and the token losses. Only lse is saved for the
backward.

Backward: the vocabulary is walked in chunks of C columns. A persistent Triton kernel (one program
per SM, same main loop) recomputes the chunk's logits tile by tile from hidden and weight and
writes dlogits [N, C] in the input dtype (eager PyTorch also feeds bf16 logit gradients to its
GEMMs); cuBLAS then writes dW[chunk] = dlogits^T @ h in one GEMM (the reduction over all tokens is
complete, so every dW element is rounded once) and adds dlogits @ W[chunk] into an fp32 [N, H]
accumulator for dh, rounded once at the end. dW is skipped entirely when weight needs no gradient
(frozen LM head under LoRA), dh when hidden needs none.

A frozen weight (LoRA's LM head) with a scalar loss takes another path, which computes hidden's
gradient in the forward: `linear_cross_entropy_frozen.py`.

Numerics contract: lse, token losses and the reduction are fp32; the loss comes back fp32,
gradients in the input dtype. The fused kernels keep the logits in fp32 (eager PyTorch rounds
them to bf16 first), so the loss is at least as close to an fp64 truth as eager's; the frozen-
weight path rounds them as eager does. Nothing is skipped or approximated: every tile of the
backward is computed.

Memory beyond inputs and gradients: lse [N] and the partials (16 * splits bytes a token), the
dlogits chunk (`_DLOGITS_CHUNK_ELEMENTS` elements at most, 64 MiB in bf16, independent of V) and
the fp32 dh accumulator [N, H] (none for fp32 inputs, which accumulate in dh itself).

Cost: four GEMM-sized passes (forward, recompute, dW, dh) where eager runs three plus ~6 passes
over [N, V] fp32 logits (the backward's fp32 dh accumulator adds 117 MB read and written per
2048-column chunk at H=896). The recompute is why an op that never holds the logits trails a
compiled graph that does: recomputing a logit costs 2H FLOPs, storing and re-reading it ~8 bytes,
so the gap widens with H. Timings against torch.compile, eager and other ops: README.md, "LM head
+ CE".

Labels outside [0, V) that are not `ignore_index`: never read out of bounds. On CPU tensors the op
raises IndexError("... Target 7 is out of bounds.") as PyTorch's CPU cross-entropy does (a host
check; CPU only). On CUDA, where PyTorch fires a device-side assert, the kernels use
`tl.device_assert` (active when Triton's debug mode is on) and otherwise make that token's loss
and gradient NaN, so the loss, grad norm and weights show it instead of training on a wrong target.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from chronicals import reference
from chronicals.ops._launch import (
    cast_nearest,
    check_float,
    check_same_device,
    implementation,
    interpreter_on,
    next_power_of_2,
    sm_count,
    use_triton,
)
from chronicals.ops._lce_common import (
    LossOptions,
    _accumulate_d_hidden,
    _as_kernel_operands,
    _load_labels,
    _logits,
    _or_one,
    _reduce,
    _token_loss,
    _token_weight,
)
from chronicals.ops.linear_cross_entropy_frozen import (
    _lce_fwd_d_hidden,
    _scale_op,
    frozen_head_path_supports,
    takes_frozen_head_path,
)

# Upper bound on the dlogits chunk of the backward, in elements (64 MiB in bf16). With 16k tokens
# it is 2048 vocab columns: the dh update is then a K=2048 GEMM that stays compute-bound although
# it reads and writes the fp32 accumulator.
_DLOGITS_CHUNK_ELEMENTS = 1 << 25
# Forward programs aimed at per SM: a few waves keep the last wave's tail short.
_FWD_WAVES = 4


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _operands(
    h_ptr, w_ptr, h_desc, w_desc, row0, col0, k0, stride_h_n, stride_w_v, N, V,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The k-th slices of hidden rows [row0, row0 + BLOCK_N) and weight rows [col0, col0 +
    BLOCK_V), as dot operands [BLOCK_N, BLOCK_K] and [BLOCK_K, BLOCK_V]. Rows past N or V and
    columns past H read as 0: TMA fills them; the pointer path clamps rows and masks columns."""
    if TMA:
        h = h_desc.load([row0, k0])
        w = w_desc.load([col0, k0]).T
    else:
        rows = tl.minimum(row0 + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
        cols = tl.minimum(col0 + tl.arange(0, BLOCK_V), V - 1).to(tl.int64)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_h_n + offs_k[None, :]
        w_ptrs = w_ptr + cols[None, :] * stride_w_v + offs_k[:, None]
        if H % BLOCK_K == 0:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=(offs_k < H)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k < H)[:, None], other=0.0)
    if INTERPRET:
        # bf16 tl.dot is wrong in the interpreter; the upcast is exact.
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    return h, w


@triton.jit
def _dlogits(logits, vocab, label, lse, g, softcap, z_loss, label_smoothing, V: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_Z: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """d loss / d logits times g (the token's weight in the returned loss), for softcapped
    `logits` at vocab ids `vocab` (each operand broadcasts against them): softmax (times
    1 + 2 z lse with z-loss) minus the smoothed one-hot, through the softcap's derivative."""
    p = tl.exp(logits - lse)
    if HAS_Z:
        p = p * (1.0 + 2.0 * z_loss * lse)
    if HAS_SMOOTHING:
        dl = p - tl.where(vocab == label, 1.0 - label_smoothing, 0.0)
        dl = dl - label_smoothing / V
    else:
        dl = p - tl.where(vocab == label, 1.0, 0.0)
    if HAS_SOFTCAP:
        capped = logits / softcap
        dl = dl * (1.0 - capped * capped)
    return dl * g


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, h_desc, w_desc, labels_ptr, part_ptr,
    N, seq_len, stride_h_n, stride_w_v, stride_labels_b, stride_labels_s, ignore_index,
    logit_scale, softcap,
    V: tl.constexpr, H: tl.constexpr, SPLITS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    SHIFT: tl.constexpr,
    TMA: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """Partials of one token block over one vocab split: running max, sum of exp(l - max), the
    label's logit (0 if the label is elsewhere) and the sum of logits, into part[4, SPLITS, N].

    The (vocab tile, k step) loops are one flattened loop, so the pipeline loads the next tile's
    operands while a finished tile is reduced (a nested k loop drains and refills it per tile)."""
    K_TILES: tl.constexpr = (H + BLOCK_K - 1) // BLOCK_K
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    label, _, _ = _load_labels(
        labels_ptr, tl.minimum(offs_n, N - 1), n_mask, seq_len, stride_labels_b,
        stride_labels_s, ignore_index, V, SHIFT,
    )
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for i in tl.range(0, TILES_PER_SPLIT * K_TILES, num_stages=STAGES):
        col0 = (split * TILES_PER_SPLIT + i // K_TILES) * BLOCK_V
        k = i % K_TILES
        h, w = _operands(
            h_ptr, w_ptr, h_desc, w_desc, row0, col0, k * BLOCK_K, stride_h_n, stride_w_v, N, V,
            H, BLOCK_N, BLOCK_V, BLOCK_K, TMA, INTERPRET,
        )
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if k == K_TILES - 1:
            offs_v = col0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            logits = tl.where(v_mask[None, :],
                              _logits(acc, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP),
                              float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            # A split whose tiles all lie past V keeps m = -inf; subtract 0 there (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
            m = m_new
            target += tl.sum(tl.where(offs_v[None, :] == label[:, None], logits, 0.0), axis=1)
            if HAS_SMOOTHING:
                total += tl.sum(tl.where(v_mask[None, :], logits, 0.0), axis=1)
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    out = part_ptr + split * N + offs_n
    tl.store(out, m, mask=n_mask)
    tl.store(out + SPLITS * N, s, mask=n_mask)
    tl.store(out + 2 * SPLITS * N, target, mask=n_mask)
    if HAS_SMOOTHING:
        tl.store(out + 3 * SPLITS * N, total, mask=n_mask)


@triton.jit
def _lce_merge_kernel(
    part_ptr, labels_ptr, lse_ptr, loss_ptr,
    N, seq_len, stride_labels_b, stride_labels_s, ignore_index, z_loss, label_smoothing,
    V: tl.constexpr, SPLITS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    """lse [N] and token losses [N] (0 where ignored, NaN where the label is out of range)."""
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_mask = offs_n < N
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for i in range(SPLITS):
        m = tl.maximum(m, tl.load(part_ptr + i * N + offs_n, mask=n_mask, other=0.0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    target = tl.zeros((BLOCK,), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(SPLITS):
        off = part_ptr + i * N + offs_n
        m_i = tl.load(off, mask=n_mask, other=0.0)
        s += tl.load(off + SPLITS * N, mask=n_mask, other=0.0) * tl.exp(m_i - m_safe)
        target += tl.load(off + 2 * SPLITS * N, mask=n_mask, other=0.0)
        if HAS_SMOOTHING:
            total += tl.load(off + 3 * SPLITS * N, mask=n_mask, other=0.0)
    lse = m_safe + tl.log(tl.where(n_mask, s, 1.0))  # rows past N: no log(0) warnings
    rows = tl.minimum(offs_n, N - 1)
    _, valid, bad = _load_labels(
        labels_ptr, rows, n_mask, seq_len, stride_labels_b, stride_labels_s, ignore_index, V, SHIFT
    )
    tl.device_assert(~bad, "linear_cross_entropy: label out of bounds [0, V)")
    loss = _token_loss(lse, target, total, valid, bad, z_loss, label_smoothing, V, HAS_Z,
                       HAS_SMOOTHING)
    tl.store(lse_ptr + offs_n, lse, mask=n_mask)
    tl.store(loss_ptr + offs_n, loss, mask=n_mask)


@triton.jit
def _lce_bwd_dlogits_kernel(
    h_ptr, w_ptr, h_desc, w_desc, dl_desc, labels_ptr, lse_ptr, g_ptr, dl_ptr,
    N, seq_len, v_start, chunk_cols,
    stride_h_n, stride_w_v, stride_labels_b, stride_labels_s, stride_g, stride_dl_n,
    ignore_index, logit_scale, softcap, z_loss, label_smoothing,
    V: tl.constexpr, H: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_Z: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    SHIFT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr, INTERPRETER_TILES: tl.constexpr,
):
    """dlogits of the vocab chunk starting at v_start, [N, chunk_cols] (the gradient of h W^T, so
    through the logit scale), each token's row scaled by its weight g (d total / d loss_n:
    upstream grad x 1/count, 0 where ignored).

    Persistent: program p takes tiles p, p + P, ... (P programs), vocab tiles varying fastest, so
    programs running together share token blocks and the chunk's weight rows stay in L2. The
    (tile, k step) loops are flattened as in the forward."""
    K_TILES: tl.constexpr = (H + BLOCK_K - 1) // BLOCK_K
    tiles_v = tl.cdiv(chunk_cols, BLOCK_V)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_v
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if INTERPRET:
        # triton 3.6's interpreter loops only to a constexpr bound; it runs one program, which
        # takes every tile (INTERPRETER_TILES of them).
        steps: tl.constexpr = INTERPRETER_TILES * K_TILES
    else:
        steps = tl.cdiv(tiles - pid, programs) * K_TILES
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=STAGES):
        tile = pid + (i // K_TILES) * programs
        row0 = (tile // tiles_v) * BLOCK_N
        c0 = (tile % tiles_v) * BLOCK_V
        k = i % K_TILES
        h, w = _operands(
            h_ptr, w_ptr, h_desc, w_desc, row0, v_start + c0, k * BLOCK_K, stride_h_n,
            stride_w_v, N, V, H, BLOCK_N, BLOCK_V, BLOCK_K, TMA, INTERPRET,
        )
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if k == K_TILES - 1:
            offs_n = row0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            rows = tl.minimum(offs_n, N - 1)
            offs_c = c0 + tl.arange(0, BLOCK_V)
            offs_v = v_start + offs_c
            logits = _logits(acc, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            label, valid, bad = _load_labels(
                labels_ptr, rows, n_mask, seq_len, stride_labels_b, stride_labels_s,
                ignore_index, V, SHIFT,
            )
            lse = tl.load(lse_ptr + rows)
            g = tl.load(g_ptr + rows * stride_g).to(tl.float32)
            g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
            if HAS_SCALE:
                g = g * logit_scale
            dl = _dlogits(
                logits, offs_v[None, :], label[:, None], lse[:, None], g[:, None], softcap,
                z_loss, label_smoothing, V, HAS_SOFTCAP, HAS_Z, HAS_SMOOTHING,
            )
            dl = cast_nearest(dl, dl_ptr.dtype.element_ty, INTERPRET)
            if TMA:
                dl_desc.store([row0, c0], dl)  # rows past N, columns past the chunk: clipped
            else:
                out = dl_ptr + offs_n.to(tl.int64)[:, None] * stride_dl_n + offs_c[None, :]
                tl.store(out, dl, mask=n_mask[:, None] & (offs_c < chunk_cols)[None, :])
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


class _Tiles(NamedTuple):
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


def _tiles(dtype: torch.dtype) -> _Tiles:
    """Tile sizes of the forward and the dlogits kernels. 16-bit operands: 128 x 256 x 64, 8 warps,
    3 stages. On an H200 (`benchmarks/tuning/sweep_lce_tiles.py`, bf16) the forward took 1.08x
    (16384 x 896 x 151936) and 1.10x (8192 x 4096 x 128256) the time of a cuBLAS GEMM of the same
    size; 256 x 128 was up to 3% slower, 128 x 128 5-10% slower, and 4 stages do not fit in shared
    memory. fp32 operands take ieee dots, whose tiles must be smaller to fit shared memory. Tiny
    tiles in the interpreter, where every program costs ~0.4 ms."""
    if interpreter_on():
        return _Tiles(32, 64, 16, 1, 1)
    if dtype == torch.float32:
        return _Tiles(64, 64, 32, 4, 2)
    return _Tiles(128, 256, 64, 8, 3)


def _tma_ok(*tensors: Tensor) -> bool:
    """Whether the kernels may load these 2-D tensors through TMA descriptors: a Hopper or newer
    GPU (or the interpreter), unit stride along the last dim, and 16-byte aligned base and row
    stride, which TMA requires. Otherwise the kernels take their pointer path (same tiles and
    arithmetic; its forward was about 18% slower on an H200)."""
    for t in tensors:
        if t.is_cuda and torch.cuda.get_device_capability(t.device) < (9, 0):
            return False
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _descriptor(t: Tensor, block: list[int], tma: bool) -> TensorDescriptor | None:
    return TensorDescriptor.from_tensor(t, block) if tma else None


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products, as eager PyTorch's default matmul precision does.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: Tensor, weight: Tensor, labels: Tensor, num_items_tensor: Tensor | None,
    num_items_int: int | None, ignore_index: int, reduction: str, softcap: float | None,
    logit_scale: float | None, z_loss: float, label_smoothing: float,
    d_hidden_in_forward: bool = False,
) -> None:
    op = "linear_cross_entropy"
    check_float(op, hidden=hidden, weight=weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{op}: weight must have hidden's dtype {hidden.dtype}. Got {weight.dtype}."
        )
    if hidden.dim() < 2:
        raise ValueError(
            f"{op}: hidden must be (..., H) with at least 2 dims. Got {tuple(hidden.shape)}."
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape (V, {hidden.shape[-1]}) to match hidden's last dim. "
            f"Got {tuple(weight.shape)}."
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"{op}: weight must have at least one vocab row and hidden column. Got "
            f"{tuple(weight.shape)}."
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must be int64 or int32. Got {labels.dtype}.")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        # Compared in the labels' dtype it would wrap and ignore some other label.
        raise ValueError(
            f"{op}: ignore_index must fit the labels' dtype {labels.dtype} "
            f"([{info.min}, {info.max}]). Got {ignore_index}."
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: labels must have shape {tuple(hidden.shape[:-1])} (hidden's shape without its "
            f"last dim). Got {tuple(labels.shape)}."
        )
    check_same_device(op, hidden=hidden, weight=weight, labels=labels)
    if reduction not in reference.REDUCTIONS:
        raise ValueError(
            f"{op}: reduction must be one of {reference.REDUCTIONS}. Got {reduction!r}."
        )
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"{op}: softcap must be None or finite and > 0. Got {softcap}.")
    if logit_scale is not None and not math.isfinite(logit_scale):
        raise ValueError(f"{op}: logit_scale must be None or finite. Got {logit_scale}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1]. Got {label_smoothing}.")
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"{op}: z_loss must be finite and >= 0. Got {z_loss}.")
    if num_items_int is not None and num_items_int < 1:
        raise ValueError(f"{op}: num_items_in_batch must be >= 1. Got {num_items_int}.")
    if d_hidden_in_forward and not frozen_head_path_supports(hidden, reduction, softcap,
                                                             label_smoothing):
        raise ValueError(
            f"{op}: d_hidden_in_forward needs a scalar loss (reduction 'mean' or 'sum'), bf16 or "
            f"fp32 inputs, the Triton path, and not softcap with label_smoothing. Got "
            f"reduction={reduction!r}, dtype {hidden.dtype}, implementation "
            f"{implementation(hidden.device)!r}, softcap={softcap}, "
            f"label_smoothing={label_smoothing}."
        )
    if num_items_tensor is not None and num_items_tensor.numel() != 1:
        raise ValueError(
            f"{op}: num_items_in_batch must be a number or a one-element tensor. Got shape "
            f"{tuple(num_items_tensor.shape)}."
        )


def _check_label_range(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """PyTorch's CPU cross-entropy error for a label outside [0, V). A host check: CPU only."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        target = int(labels[bad][0])
        raise IndexError(f"linear_cross_entropy: Target {target} is out of bounds.")


def _num_items(num_items_tensor: Tensor | None, num_items_int: int | None):
    return num_items_tensor.reshape(()) if num_items_tensor is not None else num_items_int


def _lce_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, num_items, options: LossOptions, *,
    tiles: _Tiles | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, lse [N] fp32) with the Triton kernels; `tiles` instead of `_tiles`'s (for
    benchmarks/tuning/sweep_lce_tiles.py)."""
    h2, weight, labels2d = _as_kernel_operands(hidden, weight, labels)
    (N, H), V = h2.shape, weight.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    token_loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return _reduce(token_loss, labels2d, labels.shape, options, num_items), lse
    tiles = tiles or _tiles(hidden.dtype)
    blocks_n = triton.cdiv(N, tiles.block_n)
    tiles_v = triton.cdiv(V, tiles.block_v)
    wanted = next_power_of_2(triton.cdiv(_FWD_WAVES * sm_count(hidden.device), blocks_n))
    tiles_per_split = triton.cdiv(tiles_v, min(wanted, tiles_v))
    splits = triton.cdiv(tiles_v, tiles_per_split)
    part = torch.empty((4, splits, N), dtype=torch.float32, device=hidden.device)
    has_smoothing = options.label_smoothing != 0.0
    tma = _tma_ok(h2, weight)
    _lce_fwd_kernel[(blocks_n, splits)](
        h2, weight, _descriptor(h2, [tiles.block_n, tiles.block_k], tma),
        _descriptor(weight, [tiles.block_v, tiles.block_k], tma), labels2d, part,
        N, labels2d.shape[1], h2.stride(0), weight.stride(0),
        labels2d.stride(0), labels2d.stride(1), options.ignore_index, _or_one(options.logit_scale),
        _or_one(options.softcap),
        V=V, H=H, SPLITS=splits, TILES_PER_SPLIT=tiles_per_split,
        HAS_SCALE=options.logit_scale is not None, HAS_SOFTCAP=options.softcap is not None,
        HAS_SMOOTHING=has_smoothing, SHIFT=options.shift, TMA=tma,
        INTERPRET=interpreter_on(), DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k,
        STAGES=tiles.num_stages, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    merge_block = 1024 if hidden.is_cuda else 64
    _lce_merge_kernel[(triton.cdiv(N, merge_block),)](
        part, labels2d, lse, token_loss,
        N, labels2d.shape[1], labels2d.stride(0), labels2d.stride(1), options.ignore_index,
        float(options.z_loss), float(options.label_smoothing),
        V=V, SPLITS=splits, HAS_Z=options.z_loss != 0.0, HAS_SMOOTHING=has_smoothing,
        SHIFT=options.shift, BLOCK=merge_block, num_warps=4,
    )
    loss = _reduce(token_loss, labels2d, labels.shape, options, num_items)
    return loss, lse


def _lce_bwd(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, num_items,
    options: LossOptions, need_d_hidden: bool, need_d_weight: bool, *,
    tiles: _Tiles | None = None,
) -> tuple[Tensor, Tensor]:
    """(d_hidden, d_weight) with the Triton dlogits kernel and cuBLAS; empty tensors for the
    gradients not asked for. `tiles`: as `_lce_fwd`'s."""
    h2, weight, labels2d = _as_kernel_operands(hidden, weight, labels)
    (N, H), V = h2.shape, weight.shape[0]
    dtype = hidden.dtype
    empty = hidden.new_empty(0)
    d_weight = torch.zeros_like(weight) if need_d_weight else empty
    d_hidden_acc = torch.zeros((N, H), dtype=torch.float32, device=hidden.device) if (
        need_d_hidden) else empty
    if N > 0 and (need_d_hidden or need_d_weight):
        tiles = tiles or _tiles(dtype)
        chunk = max(tiles.block_v, _DLOGITS_CHUNK_ELEMENTS // N // tiles.block_v * tiles.block_v)
        chunk = min(chunk, triton.cdiv(V, tiles.block_v) * tiles.block_v)
        g = _token_weight(grad_loss, labels2d, options, num_items)
        dl_buf = torch.empty((N, chunk), dtype=dtype, device=hidden.device)
        tma = _tma_ok(h2, weight, dl_buf)
        h_desc = _descriptor(h2, [tiles.block_n, tiles.block_k], tma)
        w_desc = _descriptor(weight, [tiles.block_v, tiles.block_k], tma)
        blocks_n = triton.cdiv(N, tiles.block_n)
        for v0 in range(0, V, chunk):
            cols = min(chunk, V - v0)
            chunk_tiles = blocks_n * triton.cdiv(cols, tiles.block_v)
            programs = 1 if interpreter_on() else min(chunk_tiles, sm_count(hidden.device))
            _lce_bwd_dlogits_kernel[(programs,)](
                h2, weight, h_desc, w_desc,
                _descriptor(dl_buf[:, :cols], [tiles.block_n, tiles.block_v], tma),
                labels2d, lse, g, dl_buf,
                N, labels2d.shape[1], v0, cols,
                h2.stride(0), weight.stride(0), labels2d.stride(0), labels2d.stride(1),
                0 if g.dim() == 0 else 1, dl_buf.stride(0),
                options.ignore_index, _or_one(options.logit_scale), _or_one(options.softcap),
                float(options.z_loss), float(options.label_smoothing),
                V=V, H=H, HAS_SCALE=options.logit_scale is not None,
                HAS_SOFTCAP=options.softcap is not None, HAS_Z=options.z_loss != 0.0,
                HAS_SMOOTHING=options.label_smoothing != 0.0, SHIFT=options.shift, TMA=tma,
                INTERPRET=interpreter_on(), DOT_PRECISION=_dot_precision(dtype),
                BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k,
                STAGES=tiles.num_stages, INTERPRETER_TILES=chunk_tiles if interpreter_on() else 0,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )
            dl = dl_buf[:, :cols]
            if need_d_weight:
                torch.mm(dl.t(), h2, out=d_weight[v0 : v0 + cols])
            if need_d_hidden:
                _accumulate_d_hidden(d_hidden_acc, dl, weight[v0 : v0 + cols])
    d_hidden = d_hidden_acc.to(dtype).view(hidden.shape) if need_d_hidden else empty
    return d_hidden, d_weight


# ----------------------------------------------------------------------------------------------
# Reference path (CPU without the interpreter)
# ----------------------------------------------------------------------------------------------


def _reference_lse(
    hidden: Tensor, weight: Tensor, softcap: float | None, logit_scale: float | None,
) -> Tensor:
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("chronicals::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, num_items_tensor: Tensor | None,
    num_items_int: int | None, ignore_index: int, reduction: str, shift: bool,
    softcap: float | None, logit_scale: float | None, z_loss: float, label_smoothing: float,
    d_hidden_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse [N], d_hidden): d_hidden is d loss / d hidden for an upstream gradient of 1
    when `d_hidden_in_forward` (frozen weight, scalar loss), else an empty tensor."""
    _check_inputs(hidden, weight, labels, num_items_tensor, num_items_int, ignore_index,
                  reduction, softcap, logit_scale, z_loss, label_smoothing, d_hidden_in_forward)
    if labels.device.type == "cpu":
        # With shift, each row's first label is never scored (as in HF's shifted labels).
        _check_label_range(labels[..., 1:] if shift else labels, ignore_index, weight.shape[0])
    num_items = _num_items(num_items_tensor, num_items_int)
    options = LossOptions(
        ignore_index=ignore_index, reduction=reduction, shift=shift, softcap=softcap,
        logit_scale=logit_scale, z_loss=z_loss, label_smoothing=label_smoothing,
    )
    if use_triton(hidden):
        if d_hidden_in_forward:
            return _lce_fwd_d_hidden(hidden, weight, labels, num_items, options)
        loss, lse = _lce_fwd(hidden, weight, labels, num_items, options)
        return loss, lse, hidden.new_empty(0)
    loss = reference.linear_cross_entropy(hidden, weight, labels,
                                          **options.reference_kwargs(num_items))
    lse = _reference_lse(hidden, weight, softcap, logit_scale)
    return loss.contiguous(), lse, hidden.new_empty(0)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, num_items_tensor, num_items_int, ignore_index, reduction, shift,
      softcap, logit_scale, z_loss, label_smoothing, d_hidden_in_forward):
    _check_inputs(hidden, weight, labels, num_items_tensor, num_items_int, ignore_index,
                  reduction, softcap, logit_scale, z_loss, label_smoothing, d_hidden_in_forward)
    loss_shape = labels.shape if reduction == "none" else ()
    loss = hidden.new_empty(loss_shape, dtype=torch.float32)
    d_hidden = hidden.new_empty(hidden.shape if d_hidden_in_forward else (0,))
    return loss, hidden.new_empty((labels.numel(),), dtype=torch.float32), d_hidden


@torch.library.custom_op("chronicals::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
    num_items_tensor: Tensor | None, num_items_int: int | None, ignore_index: int,
    reduction: str, shift: bool, softcap: float | None, logit_scale: float | None,
    z_loss: float, label_smoothing: float, need_d_hidden: bool, need_d_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(d_hidden, d_weight); a gradient not asked for comes back as an empty tensor (custom ops
    cannot return None)."""
    num_items = _num_items(num_items_tensor, num_items_int)
    options = LossOptions(
        ignore_index=ignore_index, reduction=reduction, shift=shift, softcap=softcap,
        logit_scale=logit_scale, z_loss=z_loss, label_smoothing=label_smoothing,
    )
    if use_triton(hidden):
        return _lce_bwd(grad_loss, hidden, weight, labels, lse, num_items, options,
                        need_d_hidden, need_d_weight)
    kwargs = options.reference_kwargs(num_items)

    def loss_of(*wrt: Tensor) -> Tensor:
        given = iter(wrt)
        h = next(given) if need_d_hidden else hidden
        w = next(given) if need_d_weight else weight
        return reference.linear_cross_entropy(h, w, labels, **kwargs)

    # torch.func, not autograd.grad: autograd does not record inside a custom op's kernel.
    primals = [t for t, need in ((hidden, need_d_hidden), (weight, need_d_weight)) if need]
    _, vjp = torch.func.vjp(loss_of, *primals)
    grads = iter(vjp(grad_loss))
    empty = hidden.new_empty(0)
    d_hidden = next(grads).contiguous() if need_d_hidden else empty
    d_weight = next(grads).contiguous() if need_d_weight else empty
    return d_hidden, d_weight


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, labels, lse, num_items_tensor, num_items_int, ignore_index,
      reduction, shift, softcap, logit_scale, z_loss, label_smoothing, need_d_hidden,
      need_d_weight):
    d_hidden = hidden.new_empty(hidden.shape) if need_d_hidden else hidden.new_empty(0)
    d_weight = weight.new_empty(weight.shape) if need_d_weight else hidden.new_empty(0)
    return d_hidden, d_weight


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, num_items_tensor, *scalars, d_hidden_in_forward = inputs
    ctx.d_hidden_in_forward = d_hidden_in_forward
    if d_hidden_in_forward:
        ctx.save_for_backward(output[2])
    else:
        ctx.save_for_backward(hidden, weight, labels, output[1], num_items_tensor)
    # num_items_int and the options, which the backward op takes in the forward op's order.
    ctx.scalars = tuple(scalars)
    ctx.mark_non_differentiable(output[1], output[2])
    # Otherwise autograd hands the backward zeros shaped like lse and d_hidden (a gradient-sized
    # allocation) for the outputs that get no gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_lse, _grad_d_hidden):
    need_d_hidden, need_d_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.d_hidden_in_forward:
        if need_d_weight:
            raise RuntimeError(
                "linear_cross_entropy: weight needs a gradient, but the op ran with "
                "d_hidden_in_forward=True, which computes hidden's alone (it is for a frozen "
                "weight)."
            )
        (d_hidden_unit,) = ctx.saved_tensors
        d_hidden = _scale_op(d_hidden_unit, grad_loss)
        d_weight = None
    else:
        hidden, weight, labels, lse, num_items_tensor = ctx.saved_tensors
        d_hidden, d_weight = _linear_cross_entropy_backward_op(
            grad_loss, hidden, weight, labels, lse, num_items_tensor, *ctx.scalars,
            need_d_hidden=need_d_hidden, need_d_weight=need_d_weight,
        )
    return (
        d_hidden if need_d_hidden else None,
        d_weight if need_d_weight else None,
        # labels, num_items_tensor, the scalars, d_hidden_in_forward
        *([None] * (3 + len(ctx.scalars))),
    )


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` (fp32 logits, never materialised) against `labels`.

    hidden: (..., H) float32/bfloat16/float16; weight: (V, H) of the same dtype (an LM head or a
    tied embedding); labels: int64/int32 shaped hidden.shape[:-1]. `shift=True` scores position t
    against label t + 1 along the last label dim (HF's causal-LM loss; the last position is
    ignored). `logit_scale` multiplies the logits before `softcap` (Cohere's `logit_scale`,
    Granite's 1 / `logits_scaling`); it, `softcap` (Gemma-2), `z_loss` and `label_smoothing` as in
    `chronicals.reference`.
    `num_items_in_batch` (int or one-element tensor) divides the summed loss (HF's gradient
    accumulation normalisation). Returns a 0-d fp32 loss, or fp32 per-token losses shaped like
    labels for `reduction="none"`. Semantics: `chronicals.reference.linear_cross_entropy`.
    """
    num_items_tensor, num_items_int = None, None
    if isinstance(num_items_in_batch, Tensor):
        num_items_tensor = num_items_in_batch
    elif num_items_in_batch is not None:
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
            raise TypeError(
                "linear_cross_entropy: num_items_in_batch must be an int, a tensor or None. "
                f"Got {type(num_items_in_batch).__name__}."
            )
        num_items_int = num_items_in_batch
    loss, _, _ = _linear_cross_entropy_op(
        hidden, weight, labels, num_items_tensor, num_items_int, ignore_index, reduction, shift,
        None if softcap is None else float(softcap),
        None if logit_scale is None else float(logit_scale), float(z_loss), float(label_smoothing),
        takes_frozen_head_path(hidden, weight, reduction, softcap, label_smoothing),
    )
    return loss


