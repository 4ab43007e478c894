"""Triton kernels of :func:`fastrl.linear_logprobs`: ``hidden @ weight.T`` in vocab tiles with ``tl.dot``
(tensor cores for bf16/fp16; for fp32, FMAs, or three TF32 tensor-core products with
``FASTRL_LINEAR_LOGPROBS_FP32=tf32x3``: :data:`FP32_PRECISION`) and the softmax reductions as the
tiles' epilogue.

Forward, split over the vocabulary: ``_forward_kernel`` runs on a grid of (row tiles of ``BLOCK_M``
rows, ``splits`` vocab ranges of ``span`` columns, a multiple of the vocab tile ``BLOCK_N``), so even
one row tile fills the GPU. Each program accumulates every ``[BLOCK_M, BLOCK_N]`` logits tile of its
range over ``H`` in ``BLOCK_K`` steps (fp32 accumulator), scales by ``1/T`` and folds it into the
rows' partial softmax state ``(m = max z, s = sum exp(z - m), t = sum exp(z - m)(z - m))`` and the
label's logit (0 unless the label is in the range), written to an fp32 ``[3 or 4, splits, N]``
workspace. ``_combine_kernel`` merges the splits of each row in split order (no atomics) into
``lse = m + log s``, ``log p(label) = z_label - lse`` and ``entropy = log s - t / s``. The tiles,
``span`` and ``splits`` are a function of ``(V, dtype)`` only (:func:`_config`) and the merge order is
fixed, so a row's results are bitwise the same whatever else is in the batch. ``H`` and ``V`` tails
are masked (padded columns are -inf: they never reach the logsumexp). Rows are visited in ``order``
(the non-ignored rows first, computed on the device) and a program whose block lies past the count
of non-ignored rows exits at once: ignored rows are skipped without a host sync. Extra memory: the
workspace, ``(12 or 16) x splits`` bytes per row (2 KiB per row at 128 splits), plus the fp32 outputs.

Backward (default): blocks of (rows, vocab columns) of about :data:`fastrl.linear_logprobs.CHUNK_BYTES`
(:func:`_backward_blocks`; ``chunk_size`` rows x the whole vocabulary when given). Per block,
``_dlogits_kernel`` (one program per ``[BLOCK_M, BLOCK_N]`` tile) recomputes the logits tile with
``tl.dot`` and writes its gradient ``dL/dlogits = (g_lp ([j == y] - p_j) - g_ent p_j (log p_j + H)) / T``
into the block buffer (input dtype), then two cuBLAS matmuls add ``G @ weight[cols]`` to the rows'
``grad_hidden`` and ``G.T @ hidden[rows]`` to ``grad_weight[cols]`` (and the bias' column sums), in
a fixed block order: deterministic, no atomics. Accumulators are fp32 for half inputs (the matmuls
accumulate into them in fp32). Blocks about as tall as wide keep the accumulators' traffic small:
bf16, N = 4,096, V = 152,064 is one row block, so each vocab block of ``grad_weight`` is written
once by one matmul over all the rows. Forward + backward there on an H100: 38.1 ms (Liger's fused
linear cross entropy 88.4 ms, torch eager with materialized logits 30.4 ms and 5x the memory, the three
matmuls alone 21.5 ms); with row chunks over the whole vocabulary, which re-read and re-wrote the
fp32 ``[V, H]`` accumulator per chunk, it was 102 ms. Extra memory: the block buffer, fp32
``[N, H]`` (and, for half inputs with more than one row block, ``[V, H]``) accumulators. Ignored rows have zero gradient rows (they still take part
in the matmuls: skipping them would need the count on the host). ``grad_hidden`` comes from cuBLAS
matmuls whose shapes depend on the batch, so it is not guaranteed batch invariant.

Backward, fully fused (``linear_logprobs_backward_fused``, ``FASTRL_LINEAR_LOGPROBS_BACKWARD=fused``):
one kernel per output and no buffer at all. ``_grad_hidden_kernel``: one program per (block of
``BLOCK_M`` rows, block of ``BLOCK_H`` hidden columns) walks the vocab tiles, recomputes each
gradient tile and accumulates ``dlogits_tile @ weight[tile, h block]``: a row's ``grad_hidden`` is
batch invariant. ``_grad_weight_kernel``: one program per (vocab tile, ``BLOCK_H`` block) walks the
non-ignored row blocks in order and accumulates ``dlogits_tile.T @ hidden[rows, h block]`` (and the
bias' sums): deterministic, no atomics, and ignored rows cost nothing. Both recompute the logits
tiles once per ``BLOCK_H`` block, i.e. ``ceil(H / BLOCK_H)`` times the forward's matmul each: the
price of holding no ``[*, V]`` buffer. Extra memory: none beyond the gradients.

Portability: ``H`` and ``V`` are ``tl.constexpr`` where they bound a loop (one compilation per model
shape) and the row loop of ``_grad_weight_kernel`` is a ``while``: Triton 3.6's interpreter cannot
turn a runtime scalar argument into a ``range`` bound under NumPy >= 2.5 (its ``__index__`` calls
``int()`` on a 1-element array).

Measured on an H100 (torch 2.11, Triton 3.6), forward of hidden f32[8192, 128] x weight[65536, 128]
(137 GFLOP): 7.2 ms with fp32 FMAs (19 TFLOP/s; the one-program-per-row-tile version: 20.7 ms), 2.6 ms
with tf32x3; torch eager with materialized logits: 6.6 ms. CI runs these kernels under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastrl.linear_logprobs import _chunk_rows

_chunked = importlib.import_module("fastrl.linear_logprobs")  # the module (fastrl.linear_logprobs is the function)


class Tiles(NamedTuple):
    """Tile sizes and launch parameters of every kernel for one input dtype."""
    BLOCK_M: int  # rows per tile
    BLOCK_N: int  # vocab columns per tile
    BLOCK_K: int  # hidden columns per tl.dot step
    BLOCK_H: int  # hidden columns per program of the fused backward (its logits recompute factor: H / BLOCK_H)
    num_warps: int
    num_stages: int


FP32_PRECISION = os.environ.get("FASTRL_LINEAR_LOGPROBS_FP32", "ieee")
"""``tl.dot`` precision of fp32 inputs: "ieee" (the default: fp32 FMAs, no TF32 rounding) or "tf32x3"
(``FASTRL_LINEAR_LOGPROBS_FP32=tf32x3``: each product split into TF32 high and low parts, three
tensor-core products; measured on an H100 at V = 65,536: the same max error against fp64 as "ieee",
2.8x faster)."""
if FP32_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"FASTRL_LINEAR_LOGPROBS_FP32 must be 'ieee' or 'tf32x3', got {FP32_PRECISION!r}")

TILES = {
    # fp32 on the FMA units: 128 x 128 x 32, 8 warps, 2 stages (H100, V = 65,536, H = 128: 7.2 ms; 64 x 128 x 32,
    # 8 warps, 3 stages: 11.2 ms)
    (torch.float32, "ieee"): Tiles(128, 128, 32, 64, 8, 2),
    # fp32 as three TF32 tensor-core products: 64 x 128 x 32, 4 warps (2.6 ms; 128 x 128: as fast at N = 8,192,
    # 1.8x slower at N = 100)
    (torch.float32, "tf32x3"): Tiles(64, 128, 32, 64, 4, 3),
    # bf16 / fp16: tensor cores (wgmma on Hopper). bf16: 128 x 256 x 64, 4 stages (H100, N = 4,096, H = 4,096,
    # V = 152,064 forward: 10.1 ms; 128 x 128 x 64, 3 stages: 11.2 ms; cuBLAS's matmul alone: 7.4 ms)
    (torch.bfloat16, "ieee"): Tiles(128, 256, 64, 64, 8, 4),
    (torch.float16, "ieee"): Tiles(128, 128, 64, 64, 8, 3),
}
"""Tiles per (dtype, fp32 precision): never a function of the batch (a row's bits must not depend on it)."""

FUSED_TILES = {(torch.float32, "ieee"): Tiles(64, 128, 32, 64, 8, 3),
               (torch.bfloat16, "ieee"): Tiles(128, 128, 64, 64, 8, 3)}  # the fused backward keeps 128 x 128
"""Where the fused backward wants other tiles: fp32 FMAs, N = 2,048, V = 32,768, H = 256 on an H100:
24.5 ms with these, 57 ms with 128 x 128 x 32."""

MAX_SPLITS = 128
"""Most vocab ranges of the forward: enough programs for one row tile to fill an H100 (132 SMs)."""


class Config(NamedTuple):
    tiles: Tiles
    span: int  # vocab columns per split, a multiple of BLOCK_N
    splits: int


def _key(dtype: torch.dtype):
    return dtype, FP32_PRECISION if dtype == torch.float32 else "ieee"


def _config(vocab: int, dtype: torch.dtype) -> Config:
    """Tiles and the forward's vocab split: a pure function of V and the dtype (H only bounds the
    kernels' loops). ``splits`` = at most :data:`MAX_SPLITS` ranges of whole vocab tiles, every range
    non-empty; e.g. V = 65,536 fp32: 512 tiles of 128, 128 splits of 4 tiles."""
    tiles = TILES[_key(dtype)]
    n_tiles = triton.cdiv(vocab, tiles.BLOCK_N)
    per_split = triton.cdiv(n_tiles, MAX_SPLITS)
    return Config(tiles, per_split * tiles.BLOCK_N, triton.cdiv(n_tiles, per_split))


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w, inv_t, H: tl.constexpr,
                 HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) / T as fp32 [BLOCK_M, BLOCK_N]; -inf past V."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if FP32_DOT:  # fp32 inputs (FP32_PRECISION); bf16 under the interpreter: upcast (see _fp32_dot)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _merge(m, s, t, m2, s2, t2, ENTROPY: tl.constexpr):
    """Two softmax states ``(m, s = sum exp(z - m), t = sum exp(z - m)(z - m))`` of disjoint column sets
    as one (an empty set: m = -inf, s = t = 0). ``t`` is carried only with ENTROPY."""
    m_new = tl.maximum(m, m2)
    d1 = tl.where(s > 0, m - m_new, 0.0)  # s > 0: m finite; the empty side contributes nothing
    d2 = tl.where(s2 > 0, m2 - m_new, 0.0)
    a = tl.where(s > 0, tl.exp(d1), 0.0)
    b = tl.where(s2 > 0, tl.exp(d2), 0.0)
    if ENTROPY:
        t = a * (t + d1 * s) + b * (t2 + d2 * s2)
    return m_new, a * s + b * s2, t


@triton.jit
def _row_block(order_ptr, y_ptr, start, count, BLOCK: tl.constexpr):
    """Positions ``start + [0, BLOCK)`` in ``order`` (valid below ``count``), their rows and labels, and
    an empty softmax state (m, s, t) and label logit for them."""
    offs = start + tl.arange(0, BLOCK)
    row_ok = offs < count
    rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    return offs, row_ok, rows, y, zero + float("-inf"), zero, zero, zero


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, ws_ptr, N, V, stride_h, stride_w, inv_t,
                    H: tl.constexpr, SPAN: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial softmax state and label logit of BLOCK_M rows over the vocab range [split * SPAN, + SPAN)
    into ws[:, split, row position]."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    split = tl.program_id(1).to(tl.int64)
    count = tl.load(count_ptr)
    if start < count:  # blocks of only ignored rows do nothing
        offs, row_ok, rows, y, m, s, t, label_z = _row_block(order_ptr, y_ptr, start, count, BLOCK_M)
        for v0 in range(0, SPAN, BLOCK_N):
            cols = split * SPAN + v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w, inv_t, H,
                             HAS_BIAS, FP32_DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            tile_m = tl.max(z, 1)  # -inf for a tile wholly past V (its e and d are 0)
            d = tl.where(col_ok[None, :], z - tile_m[:, None], 0.0)
            e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
            m, s, t = _merge(m, s, t, tile_m, tl.sum(e, 1), tl.sum(e * d, 1), ENTROPY)
            label_z += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        ws = ws_ptr + split * N + offs  # ws: [3 or 4, SPLITS, N]
        tl.store(ws, m, mask=row_ok)
        tl.store(ws + SPLITS * N, s, mask=row_ok)
        tl.store(ws + 2 * SPLITS * N, label_z, mask=row_ok)
        if ENTROPY:
            tl.store(ws + 3 * SPLITS * N, t, mask=row_ok)


@triton.jit
def _combine_kernel(ws_ptr, y_ptr, order_ptr, count_ptr, lp_ptr, ent_ptr, lse_ptr, N, V, SPLITS: tl.constexpr,
                    ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Merges each row's SPLITS partial states in split order: log-prob, entropy and lse."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    count = tl.load(count_ptr)
    if start < count:
        offs, row_ok, rows, y, m, s, t, label_z = _row_block(order_ptr, y_ptr, start, count, BLOCK)
        for split in range(0, SPLITS):
            ws = ws_ptr + split * N + offs
            t2 = t
            if ENTROPY:
                t2 = tl.load(ws + 3 * SPLITS * N, mask=row_ok, other=0.0)
            # rows past the count: a finite dummy state (not stored), no 0 / 0 below
            m, s, t = _merge(m, s, t, tl.load(ws, mask=row_ok, other=0.0),
                             tl.load(ws + SPLITS * N, mask=row_ok, other=1.0), t2, ENTROPY)
            label_z += tl.load(ws + 2 * SPLITS * N, mask=row_ok, other=0.0)  # non-zero in one split only
        lse = m + tl.log(s)
        lp = tl.where((y < 0) | (y >= V), float("nan"), label_z - lse)
        tl.store(lp_ptr + rows, lp, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        if ENTROPY:
            tl.store(ent_ptr + rows, tl.log(s) - t / s, mask=row_ok)


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                  stride_h, stride_w, inv_t, H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr,
                  HAS_GENT: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dlogits of the [BLOCK_M, BLOCK_N] tile (fp32, recomputed from hidden and weight); 0 outside."""
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w, inv_t, H,
                     HAS_BIAS, FP32_DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    log_p = tl.where(col_ok[None, :], z - lse[:, None], 0.0)
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        g += g_lp[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g -= g_ent[:, None] * tl.where(p > 0, p * (log_p + ent[:, None]), 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], g * inv_t, 0.0)


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b: fp32 a (a gradient tile) times b in the inputs' dtype, on the tensor cores for
    bf16/fp16 (a rounded to that dtype, as the chunked path's gradient buffer is)."""
    if FP32_DOT:
        return tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                    out_ptr, chunk_start, chunk_rows, col_start, V, stride_h, stride_w, stride_out, inv_t,
                    H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """The gradient of rows ``order[chunk_start : chunk_start + chunk_rows]`` x vocab columns from
    ``col_start`` (a multiple of BLOCK_N) into ``out`` (column 0 = ``col_start``)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + local_cols
    col_ok = cols < V
    offs = chunk_start + local
    in_chunk = local < chunk_rows
    row_ok = in_chunk & (offs < tl.load(count_ptr))  # past the count: ignored rows, zero gradient
    rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
    g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                      stride_h, stride_w, inv_t, H, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT, PRECISION,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + local[:, None] * stride_out + local_cols[None, :], g.to(out_ptr.dtype.element_ty),
             mask=in_chunk[:, None] & col_ok[None, :])


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                        gh_ptr, stride_h, stride_w, stride_gh, inv_t, V: tl.constexpr, H: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                        FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_hidden[rows, h block] = sum over the vocab tiles of dlogits[rows, tile] @ weight[tile, h block]."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H
    count = tl.load(count_ptr)
    if start < count:  # blocks of only ignored rows keep their zero gradient
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < count
        rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols,
                              col_ok, stride_h, stride_w, inv_t, H, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT,
                              PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=col_ok[:, None] & h_ok[None, :],
                        other=0.0)
            acc = _dot(g, w, acc, FP32_DOT, PRECISION)
        tl.store(gh_ptr + rows[:, None] * stride_gh + hs[None, :], acc.to(gh_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                        gw_ptr, gb_ptr, V, stride_h, stride_w, stride_gw, inv_t, H: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                        FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_weight[tile, h block] = sum over the non-ignored row blocks of dlogits[rows, tile].T @
    hidden[rows, h block] (and grad_bias[tile], by the h block 0), in row order: no atomics."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H
    count = tl.load(count_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    g_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = count * 0  # an int64 scalar, like count (a `while`: the count is a runtime bound, see the module doc)
    while start < count:
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < count
        rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
        g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                          stride_h, stride_w, inv_t, H, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT, PRECISION,
                          BLOCK_M, BLOCK_N, BLOCK_K)
        x = tl.load(h_ptr + rows[:, None] * stride_h + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        acc = _dot(tl.trans(g), x, acc, FP32_DOT, PRECISION)
        if HAS_BIAS:
            g_bias += tl.sum(g, 0)
        start += BLOCK_M
    tl.store(gw_ptr + cols[:, None] * stride_gw + hs[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=col_ok[:, None] & h_ok[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(gb_ptr + cols, g_bias.to(gb_ptr.dtype.element_ty), mask=col_ok)


COMBINE_BLOCK = 128  # rows per program of _combine_kernel


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the tiles are multiplied in fp32: for fp32 inputs, and for bf16 under TRITON_INTERPRET=1,
    whose numpy tl.dot mishandles bf16 operands (on a GPU bf16/fp16 tiles go to the tensor cores)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _launch(dtype: torch.dtype, tiles: Tiles, fused: bool = False) -> dict:
    """The constexpr tile arguments and launch parameters shared by the kernels."""
    meta = dict(FP32_DOT=_fp32_dot(dtype), PRECISION=FP32_PRECISION, BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N,
                BLOCK_K=tiles.BLOCK_K, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if fused:
        meta["BLOCK_H"] = tiles.BLOCK_H
    return meta


def _order(labels: torch.Tensor, ignore_index: int):
    """Row indices with the non-ignored rows first (stable), and their count, both on the device."""
    ignored = labels == ignore_index
    return torch.argsort(ignored.to(torch.int8), stable=True), (~ignored).sum().reshape(1)


def linear_logprobs_forward(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy):
    """``(logprobs [N], entropy [N] or [0], lse [N])`` fp32; ignored rows 0."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp, lse = torch.zeros(n, **f32), torch.zeros(n, **f32)
    ent = torch.zeros(n if compute_entropy else 0, **f32)
    if n == 0:
        return lp, ent, lse
    cfg = _config(vocab, hidden.dtype)
    order, count = _order(labels, ignore_index)
    ws = torch.empty(4 if compute_entropy else 3, cfg.splits, n, **f32)  # (m, s, label logit[, t]) per split
    _forward_kernel[(triton.cdiv(n, cfg.tiles.BLOCK_M), cfg.splits)](
        hidden, weight, bias if bias is not None else weight, labels, order, count, ws,
        n, vocab, hidden.stride(0), weight.stride(0), 1.0 / temperature, H=h, SPAN=cfg.span, SPLITS=cfg.splits,
        HAS_BIAS=bias is not None, ENTROPY=compute_entropy, **_launch(hidden.dtype, cfg.tiles))
    _combine_kernel[(triton.cdiv(n, COMBINE_BLOCK),)](ws, labels, order, count, lp, ent, lse, n, vocab,
                                                      SPLITS=cfg.splits, ENTROPY=compute_entropy, BLOCK=COMBINE_BLOCK)
    return lp, ent, lse


def _backward_blocks(n: int, vocab: int, element_size: int, chunk_size: int, tiles: Tiles) -> tuple[int, int]:
    """(rows, columns) of the default backward's gradient buffer. ``chunk_size`` > 0: that many rows
    (rounded up to the chunked path's tile) by the whole vocabulary. Otherwise a block of
    :data:`fastrl.linear_logprobs.CHUNK_BYTES` about as tall as it is wide: the gradient of the
    weight is re-read and re-written once per row block and the gradient of the hidden states once
    per vocab block, so a square block moves the fewest accumulator bytes (one block of rows up to
    ~5,800 bf16 rows at 64 MiB, every vocab block then a single matmul over all the rows)."""
    if chunk_size > 0:
        return min(n, _chunk_rows(chunk_size, vocab, element_size)), vocab
    budget = max(1, _chunked.CHUNK_BYTES // element_size)  # elements
    rows = min(n, max(tiles.BLOCK_M, math.isqrt(budget) // tiles.BLOCK_M * tiles.BLOCK_M))
    cols = max(tiles.BLOCK_N, budget // rows // tiles.BLOCK_N * tiles.BLOCK_N)
    return rows, min(cols, triton.cdiv(vocab, tiles.BLOCK_N) * tiles.BLOCK_N)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b``. For an fp32 ``out`` and half ``a``, ``b`` the product is
    accumulated in fp32 by the matmul itself (cuBLAS ``out_dtype``), so a sum over blocks is never
    rounded to the half dtype; off CUDA (the Triton interpreter) in fp32 arithmetic."""
    if out.dtype == a.dtype:
        out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    elif out.device.type != "cuda":
        out.addmm_(a.float(), b.float()) if accumulate else torch.mm(a.float(), b.float(), out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def linear_logprobs_backward(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy,
                             temperature, ignore_index, chunk_size=0):
    """``(grad_hidden, grad_weight, grad_bias or [0])`` from the forward's lse (and entropy).

    Blocks of (rows in ``order``) x (vocab columns), :func:`_backward_blocks`: per block the gradient
    tile ``G`` is written by ``_dlogits_kernel``, then ``grad_hidden[rows] += G @ weight[cols]`` and
    ``grad_weight[cols] += G.T @ hidden[rows]``, accumulated in fp32 for half inputs, in a fixed
    block order."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    acc_dtype = torch.float32 if half else hidden.dtype
    tiles = _config(vocab, hidden.dtype).tiles
    grad_b = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=weight.device)
    if n == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), grad_b.to(bias.dtype) if bias is not None else grad_b
    order, count = _order(labels, ignore_index)
    rows, cols = _backward_blocks(n, vocab, hidden.element_size(), chunk_size, tiles)
    x = hidden.index_select(0, order)  # the rows in `order` (ignored rows last: zero gradient)
    acc_h = torch.empty(n, h, dtype=acc_dtype, device=hidden.device)
    # one row block: each vocab block of grad_weight is one matmul, written once in the weight's dtype
    acc_w = torch.empty(vocab, h, dtype=acc_dtype if rows < n else weight.dtype, device=weight.device)
    buf = torch.empty(rows, cols, dtype=hidden.dtype, device=hidden.device)
    dummy = lse
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        for c0 in range(0, vocab, cols):
            cc = min(cols, vocab - c0)
            g = buf[:rc, :cc]
            grid = (triton.cdiv(rc, tiles.BLOCK_M), triton.cdiv(cc, tiles.BLOCK_N))
            _dlogits_kernel[grid](
                hidden, weight, bias if bias is not None else weight, labels, order, count, lse,
                entropy if entropy is not None else dummy,
                grad_logprobs.contiguous() if grad_logprobs is not None else dummy,
                grad_entropy.contiguous() if grad_entropy is not None else dummy,
                g, r0, rc, c0, vocab, hidden.stride(0), weight.stride(0), g.stride(0), 1.0 / temperature, H=h,
                HAS_BIAS=bias is not None, HAS_GLP=grad_logprobs is not None, HAS_GENT=grad_entropy is not None,
                **_launch(hidden.dtype, tiles))
            _mm_into(acc_h[r0:r0 + rc], g, weight[c0:c0 + cc], accumulate=c0 > 0)
            _mm_into(acc_w[c0:c0 + cc], g.t(), x[r0:r0 + rc], accumulate=r0 > 0)
            if bias is not None:
                grad_b[c0:c0 + cc].add_(g.sum(0, dtype=torch.float32))
    grad_h = torch.empty_like(hidden).index_copy_(0, order, acc_h.to(hidden.dtype))
    return grad_h, acc_w.to(weight.dtype), grad_b.to(bias.dtype) if bias is not None else grad_b


def linear_logprobs_backward_fused(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy,
                                   temperature, ignore_index):
    """``(grad_hidden, grad_weight, grad_bias or [0])`` with no ``[chunk, V]`` buffer: one kernel per
    output, each recomputing its logits tiles (``ceil(H / BLOCK_H)`` times over)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty_like(bias) if bias is not None else torch.zeros(0, dtype=torch.float32, device=weight.device)
    tiles = FUSED_TILES.get(_key(hidden.dtype), TILES[_key(hidden.dtype)])
    order, count = _order(labels, ignore_index)
    args = (hidden, weight, bias if bias is not None else weight, labels, order, count, lse,
            entropy if entropy is not None else lse,
            grad_logprobs.contiguous() if grad_logprobs is not None else lse,
            grad_entropy.contiguous() if grad_entropy is not None else lse)
    meta = dict(H=h, HAS_BIAS=bias is not None, HAS_GLP=grad_logprobs is not None,
                HAS_GENT=grad_entropy is not None, **_launch(hidden.dtype, tiles, fused=True))
    if n:
        _grad_hidden_kernel[(triton.cdiv(n, tiles.BLOCK_M), triton.cdiv(h, tiles.BLOCK_H))](
            *args, grad_h, hidden.stride(0), weight.stride(0), grad_h.stride(0), 1.0 / temperature, V=vocab, **meta)
    _grad_weight_kernel[(triton.cdiv(vocab, tiles.BLOCK_N), triton.cdiv(h, tiles.BLOCK_H))](
        *args, grad_w, grad_b, vocab, hidden.stride(0), weight.stride(0), grad_w.stride(0), 1.0 / temperature,
        **meta)
    return grad_h, grad_w, grad_b


__all__ = ["linear_logprobs_forward", "linear_logprobs_backward", "linear_logprobs_backward_fused"]
