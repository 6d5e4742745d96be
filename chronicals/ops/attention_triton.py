"""Chronicals' own attention kernels (Triton): causal attention within documents, with sliding
windows, logit soft-capping, attention sinks and GQA/MQA, forward and backward. The "triton"
kernel of `chronicals::attention` (chronicals/ops/attention.py states when it runs).

One program per (block of BLOCK_M queries, query head) in the forward and for dQ; one per (block
of BLOCK_N keys, K/V head) for dK and dV, which walks the query heads of its GQA group in turn, so
K/V heads are never repeated and their gradients need no atomics or reduction afterwards.
Documents come as each token's first and one-past-last index in its row
(chronicals/ops/attention.py's `document_spans`, computed on the device: no host sync, the same
tensors for every layer), so a query block visits
only the key blocks from its first query's document start (or window start) up to its diagonal,
and a key block only the query blocks up to its last key's document end (or window end).

Scores s = scale * q.k in fp32; with softcap c > 0, s = c * tanh(s / c) (Gemma-2); softmax
statistics (log-sum-exp) fp32; P and dS are rounded to the input dtype for their GEMMs, as flash
kernels do, with fp32 accumulation. A head's sink logit (gpt-oss) starts the forward's online
softmax (running max = the sink, sum = 1), so the log-sum-exp includes it and the backward's P
needs no change; the sink's own gradient comes from that lse and delta = rowsum(dO * O). Under
Triton's interpreter (CPU tests) every GEMM runs in fp32: the interpreter's `tl.dot` on bf16
operands gives wrong results, and arithmetic on raw bf16 loads too, so loads are upcast there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from chronicals import reference
from chronicals.ops._launch import cast_nearest, interpreter_on, next_power_of_2


@triton.jit
def _exp(x):
    """e^x through exp2 (one multiply, the hardware's exp2)."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _tanh(x):
    # tanh through exp, exact enough in fp32 and available to the interpreter and every backend.
    e = _exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(a, b, scale, softcap, SOFTCAP: tl.constexpr):
    """scale * a @ b (fp32), soft-capped; and tanh of it over softcap (1 - t^2 is the cap's
    derivative; 0 without a cap)."""
    s = tl.dot(a, b) * scale
    if SOFTCAP:
        t = _tanh(s / softcap)
        return softcap * t, t
    return s, s * 0.0


@triton.jit
def _visible(rows, cols, seq, start, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Query rows (column vector) see key cols (row vector): causal, inside the row, in the
    query's document (its start given per row), within the window."""
    ok = (cols <= rows) & (rows < seq)
    if HAS_DOCS:
        ok = ok & (cols >= start)
    if WINDOW > 0:
        ok = ok & (rows - cols < WINDOW)
    return ok


@triton.jit
def _load(ptr, mask, INTERPRET: tl.constexpr):
    x = tl.load(ptr, mask=mask, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_range(starts, m0, seq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key blocks a query block [m0, m0 + BLOCK_M) needs: from its first query's document start
    (starts never decrease within a row) or window start, to its diagonal."""
    lo = 0
    if HAS_DOCS:
        lo = tl.load(starts + m0)
    if WINDOW > 0:
        lo = tl.maximum(lo, m0 - WINDOW + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, seq)
    return lo, hi


@triton.jit
def _key_tile(qt, k, v, n0, rows, dims, dim_ok, doc_start, sks, svs, scale, softcap, SEQ,
              BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              SOFTCAP: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """A query block against key block n0: K, V, the scores (-inf where not visible, when
    MASK) and tanh of the capped scores."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = (cols < SEQ)[:, None] & dim_ok[None, :]
    kt = _load(k + cols[:, None] * sks + dims[None, :], col_ok, INTERPRET)
    vt = _load(v + cols[:, None] * svs + dims[None, :], col_ok, INTERPRET)
    s, t = _scores(qt, tl.trans(kt), scale, softcap, SOFTCAP)
    if MASK:
        s = tl.where(_visible(rows[:, None], cols[None, :], SEQ, doc_start[:, None], WINDOW,
                              HAS_DOCS), s, float("-inf"))
    return kt, vt, s, t


@triton.jit
def _query_block(q, k, v, starts, sqb, sqh, sqs, skb, skh, svb, svh, SEQ, HQ: tl.constexpr,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_DOCS: tl.constexpr, INTERPRET: tl.constexpr):
    """What a (query block, query head) program of the forward or dQ starts from: its indices,
    Q tile, document starts, K/V head pointers and key range."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < SEQ
    dim_ok = dims < D
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    qt = _load(q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :], tile_ok, INTERPRET)
    doc_start = rows * 0
    if HAS_DOCS:
        starts += b * SEQ
        doc_start = tl.load(starts + rows, mask=row_ok, other=0)
    lo, hi = _key_range(starts, m0, SEQ, BLOCK_M, BLOCK_N, WINDOW, HAS_DOCS)
    return (m0, bh, b, h, rows, dims, row_ok, dim_ok, tile_ok, qt, doc_start,
            k + b * skb + hk * skh, v + b * svb + hk * svh, lo, hi)


@triton.jit
def _fwd_tile(acc, m_i, l_i, qt, k, v, n0, rows, dims, dim_ok, doc_start, sks, svs, scale,
              softcap, SEQ, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              SOFTCAP: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """One key block of the online softmax: the running max m_i, sum l_i and output acc."""
    _kt, vt, s, _t = _key_tile(qt, k, v, n0, rows, dims, dim_ok, doc_start, sks, svs, scale,
                               softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS, SOFTCAP, MASK, INTERPRET)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp(s - m_use[:, None])
    alpha = _exp(m_i - m_use)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_kernel(
    q, k, v, out, lse, starts, sinks,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    scale, softcap,
    SEQ, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr, INTERPRET: tl.constexpr,
):
    m0, bh, b, h, rows, dims, row_ok, dim_ok, tile_ok, qt, doc_start, k, v, lo, hi = _query_block(
        q, k, v, starts, sqb, sqh, sqs, skb, skh, svb, svh, SEQ, HQ, GROUP, D, BLOCK_M, BLOCK_N,
        BLOCK_D, WINDOW, HAS_DOCS, INTERPRET)
    if SINKS:
        # The head's sink logit is the softmax's first term: max so far, sum exp(0) = 1.
        m_i = tl.full((BLOCK_M,), 0.0, tl.float32) + tl.load(sinks + h).to(tl.float32)
        l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Key blocks wholly below the diagonal (keys < m0) need the causal mask for no query; with
    # documents or a window they still need theirs. Then the blocks the diagonal crosses.
    for n0 in range(lo, m0, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qt, k, v, n0, rows, dims, dim_ok, doc_start,
                                  sks, svs, scale, softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS,
                                  SOFTCAP, HAS_DOCS or WINDOW > 0, INTERPRET)
    for n0 in range(m0, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qt, k, v, n0, rows, dims, dim_ok, doc_start,
                                  sks, svs, scale, softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS,
                                  SOFTCAP, True, INTERPRET)
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    # out is (B, S, Hq, D) in memory.
    tl.store(out + ((b * SEQ + rows[:, None]) * HQ + h) * D + dims[None, :],
             cast_nearest(o, out.dtype.element_ty, INTERPRET), mask=tile_ok)
    tl.store(lse + bh * SEQ + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _delta_kernel(dout, out, delta, sdb, sdh, sds, SEQ, HQ: tl.constexpr, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """delta = rowsum(dO * O) per (b, h, s), fp32: the softmax backward's correction term."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows < SEQ)[:, None] & (dims < D)[None, :]
    do = tl.load(dout + b * sdb + h * sdh + rows[:, None] * sds + dims[None, :], mask=ok,
                 other=0.0).to(tl.float32)
    o = tl.load(out + ((b * SEQ + rows[:, None]) * HQ + h) * D + dims[None, :], mask=ok,
                other=0.0).to(tl.float32)
    tl.store(delta + bh * SEQ + rows, tl.sum(do * o, 1), mask=rows < SEQ)


@triton.jit
def _dq_tile(qt, do, row_lse, row_delta, k, v, n0, rows, dims, dim_ok, doc_start, sks, svs,
             scale, softcap, SEQ, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
             HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
             INTERPRET: tl.constexpr):
    """One key block's dS K for a query block (unscaled)."""
    kt, vt, s, t = _key_tile(qt, k, v, n0, rows, dims, dim_ok, doc_start, sks, svs, scale,
                             softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS, SOFTCAP, MASK, INTERPRET)
    p = _exp(s - row_lse[:, None])
    ds = p * (tl.dot(do, tl.trans(vt)) - row_delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(kt.dtype), kt)


@triton.jit
def _dkdv_tile(dk_acc, dv_acc, kt, vt, q, dout, lse, delta, starts, m0, cols, dims, dim_ok,
               sqs, sds, scale, softcap, SEQ, BLOCK_M: tl.constexpr, WINDOW: tl.constexpr,
               HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
               INTERPRET: tl.constexpr):
    """One query block's share of a key block's dK (unscaled) and dV; q, dout, lse, delta point
    at the query head's row."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < SEQ
    q_ok = row_ok[:, None] & dim_ok[None, :]
    qt = _load(q + rows[:, None] * sqs + dims[None, :], q_ok, INTERPRET)
    do = _load(dout + rows[:, None] * sds + dims[None, :], q_ok, INTERPRET)
    row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + rows, mask=row_ok, other=0.0)
    # Transposed scores: keys down, queries across.
    s, t = _scores(kt, tl.trans(qt), scale, softcap, SOFTCAP)
    p = _exp(s - row_lse[None, :])
    if MASK:
        doc_start = rows * 0
        if HAS_DOCS:
            doc_start = tl.load(starts + rows, mask=row_ok, other=0)
        p = tl.where(_visible(rows[None, :], cols[:, None], SEQ, doc_start[None, :], WINDOW,
                              HAS_DOCS), p, 0.0)
    dv_acc += tl.dot(p.to(do.dtype), do)
    ds = p * (tl.dot(vt, tl.trans(do)) - row_delta[None, :])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dk_acc + tl.dot(ds.to(qt.dtype), qt), dv_acc


@triton.jit
def _dq_kernel(
    q, k, v, dout, lse, delta, dq, starts,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    scale, softcap,
    SEQ, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    m0, bh, b, h, rows, dims, row_ok, dim_ok, tile_ok, qt, doc_start, k, v, lo, hi = _query_block(
        q, k, v, starts, sqb, sqh, sqs, skb, skh, svb, svh, SEQ, HQ, GROUP, D, BLOCK_M, BLOCK_N,
        BLOCK_D, WINDOW, HAS_DOCS, INTERPRET)
    do = _load(dout + b * sdb + h * sdh + rows[:, None] * sds + dims[None, :], tile_ok,
               INTERPRET)
    row_lse = tl.load(lse + bh * SEQ + rows, mask=row_ok, other=0.0)
    row_delta = tl.load(delta + bh * SEQ + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # As in the forward: key blocks below the diagonal, then the ones it crosses.
    for n0 in range(lo, m0, BLOCK_N):
        acc += _dq_tile(qt, do, row_lse, row_delta, k, v, n0, rows, dims, dim_ok, doc_start,
                        sks, svs, scale, softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS, SOFTCAP,
                        HAS_DOCS or WINDOW > 0, INTERPRET)
    for n0 in range(m0, hi, BLOCK_N):
        acc += _dq_tile(qt, do, row_lse, row_delta, k, v, n0, rows, dims, dim_ok, doc_start,
                        sks, svs, scale, softcap, SEQ, BLOCK_N, WINDOW, HAS_DOCS, SOFTCAP,
                        True, INTERPRET)
    # dq is (B, S, Hq, D) in memory.
    tl.store(dq + ((b * SEQ + rows[:, None]) * HQ + h) * D + dims[None, :],
             cast_nearest(acc * scale, dq.dtype.element_ty, INTERPRET), mask=tile_ok)


@triton.jit
def _dkdv_kernel(
    q, k, v, dout, lse, delta, dk, dv, starts, ends,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    scale, softcap,
    SEQ, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    hkv = HQ // GROUP
    b = bhk // hkv
    hk = bhk % hkv
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < SEQ
    dim_ok = dims < D
    tile_ok = col_ok[:, None] & dim_ok[None, :]
    kt = _load(k + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], tile_ok, INTERPRET)
    vt = _load(v + b * svb + hk * svh + cols[:, None] * svs + dims[None, :], tile_ok, INTERPRET)
    # Query blocks that see this key block: from its diagonal to its last key's document end
    # (ends never decrease within a row) or window end.
    last = tl.minimum(n0 + BLOCK_N, SEQ) - 1
    hi = SEQ
    if HAS_DOCS:
        starts += b * SEQ
        hi = tl.load(ends + b * SEQ + last)
    if WINDOW > 0:
        hi = tl.minimum(hi, last + WINDOW)
    lo = (n0 // BLOCK_M) * BLOCK_M
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Query blocks the diagonal crosses (m0 < n0 + BLOCK_N), then those wholly past it.
    mid = tl.minimum(n0 + BLOCK_N, hi)
    for g in range(GROUP):
        h = hk * GROUP + g
        qh = q + b * sqb + h * sqh
        doh = dout + b * sdb + h * sdh
        lse_h = lse + (b * HQ + h) * SEQ
        delta_h = delta + (b * HQ + h) * SEQ
        for m0 in range(lo, mid, BLOCK_M):
            dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, kt, vt, qh, doh, lse_h, delta_h, starts,
                                        m0, cols, dims, dim_ok, sqs, sds, scale, softcap, SEQ,
                                        BLOCK_M, WINDOW, HAS_DOCS, SOFTCAP, True, INTERPRET)
        for m0 in range(mid, hi, BLOCK_M):
            dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, kt, vt, qh, doh, lse_h, delta_h, starts,
                                        m0, cols, dims, dim_ok, sqs, sds, scale, softcap, SEQ,
                                        BLOCK_M, WINDOW, HAS_DOCS, SOFTCAP,
                                        HAS_DOCS or WINDOW > 0, INTERPRET)
    # dk, dv are (B, S, Hk, D) in memory.
    at = ((b * SEQ + cols[:, None]) * hkv + hk) * D + dims[None, :]
    tl.store(dk + at, cast_nearest(dk_acc * scale, dk.dtype.element_ty, INTERPRET), mask=tile_ok)
    tl.store(dv + at, cast_nearest(dv_acc, dv.dtype.element_ty, INTERPRET), mask=tile_ok)


class _Tiles(NamedTuple):
    """Block sizes (rows x cols of the score tile) and warps of one kernel. The kernels split
    their loops at the other axis's block boundaries: rows must be a multiple of cols in the
    forward and dQ (query rows, key cols) and in dK/dV (key rows, query cols)."""

    rows: int
    cols: int
    warps: int
    stages: int

    def checked(self) -> _Tiles:
        """These tiles, or ValueError where the kernels would compute a wrong result."""
        if self.rows % self.cols:
            raise ValueError(f"attention tiles {self}: rows must be a multiple of cols (the "
                             "kernels split their loops at the other axis's block boundaries)")
        return self


def _tiles(q: Tensor) -> tuple[_Tiles, _Tiles, _Tiles]:
    """Forward, dQ and dK/dV tiles for q's device and head dim. Head dims 65-256: the fastest
    valid tiles of `benchmarks/tuning/sweep_attention_tiles.py` on an H100 (2026-12-08; Qwen2.5-7B
    2 x 4096 d 128, and 4 x 2048 d 256 with Gemma-2's softcap: forward 0.707 -> 0.562 and
    0.651 -> 0.271 ms, dQ 2.964 -> 2.615 and 2.441 -> 1.960, dK/dV 2.961 -> 2.421 and 2.456 ->
    1.760 against the tiles before). Head dims up to 64: starting points from the shapes flash
    kernels use on Hopper, not yet swept whole. The interpreter runs one program at a time:
    small blocks keep the tests' masked work small."""
    if q.device.type != "cuda":
        small = _Tiles(16, 16, 4, 1)
        return small, small, small
    d = q.shape[-1]
    if d <= 64:
        return _Tiles(128, 64, 4, 3), _Tiles(128, 32, 4, 3), _Tiles(128, 32, 4, 3)
    if d <= 128:
        return _Tiles(64, 64, 4, 3), _Tiles(128, 64, 8, 3), _Tiles(64, 64, 4, 2)
    return _Tiles(64, 32, 4, 2), _Tiles(64, 64, 4, 2), _Tiles(32, 32, 4, 2)


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q: Tensor, k: Tensor, v: Tensor, spans: tuple[Tensor, Tensor] | None, scale: float,
            window: int, softcap: float, tiles: _Tiles | None = None,
            sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, S, D) laid out (B, S, Hq, D), and lse (B * Hq * S,) fp32, the sink logits
    (Hq,) included when given. `tiles`: the forward kernel's, else `_tiles`'
    (benchmarks/tuning/sweep_attention_tiles.py passes its own)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, hq, s, d = q.shape
    out = q.new_empty((b, s, hq, d))
    lse = q.new_empty((b * hq * s,), dtype=torch.float32)
    tiles = (tiles or _tiles(q)[0]).checked()
    starts = spans[0] if spans is not None else lse
    _fwd_kernel[(triton.cdiv(s, tiles.rows), b * hq)](
        q, k, v, out, lse, starts, lse if sinks is None else sinks.contiguous(),
        *_strides(q), *_strides(k), *_strides(v),
        scale, softcap or 1.0, s, hq, hq // k.shape[1], d,
        BLOCK_M=tiles.rows, BLOCK_N=tiles.cols, BLOCK_D=_block_d(d), WINDOW=window,
        HAS_DOCS=spans is not None, SOFTCAP=softcap > 0, SINKS=sinks is not None,
        INTERPRET=interpreter_on(),
        num_warps=tiles.warps, num_stages=tiles.stages,
    )
    return out.transpose(1, 2), lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             spans: tuple[Tensor, Tensor] | None, scale: float, window: int, softcap: float,
             tiles: tuple[_Tiles, _Tiles] | None = None, sinks: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv, each laid out (B, S, H, D) like the forward's output, and the sinks' gradient
    (None without sinks). `out` is the forward's output (its (B, S, Hq, D) storage), `lse` its
    log-sum-exp (the sinks included: the kernels' P needs no other change). `tiles`: the dQ and
    dK/dV kernels', else `_tiles`'."""
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    b, hq, s, d = q.shape
    hk = k.shape[1]
    out = out.transpose(1, 2).contiguous()  # a view of the forward's storage: no copy
    dq_tiles, kv_tiles = (t.checked() for t in tiles or _tiles(q)[1:])
    block_d = _block_d(d)
    interpret = interpreter_on()
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(s, dq_tiles.rows), b * hq)](
        dout, out, delta, *_strides(dout), s, hq, d, BLOCK_M=dq_tiles.rows, BLOCK_D=block_d,
        INTERPRET=interpret, num_warps=4,
    )
    dsinks = (None if sinks is None else
              reference.attention_sinks_grad(sinks, lse.view(b, hq, s), delta.view(b, hq, s)))
    starts, ends = spans if spans is not None else (lse, lse)
    dq = q.new_empty((b, s, hq, d))
    dk = k.new_empty((b, s, hk, d))
    dv = v.new_empty((b, s, hk, d))
    common = dict(BLOCK_D=block_d, WINDOW=window, HAS_DOCS=spans is not None,
                  SOFTCAP=softcap > 0, INTERPRET=interpret)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    _dq_kernel[(triton.cdiv(s, dq_tiles.rows), b * hq)](
        q, k, v, dout, lse, delta, dq, starts, *strides, scale, softcap or 1.0,
        s, hq, hq // hk, d, BLOCK_M=dq_tiles.rows, BLOCK_N=dq_tiles.cols,
        num_warps=dq_tiles.warps, num_stages=dq_tiles.stages, **common,
    )
    # dK/dV: key blocks are the tile's rows (BLOCK_N), query blocks its columns (BLOCK_M).
    _dkdv_kernel[(triton.cdiv(s, kv_tiles.rows), b * hk)](
        q, k, v, dout, lse, delta, dk, dv, starts, ends, *strides, scale, softcap or 1.0,
        s, hq, hq // hk, d, BLOCK_M=kv_tiles.cols, BLOCK_N=kv_tiles.rows,
        num_warps=kv_tiles.warps, num_stages=kv_tiles.stages, **common,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dsinks
