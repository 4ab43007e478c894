"""Pure-PyTorch fp64 reference of the group-advantage op (the spec the kernels are tested against).

Vectorized with index_add/scatter_reduce; no Python loop over samples or groups. Slow-ish and
allocation-heavy on purpose: clarity over speed.
"""
from __future__ import annotations

import torch


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int,
    weights: torch.Tensor | None = None,
    baseline: str = "mean",
    scale: str = "group_std",
    unbiased: bool = True,
    eps: float = 1e-6,
    eps_on_var: bool = False,
    singleton_zero: bool = False,
    ignore_nan: bool = False,
):
    """Returns (advantages fp32[B], count int64[G], mean, std, min, max fp32[G])."""
    x = scores.double()
    g = group_ids.long()
    G = num_groups
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
        bad = int(((g < 0) | (g >= G)).nonzero()[0])
        raise ValueError(f"fastrl: `group_ids` must lie in [0, num_groups={G}), got group_ids[{bad}] = {int(g[bad])}")
    valid = ~torch.isnan(x) if ignore_nan else torch.ones_like(x, dtype=torch.bool)
    xv = torch.where(valid, x, torch.zeros_like(x))
    zeros = torch.zeros(G, dtype=torch.float64, device=x.device)

    count = zeros.index_add(0, g, valid.double())
    mean = zeros.index_add(0, g, xv) / count
    dev = torch.where(valid, x - mean[g], torch.zeros_like(x))
    m2 = zeros.index_add(0, g, dev * dev)
    dof = count - 1 if unbiased else count
    var = torch.where(dof > 0, m2 / dof.clamp(min=1), torch.full_like(m2, float("nan")))

    n = count[g]
    singleton = n == 1
    if baseline == "mean":
        centered = x - mean[g]
    elif baseline == "leave_one_out":
        centered = (x - mean[g]) * n / (n - 1)
    elif baseline == "weighted_mean":
        w = weights.double()
        wv = torch.where(valid, w, torch.zeros_like(w))
        wsum = zeros.index_add(0, g, wv)
        wxsum = zeros.index_add(0, g, wv * xv)
        centered = x - (wxsum / wsum)[g]
    elif baseline == "none":
        centered = x
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    centered = torch.where(singleton, x, centered)

    if scale == "none":
        adv = centered
    else:
        if scale == "group_std":
            v = torch.where(singleton, torch.ones_like(x), var[g])
        elif scale == "batch_std":
            xs = x[valid]
            N = xs.numel()
            bdof = N - 1 if unbiased else N
            bvar = ((xs - xs.mean()) ** 2).sum() / bdof if bdof > 0 else torch.tensor(float("nan"), dtype=torch.float64)
            v = bvar.expand_as(x)
        else:
            raise ValueError(f"unknown scale {scale!r}")
        denom = torch.sqrt(v + eps) if eps_on_var else torch.sqrt(v) + eps
        adv = centered / denom
    if singleton_zero:
        adv = torch.where(singleton, torch.zeros_like(adv), adv)
    adv = torch.where(valid, adv, torch.zeros_like(adv))

    big = torch.full((G,), float("inf"), dtype=torch.float64, device=x.device)
    xmin = torch.where(valid, x, big[g] if G else x)
    xmax = torch.where(valid, x, -big[g] if G else x)
    mn = big.scatter_reduce(0, g, xmin, "amin", include_self=True)
    mx = (-big).scatter_reduce(0, g, xmax, "amax", include_self=True)
    empty = count == 0
    nan = torch.full_like(mn, float("nan"))
    return (
        adv.float(),
        count.long(),
        torch.where(empty, nan, mean).float(),
        torch.sqrt(var).float(),
        torch.where(empty, nan, mn).float(),
        torch.where(empty, nan, mx).float(),
    )


# ------------------------------------------------------------------ estimators (fp64 references)
# Written independently of the fast paths: dense [B, B] same-group masks (O(B^2), fine for tests),
# index_add sums, torch.distributions.Beta for the Beta pdf.


def _group_mean_std(x: torch.Tensor, g: torch.Tensor, G: int):
    """fp64 per-group (count, mean, unbiased std); std NaN for groups of < 2."""
    zeros = torch.zeros(G, dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, g, torch.ones_like(x))
    mean = zeros.index_add(0, g, x) / count
    m2 = zeros.index_add(0, g, (x - mean[g]) ** 2)
    std = torch.where(count > 1, torch.sqrt(m2 / (count - 1).clamp(min=1)), torch.full_like(m2, float("nan")))
    return count, mean, std


def passk(scores, group_ids, *, eps=1e-6, norm_by_std=True, num_groups=None):
    """pass@k (verl compute_grpo_passk_outcome_advantage): the group's best sample (first index among
    ties) gets (max - second max) [/ (unbiased std + eps)], the others 0. Returns fp32[B]."""
    x = scores.double()
    g = group_ids.long()
    B = x.numel()
    G = int(g.max()) + 1 if num_groups is None and B else (num_groups or 0)
    count, _, std = _group_mean_std(x, g, G)
    if bool((count == 1).any()):
        bad = int(torch.nonzero(count == 1)[0, 0])
        raise ValueError(f"pass@k needs at least 2 samples per group; group {bad} has 1")
    same = g[:, None] == g[None, :]
    idx = torch.arange(B, device=x.device)
    other = same & (idx[:, None] != idx[None, :])
    beaten = (other & (x[None, :] > x[:, None])).any(1)
    tied_before = (other & (x[None, :] == x[:, None]) & (idx[None, :] < idx[:, None])).any(1)
    best = ~beaten & ~tied_before
    second = torch.where(other, x[None, :].expand(B, B), float("-inf")).amax(1) if B else x
    adv = x - second
    if norm_by_std:
        adv = adv / (std[g] + eps)
    return torch.where(best, adv, torch.zeros_like(adv)).float()


def bnpo(scores, group_ids, *, min_value=0.0, max_value=1.0, num_groups=None):
    """BNPO (authors' compute_bnpo_outcome_advantage; edge cases as fastrl.advantages.bnpo).
    Returns fp32[B]."""
    x = scores.double()
    g = group_ids.long()
    B = x.numel()
    if B == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)
    G = int(g.max()) + 1 if num_groups is None else num_groups
    lo = x.min() if min_value is None else torch.tensor(min_value, dtype=torch.float64)
    hi = x.max() if max_value is None else torch.tensor(max_value, dtype=torch.float64)
    rt = (x - lo) / (hi - lo) if bool(hi > lo) else torch.zeros_like(x)
    count, mean, _ = _group_mean_std(rt, g, G)
    present = count > 0
    p = torch.where(count == 1, torch.zeros_like(mean), mean)
    ps = p[present]
    if ps.numel() > 1:
        mu, v = ps.mean(), ps.var()
    else:
        mu, v = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    if bool(v == 0):
        alpha = beta = torch.tensor(1.0, dtype=torch.float64)
    else:
        a = (mu * (1 - mu) / v - 1) * mu
        b = (mu * (1 - mu) / v - 1) * (1 - mu)
        alpha, beta = torch.clamp(1 + a / 3, min=1.0), torch.clamp(1 + b / 3, min=1.0)
    pdf = torch.distributions.Beta(alpha, beta).log_prob(p[g]).exp()
    w = torch.clamp(1 / pdf, min=0, max=1e6)
    return (w * (rt - p[g])).float()


def pref_grpo(scores, group_ids, *, eps=1e-6, num_groups=None):
    """Pref-GRPO, brute force: w_i = mean over j != i in g of [s_i > s_j] + 0.5 [s_i == s_j]
    (singleton 0.5); A = (w - mean_g w) / (unbiased std_g w + eps), singleton 0. Returns fp32[B]."""
    x = scores.double()
    g = group_ids.long()
    B = x.numel()
    G = int(g.max()) + 1 if num_groups is None and B else (num_groups or 0)
    idx = torch.arange(B, device=x.device)
    other = (g[:, None] == g[None, :]) & (idx[:, None] != idx[None, :])
    cmp = (x[:, None] > x[None, :]).double() + 0.5 * (x[:, None] == x[None, :]).double()
    n_other = other.sum(1).double()
    w = torch.where(n_other > 0, (cmp * other).sum(1) / n_other.clamp(min=1), torch.full_like(x, 0.5))
    count, mean, std = _group_mean_std(w, g, G)
    adv = (w - mean[g]) / (std[g] + eps)
    return torch.where(count[g] > 1, adv, torch.zeros_like(adv)).float()


def combine_rewards(rewards, *, weights=None, reduce="weighted_sum", lam=1.0):
    """NaN-aware combination of [B, K] reward columns, fp64: weighted_sum (sum of w_k r_k over the
    non-NaN r_k), mean, min, mean_minus_std (unbiased std over valid columns, 0 for one column);
    all-NaN rows give NaN. Returns fp32[B]."""
    x = rewards.double()
    K = x.shape[1]
    valid = ~torch.isnan(x)
    cnt = valid.sum(1)
    if reduce == "weighted_sum":
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        out = torch.where(valid, x * w.to(x.device), 0.0).sum(1)
    elif reduce == "mean":
        out = torch.nanmean(x, dim=1)
    elif reduce == "min":
        out = torch.where(valid, x, float("inf")).min(1).values if K else torch.zeros(x.shape[0], dtype=torch.float64)
    elif reduce == "mean_minus_std":
        mean = torch.nanmean(x, dim=1)
        var = torch.nansum((x - mean[:, None]) ** 2, dim=1) / (cnt - 1).clamp(min=1)
        out = mean - lam * torch.where(cnt > 1, var.sqrt(), torch.zeros_like(var))
    else:
        raise ValueError(f"unknown reduce {reduce!r}")
    return torch.where(cnt == 0, float("nan"), out).float()
