"""Fused RMSNorm: `torch.ops.chronicals.rms_norm` and its backward `chronicals::rms_norm_backward`.

Math, over the last dimension of x: (..., H) with weight: (H,):

    r = 1 / sqrt(mean(x^2) + eps)                 statistics in fp32
    n = x * r                                     fp32
    Llama-style (gemma=False):  y = w * cast(n, x.dtype)        dtype promote(w.dtype, x.dtype)
    Gemma-style (gemma=True):   y = cast(n * (1 + w), x.dtype)  dtype x.dtype

This is `chronicals.reference.rms_norm` (Hugging Face's cast order). The Llama product is taken in
fp32 and rounded once to the output dtype, which is what PyTorch does for `w * n` in bf16/fp16
(a bf16 x bf16 product is exact in fp32), so the kernel rounds like HF.

Backward (the cast is the identity for gradients, as autograd treats it), with g = dy * w (Llama)
or g = dy * (1 + w) (Gemma), all in fp32:

    dx = r * (g - n * mean(g * n))                returned in x.dtype
    dW = sum over rows of dy * cast(n) (Llama) or dy * n (Gemma)    fp32, returned in w.dtype

dW is reduced without a [rows, H] scratch buffer: each backward program walks a contiguous chunk
of rows and keeps its partial dW in registers, writing one fp32 row of a [programs, H] buffer
(a few programs per SM); one more kernel sums that small buffer's columns and rounds once. With a
frozen weight the backward op is asked for dx only and neither computes nor allocates dW.

Rows longer than `_MAX_BLOCK_COLS` are processed in column blocks (two passes over the row).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from chronicals import reference
from chronicals.ops._launch import (
    as_rows,
    cast_nearest,
    check_float,
    check_same_device,
    interpreter_on,
    next_power_of_2,
    sm_count,
    use_triton,
)

# Largest row block held in registers. The backward keeps x, dy, w and the dW accumulator live
# (4 fp32 values per column) plus the next rows' x and dy: 8192 columns over 16 warps is about
# 80 registers per thread for them; wider rows loop over blocks of this size.
_MAX_BLOCK_COLS = 8192
# Short rows are packed several to a program tile: hidden 896 gets 2 rows, Qwen3's q_norm (head
# dim 128) 16. Warps are sized so each thread holds 16 elements (two 16-byte bf16 vectors).
# Measured on an H200 (bf16, 16384 rows), forward: 0.70 / 0.83 / 0.89 / 0.94 of copy bandwidth at
# hidden 896 / 2048 / 4096 / 8192, against 0.66 / 0.78 / 0.83 / 0.94 with 4096-element tiles at
# 16 warps.
_TILE_ELEMS = 2048
_MAX_BLOCK_ROWS = 64
_ELEMS_PER_THREAD = 16
# The forward streams rows wider than this through column blocks of this size (a first pass for
# the sum of squares, a second that rereads the row from L2), at 8 elements per thread. At hidden
# 8192 (bf16, 16384 rows, H200, benchmarks/tuning/sweep_rms_norm.py) that took 129.5 us with 16
# warps, against 133.2 us for the row held whole in registers and 129.2 us for torch.compile.
_FWD_MAX_BLOCK_COLS = 4096
_FWD_LOOPED_ELEMS_PER_THREAD = 8
# Backward programs loop over row tiles, so latency is hidden by the warps resident per SM rather
# than by fresh programs. Measured before next-tile prefetching was added, the best of 48
# tile / warp / grid configs reached 0.44 / 0.55 / 0.60 of copy bandwidth at hidden 896 / 2048 /
# 4096, each with programs x warps of about 32 per SM.
_BWD_WARPS_PER_SM = 32
# dW's finishing sum over the backward's partial rows (`_rms_norm_dw_kernel`): a program per
# column block of 8, looping over blocks of 128 partial rows at 8 warps. Whole backward at hidden
# 896 / 2048 / 4096 / 8192 (bf16, 16384 rows, H200, benchmarks/tuning/sweep_rms_norm.py): 35.6 / 65.0 /
# 115.7 / 218.6 us, against 42.8 / 71.6 / 129.6 / 225.8 us finishing with `sum(0).to(dtype)`; the
# best of 40 configurations was within 0.8 us of it at every size.
_DW_BLOCK_ROWS = 128
_DW_BLOCK_COLS = 8
_DW_WARPS = 8
# The interpreter runs programs one after another (~0.4 ms each): keep the backward grid tiny.
_INTERPRETER_BWD_PROGRAMS = 4


@triton.jit
def _normalize(x, rstd, w, x_dtype: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 output tile from fp32 x, rstd per row and fp32 w, in the variant's cast order: Gemma
    scales by (1 + w) in fp32 before the final cast; Llama rounds the normalised value to x's
    dtype first, then scales by w in fp32."""
    normed = x * rstd[:, None]
    if GEMMA:
        return normed * (1.0 + w[None, :])
    return cast_nearest(normed, x_dtype, INTERPRETED).to(tl.float32) * w[None, :]


@triton.jit
def _dx(x, dy, w, rstd, mean_gn):
    """fp32 dx from fp32 x and dy, the effective weight w (1 + w for Gemma), and per-row rstd
    and mean(g * n)."""
    normed = x * rstd[:, None]
    return rstd[:, None] * (dy * w[None, :] - normed * mean_gn[:, None])


@triton.jit
def _dw_normed(x, rstd, x_dtype: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr):
    """n as dW = sum(dy * n) sees it: rounded to x's dtype for Llama (the forward's cast)."""
    normed = x * rstd[:, None]
    if not GEMMA:
        normed = cast_nearest(normed, x_dtype, INTERPRETED).to(tl.float32)
    return normed


@triton.jit
def _load_bwd_block(x_rows, dy_rows, w_ptr, c, row_mask, n_cols, GEMMA: tl.constexpr):
    """fp32 x, dy and effective weight for column block c of the looped backward, and its masks."""
    col_mask = c < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=col_mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return x, dy, w, col_mask, mask


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    n_rows,
    n_cols,
    stride_x_row,
    stride_y_row,
    eps,
    GEMMA: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    rows = row_start + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_COLS)
    x_rows = x_ptr + rows[:, None] * stride_x_row
    y_rows = y_ptr + rows[:, None] * stride_y_row
    if NUM_BLOCKS == 1:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # Every program reads all of w: keep it in L2.
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
        y = _normalize(x, rstd, w.to(tl.float32), x_ptr.dtype.element_ty, GEMMA, INTERPRETED)
        tl.store(y_rows + cols[None, :], cast_nearest(y, y_ptr.dtype.element_ty, INTERPRETED),
                 mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        for block in range(NUM_BLOCKS):
            c = block * BLOCK_COLS + cols
            mask = row_mask[:, None] & (c < n_cols)[None, :]
            # Keep the row in L2 for the second pass, which reads it for the last time.
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
            x = x.to(tl.float32)
            sum_sq += x * x
        rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / n_cols + eps)
        for block in range(NUM_BLOCKS):
            c = block * BLOCK_COLS + cols
            col_mask = c < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            x = x.to(tl.float32)
            w = tl.load(w_ptr + c, mask=col_mask, other=0.0, eviction_policy="evict_last")
            y = _normalize(x, rstd, w.to(tl.float32), x_ptr.dtype.element_ty, GEMMA, INTERPRETED)
            tl.store(y_rows + c[None, :], cast_nearest(y, y_ptr.dtype.element_ty, INTERPRETED),
                     mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    stride_dw_partial_row,
    eps,
    GEMMA: tl.constexpr,
    HAS_DW: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
):
    # rstd is recomputed from x instead of saved by the forward: the forward op returns one
    # tensor (a second output would widen the op's schema and the pattern replacement), and when
    # a row fits one block x is in registers anyway, so the sum of squares costs no extra bytes.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_COLS)
    dw_partial_row = dw_partial_ptr + pid * stride_dw_partial_row
    if NUM_BLOCKS == 1:
        col_mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        # dW accumulates per element of the tile and is reduced over rows once at the end: no
        # cross-warp reduction per tile, and a shorter fp32 addition chain than summing each tile.
        dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        row_end = tl.minimum((pid + 1) * TILES_PER_PROGRAM * BLOCK_ROWS, n_rows)
        rows = pid * TILES_PER_PROGRAM * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0)
        for _ in range(TILES_PER_PROGRAM):
            # Issue the next tile's loads before this tile's reductions: a program walks its rows
            # one tile after another, so without this each warp waits a full memory latency per
            # tile. Rows past this program's chunk are masked off (no traffic). Tiles stay in their
            # storage dtype until used (half the registers for bf16) and are upcast before any
            # arithmetic.
            next_rows = rows + BLOCK_ROWS
            next_mask = (next_rows < row_end)[:, None] & col_mask[None, :]
            x_next = tl.load(
                x_ptr + next_rows[:, None] * stride_x_row + cols[None, :], mask=next_mask,
                other=0.0,
            )
            dy_next = tl.load(
                dy_ptr + next_rows[:, None] * stride_dy_row + cols[None, :], mask=next_mask,
                other=0.0,
            )
            xf = x.to(tl.float32)
            dyf = dy.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
            normed = xf * rstd[:, None]
            mean_gn = tl.sum(dyf * w[None, :] * normed, axis=1) / n_cols
            dx = _dx(xf, dyf, w, rstd, mean_gn)
            tl.store(
                dx_ptr + rows[:, None] * stride_dx_row + cols[None, :],
                cast_nearest(dx, dx_ptr.dtype.element_ty, INTERPRETED),
                mask=mask,
            )
            if HAS_DW:
                dw_acc += dyf * _dw_normed(xf, rstd, x_ptr.dtype.element_ty, GEMMA, INTERPRETED)
            rows, mask, x, dy = next_rows, next_mask, x_next, dy_next
        if HAS_DW:
            tl.store(dw_partial_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        for tile in range(TILES_PER_PROGRAM):
            rows = (pid * TILES_PER_PROGRAM + tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_mask = rows < n_rows
            x_rows = x_ptr + rows[:, None] * stride_x_row
            dy_rows = dy_ptr + rows[:, None] * stride_dy_row
            dx_rows = dx_ptr + rows[:, None] * stride_dx_row
            # Pass 1: sum(x^2) and sum(g * x) together; mean(g * n) = r * mean(g * x).
            sum_sq = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
            for block in range(NUM_BLOCKS):
                c = block * BLOCK_COLS + cols
                x, dy, w, _, _ = _load_bwd_block(x_rows, dy_rows, w_ptr, c, row_mask, n_cols, GEMMA)
                sum_sq += x * x
                sum_gx += dy * w[None, :] * x
            rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / n_cols + eps)
            mean_gn = rstd * tl.sum(sum_gx, axis=1) / n_cols
            # Pass 2: dx, and dW accumulated into this program's own row of the partial buffer.
            for block in range(NUM_BLOCKS):
                c = block * BLOCK_COLS + cols
                x, dy, w, col_mask, mask = _load_bwd_block(
                    x_rows, dy_rows, w_ptr, c, row_mask, n_cols, GEMMA
                )
                dx = _dx(x, dy, w, rstd, mean_gn)
                dx = cast_nearest(dx, dx_ptr.dtype.element_ty, INTERPRETED)
                tl.store(dx_rows + c[None, :], dx, mask=mask)
                if HAS_DW:
                    normed = _dw_normed(x, rstd, x_ptr.dtype.element_ty, GEMMA, INTERPRETED)
                    # The row is private to this program, so the adds never contend; an atomic
                    # keeps the read-modify-write ordered across loop iterations without a barrier.
                    tl.atomic_add(
                        dw_partial_row + c, tl.sum(dy * normed, axis=0), mask=col_mask,
                        sem="relaxed",
                    )


@triton.jit
def _rms_norm_dw_kernel(
    partial_ptr,
    dw_ptr,
    n_partials,
    n_cols,
    stride_partial_row,
    INTERPRETED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
):
    """dW = sum over the backward's fp32 partial rows, rounded once to the weight's dtype: one
    launch where `partial.sum(0).to(dtype)` took two. Each program owns a column block, so the
    sum's order is fixed (deterministic)."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    rows = tl.arange(0, BLOCK_ROWS)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    # A constexpr trip count: runtime-bounded loops break triton 3.6's interpreter. The backward
    # launches at most a few thousand programs, so only a handful of counts ever compile.
    for block in range(ROW_BLOCKS):
        r = block * BLOCK_ROWS + rows
        mask = (r < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + r[:, None] * stride_partial_row + cols[None, :], mask=mask,
                       other=0.0)
    dw = cast_nearest(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty, INTERPRETED)
    tl.store(dw_ptr + cols, dw, mask=col_mask)


def _check_inputs(x: Tensor, weight: Tensor, eps: float) -> None:
    check_same_device("rms_norm", x=x, weight=weight)
    check_float("rms_norm", x=x, weight=weight)
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least 1 dimension (..., H). Got a 0-dim tensor.")
    if weight.dim() != 1:
        raise ValueError(
            f"rms_norm: weight must be 1-D with shape ({x.shape[-1]},). "
            f"Got shape {tuple(weight.shape)}."
        )
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim. "
            f"Got {tuple(weight.shape)}."
        )
    if not 0 < eps < math.inf:
        raise ValueError(f"rms_norm: eps must be finite and > 0. Got {eps}.")


def _out_dtype(x: Tensor, weight: Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


def _config(n_rows: int, n_cols: int, max_block_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, NUM_BLOCKS, num_warps) for a [n_rows, n_cols] problem."""
    block_cols = min(next_power_of_2(n_cols), max_block_cols)
    num_blocks = triton.cdiv(n_cols, block_cols)
    block_rows = 1
    if num_blocks == 1:
        block_rows = min(max(_TILE_ELEMS // block_cols, 1), _MAX_BLOCK_ROWS)
        block_rows = min(block_rows, next_power_of_2(n_rows))
    num_warps = min(max(block_rows * block_cols // (32 * _ELEMS_PER_THREAD), 1), 16)
    return block_rows, block_cols, num_blocks, num_warps


def _fwd_config(n_rows: int, n_cols: int, max_block_cols: int) -> tuple[int, int, int, int]:
    """`_config` for the forward: looped rows get more warps (`_FWD_LOOPED_ELEMS_PER_THREAD`)."""
    block_rows, block_cols, num_blocks, num_warps = _config(n_rows, n_cols, max_block_cols)
    if num_blocks > 1:
        num_warps = min(max(block_cols // (32 * _FWD_LOOPED_ELEMS_PER_THREAD), 1), 16)
    return block_rows, block_cols, num_blocks, num_warps


def _rms_norm_fwd(
    x: Tensor, weight: Tensor, eps: float, gemma: bool, *,
    max_block_cols: int = _FWD_MAX_BLOCK_COLS, config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """`config`: (BLOCK_ROWS, BLOCK_COLS, NUM_BLOCKS, num_warps) instead of `_fwd_config`'s (for
    benchmarks/tuning/sweep_rms_norm.py)."""
    x_rows, weight = as_rows(x), weight.contiguous()  # the kernels read w with unit stride
    n_rows, n_cols = x_rows.shape
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, weight, gemma), device=x.device)
    if y.numel() == 0:
        return y.view(x.shape)
    block_rows, block_cols, num_blocks, num_warps = config or _fwd_config(
        n_rows, n_cols, max_block_cols
    )
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x_rows, weight, y, n_rows, n_cols, x_rows.stride(0), y.stride(0), float(eps),
        GEMMA=gemma, INTERPRETED=interpreter_on(), BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols, NUM_BLOCKS=num_blocks, num_warps=num_warps,
    )
    return y.view(x.shape)


def _rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool, compute_dw: bool, *,
    max_block_cols: int = _MAX_BLOCK_COLS,
    finish_dw: Callable[[Tensor, torch.dtype], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """`finish_dw`: what sums the per-program fp32 dW partials into dW instead of `_finish_dw`
    (for benchmarks/tuning/sweep_rms_norm.py)."""
    if dy.shape != x.shape:
        raise ValueError(
            f"rms_norm_backward: dy must have x's shape {tuple(x.shape)}. Got {tuple(dy.shape)}."
        )
    x_rows, dy_rows, weight = as_rows(x), as_rows(dy), weight.contiguous()
    n_rows, n_cols = x_rows.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        dw = torch.zeros_like(weight) if compute_dw else weight.new_empty(0)
        return dx.view(x.shape), dw
    block_rows, block_cols, num_blocks, num_warps = _config(n_rows, n_cols, max_block_cols)
    num_tiles = triton.cdiv(n_rows, block_rows)
    if x.device.type == "cuda":
        target_programs = sm_count(x.device) * max(_BWD_WARPS_PER_SM // num_warps, 1)
    else:
        target_programs = _INTERPRETER_BWD_PROGRAMS
    # A power of two so the constexpr loop bound compiles a handful of variants, not one per
    # row count (constexpr because runtime-bounded loops break triton 3.6's interpreter).
    tiles_per_program = next_power_of_2(triton.cdiv(num_tiles, target_programs))
    num_programs = triton.cdiv(num_tiles, tiles_per_program)
    if compute_dw:
        # One fp32 row per program. The multi-block path accumulates into it, so it starts at
        # zero there; the one-block path writes every row whole and skips the memset launch.
        alloc = torch.zeros if num_blocks > 1 else torch.empty
        dw_partial = alloc((num_programs, n_cols), dtype=torch.float32, device=x.device)
    else:
        dw_partial = dx  # never read or written: HAS_DW=False compiles the dW code out
    _rms_norm_bwd_kernel[(num_programs,)](
        dy_rows, x_rows, weight, dx, dw_partial, n_rows, n_cols,
        dy_rows.stride(0), x_rows.stride(0), dx.stride(0), dw_partial.stride(0), float(eps),
        GEMMA=gemma, HAS_DW=compute_dw, INTERPRETED=interpreter_on(), BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols, NUM_BLOCKS=num_blocks, TILES_PER_PROGRAM=tiles_per_program,
        num_warps=num_warps,
    )
    dw = (finish_dw or _finish_dw)(dw_partial, weight.dtype) if compute_dw else (
        weight.new_empty(0))
    return dx.view(x.shape), dw


def _dw_config() -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for `_rms_norm_dw_kernel`."""
    if interpreter_on():
        return 16, 64, 4  # fewer, wider programs: the interpreter runs them one after another
    return _DW_BLOCK_ROWS, _DW_BLOCK_COLS, _DW_WARPS


def _finish_dw(
    partial: Tensor, dtype: torch.dtype, *, config: tuple[int, int, int] | None = None
) -> Tensor:
    """`config`: (BLOCK_ROWS, BLOCK_COLS, num_warps) instead of `_dw_config`'s."""
    n_partials, n_cols = partial.shape
    dw = torch.empty(n_cols, dtype=dtype, device=partial.device)
    block_rows, block_cols, num_warps = config or _dw_config()
    _rms_norm_dw_kernel[(triton.cdiv(n_cols, block_cols),)](
        partial, dw, n_partials, n_cols, partial.stride(0), INTERPRETED=interpreter_on(),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        ROW_BLOCKS=triton.cdiv(n_partials, block_rows), num_warps=num_warps,
    )
    return dw


def _reference_backward(
    dy: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool, compute_dw: bool
) -> tuple[Tensor, Tensor]:
    """The kernels' formula (module docstring) in fp32 PyTorch. Not autograd through the
    reference: a custom op's body runs below the autograd key, where no graph is recorded."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * rstd
    dyf = dy.float()
    g = dyf * (weight.float() + 1.0 if gemma else weight.float())
    dx = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype).contiguous()
    if not compute_dw:
        return dx, weight.new_empty(0)
    coeff = normed if gemma else normed.to(x.dtype).float()
    dw = (dyf * coeff).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw


@torch.library.custom_op("chronicals::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    _check_inputs(x, weight, eps)
    if use_triton(x):
        return _rms_norm_fwd(x, weight, eps, gemma)
    return reference.rms_norm(x, weight, eps, gemma).contiguous()


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    _check_inputs(x, weight, eps)
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, gemma))


@torch.library.custom_op("chronicals::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool, compute_dw: bool
) -> tuple[Tensor, Tensor]:
    """(dx, dW). dW is an empty (0,) tensor when `compute_dw` is False (custom ops cannot return
    None): a frozen weight costs neither the reduction nor the partial buffer."""
    if use_triton(x):
        return _rms_norm_bwd(dy, x, weight, eps, gemma, compute_dw)
    return _reference_backward(dy, x, weight, eps, gemma, compute_dw)


@_rms_norm_backward_op.register_fake
def _(
    dy: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool, compute_dw: bool
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, eps, gemma = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.gemma = eps, gemma


def _backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    x, weight = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = _rms_norm_backward_op(dy, x, weight, ctx.eps, ctx.gemma, compute_dw)
    return (dx if ctx.needs_input_grad[0] else None), (dw if compute_dw else None), None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm of x: (..., H) over its last dim, scaled by weight: (H,). Returns (..., H),
    contiguous.

    Numerics as `chronicals.reference.rms_norm` (HF Llama, or Gemma's `(1 + w)` with
    `gemma=True`). Output dtype: `promote_types(weight.dtype, x.dtype)` (Llama) or x.dtype (Gemma).
    Differentiable in x and weight; no dW work is done when weight does not require grad.
    """
    return torch.ops.chronicals.rms_norm(x, weight, eps, gemma)
