"""Pure-PyTorch fp64 reference of the fused policy loss (fastrl.losses.policy_loss).

Written formula by formula from verl 0.9.1 (``verl/trainer/ppo/core_algos.py``:
``compute_policy_loss_{vanilla,gspo,cispo,sapo,gpg,geo_mean}``, ``agg_loss``, ``kl_penalty``) and
trl 1.16.0 (``GRPOTrainer._compute_loss``), with torch ops that autograd differentiates, so the
tests compare both the loss and the gradients of the compiled kernels against it. Everything is
computed in float64 on the padded layout (packed inputs are padded per row first). Masked tokens
never reach a sum (``torch.where``, not a multiply: a NaN there is ignored). Used by the tests and
by ``FASTRL_BACKEND=reference``.
"""
from __future__ import annotations

import torch

from fastrl.reference.credit import _pad

KINDS = ("vanilla", "gpg", "reinforce", "cispo", "gspo", "sapo", "geo_mean")
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
        "grpo", "bnpo", "dr_grpo", "luspo")
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3_unclamped")
RATIO_LEVELS = ("token", "sequence")


def kl_value(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """verl 0.9.1 ``kl_penalty_forward`` (k1/abs/k2/k3) or TRL's unclamped k3."""
    d = logp - ref
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind in ("k3", "low_var_kl"):
        kl = torch.clamp(ref - logp, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if kind == "k3_unclamped":
        return torch.exp(ref - logp) - (ref - logp) - 1
    raise ValueError(f"fastrl: policy_loss `kl_kind` must be one of {', '.join(KL_KINDS)}; got {kind!r}")


def agg_weights(n: torch.Tensor, agg: str, *, horizon: float, num_tokens, num_seqs, num_rows) -> torch.Tensor:
    """Per-row weight w_b of the row sums: loss = sum_b w_b * sum_{t valid} loss_bt (0 where a count is 0)."""
    n = n.to(torch.float64)
    N = n.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float64, device=n.device)
    S = (n > 0).sum().to(torch.float64) if num_seqs is None else torch.as_tensor(
        num_seqs, dtype=torch.float64, device=n.device)
    B = torch.as_tensor(num_rows, dtype=torch.float64, device=n.device)
    one = torch.ones_like(n)

    def inv(d):
        return torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)

    if agg in ("token-mean", "bnpo"):
        return one * inv(N)
    if agg == "token-sum":
        return one
    if agg == "seq-mean-token-sum":
        return one * inv(S)
    if agg == "seq-mean-token-sum-norm":
        return one * inv(S) / horizon
    if agg == "seq-mean-token-mean":
        return inv(n) * inv(S)
    if agg == "grpo":
        return inv(n.clamp(min=1.0)) * inv(B)
    if agg == "dr_grpo":
        return one * inv(B) / horizon
    if agg == "luspo":
        return one * inv(B)
    raise ValueError(f"fastrl: policy_loss `agg` must be one of {', '.join(AGGS)}; got {agg!r}")


def policy_loss(logp, old_logp, advantages, mask, *, kind="vanilla", clip_low=0.2, clip_high=0.2, dual_clip=None,
                agg="token-mean", ref_logp=None, kl_coef=0.0, kl_kind="k3", entropy=None, entropy_coef=0.0,
                is_weights=None, cu_seqlens=None, ratio_level="token", log_ratio_clamp=20.0, delta=None,
                tau_pos=1.0, tau_neg=1.05, max_length=None, num_tokens=None, num_seqs=None, scale=1.0,
                num_rows=None):
    """The fp64 reference: (loss in the output dtype, metrics dict), see fastrl.losses.policy_loss."""
    if kind == "reinforce":
        kind = "gpg"
    if kind not in KINDS:
        raise ValueError(f"fastrl: policy_loss `kind` must be one of {', '.join(KINDS)}; got {kind!r}")
    out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:
        per_row = advantages.dim() == 1 and advantages.shape[0] != logp.shape[0]
        pad = lambda t: None if t is None else _pad(t, cu_seqlens)  # noqa: E731
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        valid = torch.arange(int(lengths.max()) if len(lengths) else 0)[None, :] < lengths[:, None]
        valid = valid & (_pad(mask.to(torch.float64), cu_seqlens) != 0)
        logp, old_logp, ref_logp, entropy, is_weights = map(pad, (logp, old_logp, ref_logp, entropy, is_weights))
        advantages = advantages if per_row else _pad(advantages, cu_seqlens)
    else:
        valid = mask != 0
    f = torch.float64
    lp, olp = logp.to(f), old_logp.to(f)
    A = advantages.to(f)
    if A.dim() == 1:
        A = A[:, None].expand_as(lp)
    zero = torch.zeros((), dtype=f)

    def msum(t, dim=None):  # masked sum, masked positions never read
        t = torch.where(valid, t, zero)
        return t.sum() if dim is None else t.sum(dim)

    n = valid.sum(-1).to(f)
    x = lp - olp
    c = log_ratio_clamp
    if kind == "gspo":
        seq = msum(x, -1) / n.clamp(min=1)
        r = torch.exp(torch.clamp(lp - lp.detach() + seq.detach()[:, None], max=10.0))
        neg_log = -x
    elif ratio_level == "sequence" and kind != "geo_mean":
        seq = msum(x, -1) / n.clamp(min=1)
        r = torch.exp(seq if c is None else torch.clamp(seq, -c, c))[:, None].expand_as(lp)
        neg_log = -x
    elif kind == "geo_mean":
        r, neg_log = torch.exp(x), -x
    else:
        lr = x if c is None else torch.clamp(x, -c, c)
        r, neg_log = torch.exp(lr), -lr
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    clip = torch.zeros_like(valid)
    clip_lower = torch.zeros_like(valid)
    if kind in ("vanilla", "gspo"):
        r1 = torch.clamp(r, max=delta) if (delta is not None and kind == "vanilla") else r
        l1, l2 = -A * r1, -A * torch.clamp(r, lo, hi)
        pg = torch.maximum(l1, l2)
        clip = l2 > l1
        if dual_clip is not None and kind == "vanilla":
            l3 = -A * dual_clip
            clip_lower = (pg > l3) & (A < 0)
            pg = torch.where(A < 0, torch.minimum(l3, pg), pg)
    elif kind == "gpg":
        pg = -lp * A
    elif kind == "cispo":
        cr = torch.clamp(r, lo, hi)
        pg = -cr.detach() * A * lp
        clip = r != cr
    elif kind == "sapo":
        tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=f), torch.tensor(tau_neg, dtype=f))
        pg = -(torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau)) * A
    if is_weights is not None and kind != "geo_mean":
        pg = pg * is_weights.to(f)
    aux = torch.zeros_like(lp)
    kl = None
    if ref_logp is not None:
        kl = kl_value(lp, ref_logp.to(f), kl_kind)
        aux = aux + kl_coef * kl
    if entropy is not None:
        aux = aux - entropy_coef * entropy.to(f)
    B = lp.shape[0] if num_rows is None else num_rows
    horizon = float(max_length if max_length is not None else lp.shape[-1])
    w = agg_weights(n, agg, horizon=horizon, num_tokens=num_tokens, num_seqs=num_seqs, num_rows=B)
    if kind == "geo_mean":
        s = torch.sign(A)
        xc = torch.clamp(x, -clip_low, clip_high)
        xm = s * torch.minimum(s * x, s * xc)
        ratio = torch.exp(msum(xm, -1) / n.clamp(min=1))
        adv = msum(A, -1) / n.clamp(min=1)
        row = -adv * ratio
        if is_weights is not None:
            row = row * torch.exp(msum(torch.log(is_weights.to(f) + 1e-10), -1) / n.clamp(min=1))
        clipped = x != xc
        clip, clip_lower = clipped & (A > 0), clipped & (A < 0)
        pg_loss = row.sum() / torch.as_tensor(B, dtype=f).clamp(min=1)  # 0 rows: 0, not NaN
        loss = pg_loss + (w * msum(aux, -1)).sum()
    else:
        pg_loss = (w * msum(pg, -1)).sum()
        loss = (w * msum(pg + aux, -1)).sum()
    Nl = n.sum()

    def mean(t):
        return torch.where(Nl > 0, msum(t.to(f)) / Nl.clamp(min=1), 0.0).to(torch.float32)

    big = torch.tensor(float("inf"), dtype=f)
    metrics = {
        "policy_loss": (pg_loss * scale).detach().to(torch.float32),
        "clipfrac": mean(clip), "clipfrac_lower": mean(clip_lower),
        "clip_low_frac": mean((r < lo) & (A < 0)), "clip_high_frac": mean((r > hi) & (A > 0)),
        "approx_kl": mean(neg_log).detach(), "ratio_mean": mean(r).detach(),
        "ratio_min": torch.where(Nl > 0, torch.where(valid, r.detach(), big).min() if r.numel() else big,
                                 0.0).to(torch.float32),
        "ratio_max": torch.where(Nl > 0, torch.where(valid, r.detach(), -big).max() if r.numel() else -big,
                                 0.0).to(torch.float32),
        "num_tokens": Nl.to(torch.float32),
    }
    if kl is not None:
        metrics["kl_mean"] = mean(kl).detach()
        metrics["kl_loss"] = ((w * msum(kl, -1)).sum() * scale).detach().to(torch.float32)
    if entropy is not None:
        metrics["entropy_mean"] = mean(entropy).detach()
        metrics["entropy_loss"] = ((w * msum(entropy.to(f), -1)).sum() * scale).detach().to(torch.float32)
    return (loss * scale).to(out_dtype), metrics


def linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                       ignore_index=-100, with_entropy=None, **policy_kwargs):
    """The materialized composition (see fastrl.losses.linear_policy_loss): float64 logits
    ``hidden @ weight.T + bias`` -> log-softmax / entropy -> :func:`policy_loss`, autograd throughout."""
    from fastrl.reference.logprobs import linear_logprobs

    if with_entropy is None:
        with_entropy = policy_kwargs.get("entropy_coef", 0.0) != 0
    labels = torch.where(mask != 0, labels, ignore_index)
    logp, entropy = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index)
    return policy_loss(logp, old_logp, advantages, mask, entropy=entropy if with_entropy else None, **policy_kwargs)


def rollout_is_weights(logp, rollout_logp, mask, *, level="token", mode="truncate", threshold=2.0,
                       threshold_lower=None, batch_normalize=False):
    """Float64 weights of fastrl.losses.rollout_is_weights, one row and one token at a time."""
    import math

    lower = 1.0 / threshold if threshold_lower is None else threshold_lower
    B, T = logp.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] != 0]
        xs = [float(logp[b, t]) - float(rollout_logp[b, t]) for t in idx]
        for j, t in enumerate(idx):
            lw = xs[j] if level == "token" else (sum(xs) / len(xs) if level == "geometric" else sum(xs))
            raw = math.exp(min(max(lw, -20.0), 20.0))
            if mode == "mask":
                w[b, t] = raw if lower <= raw <= threshold else 0.0
            else:
                w[b, t] = min(raw, threshold) if threshold_lower is None else min(max(raw, lower), threshold)
    if batch_normalize:
        valid = mask != 0
        if level == "token":
            mean = float(w[valid].mean()) if bool(valid.any()) else 0.0
        else:
            rows = [float(w[b][valid[b]].mean()) for b in range(B) if bool(valid[b].any())]
            mean = sum(rows) / len(rows) if rows else 0.0
        if mean > 1e-8:
            w = w / mean
    return w


def rollout_rejection_mask(logp, rollout_logp, mask, *, options, bounds):
    """Float64 keep mask of fastrl.losses.rollout_rejection_mask, one row and one token at a time.
    ``bounds``: {option: (lower, upper)} (ratio bounds for k1 options, lower None otherwise)."""
    import math

    B, T = logp.shape
    keep = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] != 0]
        xs = [min(max(float(logp[b, t]) - float(rollout_logp[b, t]), -20.0), 20.0) for t in idx]
        for opt in options:
            lower, upper = bounds[opt]
            est = {"k1": lambda x: -x, "k2": lambda x: 0.5 * x * x, "k3": lambda x: math.exp(x) - 1.0 - x}[opt[-2:]]
            vals = [est(x) for x in xs]
            if opt.startswith("seq_sum"):
                vals = [sum(vals)] * len(vals)
            elif opt.startswith("seq_mean"):
                vals = [sum(vals) / len(vals)] * len(vals) if vals else []
            elif opt.startswith("seq_max"):
                vals = [max(vals)] * len(vals) if vals else []
            for t, v in zip(idx, vals):
                ok = math.log(lower) <= v <= math.log(upper) if opt.endswith("k1") else v <= upper
                keep[b, t] &= ok
    return keep & (mask != 0)
