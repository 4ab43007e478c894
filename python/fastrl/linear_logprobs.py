"""Log-probs (and entropy) of labels straight from hidden states: ``hidden @ weight.T (+ bias)``
without ever materializing the ``[N, V]`` logits.

Two implementations behind one function, :func:`linear_logprobs`:

* **chunked** (CPU, and CUDA without Triton): rows are processed a chunk at a time; a chunk's
  logits ``[chunk, V]`` are computed in the input dtype by ``torch.mm`` on fixed ``[tile, H]`` row
  tiles (:func:`_row_tile`: 16 to 256 rows, from V and the dtype only; the last tile padded with zero
  rows), and the compiled row kernels of :func:`fastrl.logprobs` (``fastrl::logprobs`` /
  ``fastrl::logprobs_backward_``) do the softmax part. The backward recomputes each chunk's logits
  and overwrites them with their gradient, then per tile ``grad_hidden = G @ W`` and
  ``grad_weight += G.T @ hidden``. Extra memory: O(chunk x V) (one chunk's logits, at least one
  tile; for bf16/fp16 inputs the backward also holds a tile's gradient in fp32 and accumulates
  ``grad_weight`` in an fp32 ``[V, H]`` buffer). The chunk size comes from a memory budget
  (:data:`CHUNK_BYTES`, 64 MiB of chunk logits).
  **Batch invariant**: every matmul has the same shape (so the same BLAS kernel and blocking)
  whatever the batch and the chunk size, so a row's log-prob, entropy and ``grad_hidden`` are
  bitwise the same alone or in any batch, and ``grad_weight`` / ``grad_bias`` (sums over the rows,
  tile by tile in row order) do not depend on the chunk size. The price: the padding of the last
  tile (up to 255 rows of matmul per call, which dominates for small batches) and, in the
  backward, tiles smaller than the chunk (measured: benchmarks/bench_logprobs.py).
* **Triton** (CUDA tensors, when Triton is installed): :mod:`fastrl.triton.linear_logprobs`, vocab tiles
  with ``tl.dot`` and an online logsumexp / label / entropy epilogue; no ``[N, V]`` either. The forward
  runs on a grid of (row tiles, vocab splits), so one row tile fills the GPU; each program writes its
  range's partial softmax state to an fp32 ``[3 or 4, splits, N]`` workspace (up to 2 KiB per row)
  and a second kernel merges the splits in a fixed order. Tiles and splits depend on V and the dtype
  only, so the forward is batch invariant too. fp32 tiles are multiplied with fp32 FMAs, or with
  ``FASTRL_LINEAR_LOGPROBS_FP32=tf32x3`` as three TF32 tensor-core products (about fp32 accuracy,
  ~2.8x faster on an H100). Its backward uses a ``[chunk, V]``
  gradient buffer and two matmuls per chunk; ``FASTRL_LINEAR_LOGPROBS_BACKWARD=fused`` selects the
  fully fused one instead (one kernel per output, no buffer, batch-invariant ``grad_hidden``; it
  recomputes the logits ``ceil(H / 64)`` times: on an H100, fp32 N = 2,048, V = 32,768, H = 256,
  24.5 ms against 3.4 ms for the default backward).

Both are registered as the torch.library custom ops ``fastrl::linear_logprobs`` and
``fastrl::linear_logprobs_backward`` with a fake kernel and autograd, so they compose with
autograd and ``torch.compile``.
"""
from __future__ import annotations

import os

import torch

from fastrl import _extension

__all__ = ["linear_logprobs", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20
"""Memory budget of the chunked implementation: bytes of one chunk's ``[chunk, V]`` logits (by
default), and what fixes its matmul tile (:func:`_row_tile`)."""


def _row_tile(vocab: int, element_size: int) -> int:
    """Rows of every matmul of the chunked implementation: as many as fit :data:`CHUNK_BYTES` of
    logits, in multiples of 16, between 16 and 256 (larger tiles re-read the weight less often).

    It depends on V and the dtype only, never on the batch or the chunk size: every product is
    ``[tile, H] @ [H, V]`` (the last tile padded with zero rows), so BLAS runs the same kernel with
    the same blocking for every tile and a row's logits do not depend on the other rows (a product
    of another height may take another kernel: one row takes BLAS's gemv path, with another
    summation order)."""
    rows = CHUNK_BYTES // max(1, vocab * element_size)
    return max(16, min(256, rows) // 16 * 16)


def _chunk_rows(chunk_size: int, vocab: int, element_size: int) -> int:
    """Rows per chunk, a multiple of the tile: ``chunk_size`` rounded up, or (0) as many tiles as fit
    :data:`CHUNK_BYTES` of logits (at least one)."""
    tile = _row_tile(vocab, element_size)
    if chunk_size > 0:
        return -(-chunk_size // tile) * tile
    return max(1, CHUNK_BYTES // max(1, vocab * element_size * tile)) * tile


def _use_triton(hidden: torch.Tensor) -> bool:
    """Triton for CUDA tensors when it is importable (``FASTRL_LINEAR_LOGPROBS=chunked`` opts out)."""
    if hidden.device.type != "cuda" or os.environ.get("FASTRL_LINEAR_LOGPROBS", "") == "chunked":
        return False
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # float64: the chunked path
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _tile_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` of one ``[tile, H]`` tile, written into ``out [tile, V]`` (a
    slice of the reused chunk buffer: a fresh allocation per chunk would page-fault its O(chunk x V)
    bytes every time, ~40% of the matmul time)."""
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


class _Chunks:
    """The non-ignored rows in chunks, and the buffers every chunk reuses: ``x [chunk, H]`` (the
    chunk's hidden rows, gathered; zero padding after the last row) and ``logits [chunk, V]``.

    ``chunk`` is a multiple of the matmul tile (:func:`_row_tile`). Ignored rows never reach the
    matmul (when none is ignored the chunks are slices, otherwise index tensors)."""

    def __init__(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab: int, chunk_size: int):
        self.tile = _row_tile(vocab, hidden.element_size())
        step = _chunk_rows(chunk_size, vocab, hidden.element_size())
        keep = (labels != ignore_index).nonzero().squeeze(1)
        if keep.numel() == labels.numel():
            self.rows = [slice(start, start + step) for start in range(0, keep.numel(), step)]
        else:
            self.rows = [keep[start:start + step] for start in range(0, keep.numel(), step)]
        size = min(step, -(-keep.numel() // self.tile) * self.tile)
        self.x = hidden.new_zeros(size, hidden.shape[1])
        self.logits = hidden.new_empty(size, vocab)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: _Chunks):
    """The logits of the chunk's rows ``h [count, H]``, one tile's matmul at a time: ``(x, logits)``,
    views ``[padded, H]`` and ``[padded, V]`` of the chunk buffers (``padded`` = ``count`` rounded up to
    the tile; the rows past ``count`` are zero padding and its logits)."""
    count, tile = h.shape[0], chunks.tile
    padded = -(-count // tile) * tile
    x, logits = chunks.x[:padded], chunks.logits[:padded]
    x[:count] = h
    x[count:].zero_()
    for t in range(0, padded, tile):
        _tile_logits(x[t:t + tile], weight, bias, logits[t:t + tile])
    return x, logits


def _check_labels_cpu(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cpu" and bool(bad.any()):  # on CUDA: no host sync, NaN (as fastrl.logprobs)
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"fastrl.linear_logprobs: `labels` must lie in [0, vocab={vocab}) or equal "
                           f"ignore_index={ignore_index}, got labels[{i}] = {int(labels[i])} (flattened position)")


# --------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastrl::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        temperature: float, ignore_index: int, compute_entropy: bool,
                        chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [N], entropy [N] or [0], lse [N])`` fp32 of ``hidden[N, H] @ weight[V, H].T (+ bias)``."""
    if _use_triton(hidden):
        from fastrl.triton.linear_logprobs import linear_logprobs_forward
        return linear_logprobs_forward(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy)
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp, lse = torch.zeros(n, **f32), torch.zeros(n, **f32)
    ent = torch.zeros(n if compute_entropy else 0, **f32)
    _check_labels_cpu(labels, vocab, ignore_index)
    chunks = _Chunks(hidden, labels, ignore_index, vocab, chunk_size)
    for rows in chunks.rows:
        y = labels[rows]
        _, logits = _chunk_logits(hidden[rows], weight, bias, chunks)
        lp[rows], c_ent, lse[rows] = torch.ops.fastrl.logprobs(logits[:y.shape[0]], y, temperature, ignore_index,
                                                               compute_entropy)
        if compute_entropy:
            ent[rows] = c_ent
    return lp, ent, lse


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_size):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n if compute_entropy else 0, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("fastrl::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                                 grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                                 temperature: float, ignore_index: int,
                                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0])`` in the inputs' dtypes."""
    if _use_triton(hidden):
        from fastrl.triton import linear_logprobs as kernels
        if os.environ.get("FASTRL_LINEAR_LOGPROBS_BACKWARD", "") == "fused":
            return kernels.linear_logprobs_backward_fused(hidden, weight, bias, labels, lse, entropy, grad_logprobs,
                                                          grad_entropy, temperature, ignore_index)
        return kernels.linear_logprobs_backward(hidden, weight, bias, labels, lse, entropy, grad_logprobs,
                                                grad_entropy, temperature, ignore_index, chunk_size)
    vocab = weight.shape[0]
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32 if half else weight.dtype, device=weight.device)
    grad_b = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=weight.device)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    chunks = _Chunks(hidden, labels, ignore_index, vocab, chunk_size)
    grad_x = torch.empty_like(chunks.x)
    for rows in chunks.rows:
        y = labels[rows]
        count = y.shape[0]
        x, g = _chunk_logits(hidden[rows], weight, bias, chunks)  # recomputed, then overwritten by its gradient
        torch.ops.fastrl.logprobs_backward_(g[:count], y, lse[rows], pick(entropy), pick(grad_logprobs),
                                            pick(grad_entropy), None, temperature, ignore_index)
        g[count:].zero_()  # padding rows: no gradient
        # per tile, like the forward: a row's grad_hidden is batch invariant, and grad_weight / grad_bias
        # sum the tiles in row order whatever the chunk size
        tile = chunks.tile
        for t in range(0, g.shape[0], tile):
            g_t, x_t = g[t:t + tile], x[t:t + tile]
            torch.mm(g_t, weight, out=grad_x[t:t + tile])
            if half:  # fp32 accumulation of grad_weight over the tiles
                g_t, x_t = g_t.float(), x_t.float()
            grad_w.addmm_(g_t.t(), x_t)
            if bias is not None:
                grad_b.add_(g_t.sum(0, dtype=torch.float32))
        grad_h[rows] = grad_x[:count]
    return grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype) if bias is not None else grad_b


@_linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, chunk_size):
    grad_b = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0, dtype=torch.float32)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_b


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if compute_entropy else None)
    ctx.args = (temperature, ignore_index, chunk_size)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_lp, grad_ent, grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    if entropy is None:
        grad_ent = None
    grad_h, grad_w, grad_b = _linear_logprobs_backward_op(hidden, weight, bias, labels, lse, entropy, grad_lp,
                                                          grad_ent, *ctx.args)
    return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None, None


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public API


def _check(hidden, weight, labels, bias, temperature):
    name = "fastrl.linear_logprobs"
    for arg, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: `{arg}` must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{name}: `hidden` must be [..., H] and `weight` [V, H], got shapes {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: `weight` must be [V, H={hidden.shape[-1]}] to match `hidden`, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{name}: `weight` must have a vocabulary dimension V >= 1, got {tuple(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"{name}: `hidden` must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for arg, t in others:
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: `{arg}` must have `hidden`'s dtype {hidden.dtype}, got {t.dtype}")
    for arg, t in others + [("labels", labels)]:
        if t.device != hidden.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device} but `hidden` is on {hidden.device}; move both to "
                             f"the same device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: `bias` must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: `labels` must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: `labels` must be an integer tensor, got {labels.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (0 < temperature < float("inf")):
        raise ValueError(f"{name}: `temperature` must be a finite number > 0, got {temperature!r}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                    ignore_index: int = -100, chunk_size: int | None = None):
    """Log-probability of each label under ``softmax((hidden @ weight.T + bias) / T)``, without the logits.

    With ``z = (hidden @ weight.T + bias) / T`` per row (``V`` entries, never stored whole)::

        logprob = z[label] - logsumexp(z)        entropy = logsumexp(z) - sum_j softmax(z)_j z_j

    Differentiable in ``hidden``, ``weight`` and ``bias`` (entropy gradient included):
    ``dL/dz_j = g_lp ([j == label] - p_j) - g_ent p_j (log p_j + H)``, ``dL/dlogits = dL/dz / T``,
    ``grad_hidden = dL/dlogits @ weight``, ``grad_weight = dL/dlogits.T @ hidden``.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 is accepted; the softmax part is fp32).
        weight: ``[V, H]`` (the LM head), ``hidden``'s dtype and device. No divisibility needed.
        labels: integer ``[...]`` = ``hidden.shape[:-1]``. Positions with ``ignore_index`` are dropped
            before the matmul: log-prob 0, entropy 0, no gradient. Any other label outside ``[0, V)``
            raises on the CPU (flattened position in the message); on CUDA it gives NaN (no host sync).
        bias: optional ``[V]``.
        temperature: ``T > 0``.
        return_entropy: also return the entropy of each position's distribution.
        chunk_size: rows per chunk of the chunked (CPU) implementation, rounded up to a multiple of
            the matmul tile; default: as many tiles as fit :data:`CHUNK_BYTES` of chunk logits.
            Extra memory O(chunk_size x V). It does not change the results (bitwise).

    Returns:
        ``logprobs`` float32 ``[...]``, or ``(logprobs, entropy)``.

    The chunk logits are computed in the input dtype (as the model's LM head would); the softmax
    reductions are fp32. Batch invariant: a row's log-prob and entropy (and its gradient wrt its
    hidden state, on the CPU or with the fused Triton backward) are bitwise the same whatever other
    rows share the call and whatever the chunk size (for a given thread count, device and
    implementation). On CUDA, Triton kernels are used when
    installed (tiles in fp32 accumulators).

    >>> hidden, weight = torch.randn(2, 3, 8), torch.randn(50, 8)
    >>> labels = torch.tensor([[1, 2, -100], [4, 5, 6]])
    >>> lp, ent = fastrl.linear_logprobs(hidden, weight, labels, return_entropy=True)
    >>> lp.shape, bool(lp[0, 2] == 0)
    (torch.Size([2, 3]), True)
    """
    _check(hidden, weight, labels, bias, temperature)
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).long()
    if _extension.use_reference():
        from fastrl.reference.logprobs import linear_logprobs as ref
        lp, ent = (t.float() for t in ref(flat_h, weight, flat_y, bias=bias, temperature=temperature,
                                          ignore_index=ignore_index))
    else:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"fastrl.linear_logprobs: `chunk_size` must be a positive int or None, got {chunk_size!r}")
        lp, ent, _ = _linear_logprobs_op(flat_h, weight.contiguous(), bias, flat_y, float(temperature),
                                         int(ignore_index), bool(return_entropy), int(chunk_size or 0))
    lp = lp.view(lead)
    return (lp, ent.view(lead)) if return_entropy else lp
