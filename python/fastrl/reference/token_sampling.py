"""Pure-PyTorch fp64 reference of token sampling (fastrl.sampling.sample).

Sorts the vocabulary and materializes ``[N, V]`` fp64 probabilities: for tests and
``FASTRL_BACKEND=reference``, never for speed. Processors in the kernels' order: temperature,
top-k (ties with the k-th value kept), top-p over the top-k-renormalized distribution (the
smallest value-threshold set with mass >= p, ties kept), min-p relative to the most likely token.
Exact probabilities (the kernels quantize each token's mass to 2^-44 of the most likely one's).
"""
from __future__ import annotations

import torch


def _col(value, n: int, dtype) -> torch.Tensor:
    """A scalar or a per-row ``[N]`` tensor as an ``[N, 1]`` column."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype).reshape(n, 1)
    return torch.full((n, 1), value, dtype=dtype)


def processed_probs(logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """``(probs, raw_probs)``, fp64 ``[N, V]``: the truncated renormalized distribution (0 outside
    the kept set) and ``softmax(logits / temperature)``. Parameters: scalars or ``[N]`` tensors."""
    x = logits.detach().cpu().double()
    n, v = x.shape
    z = x / _col(temperature, n, torch.float64)
    raw = torch.softmax(z, -1)
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        k = _col(top_k, n, torch.int64).clamp(max=v)
        kth = z.sort(-1, descending=True).values.gather(-1, k - 1)
        keep &= z >= kth
    if top_p is not None:
        q = torch.where(keep, raw, torch.zeros_like(raw))
        qs = q.sort(-1, descending=True).values
        cum = qs.cumsum(-1)
        target = _col(top_p, n, torch.float64) * q.sum(-1, keepdim=True)
        first = (cum < target).sum(-1, keepdim=True).clamp(max=v - 1)  # first position reaching the target
        keep &= q >= qs.gather(-1, first)
    if min_p is not None:
        keep &= raw >= _col(min_p, n, torch.float64) * raw.max(-1, keepdim=True).values
    probs = torch.where(keep, raw, torch.zeros_like(raw))
    return probs / probs.sum(-1, keepdim=True), raw


def sample(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """``(tokens int64 [N], logprobs fp64 [N], raw_logprobs fp64 [N])`` by inverse-CDF sampling in
    vocabulary order: the token is the first ``j`` with ``cumsum(probs)[j] > u``."""
    if torch.isnan(logits).any():
        raise ValueError("fastrl reference sample: `logits` holds NaN")
    probs, raw = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    cdf = probs.cumsum(-1)
    u = uniforms.detach().cpu().double().reshape(-1, 1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)  # last kept token
    tokens = torch.minimum((cdf <= u).sum(-1, keepdim=True), last)
    return (tokens.squeeze(-1), probs.gather(-1, tokens).log().squeeze(-1),
            raw.gather(-1, tokens).log().squeeze(-1))
