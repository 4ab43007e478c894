"""Log-prob gathering from logits: ``log p(label)``, entropy and logsumexp of ``softmax(logits / T)``.

The public function is :func:`fastrl.logprobs` (this module is also reachable as
``fastrl.logprobs_ops``, since the name ``fastrl.logprobs`` is the function).

One streaming pass over each row with an online max / sum of exponentials in fp32 (and the online
sum of ``p * z`` for the entropy): no ``[N, V]`` temporary is allocated, forward or backward (the
backward writes the gradient into one new buffer the size of the logits, as autograd needs).
A row's result depends only on that row (batch invariant, bitwise, whatever the thread count).
"""
from __future__ import annotations

import torch

from fastrl import _extension
from fastrl.reference import logprobs as _ref

__all__ = ["logprobs"]


def _flatten(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("fastrl.logprobs: `logits` must be a tensor of shape [..., V]")
    if logits.shape[-1] < 1:
        raise ValueError(f"fastrl.logprobs: `logits` must have a vocabulary dimension of size >= 1, got shape "
                         f"{tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError("fastrl.logprobs: `labels` must be an integer tensor of shape logits.shape[:-1]")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"fastrl.logprobs: `labels` must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        labels = labels.long()
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"fastrl.logprobs: `temperature` must be a float, got {type(temperature).__name__}")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
             return_lse: bool = False, ignore_index: int = -100):
    """Log-probability of each label under ``softmax(logits / temperature)``, without a ``[N, V]`` temporary.

    With ``z = logits / T`` (computed as ``logits * (1 / T)`` in fp32) per row of ``V`` logits::

        lse      = log sum_j exp(z_j)
        logprob  = z[label] - lse                    (0 where label == ignore_index)
        entropy  = -sum_j p_j log p_j = lse - sum_j p_j z_j,   p = softmax(z)

    Gradients (one compiled pass per row, into a new buffer of the logits' shape and dtype)::

        d logprob / d logits_j = ([j == label] - p_j) / T     (none for ignored labels)
        d entropy / d logits_j = -p_j (log p_j + entropy) / T
        d lse     / d logits_j = p_j / T

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 is accepted and computed in fp32),
            any leading shape; the last dimension is made contiguous if it is not (a copy).
        labels: integer ``[...]`` = ``logits.shape[:-1]`` (int64; narrower integers are widened).
            A label outside ``[0, V)`` other than ``ignore_index`` raises a ``RuntimeError`` naming
            the first bad (flattened) position on the CPU; on CUDA (no host sync) it gives NaN.
        temperature: ``T > 0``, finite.
        return_entropy, return_lse: also return the entropy / the logsumexp of ``z``.
        ignore_index: label value whose log-prob is 0 with no gradient. The entropy and lse of
            such a position are still those of its row (they do not depend on the label).

    Returns:
        ``logprobs`` float32 ``[...]``; or the tuple ``(logprobs, entropy)``, ``(logprobs, lse)`` or
        ``(logprobs, entropy, lse)`` when asked, each float32 ``[...]``.

    Special values: a row containing NaN or +inf gives NaN log-prob, entropy and lse (0 log-prob
    if ignored); -inf logits have probability 0 (a label on one gets -inf); a row of only -inf
    gives lse = -inf and NaN log-prob/entropy. ``V = 1`` gives log-prob 0, entropy 0.
    Extra memory: the float32 outputs only (forward); the gradient buffer (backward).

    >>> logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> fastrl.logprobs(logits, torch.tensor([2, -100]), return_entropy=True)
    (tensor([-0.4076,  0.0000]), tensor([0.8324, 1.0986]))
    """
    flat_logits, flat_labels = _flatten(logits, labels, temperature)
    lead = logits.shape[:-1]
    if _extension.use_reference():
        if temperature <= 0:
            raise ValueError(f"fastrl.logprobs: `temperature` must be > 0, got {temperature}")
        lp, ent, lse = (t.float() for t in _ref.logprobs(flat_logits, flat_labels, temperature=temperature,
                                                         ignore_index=ignore_index))
    else:
        lp, ent, lse = torch.ops.fastrl.logprobs(flat_logits, flat_labels, float(temperature), int(ignore_index),
                                                 bool(return_entropy))
    out = [lp.view(lead)]
    if return_entropy:
        out.append(ent.view(lead))
    if return_lse:
        out.append(lse.view(lead))
    return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------- fake kernels, autograd


def _fake(logits, labels, temperature, ignore_index, compute_entropy):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits.new_empty(n, **f32), logits.new_empty(n if compute_entropy else 0, **f32), logits.new_empty(n, **f32)


def _backward_fake(logits, labels, lse, entropy, grad_logprobs, grad_entropy, grad_lse, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.compute_entropy = temperature, ignore_index, compute_entropy


def _backward(ctx, grad_lp, grad_ent, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.compute_entropy:
        grad_ent, entropy = None, None
    grad = torch.ops.fastrl.logprobs_backward(logits, labels, lse, entropy, grad_lp, grad_ent, grad_lse,
                                              ctx.temperature, ctx.ignore_index)
    return grad, None, None, None, None


if _extension._C is not None:
    torch.library.register_fake("fastrl::logprobs")(_fake)
    torch.library.register_fake("fastrl::logprobs_backward")(_backward_fake)
    torch.library.register_autograd("fastrl::logprobs", _backward, setup_context=_setup)
