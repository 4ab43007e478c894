"""Log-prob gathering from logits: ``log p(label)``, entropy and logsumexp of ``softmax(logits / T)``.

The public function is :func:`fastrl.logprobs` (this module is also reachable as
``fastrl.logprobs_ops``, since the name ``fastrl.logprobs`` is the function).

One streaming pass over each row with an online max / sum of exponentials in fp32 (and the online
sum of ``p * z`` for the entropy): no ``[N, V]`` temporary is allocated, forward or backward (the
backward writes the gradient into one new buffer the size of the logits, as autograd needs, or with
``inplace_backward=True`` into the logits themselves).
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
    lead = tuple(logits.shape[:-1])
    topk = labels.dim() == logits.dim() and tuple(labels.shape[:-1]) == lead
    if tuple(labels.shape) != lead and not topk:
        raise ValueError(f"fastrl.logprobs: `labels` must have shape logits.shape[:-1] = {lead} (one label per "
                         f"position) or {lead + ('K',)} (K labels per position), got {tuple(labels.shape)}")
    if labels.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        labels = labels.long()
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"fastrl.logprobs: `temperature` must be a float, got {type(temperature).__name__}")
    flat_labels = labels.reshape(-1, labels.shape[-1]) if topk else labels.reshape(-1)
    return logits.reshape(-1, logits.shape[-1]), flat_labels


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
             return_lse: bool = False, ignore_index: int = -100, inplace_backward: bool = False):
    """Log-probability of each label under ``softmax(logits / temperature)``, without a ``[N, V]`` temporary.

    With ``z = logits / T`` (computed as ``logits * (1 / T)`` in fp32) per row of ``V`` logits::

        lse      = log sum_j exp(z_j)
        logprob  = z[label] - lse                    (0 where label == ignore_index)
        entropy  = -sum_j p_j log p_j = lse - sum_j p_j z_j,   p = softmax(z)

    Gradients (one compiled pass per row, into a new buffer of the logits' shape and dtype, or into
    the logits themselves with ``inplace_backward=True``)::

        d logprob_k / d logits_j = ([j == label_k] - p_j) / T     (none for ignored labels)
        d entropy / d logits_j = -p_j (log p_j + entropy) / T
        d lse     / d logits_j = p_j / T

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 is accepted and computed in fp32),
            any leading shape; the last dimension is made contiguous if it is not (a copy).
        labels: integer ``[...]`` = ``logits.shape[:-1]`` (int64; narrower integers are widened), or
            ``[..., K]`` for K labels per position (top-K candidates, as TRL gathers): one pass per
            row for the logsumexp, the K log-probs read off it. A label outside ``[0, V)`` other
            than ``ignore_index`` raises a ``RuntimeError`` naming the first bad (flattened)
            position on the CPU; on CUDA (no host sync) it gives NaN.
        temperature: ``T > 0``, finite.
        return_entropy, return_lse: also return the entropy / the logsumexp of ``z``.
        ignore_index: label value whose log-prob is 0 with no gradient. The entropy and lse of
            such a position are still those of its row (they do not depend on the label).
        inplace_backward: write the gradient into the logits' own storage (flash-attn's
            ``inplace_backward``), so the backward needs no second ``[N, V]`` buffer: peak memory
            ≈ the logits. **The logits tensor is overwritten by the backward and must not be used
            afterwards** (nor saved by another autograd node: torch then raises "modified by an
            inplace operation"). Needs logits that can be flattened to ``[N, V]`` without a copy
            (otherwise the copy is what gets overwritten, which is safe but saves nothing).

    Returns:
        ``logprobs`` float32 of ``labels``' shape; or the tuple ``(logprobs, entropy)``,
        ``(logprobs, lse)`` or ``(logprobs, entropy, lse)`` when asked, entropy and lse float32
        ``logits.shape[:-1]``.

    Special values: a row containing NaN or +inf gives NaN log-prob, entropy and lse (0 log-prob
    if ignored); -inf logits have probability 0 (a label on one gets -inf); a row of only -inf
    gives lse = -inf and NaN log-prob/entropy. ``V = 1`` gives log-prob 0, entropy 0.
    Extra memory: the float32 outputs only (forward); the gradient buffer (backward; none with
    ``inplace_backward=True``). K labels per position: the backward's one-hot terms cost O(K^2) per
    row on the CPU and K compares per element on CUDA, so K is meant to be small (top-K candidates).

    >>> logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> fastrl.logprobs(logits, torch.tensor([2, -100]), return_entropy=True)
    (tensor([-0.4076,  0.0000]), tensor([0.8324, 1.0986]))
    >>> fastrl.logprobs(logits, torch.tensor([[2, 1], [0, -100]]))  # K = 2 labels per position
    tensor([[-0.4076, -1.4076],
            [-1.0986,  0.0000]])
    """
    flat_logits, flat_labels = _flatten(logits, labels, temperature)
    lead = logits.shape[:-1]
    if _extension.use_reference():
        if temperature <= 0:
            raise ValueError(f"fastrl.logprobs: `temperature` must be > 0, got {temperature}")
        lp, ent, lse = (t.float() for t in _ref.logprobs(flat_logits, flat_labels, temperature=temperature,
                                                         ignore_index=ignore_index))
    elif inplace_backward and flat_logits.requires_grad and torch.is_grad_enabled():
        if flat_logits.stride(-1) != 1:
            flat_logits = flat_logits.contiguous()  # the copy is what the backward overwrites
        lp, ent, lse = _InplaceBackward.apply(flat_logits, flat_labels, float(temperature), int(ignore_index),
                                              bool(return_entropy))
    else:
        lp, ent, lse = torch.ops.fastrl.logprobs(flat_logits, flat_labels, float(temperature), int(ignore_index),
                                                 bool(return_entropy))
    out = [lp.view(labels.shape)]
    if return_entropy:
        out.append(ent.view(lead))
    if return_lse:
        out.append(lse.view(lead))
    return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------- fake kernels, autograd


def _fake(logits, labels, temperature, ignore_index, compute_entropy):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(labels.shape, **f32), logits.new_empty(n if compute_entropy else 0, **f32),
            logits.new_empty(n, **f32))


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


class _InplaceBackward(torch.autograd.Function):
    """``fastrl::logprobs`` whose backward overwrites the saved logits with their gradient
    (``fastrl::logprobs_backward_``) and returns that same storage as the gradient."""

    @staticmethod
    def forward(logits, labels, temperature, ignore_index, compute_entropy):
        return torch.ops.fastrl.logprobs(logits, labels, temperature, ignore_index, compute_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if not ctx.compute_entropy:
            grad_ent, entropy = None, None
        torch.ops.fastrl.logprobs_backward_(logits, labels, lse, entropy, grad_lp, grad_ent, grad_lse,
                                            ctx.temperature, ctx.ignore_index)
        # the C++ op does not bump the version counter: do it, so that another autograd node that
        # saved these logits raises "modified by an inplace operation" instead of reading gradients
        torch.autograd.graph.increment_version(logits)
        return logits, None, None, None, None


if _extension._C is not None:
    torch.library.register_fake("fastrl::logprobs")(_fake)
    torch.library.register_fake("fastrl::logprobs_backward")(_backward_fake)
    torch.library.register_fake("fastrl::logprobs_backward_")(lambda *args: None)
    torch.library.register_autograd("fastrl::logprobs", _backward, setup_context=_setup)
