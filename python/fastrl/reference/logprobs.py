"""Pure-PyTorch fp64 reference of the log-prob ops (fastrl.logprobs).

Materializes the full ``[..., V]`` log-softmax in float64: for tests and ``FASTRL_BACKEND=reference``,
never for speed. Differentiable (plain autograd).
"""
from __future__ import annotations

import torch


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """``(logprobs, entropy, lse)`` of ``softmax(logits / temperature)``, float64; ``logprobs`` has
    ``labels``' shape (``logits.shape[:-1]``, or ``[..., K]`` for K labels per position) and is 0 where
    ``labels == ignore_index``; entropy and lse have ``logits.shape[:-1]``.

    Rows with special values give what the kernels give (see :func:`fastrl.logprobs`): a NaN or
    +inf logit makes the row's log-probs (but ignored ones), entropy, lse and gradient NaN (plain
    logsumexp would give lse = +inf and log-prob -inf for +inf); a row of only -inf has lse = -inf,
    NaN log-probs and entropy, NaN gradient."""
    z = logits.to(torch.float64) / temperature
    poisoned = (z.isnan() | (z == float("inf"))).any(-1, keepdim=True)
    z = z + torch.where(poisoned, float("nan"), 0.0)  # added, not selected: the gradient is NaN too
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    if labels.dim() == logits.dim():  # K labels per position
        picked = torch.gather(logp, -1, safe)
    else:
        picked = torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked), entropy, lse


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    temperature: float = 1.0, ignore_index: int = -100):
    """``(logprobs, entropy)`` float64 ``labels.shape`` of ``logits = hidden @ weight.T (+ bias)``,
    materialized in float64; both are 0 where ``labels == ignore_index`` (those rows are skipped)."""
    logits = hidden.to(torch.float64) @ weight.to(torch.float64).t()
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    lp, entropy, _ = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    return lp, torch.where(labels == ignore_index, torch.zeros_like(entropy), entropy)


def logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy, grad_logprobs,
                      grad_entropy, grad_lse, *, temperature: float = 1.0, ignore_index: int = -100):
    """float64 ``[N, V]`` gradient wrt ``logits [N, V]`` (``labels [N]``, or ``[N, K]`` for K labels per
    row with ``grad_logprobs`` of the same shape) of ``sum_r sum_k g_lp[r, k] logprob[r, k] +
    g_ent[r] entropy[r] + g_lse[r] lse[r]`` (``None``: a zero gradient), from the given per-row ``lse``
    and ``entropy`` (not recomputed: they may be those of a larger row whose shard ``logits`` is, as in
    vocab-parallel log-probs). With ``z = logits / T``, ``p = exp(z - lse)``::

        d/dlogits_j = (sum_k [j == y_k] g_lp_k - p_j (sum_k g_lp_k - g_lse + g_ent (log p_j + entropy))) / T

    Ignored labels get no log-prob term; probability-0 elements get no gradient."""
    z = logits.to(torch.float64) / temperature
    logp = z - lse.to(torch.float64).unsqueeze(-1)
    p = logp.exp()
    labels2 = labels.reshape(labels.shape[0], -1)
    keep = labels2 != ignore_index
    zeros = z.new_zeros(labels2.shape)
    g_lp = zeros if grad_logprobs is None else torch.where(keep, grad_logprobs.to(torch.float64).view(labels2.shape),
                                                           zeros)
    coef = g_lp.sum(1) - (0.0 if grad_lse is None else grad_lse.to(torch.float64))
    coef = coef.unsqueeze(-1)
    if grad_entropy is not None:
        coef = coef + grad_entropy.to(torch.float64).unsqueeze(-1) * (logp + entropy.to(torch.float64).unsqueeze(-1))
    grad = -torch.where(p > 0, p * coef, torch.zeros_like(p))
    grad.scatter_add_(-1, torch.where(keep, labels2, 0), g_lp)
    return grad / temperature
