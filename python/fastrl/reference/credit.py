"""Pure-PyTorch references of the token-level credit-assignment ops (fastrl.credit).

Written from verl 0.9.1's loops (``compute_gae_advantage_return``,
``compute_reinforce_plus_plus_outcome_advantage``, ``verl.utils.torch_functional.masked_*``): an
explicit reverse loop over T for the scans, fp64 statistics for the masked moments. Packed inputs
are padded per row, run through the padded loop and unpadded again. Everything runs on the inputs'
device. Used by the tests, the benchmarks' PyTorch-loop baselines and ``FASTRL_BACKEND=reference``.
"""
from __future__ import annotations

import torch

RETURNS_MODES = ("skip", "reset", "cumsum")
GAE_MODES = ("skip", "reset", "dense")
KL_KINDS = {  # convention -> estimator names (verl's also take a "+" suffix)
    "verl": ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"),
    "openrlhf": ("k1", "k2", "k3"),
    "openrlhf_unclamped": ("k1", "k2", "k3"),
}
KL_CONVENTIONS = tuple(KL_KINDS)
SEGMENT_REDUCTIONS = ("sum", "mean", "geomean", "last")


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


def broadcast_to_tokens(values, mask, *, cu_seqlens=None):
    """``values[b] * mask`` on each token of row ``b`` (see :func:`fastrl.credit.broadcast_to_tokens`):
    ``values.unsqueeze(-1) * mask`` padded; packed, ``values`` repeated by the row lengths, times mask."""
    if cu_seqlens is None:
        return values.unsqueeze(-1) * mask
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return values.repeat_interleave(lengths, output_size=mask.shape[0]) * mask


def gae(rewards, values, mask, gamma: float, lam: float, *, cu_seqlens=None, dones=None, mode: str = "skip",
        turn_gamma: float = 0.0, turn_lam: float | None = None, whiten: bool = False):
    """GAE (see :func:`fastrl.credit.gae`): verl 0.9.1's loop (before its whitening) for ``mode="skip"``
    without ``dones``; ``(advantages, returns)`` at every position, the advantages then whitened by
    :func:`masked_whiten` when ``whiten``."""
    if whiten:
        adv, ret = gae(rewards, values, mask, gamma, lam, cu_seqlens=cu_seqlens, dones=dones, mode=mode,
                       turn_gamma=turn_gamma, turn_lam=turn_lam)
        return masked_whiten(adv, mask), ret
    if mode not in GAE_MODES:
        raise ValueError(f"fastrl: gae `mode` must be one of {GAE_MODES}, got {mode!r}")
    turn_lam = lam if turn_lam is None else turn_lam
    if cu_seqlens is not None:  # padding after a row's end: masked, no done (dense: zero steps, no effect)
        adv, ret = gae(_pad(rewards, cu_seqlens), _pad(values, cu_seqlens), _pad(mask, cu_seqlens), gamma, lam,
                       dones=None if dones is None else _pad(dones, cu_seqlens), mode=mode,
                       turn_gamma=turn_gamma, turn_lam=turn_lam)
        return _unpad(adv, cu_seqlens), _unpad(ret, cu_seqlens)
    dtype = _acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    d = torch.zeros_like(m) if dones is None else dones.bool()
    B, T = r.shape
    # (gamma, gamma * lam) inside a turn and at a turn end, each product rounded once (verl's order)
    g, gl, tg, tgl = (torch.tensor(x, dtype=dtype, device=r.device)
                      for x in (gamma, gamma * lam, turn_gamma, turn_gamma * turn_lam))
    zero = r.new_zeros(())
    nv, carry = r.new_zeros(B), r.new_zeros(B)
    pending = torch.zeros(B, dtype=torch.bool, device=r.device)
    adv, ret = r.new_zeros(B, T), r.new_zeros(B, T)
    for t in reversed(range(T)):
        valid = m[:, t]
        step = torch.ones_like(valid) if mode == "dense" else valid
        rt = torch.where(valid, r[:, t], zero)
        vt = torch.where(valid, v[:, t], zero) if mode == "dense" else v[:, t]
        cut = d[:, t] | pending
        delta = (rt + torch.where(cut, tg, g) * nv) - vt
        new = delta + torch.where(cut, tgl, gl) * carry
        # a non-step position: skip passes through; reset restarts as the kernels' step (0, 0) does,
        # 0 + 0 * carry (a NaN/Inf after it still reaches the positions before it)
        gap = carry if mode != "reset" else zero + zero * carry
        carry = torch.where(step, new, gap)
        nv = torch.where(step, vt, nv if mode != "reset" else zero)
        pending = ~step & (pending | d[:, t])
        adv[:, t] = carry
        ret[:, t] = carry + vt
    return adv, ret


def discounted_returns(rewards, mask, gamma: float, *, mode: str = "skip", cu_seqlens=None, dones=None,
                       turn_gamma: float = 0.0, whiten: bool = False):
    """Reward-to-go in ``mode`` with turn ends (see :func:`fastrl.credit.discounted_returns`); with
    ``whiten``, ``(masked_whiten(G, mask) * mask, G)`` (verl's REINFORCE++ advantages and returns)."""
    if whiten:
        ret = discounted_returns(rewards, mask, gamma, mode=mode, cu_seqlens=cu_seqlens, dones=dones,
                                 turn_gamma=turn_gamma)
        return masked_whiten(ret, mask) * mask, ret
    if mode not in RETURNS_MODES:
        raise ValueError(f"`mode` must be one of {RETURNS_MODES}, got {mode!r}")
    if cu_seqlens is not None:  # padding after a row's end: masked, no done (cumsum: zero steps, no effect)
        out = discounted_returns(_pad(rewards, cu_seqlens), _pad(mask, cu_seqlens), gamma, mode=mode,
                                 dones=None if dones is None else _pad(dones, cu_seqlens), turn_gamma=turn_gamma)
        return _unpad(out, cu_seqlens)
    r, m = rewards.to(_acc_dtype(rewards.dtype)), mask.bool()
    d = torch.zeros_like(m) if dones is None else dones.bool()
    B, T = r.shape
    # each rounded once, as the kernels
    g, tg = (torch.tensor(x, dtype=r.dtype, device=r.device) for x in (gamma, turn_gamma))
    carry = r.new_zeros(B)
    pending = torch.zeros(B, dtype=torch.bool, device=r.device)
    out = r.new_zeros(B, T)
    zero = r.new_zeros(())
    for t in reversed(range(T)):
        step = torch.ones_like(m[:, t]) if mode == "cumsum" else m[:, t]
        disc = torch.where(d[:, t] | pending, tg, g)
        if mode == "cumsum":
            carry = torch.where(m[:, t], r[:, t], zero) + disc * carry
            out[:, t] = carry
        else:
            new = r[:, t] + disc * carry
            carry = torch.where(m[:, t], new, carry if mode == "skip" else zero + zero * carry)  # reset: (0, 0)
            out[:, t] = torch.where(m[:, t], new, zero)
        pending = ~step & (pending | d[:, t])
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


def kl_penalty(logp, ref_logp, kind: str = "k1", *, convention: str = "verl"):
    """Per-token KL estimators (see :func:`fastrl.credit.kl_penalty`), torch ops in fp32 (fp64 for
    fp64 verl inputs), rounded once to the output dtype; gradients by autograd."""
    if convention not in KL_KINDS:
        raise ValueError("fastrl: kl_penalty `convention` must be 'verl', 'openrlhf' or 'openrlhf_unclamped', "
                         f"got {convention!r}")
    straight_through = convention == "verl" and kind.endswith("+")
    base = kind[:-1] if straight_through else kind
    if base not in KL_KINDS[convention]:
        raise ValueError(f"fastrl: kl_penalty `kind` must be one of {KL_KINDS[convention]} with "
                         f"convention={convention!r}, got {kind!r}")
    dtype = torch.promote_types(logp.dtype, ref_logp.dtype)
    acc = _acc_dtype(dtype) if convention == "verl" else torch.float32
    lp, rf = logp.to(acc), ref_logp.to(acc)
    d = lp - rf
    if convention != "verl":  # openrlhf/models/utils.py compute_approx_kl, with or without its clamp
        if base == "k1":
            y = d
        elif base == "k2":
            y = d**2 / 2.0
        else:
            x = -d
            y = x.exp() - 1 - x
        return y.clamp(min=-10, max=10) if convention == "openrlhf" else y
    # verl 0.9.1 kl_penalty_forward / kl_penalty
    if base in ("k1", "kl"):
        out = d
    elif base == "abs":
        out = d.abs()
    elif base in ("k2", "mse"):
        out = 0.5 * d.square()
    else:
        kl = torch.clamp(rf - lp, min=-20, max=20)
        out = torch.clamp(kl.exp() - kl - 1, min=-10, max=10)
    if straight_through:
        k2 = 0.5 * d.square()
        out = k2 - k2.detach() + out.detach()
    return out.to(dtype)


def token_rewards(scores, mask, *, kl=None, kl_coef: float = 0.0, clip=None, cu_seqlens=None):
    """OpenRLHF ``compute_reward`` on the valid tokens (see :func:`fastrl.credit.token_rewards`)."""
    if cu_seqlens is not None:
        out = token_rewards(scores, _pad(mask, cu_seqlens), kl=None if kl is None else _pad(kl, cu_seqlens),
                            kl_coef=kl_coef, clip=clip)
        return _unpad(out, cu_seqlens)
    dtype = _acc_dtype(scores.dtype if kl is None else torch.promote_types(scores.dtype, kl.dtype))
    m = mask.bool()
    lo, hi = clip_range(clip)
    r = scores if lo is None else scores.clamp(min=lo, max=hi)
    last_reward = torch.zeros(m.shape, dtype=dtype, device=m.device)
    if m.shape[1] > 0:  # rows without a valid token: the score lands on a masked position, dropped below
        last = m.shape[1] - 1 - m.long().fliplr().argmax(dim=1, keepdim=True)
        last_reward.scatter_(1, last, r.unsqueeze(1).to(dtype))
    kl_reward = torch.zeros(m.shape, dtype=dtype, device=m.device) if kl is None else -kl_coef * kl.to(dtype)
    return torch.where(m, last_reward + kl_reward, 0.0)


# verl's masked_var raises these for an unbiased variance of 0 or 1 masked elements
VERL_UNBIASED_ERRORS = {0: "At least one element in the mask has to be 1.",
                        1: "The sum of the mask is one, which can cause a division by zero."}


def _check_unbiased(count: int, name: str = "masked_whiten") -> None:
    if count < 2:
        raise ValueError(f"fastrl: {name} with unbiased=True needs at least 2 elements where `mask` is 1, "
                         f"got {count} (verl: \"{VERL_UNBIASED_ERRORS[count]}\")")


def segment_reduce(x, mask=None, *, cu_seqlens=None, reduce: str = "sum"):
    """Per-row reduction of the valid tokens (fastrl.credit.segment_reduce), fp64 math, output in
    float32 (float64 for float64 ``x``); differentiable in ``x`` through torch's own ops."""
    if reduce not in SEGMENT_REDUCTIONS:
        raise ValueError(f"fastrl: segment_reduce `reduce` must be one of {', '.join(map(repr, SEGMENT_REDUCTIONS))}; "
                         f"got {reduce!r}")
    out_dtype = _acc_dtype(x.dtype)
    if mask is None:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if cu_seqlens is not None:
        x, mask = _pad(x, cu_seqlens), _pad(mask, cu_seqlens)  # padding is masked (zeros)
    m = mask.bool()
    x64 = torch.where(m, x.double(), 0.0)
    total = x64.sum(-1)
    count = m.sum(-1).double()
    mean = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    if reduce == "sum":
        out = total
    elif reduce == "mean":
        out = mean
    elif reduce == "geomean":
        out = torch.where(count > 0, torch.exp(mean), 1.0)
    else:
        T = m.shape[-1]
        pos = torch.arange(T, device=x.device)
        last = torch.where(m, pos, -1).amax(-1, keepdim=True) if T > 0 else m.new_full((m.shape[0], 1), -1, dtype=torch.long)
        picked = x64.gather(-1, last.clamp(min=0)) if T > 0 else x64.new_zeros(m.shape[0], 1)
        out = torch.where(last >= 0, picked, 0.0).squeeze(-1)
    return out.to(out_dtype)


def clip_range(clip):
    """``clip`` (``None``, ``c > 0`` or a ``(lo, hi)`` pair with ``lo <= hi``) as ``(lo, hi)``."""
    if clip is None:
        return None, None
    if isinstance(clip, (tuple, list)):
        if len(clip) != 2 or not clip[0] <= clip[1]:
            raise ValueError(f"fastrl: `clip` as a range must be (lo, hi) with lo <= hi, got {clip!r}")
        return float(clip[0]), float(clip[1])
    if not clip > 0:
        raise ValueError(f"fastrl: `clip` must be > 0 (scores are clipped to [-clip, clip]), a (lo, hi) pair "
                         f"or None, got {clip!r}")
    return -float(clip), float(clip)


def implicit_rewards(logp, ref_logp, beta: float, *, mask=None, cu_seqlens=None, step_ends=None):
    """PRIME implicit rewards (see :func:`fastrl.credit.implicit_rewards`): per-token
    ``beta * (logp - ref_logp)`` in fp32 (fp64 for fp64 inputs), step sums in fp64, by explicit loops."""
    if mask is None:
        mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    if cu_seqlens is not None:
        out = implicit_rewards(_pad(logp, cu_seqlens), _pad(ref_logp, cu_seqlens), beta, mask=_pad(mask, cu_seqlens),
                               step_ends=None if step_ends is None else _pad(step_ends, cu_seqlens))
        return _unpad(out, cu_seqlens)
    acc = _acc_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    m = mask.bool()
    tok = torch.where(m, (logp.to(acc) - ref_logp.to(acc)) * beta, 0.0)
    if step_ends is None:
        return tok
    ends = step_ends.bool()
    out = torch.zeros_like(tok)
    for b in range(tok.shape[0]):
        total, last = 0.0, -1
        for t in range(tok.shape[1]):
            if m[b, t]:
                total, last = total + float(tok[b, t]), t
            if ends[b, t] and last >= 0:
                out[b, last], total, last = total, 0.0, -1
        if last >= 0:
            out[b, last] = total
    return out
