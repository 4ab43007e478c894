"""Pure-PyTorch fp64 reference of the log-prob ops (fastrl.logprobs).

Materializes the full ``[..., V]`` log-softmax in float64: for tests and ``FASTRL_BACKEND=reference``,
never for speed. Differentiable (plain autograd).
"""
from __future__ import annotations

import torch


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """``(logprobs, entropy, lse)`` of ``softmax(logits / temperature)``, each ``logits.shape[:-1]``,
    float64; ``logprobs`` is 0 where ``labels == ignore_index``."""
    z = logits.to(torch.float64) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    picked = torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked), entropy, lse
