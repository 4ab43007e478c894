"""Log-probs (and entropy) of labels straight from hidden states: ``hidden @ weight.T (+ bias)``
without ever materializing the ``[N, V]`` logits.

Two implementations behind one function, :func:`linear_logprobs`:

* **chunked** (CPU, and CUDA without Triton): rows are processed ``chunk_size`` at a time; a chunk's
  logits ``[chunk, V]`` are computed with ``torch.mm`` in the input dtype, and the compiled row
  kernels of :func:`fastrl.logprobs` (``fastrl::logprobs`` / ``fastrl::logprobs_backward_``) do the
  softmax part. The backward recomputes each chunk's logits and overwrites them with their
  gradient, then ``grad_hidden = G @ W`` and ``grad_weight += G.T @ hidden``. Extra memory:
  O(chunk x V) (one chunk's logits; for bf16/fp16 inputs the backward also holds the chunk's
  gradient in fp32 and accumulates ``grad_weight`` in an fp32 ``[V, H]`` buffer).
  The chunk size comes from a memory budget (:data:`CHUNK_BYTES`, 64 MiB of chunk logits).
* **Triton** (CUDA tensors, when Triton is installed): :mod:`fastrl.triton.linear_logprobs`, vocab tiles
  with ``tl.dot`` and an online logsumexp / label / entropy epilogue; no ``[N, V]`` either.

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
"""Default memory budget of the chunked implementation: bytes of one chunk's ``[chunk, V]`` logits."""


def _chunk_rows(chunk_size: int, vocab: int, element_size: int) -> int:
    if chunk_size > 0:
        return chunk_size
    return max(1, CHUNK_BYTES // max(1, vocab * element_size))


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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T (+ bias)`` written into the first rows of the reused chunk buffer ``buf`` (a fresh
    allocation per chunk would page-fault its O(chunk x V) bytes every time: ~40% of the matmul time)."""
    out = buf[:h.shape[0]]
    return torch.mm(h, weight.t(), out=out) if bias is None else torch.addmm(bias, h, weight.t(), out=out)


def _chunk_buffer(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab: int, chunk_size: int):
    """The row chunks (see _row_chunks) and one ``[chunk, V]`` buffer for their logits."""
    step = _chunk_rows(chunk_size, vocab, hidden.element_size())
    chunks = _row_chunks(labels, ignore_index, step)
    rows = min(step, hidden.shape[0])
    return chunks, torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)


def _row_chunks(labels: torch.Tensor, ignore_index: int, step: int):
    """The non-ignored rows in chunks of ``step``: slices when no row is ignored (views, no copy), else
    index tensors (the ignored rows never reach the matmul)."""
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() == labels.numel():
        return [slice(start, start + step) for start in range(0, keep.numel(), step)]
    return [keep[start:start + step] for start in range(0, keep.numel(), step)]


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
    chunks, buf = _chunk_buffer(hidden, labels, ignore_index, vocab, chunk_size)
    for rows in chunks:
        logits = _chunk_logits(hidden[rows], weight, bias, buf)
        lp[rows], c_ent, lse[rows] = torch.ops.fastrl.logprobs(logits, labels[rows], temperature, ignore_index,
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
        from fastrl.triton.linear_logprobs import linear_logprobs_backward
        return linear_logprobs_backward(hidden, weight, bias, labels, lse, entropy, grad_logprobs, grad_entropy,
                                        temperature, ignore_index, chunk_size)
    vocab = weight.shape[0]
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32 if half else weight.dtype, device=weight.device)
    grad_b = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=weight.device)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    chunks, buf = _chunk_buffer(hidden, labels, ignore_index, vocab, chunk_size)
    for rows in chunks:
        h = hidden[rows]
        g = _chunk_logits(h, weight, bias, buf)  # recomputed, then overwritten by its own gradient
        torch.ops.fastrl.logprobs_backward_(g, labels[rows], lse[rows], pick(entropy), pick(grad_logprobs),
                                            pick(grad_entropy), None, temperature, ignore_index)
        grad_h[rows] = torch.mm(g, weight)
        if half:  # fp32 accumulation of grad_weight over the chunks
            g = g.float()
            h = h.float()
        grad_w.addmm_(g.t(), h)
        if bias is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))
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
        chunk_size: rows per chunk of the chunked (CPU) implementation; default: as many as fit
            :data:`CHUNK_BYTES` of chunk logits. Extra memory O(chunk_size x V).

    Returns:
        ``logprobs`` float32 ``[...]``, or ``(logprobs, entropy)``.

    The chunk logits are computed in the input dtype (as the model's LM head would); the softmax
    reductions are fp32. On CUDA, Triton kernels are used when installed (tiles in fp32 accumulators).

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
