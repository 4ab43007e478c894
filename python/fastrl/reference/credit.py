"""Pure-PyTorch references of the token-level credit-assignment ops (fastrl.credit).

Written from verl 0.9.1's loops (``compute_gae_advantage_return``,
``compute_reinforce_plus_plus_outcome_advantage``, ``verl.utils.torch_functional.masked_*``): an
explicit reverse loop over T for the scans, fp64 statistics for the masked moments. Packed inputs
are padded per row, run through the padded loop and unpadded again. Used by the tests and by
``FASTRL_BACKEND=reference``.
"""
from __future__ import annotations

import torch

RETURNS_MODES = ("skip", "reset", "cumsum")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] packed -> [B, max_len] padded (zeros after each row's end)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    T = max(lengths, default=0)
    out = x.new_zeros(len(lengths), T)
    for b, n in enumerate(lengths):
        out[b, :n] = x[int(cu_seqlens[b]):int(cu_seqlens[b]) + n]
    return out


def _unpad(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)]) if lengths else x.new_zeros(0)


def gae(rewards, values, mask, gamma: float, lam: float, *, cu_seqlens=None):
    """verl 0.9.1 GAE (before its whitening): ``(advantages, returns)`` at every position."""
    if cu_seqlens is not None:
        adv, ret = gae(_pad(rewards, cu_seqlens), _pad(values, cu_seqlens), _pad(mask, cu_seqlens),
                       gamma, lam)
        return _unpad(adv, cu_seqlens), _unpad(ret, cu_seqlens)
    dtype = _acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    B, T = r.shape
    nv = r.new_zeros(B)
    carry = r.new_zeros(B)
    adv = r.new_zeros(B, T)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nv - v[:, t]
        carry = torch.where(m[:, t], delta + gamma * lam * carry, carry)
        nv = torch.where(m[:, t], v[:, t], nv)
        adv[:, t] = carry
    return adv, adv + v


def discounted_returns(rewards, mask, gamma: float, *, mode: str = "skip", cu_seqlens=None):
    """Reward-to-go in ``mode`` (see :func:`fastrl.credit.discounted_returns`)."""
    if mode not in RETURNS_MODES:
        raise ValueError(f"`mode` must be one of {RETURNS_MODES}, got {mode!r}")
    if cu_seqlens is not None:
        out = discounted_returns(_pad(rewards, cu_seqlens), _pad(mask, cu_seqlens), gamma, mode=mode)
        return _unpad(out, cu_seqlens)
    r, m = rewards.to(_acc_dtype(rewards.dtype)), mask.bool()
    B, T = r.shape
    carry = r.new_zeros(B)
    out = r.new_zeros(B, T)
    zero = r.new_zeros(())
    for t in reversed(range(T)):
        if mode == "cumsum":
            carry = torch.where(m[:, t], r[:, t], zero) + gamma * carry
            out[:, t] = carry
        else:
            new = r[:, t] + gamma * carry
            carry = torch.where(m[:, t], new, carry if mode == "skip" else zero)
            out[:, t] = torch.where(m[:, t], new, zero)
    return out


def masked_moments(x, mask):
    """(count, mean, m2) of the masked elements, fp64 0-dim tensors (mean 0 for an empty mask)."""
    keep = mask.bool()
    x64 = torch.where(keep, x.double(), 0.0)
    count = keep.sum().double()
    mean = torch.where(count > 0, x64.sum() / count.clamp(min=1), 0.0)
    d = torch.where(keep, x64 - mean, 0.0)
    return count, mean, (d * d).sum()


def masked_mean(x, mask):
    return masked_moments(x, mask)[1].to(x.dtype)


def masked_var(x, mask, *, unbiased: bool = True):
    count, _, m2 = masked_moments(x, mask)
    if unbiased:
        _check_unbiased(int(count))
        return (m2 / (count - 1)).to(x.dtype)
    return torch.where(count > 0, m2 / count.clamp(min=1), 0.0).to(x.dtype)


def masked_whiten(x, mask, *, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8):
    count, mean, m2 = masked_moments(x, mask)
    if unbiased:
        _check_unbiased(int(count))
        var = m2 / (count - 1)
    else:
        var = torch.where(count > 0, m2 / count.clamp(min=1), 0.0)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.to(x.dtype)


def _check_unbiased(count: int) -> None:
    if count < 2:
        raise ValueError(f"fastrl: masked_whiten with unbiased=True needs at least 2 elements where "
                           f"`mask` is 1, got {count}")
