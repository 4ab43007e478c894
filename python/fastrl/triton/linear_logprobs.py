"""Triton kernels of :func:`fastrl.linear_logprobs`: ``hidden @ weight.T`` in vocab tiles with ``tl.dot``
(tensor cores for bf16/fp16) and the softmax reductions as the tiles' epilogue.

Forward (``_forward_kernel``): one program per block of ``BLOCK_M`` rows. For each vocab tile of
``BLOCK_N`` columns it accumulates the logits tile over ``H`` in ``BLOCK_K`` steps (fp32
accumulator), scales by ``1/T``, and folds it into the rows' online softmax state
``(m, s = sum exp(z - m), t = sum exp(z - m)(z - m))`` plus the label's logit. ``H`` and ``V`` tails
are masked (any H, any V: the padded columns are -inf, so they never reach the logsumexp).
Rows are visited in ``order`` (the non-ignored rows first, computed on the device) and a program
whose block lies past the count of non-ignored rows exits at once: ignored rows are skipped
without a host sync. Extra memory: the fp32 outputs.

Backward (default): the same rows in chunks of ``chunk`` rows; ``_dlogits_kernel`` recomputes each
``[BLOCK_M, BLOCK_N]`` logits tile with ``tl.dot`` and writes its gradient
``dL/dlogits = (g_lp ([j == y] - p_j) - g_ent p_j (log p_j + H)) / T`` into a ``[chunk, V]`` buffer
(input dtype), then two matmuls give ``grad_hidden`` rows and accumulate ``grad_weight`` (and the
bias' column sums) over the chunks, in a fixed order: deterministic, no atomics. Extra memory:
O(chunk x V) for the buffer (``fastrl.linear_logprobs.CHUNK_BYTES``), plus an fp32 ``[V, H]``
accumulator for half inputs. Ignored rows have zero gradient rows (they still take part in the
chunk matmuls: skipping them there would need the count on the host). ``grad_hidden`` comes from a
cuBLAS matmul whose height is the chunk's, so it is not guaranteed batch invariant.

Backward, fully fused (``linear_logprobs_backward_fused``, ``FASTRL_LINEAR_LOGPROBS_BACKWARD=fused``):
one kernel per output and no buffer at all. ``_grad_hidden_kernel``: one program per (block of
``BLOCK_M`` rows, block of ``BLOCK_H`` hidden columns) walks the vocab tiles, recomputes each
gradient tile and accumulates ``dlogits_tile @ weight[tile, h block]``: a row's ``grad_hidden`` is
batch invariant. ``_grad_weight_kernel``: one program per (vocab tile, ``BLOCK_H`` block) walks the
non-ignored row blocks in order and accumulates ``dlogits_tile.T @ hidden[rows, h block]`` (and the
bias' sums): deterministic, no atomics, and ignored rows cost nothing. Both recompute the logits
tiles once per ``BLOCK_H`` block, i.e. ``ceil(H / BLOCK_H)`` times the forward's matmul each: the
price of holding no ``[*, V]`` buffer. Extra memory: none beyond the gradients.

Untested on a GPU here: CI runs these kernels under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastrl.linear_logprobs import _chunk_rows

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32
BLOCK_H = 64  # columns of hidden per program of the fused backward (its logits recompute factor: H / BLOCK_H)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) / T as fp32 [BLOCK_M, BLOCK_N]; -inf past V."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if FP32_DOT:  # fp32 inputs: no TF32 rounding; bf16 under the interpreter: upcast (see _fp32_dot)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lp_ptr, ent_ptr, lse_ptr,
                    V, H, stride_h, stride_w, inv_t,
                    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    count = tl.load(count_ptr)
    if start < count:  # blocks of only ignored rows do nothing
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < count
        rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        t = tl.zeros([BLOCK_M], dtype=tl.float32)
        label_z = tl.zeros([BLOCK_M], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, inv_t,
                             HAS_BIAS, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            m_new = tl.maximum(m, tl.max(z, 1))
            scale = tl.exp(m - m_new)
            d = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # padded columns: e = 0, d = 0
            e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
            if ENTROPY:  # t rescaled to the new max (fastrl/logprobs.h rescale), then this tile's terms
                dm = tl.where(s > 0, m - m_new, 0.0)
                t = scale * (t + dm * s) + tl.sum(e * d, 1)
            s = s * scale + tl.sum(e, 1)
            m = m_new
            label_z += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        lse = m + tl.log(s)
        lp = tl.where((y < 0) | (y >= V), float("nan"), label_z - lse)
        tl.store(lp_ptr + rows, lp, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        if ENTROPY:
            tl.store(ent_ptr + rows, tl.log(s) - t / s, mask=row_ok)


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                  H, stride_h, stride_w, inv_t, HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr,
                  HAS_GENT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """dL/dlogits of the [BLOCK_M, BLOCK_N] tile (fp32, recomputed from hidden and weight); 0 outside."""
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, inv_t,
                     HAS_BIAS, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
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
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b: fp32 a (a gradient tile) times b in the inputs' dtype, on the tensor cores for
    bf16/fp16 (a rounded to that dtype, as the chunked path's gradient buffer is)."""
    if FP32_DOT:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                    out_ptr, chunk_start, chunk_rows, V, H, stride_h, stride_w, stride_out, inv_t,
                    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, FP32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    offs = chunk_start + local
    in_chunk = local < chunk_rows
    row_ok = in_chunk & (offs < tl.load(count_ptr))  # past the count: ignored rows, zero gradient
    rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
    g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                      H, stride_h, stride_w, inv_t, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + local[:, None] * stride_out + cols[None, :], g.to(out_ptr.dtype.element_ty),
             mask=in_chunk[:, None] & col_ok[None, :])


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                        gh_ptr, V, H, stride_h, stride_w, stride_gh, inv_t,
                        HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_H: tl.constexpr):
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
                              col_ok, H, stride_h, stride_w, inv_t, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT,
                              BLOCK_M, BLOCK_N, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=col_ok[:, None] & h_ok[None, :],
                        other=0.0)
            acc = _dot(g, w, acc, FP32_DOT)
        tl.store(gh_ptr + rows[:, None] * stride_gh + hs[None, :], acc.to(gh_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, b_ptr, y_ptr, order_ptr, count_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                        gw_ptr, gb_ptr, V, H, stride_h, stride_w, stride_gw, inv_t,
                        HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """grad_weight[tile, h block] = sum over the non-ignored row blocks of dlogits[rows, tile].T @
    hidden[rows, h block] (and grad_bias[tile], by the h block 0), in row order: no atomics."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < H
    count = tl.load(count_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    g_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, count, BLOCK_M):
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < count
        rows = tl.load(order_ptr + offs, mask=row_ok, other=0)
        g = _dlogits_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                          H, stride_h, stride_w, inv_t, HAS_BIAS, HAS_GLP, HAS_GENT, FP32_DOT,
                          BLOCK_M, BLOCK_N, BLOCK_K)
        x = tl.load(h_ptr + rows[:, None] * stride_h + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        acc = _dot(tl.trans(g), x, acc, FP32_DOT)
        if HAS_BIAS:
            g_bias += tl.sum(g, 0)
    tl.store(gw_ptr + cols[:, None] * stride_gw + hs[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=col_ok[:, None] & h_ok[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(gb_ptr + cols, g_bias.to(gb_ptr.dtype.element_ty), mask=col_ok)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the tiles are multiplied in fp32: for fp32 inputs, and for bf16 under TRITON_INTERPRET=1,
    whose numpy tl.dot mishandles bf16 operands (on a GPU bf16/fp16 tiles go to the tensor cores)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


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
    order, count = _order(labels, ignore_index)
    _forward_kernel[(triton.cdiv(n, BLOCK_M),)](
        hidden, weight, bias if bias is not None else weight, labels, order, count, lp, ent, lse,
        vocab, h, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, ENTROPY=compute_entropy, FP32_DOT=_fp32_dot(hidden.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return lp, ent, lse


def linear_logprobs_backward(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy,
                             temperature, ignore_index, chunk_size=0):
    """``(grad_hidden, grad_weight, grad_bias or [0])`` from the forward's lse (and entropy)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32 if half else weight.dtype, device=weight.device)
    grad_b = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=weight.device)
    order, count = _order(labels, ignore_index)
    step = min(n, _chunk_rows(chunk_size, vocab, hidden.element_size()))
    buf = torch.empty(step, vocab, dtype=hidden.dtype, device=hidden.device) if n else None
    dummy = lse
    for start in range(0, n, step):
        rows = order[start:start + step]
        g = buf[:rows.numel()]
        grid = (triton.cdiv(rows.numel(), BLOCK_M), triton.cdiv(vocab, BLOCK_N))
        _dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else weight, labels, order, count, lse,
            entropy if entropy is not None else dummy,
            grad_logprobs.contiguous() if grad_logprobs is not None else dummy,
            grad_entropy.contiguous() if grad_entropy is not None else dummy,
            g, start, rows.numel(), vocab, h, hidden.stride(0), weight.stride(0), g.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_GLP=grad_logprobs is not None, HAS_GENT=grad_entropy is not None,
            FP32_DOT=_fp32_dot(hidden.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        x = hidden.index_select(0, rows)
        grad_h.index_copy_(0, rows, torch.mm(g, weight))
        grad_w.add_(torch.mm(g.t(), x)) if half else grad_w.addmm_(g.t(), x)
        if bias is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))
    return grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype) if bias is not None else grad_b


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
    order, count = _order(labels, ignore_index)
    args = (hidden, weight, bias if bias is not None else weight, labels, order, count, lse,
            entropy if entropy is not None else lse,
            grad_logprobs.contiguous() if grad_logprobs is not None else lse,
            grad_entropy.contiguous() if grad_entropy is not None else lse)
    meta = dict(HAS_BIAS=bias is not None, HAS_GLP=grad_logprobs is not None, HAS_GENT=grad_entropy is not None,
                FP32_DOT=_fp32_dot(hidden.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H)
    if n:
        _grad_hidden_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(h, BLOCK_H))](
            *args, grad_h, vocab, h, hidden.stride(0), weight.stride(0), grad_h.stride(0), 1.0 / temperature, **meta)
    _grad_weight_kernel[(triton.cdiv(vocab, BLOCK_N), triton.cdiv(h, BLOCK_H))](
        *args, grad_w, grad_b, vocab, h, hidden.stride(0), weight.stride(0), grad_w.stride(0), 1.0 / temperature,
        **meta)
    return grad_h, grad_w, grad_b


__all__ = ["linear_logprobs_forward", "linear_logprobs_backward", "linear_logprobs_backward_fused"]
