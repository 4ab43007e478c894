"""Pure-PyTorch fp64 reference of the log-prob ops (fastrl.logprobs).

Materializes the full ``[..., V]`` log-softmax in float64: for tests and ``FASTRL_BACKEND=reference``,
never for speed. Differentiable (plain autograd).
"""
from __future__ import annotations

import torch


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """``(logprobs, entropy, lse)`` of ``softmax(logits / temperature)``, float64; ``logprobs`` has
    ``labels``' shape (``logits.shape[:-1]``, or ``[..., K]`` for K labels per position) and is 0 where
    ``labels == ignore_index``; entropy and lse have ``logits.shape[:-1]``."""
    z = logits.to(torch.float64) / temperature
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
