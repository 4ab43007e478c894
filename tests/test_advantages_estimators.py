"""pass@k, BNPO, Pref-GRPO and reward combination: fast paths vs the fp64 references, vs verl / TRL,
hand-checked cases and bad inputs."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrl
from fastrl import _extension
from fastrl import advantages as A
from fastrl.reference import advantages as R

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not (torch.cuda.is_available() and _extension.cuda_built()):
        pytest.skip("needs a CUDA GPU and the CUDA build of fastrl._C")
    return torch.device(name)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.cpu(), expected.cpu().float(), rtol=rtol, atol=atol, equal_nan=True)


@st.composite
def batches(draw, min_size=1, kinds=("int", "binary", "float", "const", "unit")):
    """(scores fp32[B], group_ids int64[B], num_groups): ragged shuffled groups, sparse ids (some ids
    in [0, num_groups) unused), ties, zero-variance groups."""
    sizes = draw(st.lists(st.integers(min_size, 9), min_size=1, max_size=12))
    kind = draw(st.sampled_from(kinds))
    sparse = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    G = len(sizes)
    ids = torch.repeat_interleave(torch.arange(G), torch.tensor(sizes))
    B = ids.numel()
    if kind == "int":
        x = torch.randint(-2, 3, (B,), generator=gen).float()
    elif kind == "binary":
        x = torch.randint(0, 2, (B,), generator=gen).float()
    elif kind == "float":
        x = torch.randn(B, generator=gen)
    elif kind == "unit":
        x = torch.rand(B, generator=gen)
    else:  # every group constant
        x = (torch.randint(0, 3, (G,), generator=gen).float() / 2)[ids]
    num_groups = G
    if sparse:
        num_groups = 2 * G + 1
        ids = torch.randperm(num_groups, generator=gen)[:G][ids]
    perm = torch.randperm(B, generator=gen)
    return x[perm], ids[perm], num_groups


# ------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("dev", DEVICES)
@SETTINGS
@given(b=batches(min_size=2), norm=st.booleans())
def test_passk_vs_reference(dev, b, norm):
    x, g, G = b
    d = _device(dev)
    out = A.passk(x.to(d), g.to(d), norm_by_std=norm, num_groups=G)
    close(out, R.passk(x, g, norm_by_std=norm, num_groups=G))
    # exactly one nonzero at most per group, and it is at a group maximum
    nz = out.cpu() != 0
    assert torch.zeros(G, dtype=torch.long).index_add(0, g, nz.long()).max() <= 1


def test_passk_vs_verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    gen = torch.Generator().manual_seed(0)
    sizes = [2, 5, 3, 8, 4, 2]
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    B = ids.numel()
    for scores in (torch.randn(B, generator=gen), torch.randint(0, 3, (B,), generator=gen).float()):
        perm = torch.randperm(B, generator=gen)
        x, g = scores[perm], ids[perm]
        uids = np.array([f"q{int(i)}" for i in g], dtype=object)
        T = 3
        tok = torch.zeros(B, T)
        tok[:, 1] = x  # the row sum is exactly x
        mask = torch.ones(B, T)
        for norm in (True, False):
            want, _ = core_algos.compute_grpo_passk_outcome_advantage(
                tok, mask, uids, epsilon=1e-6, config={"norm_adv_by_std_in_grpo": norm})
            got = A.passk(x, fastrl.group_index(uids), norm_by_std=norm)
            close(got, want[:, 0])
    # singleton group: both raise
    uids = np.array(["a", "a", "b"], dtype=object)
    with pytest.raises(ValueError):
        core_algos.compute_grpo_passk_outcome_advantage(torch.ones(3, 1), torch.ones(3, 1), uids, config={})
    with pytest.raises(ValueError, match="group 1"):
        A.passk(torch.ones(3), fastrl.group_index(uids))


def test_passk_small():
    x = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 5.0, 2.0, 7.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    out = A.passk(x, g)
    assert out[0] == pytest.approx(1 / (math.sqrt(1 / 3) + 1e-6))
    assert out[7] == pytest.approx(5 / (math.sqrt(12.5) + 1e-6))
    assert (out[[1, 2, 3, 4, 5, 6]] == 0).all()  # tie for the max in group 1: all zero
    assert torch.equal(A.passk(x, g, norm_by_std=False), torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 5]))


# -------------------------------------------------------------------------------------------- BNPO


@pytest.mark.parametrize("dev", DEVICES)
@SETTINGS
@given(b=batches(kinds=("binary", "unit", "const")))
def test_bnpo_fixed_bounds_vs_reference(dev, b):
    x, g, G = b
    d = _device(dev)
    close(A.bnpo(x.to(d), g.to(d), num_groups=G), R.bnpo(x, g, num_groups=G), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
@SETTINGS
@given(b=batches(), bounds=st.sampled_from([(None, None), (None, 10.0), (-10.0, None)]))
def test_bnpo_batch_bounds_vs_reference(dev, b, bounds):
    x, g, G = b
    d = _device(dev)
    lo, hi = bounds
    close(A.bnpo(x.to(d), g.to(d), min_value=lo, max_value=hi, num_groups=G),
          R.bnpo(x, g, min_value=lo, max_value=hi, num_groups=G), rtol=1e-4, atol=1e-5)


def test_bnpo_by_hand():
    # groups: [1,0,0,0] p=.25, [1,1,0] p=2/3, [1,1] p=1, singleton [1] p=0 (authors' rule)
    x = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1, 1, 1])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    p = [0.25, 2 / 3, 1.0, 0.0]
    mu = sum(p) / 4
    v = sum((q - mu) ** 2 for q in p) / 3
    k = mu * (1 - mu) / v - 1
    al, be = max(1.0, 1 + k * mu / 3), max(1.0, 1 + k * (1 - mu) / 3)

    def inv_pdf(q):
        lp = (math.lgamma(al + be) - math.lgamma(al) - math.lgamma(be)
              + (0 if al == 1 else (al - 1) * math.log(q) if q > 0 else -math.inf)
              + (0 if be == 1 else (be - 1) * math.log(1 - q) if q < 1 else -math.inf))
        return min(1e6, math.exp(-lp))

    want = torch.tensor([(float(x[i]) - p[int(g[i])]) * inv_pdf(p[int(g[i])]) for i in range(10)])
    close(A.bnpo(x, g), want, rtol=1e-5, atol=1e-6)
    # lgamma pdf == torch.distributions.Beta's
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for a_, b_ in ((1.0, 1.0), (1.0, 3.5), (2.5, 1.0), (4.0, 7.0)):
        a_t, b_t = torch.tensor(a_, dtype=torch.float64), torch.tensor(b_, dtype=torch.float64)
        lp = torch.xlogy(a_t - 1, q) + torch.xlogy(b_t - 1, 1 - q) + torch.lgamma(a_t + b_t) - torch.lgamma(a_t) - torch.lgamma(b_t)
        torch.testing.assert_close(lp, torch.distributions.Beta(a_t, b_t).log_prob(q))


def test_bnpo_degenerate():
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    # every group all-wrong / all-right: v == 0 -> uniform prior, A = r~ - p_g = 0, not NaN
    for x in (torch.zeros(6), torch.ones(6)):
        assert torch.equal(A.bnpo(x, g), torch.zeros(6))
    # equal group means but mixed groups: v == 0 -> weight 1, A = r~ - p
    x = torch.tensor([1.0, 0, 0, 1, 1, 0])
    assert torch.equal(A.bnpo(x, g), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5, -0.5]))
    # one group: authors' mu=0, v=1 -> alpha=beta=1, weight 1
    assert torch.equal(A.bnpo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0])), torch.tensor([0.5, -0.5]))
    # constant batch with batch bounds: 0, not 0/0
    assert torch.equal(A.bnpo(torch.full((4,), 3.0), torch.tensor([0, 0, 1, 1]), min_value=None, max_value=None),
                       torch.zeros(4))
    assert A.bnpo(torch.empty(0), torch.empty(0, dtype=torch.long)).shape == (0,)


# --------------------------------------------------------------------------------------- Pref-GRPO


@pytest.mark.parametrize("dev", DEVICES)
@SETTINGS
@given(b=batches())
def test_pref_grpo_vs_brute_force(dev, b):
    x, g, G = b
    d = _device(dev)
    close(A.pref_grpo(x.to(d), g.to(d), num_groups=G), R.pref_grpo(x, g, num_groups=G))


def test_pref_grpo_win_rates_and_large_group():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 9.0])
    g = torch.tensor([0, 0, 0, 0, 1])
    torch.testing.assert_close(A._win_rates(x, g), torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5], dtype=torch.float64))
    out = A.pref_grpo(x, g)
    assert out[4] == 0 and out[2] == 0 and out[3] == 0
    # a 20k-sample group (a dense [n, n] tensor would be 400M entries): win rate = normalized rank
    n = 20000
    x = torch.randperm(n).float()
    w = A._win_rates(x, torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(w, x.double() / (n - 1))


# ---------------------------------------------------------------------------------- combine_rewards


def _rewards_with_nans(B, K, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, K, generator=gen)
    r[torch.rand(B, K, generator=gen) < 0.3] = float("nan")
    r[0] = float("nan")  # an unscorable row
    if B > 1:
        r[1] = float("nan")
        r[1, K - 1] = 2.5  # one valid column
    return r


@pytest.mark.parametrize("dev", DEVICES)
@SETTINGS
@given(B=st.integers(1, 40), K=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       reduce=st.sampled_from(A.COMBINE_REDUCES), lam=st.floats(0.0, 3.0), weighted=st.booleans())
def test_combine_rewards_vs_reference(dev, B, K, seed, reduce, lam, weighted):
    d = _device(dev)
    r = _rewards_with_nans(B, K, seed)
    w = torch.linspace(-1.0, 2.0, K).tolist() if weighted and reduce == "weighted_sum" else None
    out = A.combine_rewards(r.to(d), weights=w, reduce=reduce, lam=lam)
    close(out, R.combine_rewards(r, weights=w, reduce=reduce, lam=lam))
    assert torch.isnan(out[0])


def test_combine_rewards_weighted_sum_matches_trl_exactly():
    # The exact rule of trl 1.16.0 GRPOTrainer._generate_and_score_completions (checked below in the
    # installed source): rewards = (rewards_per_func * reward_weights).nansum(1); all-NaN rows -> NaN.
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl not installed")
    src = open(os.path.join(os.path.dirname(spec.origin), "trainer", "grpo_trainer.py")).read()
    assert "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)" in src
    assert "rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)" in src
    assert "rewards[unscorable_mask] = torch.nan" in src
    for seed, (B, K) in enumerate([(64, 3), (7, 1), (33, 5)]):
        rewards_per_func = _rewards_with_nans(B, K, seed)
        reward_weights = torch.tensor(torch.linspace(0.5, -1.5, K).tolist(), dtype=torch.float32)
        unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        got = A.combine_rewards(rewards_per_func, weights=reward_weights)
        torch.testing.assert_close(got, rewards, rtol=0, atol=0, equal_nan=True)
        got = A.combine_rewards(rewards_per_func, weights=reward_weights.tolist())
        torch.testing.assert_close(got, rewards, rtol=0, atol=0, equal_nan=True)


def test_combine_rewards_small():
    nan = float("nan")
    r = torch.tensor([[1.0, nan, 3.0], [nan, nan, nan], [nan, 4.0, nan], [2.0, 2.0, 8.0]])
    torch.testing.assert_close(A.combine_rewards(r), torch.tensor([4.0, nan, 4.0, 12.0]), equal_nan=True)
    torch.testing.assert_close(A.combine_rewards(r, reduce="mean"), torch.tensor([2.0, nan, 4.0, 4.0]), equal_nan=True)
    torch.testing.assert_close(A.combine_rewards(r, reduce="min"), torch.tensor([1.0, nan, 4.0, 2.0]), equal_nan=True)
    want = torch.tensor([2.0 - 0.5 * math.sqrt(2), nan, 4.0, 4.0 - 0.5 * math.sqrt(12)])
    torch.testing.assert_close(A.combine_rewards(r, reduce="mean_minus_std", lam=0.5), want, equal_nan=True)


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", [A.passk, A.bnpo, A.pref_grpo])
def test_bad_inputs_group_estimators(fn):
    x, g = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="`scores`.*1-D"):
        fn(x.view(2, 2), g)
    with pytest.raises(ValueError, match="`scores`.*float"):
        fn(torch.tensor([0, 1, 1, 0]), g)
    with pytest.raises(ValueError, match="`group_ids`.*shape"):
        fn(x, g[:3])
    with pytest.raises(ValueError, match="`group_ids`.*int64"):
        fn(x, g.int())
    with pytest.raises(TypeError, match="`scores`"):
        fn([0.0, 1.0], g)
    # out-of-range id on the CPU: the compiled op and the reference both raise, naming the argument
    with pytest.raises((ValueError, RuntimeError), match="`group_ids` must lie in"):
        fn(x, torch.tensor([0, 0, 1, 7]), num_groups=2)


def test_bad_inputs_bnpo_bounds():
    x, g = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="`max_value`"):
        A.bnpo(x, g, min_value=1.0, max_value=1.0)
    with pytest.raises(ValueError, match="outside"):
        A.bnpo(x * 5, g)
    with pytest.raises(ValueError, match="`min_value`"):
        A.bnpo(x, g, min_value="0")


def test_bad_inputs_combine_rewards():
    r = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="`reduce`.*weighted_sum.*mean_minus_std"):
        A.combine_rewards(r, reduce="median")
    with pytest.raises(ValueError, match="`rewards`.*2-D"):
        A.combine_rewards(r[:, 0])
    with pytest.raises(ValueError, match="`rewards`.*float"):
        A.combine_rewards(r.long())
    with pytest.raises(ValueError, match="`weights`.*\\(3,\\)"):
        A.combine_rewards(r, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="`weights` only applies"):
        A.combine_rewards(r, weights=[1.0, 2.0, 3.0], reduce="mean")
    with pytest.raises(TypeError, match="`rewards`"):
        A.combine_rewards([[1.0]])


def test_inputs_not_modified_and_exported():
    x = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5])
    g = torch.tensor([0, 0, 1, 1, 1])
    x0, g0 = x.clone(), g.clone()
    for fn in (A.passk, A.bnpo, A.pref_grpo):
        fn(x, g)
    A.combine_rewards(x.view(-1, 1))
    assert torch.equal(x, x0) and torch.equal(g, g0)
    for name in ("passk", "bnpo", "pref_grpo", "combine_rewards"):
        assert name in A.__all__
