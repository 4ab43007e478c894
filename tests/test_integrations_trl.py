"""fastrl.integrations.trl.grpo_advantages against TRL 1.16.0's GRPOTrainer advantage code.

GRPOTrainer itself needs a model, so the reference below is a line-by-line transcription of
``trl/trainer/grpo_trainer.py`` (TRL 1.16.0, lines 2759-2810, ``_generate_and_score_completions``),
with ``self.*`` turned into arguments, calling TRL's own ``trl.trainer.utils.nanstd``.

Tolerance: ``atol = rtol = 1e-6`` plus, per row, TRL's float32 mean rounding amplified by its
denominator, ``2 ulp(|mean_g|) / (std_g + 1e-4)`` (fastrl's statistics are fp64 two-pass). A constant
group of a non-dyadic value is exactly 0 here and ``ulp / 1e-4``-sized noise in TRL; its
``is_std_zero`` may differ for the same reason (ours True, TRL False), and only there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.utils import nanstd  # noqa: E402

from fastrl.integrations.trl import GRPOAdvantages, grpo_advantages  # noqa: E402

SCALES = ["group", "batch", "none"]
AGGS = ["sum_then_normalize", "normalize_then_sum"]


def trl_reference(rewards_per_func, reward_weights, num_generations, scale_rewards, multi_objective_aggregation):
    """TRL 1.16.0 grpo_trainer.py lines 2759-2810 (self.X -> arguments; GRPOConfig maps the legacy
    booleans first: grpo_config.py line 1078)."""
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # grpo_config.py:1078
    device = rewards_per_func.device
    reward_weights = torch.as_tensor(reward_weights, dtype=torch.float32)
    num_reward_funcs = rewards_per_func.shape[1]
    # 2759
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    # 2761-2788
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:
                std_rewards = torch.zeros_like(rewards)
        else:
            raise ValueError(scale_rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    # 2790-2800
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, num_reward_funcs)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, num_reward_funcs)
        rewards = (reward_k * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    else:
        raise ValueError(multi_objective_aggregation)
    # 2810
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages, is_std_zero


# ----------------------------------------------------------------------------------------- data


def make_rewards(seed, num_groups, n, K, dtype=torch.float32, nan_frac=0.15,
                 kinds=("rand", "binary", "dyadic", "nondyadic", "near")):
    """[G*n, K] rewards with per-(group, function) random / constant (dyadic or not) / near-constant
    values, NaN entries, an all-NaN column (a reward function that never applies) and unscorable
    rows, plus groups with a single scored row."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_groups * n, K))
    for g in range(num_groups):
        for k in range(K):
            kind = rng.choice(kinds)
            if kind == "rand":
                v = rng.normal(size=n) * rng.choice([0.1, 1.0, 5.0])
            elif kind == "binary":
                v = rng.integers(0, 2, size=n).astype(float)
            elif kind == "dyadic":
                v = np.full(n, rng.choice([0.0, 1.0, 0.5]))
            elif kind == "nondyadic":
                v = np.full(n, rng.choice([0.1, 0.7, 0.3]))
            else:
                v = rng.choice([0.1, 0.7, 1.3]) + 1e-3 * rng.normal(size=n)
            out[g * n:(g + 1) * n, k] = v
    out[rng.random(out.shape) < nan_frac] = np.nan
    if K > 1:
        out[:, rng.integers(K)] = np.nan  # a function that returned None everywhere
    out[rng.random(out.shape[0]) < 0.1] = np.nan  # unscorable rows
    if num_groups > 2 and n > 1:
        out[0:n] = np.nan  # a fully unscorable group
        out[n + 1:2 * n] = np.nan  # a group with one scored row
    return torch.tensor(out, dtype=dtype)


def ulp32(x: torch.Tensor) -> torch.Tensor:
    x = x.double().abs()
    _, e = torch.frexp(torch.where(x > 0, x, torch.ones_like(x)))
    return torch.where(x > 0, torch.ldexp(torch.ones_like(x), (e - 24).to(torch.int64)), torch.zeros_like(x))


def nan_stats(values: torch.Tensor, ids: torch.Tensor, G: int):
    """fp64 per-row (count, mean, std, all-equal) of the non-NaN `values` of each row's group."""
    x = values.double()
    valid = ~torch.isnan(x)
    xv = torch.where(valid, x, torch.zeros_like(x))
    z = torch.zeros(G, dtype=torch.float64)
    cnt = z.index_add(0, ids, valid.double())
    mean = z.index_add(0, ids, xv) / cnt.clamp(min=1)
    dev = torch.where(valid, x - mean[ids], torch.zeros_like(x))
    std = (z.index_add(0, ids, dev * dev) / (cnt - 1).clamp(min=1)).sqrt()
    big = torch.full((G,), float("inf"), dtype=torch.float64)
    mn = big.scatter_reduce(0, ids, torch.where(valid, x, big[ids]), "amin")
    mx = (-big).scatter_reduce(0, ids, torch.where(valid, x, -big[ids]), "amax")
    return cnt[ids], mean[ids], std[ids], ((mn == mx) & (cnt >= 2))[ids]


def tolerances(rpf, w, n, scale, agg, ref):
    """Per-row allowed |ours - TRL|, and the rows whose is_std_zero may differ (constant groups)."""
    B, K = rpf.shape
    w = torch.as_tensor(w, dtype=torch.float64)
    base = 1e-6 + 1e-6 * ref.double().abs()
    if agg == "sum_then_normalize":
        rewards = (rpf * torch.as_tensor(w, dtype=torch.float32)).nansum(1)
        rewards[torch.isnan(rpf).all(1)] = torch.nan
        ids = torch.arange(B) // n
        cnt, mean, std, const = nan_stats(rewards, ids, B // n)
        _, _, std_b, const_b = nan_stats(rewards, torch.zeros(B, dtype=torch.int64), 1)
        denom = {"group": std + 1e-4, "batch": std_b + 1e-4, "none": torch.ones_like(std)}[scale]
        extra = torch.where(cnt >= 2, 2 * ulp32(mean) / denom, torch.zeros_like(mean))
        may_differ = const if scale != "batch" else const_b
        return base + extra, may_differ
    # normalize_then_sum: per-(group, function) error, weighted, then the batch normalization
    flat = rpf.reshape(-1)
    pos = torch.arange(B * K)
    ids = (pos // (n * K)) * K + pos % K
    cnt, mean, std, _ = nan_stats(flat, ids, (B // n) * K)
    ok = (cnt >= 2) & ~torch.isnan(flat.double())
    e = torch.where(ok, 1e-6 + 2 * ulp32(mean) / (std + 1e-4), torch.zeros_like(mean)).view(B, K)
    E = (e * w.abs()).sum(1)
    grouped = rpf.view(-1, n, K)
    rk = ((grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, 1, keepdim=True) + 1e-4)).view(B, K)
    rewards = (rk * torch.as_tensor(w, dtype=torch.float32)).nansum(1)
    rewards[torch.isnan(rpf).all(1)] = torch.nan
    _, mean_b, std_b, const_b = nan_stats(rewards, torch.zeros(B, dtype=torch.int64), 1)
    Eb = E[~torch.isnan(rewards)]
    Emax = Eb.max() if Eb.numel() else torch.zeros((), dtype=torch.float64)
    extra = (E + Emax + 2 * ulp32(mean_b)) / (std_b + 1e-4) + ref.double().abs() * 2 * Emax / (std_b + 1e-4)
    return base + torch.nan_to_num(extra, nan=0.0), const_b | (E > 0)


def check(rpf, w, n, scale, agg):
    ref_adv, ref_zero = trl_reference(rpf.clone(), w, n, scale, agg)
    before = rpf.clone()
    out = grpo_advantages(rpf, w, n, scale_rewards=scale, multi_objective_aggregation=agg)
    torch.testing.assert_close(rpf, before, rtol=0, atol=0, equal_nan=True)  # not modified
    assert isinstance(out, GRPOAdvantages)
    adv, zero = out
    assert adv.shape == ref_adv.shape and adv.dtype == ref_adv.dtype
    assert zero.shape == ref_zero.shape and zero.dtype == torch.bool
    assert not torch.isnan(adv).any()
    tol, may_differ = tolerances(rpf, w, n, scale if not isinstance(scale, bool) else
                                 {True: "group", False: "none"}[scale], agg, ref_adv)
    diff = (adv.double() - ref_adv.double()).abs()
    bad = diff > tol
    assert not bad.any(), (f"{int(bad.sum())} rows off, worst {diff.max().item():.3g}: ours {adv[bad][:4].tolist()} "
                           f"TRL {ref_adv[bad][:4].tolist()} tol {tol[bad][:4].tolist()}")
    unscorable = torch.isnan(rpf).all(1)
    assert (adv[unscorable] == 0).all()
    differ = zero != ref_zero
    assert not (differ & ~may_differ).any(), "is_std_zero differs outside constant groups"
    assert (zero | ~differ).all(), "where is_std_zero differs, ours must be the exact True"
    return adv, ref_adv, zero, ref_zero


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES + [True, False])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [1, 3])
def test_matches_trl(agg, scale, n, K):
    for seed in range(4):
        rpf = make_rewards(seed * 31 + n * 7 + K, num_groups=6, n=n, K=K)
        w = np.random.default_rng(seed).choice([1.0, 0.5, 2.0, 0.0, -1.0], size=K).tolist() if seed else [1.0] * K
        check(rpf, w, n, scale, agg)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_trl_tight_without_rounding_sensitive_groups(agg, scale):
    """Random, binary and dyadic-constant groups only (no group whose advantage is rounding noise
    over 1e-4): plain atol = rtol = 1e-6 and identical is_std_zero."""
    for seed in range(6):
        n, K = (4, 3) if seed % 2 else (8, 2)
        rpf = make_rewards(700 + seed, num_groups=6, n=n, K=K, kinds=("rand", "binary", "dyadic"))
        w = [1.0, 0.5, -2.0][:K]
        adv, zero = grpo_advantages(rpf, w, n, scale_rewards=scale, multi_objective_aggregation=agg)
        ref, ref_zero = trl_reference(rpf.clone(), w, n, scale, agg)
        torch.testing.assert_close(adv, ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(zero, ref_zero)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
def test_binary_rewards_exact_zeros(agg, scale):
    """0/1 rewards: all-0 / all-1 groups are exactly 0 on both sides, is_std_zero agrees."""
    rng = np.random.default_rng(3)
    n, G = 4, 8
    rpf = torch.tensor(rng.integers(0, 2, size=(G * n, 1)), dtype=torch.float32)
    rpf[0:n] = 0.0
    rpf[n:2 * n] = 1.0
    adv, ref, zero, ref_zero = check(rpf, [1.0], n, scale, agg)
    torch.testing.assert_close(adv, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(zero, ref_zero)
    if agg == "sum_then_normalize":
        assert (adv[:2 * n] == 0).all() and (ref[:2 * n] == 0).all()


def test_nondyadic_constant_group():
    """Every completion scored 0.7: fastrl exactly 0 and is_std_zero True; TRL's float32 mean
    rounding gives at most 2 ulp / 1e-4 (documented)."""
    for value in (0.1, 0.3, 0.7):
        for n in (3, 5, 6, 7):
            rpf = torch.full((n, 1), value)
            adv, zero = grpo_advantages(rpf, None, n)
            ref, ref_zero = trl_reference(rpf, [1.0], n, "group", "sum_then_normalize")
            assert (adv == 0).all() and zero.all()
            assert ref.abs().max().item() <= 2 * ulp32(torch.tensor(value)).item() / 1e-4


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
def test_float64_rewards(agg, scale):
    rpf = make_rewards(11, num_groups=5, n=4, K=2, dtype=torch.float64)
    check(rpf, [1.0, 0.5], 4, scale, agg)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
def test_corner_batches(agg, scale):
    # all unscorable
    check(torch.full((4, 2), float("nan")), [1.0, 1.0], 2, scale, agg)
    # a single row, and a batch with a single scored row
    check(torch.tensor([[0.3, 1.0]]), [1.0, 1.0], 1, scale, agg)
    rpf = torch.full((6, 1), float("nan"))
    rpf[4, 0] = 0.25
    check(rpf, [1.0], 3, scale, agg)
    # one group of the whole batch
    check(make_rewards(5, num_groups=1, n=8, K=2, nan_frac=0.0), [1.0, 1.0], 8, scale, agg)
    # infinite rewards (nan_to_num maps the resulting +-inf / NaN as TRL does)
    rpf = torch.tensor([[1.0], [float("inf")], [0.0], [0.5], [0.25], [2.0]])
    adv, ref, _, _ = check(rpf, [1.0], 2, scale, agg)
    assert torch.equal(adv[:2], ref[:2])  # the group holding inf


def test_errors():
    rpf = torch.zeros(6, 1)
    with pytest.raises(ValueError):
        grpo_advantages(rpf, None, 4)  # not a whole number of groups
    with pytest.raises(ValueError):
        grpo_advantages(rpf, None, 2, scale_rewards="max")
    with pytest.raises(ValueError):
        grpo_advantages(rpf, None, 2, multi_objective_aggregation="mean")
    with pytest.raises(ValueError):
        grpo_advantages(rpf, [1.0, 2.0], 2)


def test_default_weights_are_ones():
    rpf = make_rewards(9, num_groups=4, n=4, K=3)
    a = grpo_advantages(rpf, None, 4)
    b = grpo_advantages(rpf, torch.ones(3), 4)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.is_std_zero, b.is_std_zero)
