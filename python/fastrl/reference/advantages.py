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
