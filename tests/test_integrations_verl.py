"""fastrl.integrations.verl against the installed verl (0.9.1) functions themselves.

Tolerance: ``atol = rtol = 1e-6`` (float32/float64 rewards), plus, per sample, the rounding error of
verl's own statistics amplified by what divides or multiplies them (``2 ulp(|mean_g|) * gain``, e.g.
``gain = 1 / (std_g + epsilon)`` for GRPO): fastrl's statistics are fp64 two-pass, verl's are in the
rewards' dtype, so on a constant group of a non-dyadic value verl returns ``ulp / epsilon`` of
rounding noise where fastrl returns 0. Exactly representable constant groups are exactly 0 on both
sides. bf16 rewards: verl rounds every intermediate to bf16, so rtol is a few bf16 ulps and the ulps
above are bf16 ulps.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
from verl.trainer.ppo import core_algos  # noqa: E402

import fastrl.integrations.verl as fv  # noqa: E402

# the verl originals, captured before any test can install() ours
VERL = {name: core_algos.ADV_ESTIMATOR_REGISTRY[name] for name in fv.ESTIMATORS}
VERL_GRPO_ATTR = core_algos.compute_grpo_outcome_advantage

GROUP_NAMES = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "reinforce_plus_plus_baseline"]
MANTISSA = {torch.float32: 23, torch.float64: 52, torch.bfloat16: 7, torch.float16: 10}


@pytest.fixture(autouse=True)
def _never_leave_installed():
    yield
    fv.uninstall()


# ----------------------------------------------------------------------------------------- data


def make_batch(seed, dtype=torch.float32, T=6, mask_dtype=torch.int64, singletons=True, dense=False,
               kinds=("rand", "dyadic", "nondyadic", "near"), n_groups=10):
    """Ragged, shuffled groups of verl-style token rewards (outcome at the last response token, or
    dense), with constant (dyadic and not), near-constant and random groups, and all-masked rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 5, 8] if singletons else [2, 3, 5, 8], size=n_groups)
    vals, uids = [], []
    for g, n in enumerate(sizes):
        kind = rng.choice(kinds)
        if kind == "rand":
            v = rng.normal(size=n) * rng.choice([0.1, 1.0, 5.0])
        elif kind == "dyadic":
            v = np.full(n, rng.choice([0.0, 1.0, 0.5, -2.0]))
        elif kind == "nondyadic":
            v = np.full(n, rng.choice([0.1, 0.7, 0.3, -1.3, 3.3]))
        elif kind == "binary":
            v = rng.integers(0, 2, size=n).astype(np.float64)
        else:  # near-constant
            v = rng.choice([0.1, 0.7, 1.3]) + 1e-3 * rng.normal(size=n)
        vals += list(v)
        uids += [f"{rng.integers(1 << 30):x}-{g}"] * n
    perm = rng.permutation(len(vals))
    vals = np.asarray(vals)[perm]
    uids = np.asarray(uids, dtype=object)[perm]
    B = len(vals)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[rng.random(B) < 0.15] = 0  # all-zero mask rows
    mask = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]
    rewards = torch.zeros(B, T, dtype=torch.float64)
    if dense:  # several nonzero tokens per row (sum = the value), some outside the mask
        parts = torch.as_tensor(rng.dirichlet(np.ones(T), size=B))
        rewards = parts * torch.as_tensor(vals)[:, None]
    else:
        last = torch.as_tensor(np.maximum(lengths - 1, 0))
        rewards[torch.arange(B), last] = torch.as_tensor(vals)
    return rewards.to(dtype), mask.to(mask_dtype), uids


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of |x| in `dtype` (fp64 result)."""
    x = x.double().abs()
    _, e = torch.frexp(torch.where(x > 0, x, torch.ones_like(x)))
    out = torch.ldexp(torch.ones_like(x), (e - 1 - MANTISSA[dtype]).to(torch.int64))
    return torch.where(x > 0, out, torch.zeros_like(x))


def group_stats(scores: torch.Tensor, uids):
    """fp64 per-sample (n_g, mean_g, std_g, max_g |x|) of `scores` (std_g of a singleton: 0)."""
    x = scores.double()
    keys = list(dict.fromkeys(uids.tolist()))
    gid = torch.tensor([keys.index(u) for u in uids.tolist()])
    G = len(keys)
    n = torch.zeros(G, dtype=torch.float64).index_add(0, gid, torch.ones_like(x))
    mean = torch.zeros(G, dtype=torch.float64).index_add(0, gid, x) / n
    dev = x - mean[gid]
    var = torch.zeros(G, dtype=torch.float64).index_add(0, gid, dev * dev) / (n - 1).clamp(min=1)
    amax = torch.zeros(G, dtype=torch.float64).scatter_reduce(0, gid, x.abs(), "amax")
    return n[gid], mean[gid], var.sqrt()[gid], amax[gid]


def verl_call(name, **kw):
    return VERL[name](**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})


def ours_call(name, **kw):
    return fv.ESTIMATORS[name](**kw)


def tolerance(name, rewards, mask, uids, ref, *, epsilon=1e-6, norm=True, f_norm=1.0):
    """Per-token allowed |ours - verl| (see the module docstring)."""
    dtype = rewards.dtype
    low = dtype in (torch.bfloat16, torch.float16)
    stat_dtype = torch.float32 if name == "grpo_vectorized" and dtype == torch.float64 else dtype
    atol, rtol = (1e-6, 1e-6) if not low else (1e-6, 2.0 ** -6)
    scores = rewards.sum(-1)
    n, mean, std, amax = group_stats(scores, uids)
    single = n == 1
    x = scores.double().abs()
    zero = torch.zeros_like(x)
    mterm = torch.where(single, zero, 2 * ulp(mean, stat_dtype))  # verl's singleton mean is an exact 0
    if name in ("grpo", "grpo_vectorized"):
        gain = 1.0 / (std + epsilon) if norm else torch.ones_like(std)
        extra = mterm * gain
    elif name == "gpg":
        alpha = scores.numel() / max(1, int(torch.count_nonzero(scores)))
        extra = (mterm + ulp(x, stat_dtype)) * alpha / f_norm
    elif name in ("rloo", "rloo_vectorized"):
        # verl: x n/(n-1) - mean n/(n-1), or (n x - sum_g) / (n-1): products and sums round
        extra = torch.where(single, zero, n * (ulp(x * n, stat_dtype) + ulp(mean * n, stat_dtype)) / (n - 1))
    elif name == "opo":
        extra = torch.where(single, zero, 4 * ulp(amax, stat_dtype))
    elif name == "reinforce_plus_plus_baseline":
        m = mask.double()
        tok = torch.where(single, scores.double(), scores.double() - mean)[:, None] * m
        mb = (tok * m).sum() / m.sum()
        var_b = (((tok - mb) ** 2) * m).sum() / (m.sum() - 1)
        inv = torch.rsqrt(var_b + 1e-8)
        # verl sums every token in the rewards' dtype: the batch mean and variance carry a summation
        # error of up to ~log2(N) unit roundoffs of the sum of magnitudes (significant in bf16)
        u = 2.0 ** -(MANTISSA[stat_dtype] + 1)
        k = float(np.ceil(np.log2(m.numel() + 1)))
        mb_err = k * u * (tok.abs() * m).sum() / m.sum()
        extra = (mterm + mb_err + 2 * ulp(mb, stat_dtype) + 2 * ulp(x, stat_dtype)) * inv
        rtol = rtol + k * u
    else:
        raise KeyError(name)
    return atol + rtol * ref.double().abs() + extra[:, None] * (mask != 0)


def assert_close_verl(name, ours, ref, tol):
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype, (name, ours.dtype, ref.dtype)
    o, r = ours.double(), ref.double()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    assert torch.equal(nan_o, nan_r), f"{name}: NaN pattern differs"
    diff = torch.where(nan_o, torch.zeros_like(o), (o - r).abs())
    bad = diff > tol
    assert not bad.any(), (f"{name}: {int(bad.sum())} tokens off; worst |diff| {diff.max().item():.3g}, "
                           f"ours {o[bad][:5].tolist()} verl {r[bad][:5].tolist()} tol {tol[bad][:5].tolist()}")


# ------------------------------------------------------------------------------- group estimators


@pytest.mark.parametrize("name", GROUP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
def test_group_estimators_match_verl(name, dtype, mask_dtype):
    for seed in range(6):
        rewards, mask, uids = make_batch(seed, dtype=dtype, mask_dtype=mask_dtype, dense=seed % 2 == 1)
        kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config={})
        ref_a, ref_r = verl_call(name, **kw)
        before = rewards.clone()
        a, r = ours_call(name, **kw)
        assert torch.equal(rewards, before), "inputs must not be modified"
        tol = tolerance(name, rewards, mask, uids, ref_a)
        assert_close_verl(name, a, ref_a, tol)
        assert_close_verl(name, r, ref_r, tol)
        zero_rows = (mask == 0).all(-1)
        assert (a[zero_rows] == 0).all(), "all-masked rows must be 0"
        assert (a[mask == 0] == 0).all(), "masked positions must be 0"


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_single_token_responses(name):
    for seed in range(4):
        rewards, mask, uids = make_batch(100 + seed, T=1)
        if name == "reinforce_plus_plus_baseline" and mask.sum() < 2:
            continue
        kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config={})
        ref, _ = verl_call(name, **kw)
        ours, _ = ours_call(name, **kw)
        assert ours.shape == (rewards.shape[0], 1)
        assert_close_verl(name, ours, ref, tolerance(name, rewards, mask, uids, ref))


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_binary_rewards_constant_groups_exactly_zero(name):
    """0/1 rewards (the common case): all-0 and all-1 groups are exactly 0 on both sides, and
    everything else agrees to 1e-6."""
    rng = np.random.default_rng(7)
    rows, uids = [], []
    for g, kind in enumerate(["zeros", "ones", "mixed", "zeros", "ones", "mixed", "mixed"]):
        n = 4
        v = {"zeros": np.zeros(n), "ones": np.ones(n), "mixed": rng.integers(0, 2, size=n)}[kind]
        if kind == "mixed":
            v[0], v[1] = 0, 1
        rows += list(v)
        uids += [f"g{g}"] * n
    perm = rng.permutation(len(rows))
    scores = torch.tensor(rows, dtype=torch.float32)[perm]
    uids = np.asarray(uids, dtype=object)[perm]
    T = 5
    mask = torch.ones(len(rows), T, dtype=torch.int64)
    rewards = torch.zeros(len(rows), T)
    rewards[:, -1] = scores
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config={})
    ref, _ = verl_call(name, **kw)
    ours, _ = ours_call(name, **kw)
    const = np.isin(uids, ["g0", "g1", "g3", "g4"])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    if name != "reinforce_plus_plus_baseline":  # the whitening shifts every token by the batch mean
        assert (ours[torch.as_tensor(const)] == 0).all()
        assert (ref[torch.as_tensor(const)] == 0).all()


def test_nondyadic_constant_group_is_exactly_zero_verl_within_rounding_bound():
    """[0.1, 0.1, 0.1]: fastrl gives exactly 0; verl gives its fp32 mean's rounding error over
    epsilon (documented), within 2 ulp(mean) / (0 + epsilon)."""
    for value in (0.1, 0.3, 0.7, 3.3):
        for n in (3, 5, 6, 7):
            rewards = torch.full((n, 1), value)
            mask = torch.ones(n, 1, dtype=torch.int64)
            uids = np.array(["q"] * n, dtype=object)
            ref, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
            ours, _ = fv.compute_grpo_outcome_advantage(rewards, mask, uids)
            assert (ours == 0).all()
            bound = 2 * ulp(torch.tensor(value), torch.float32).item() / 1e-6
            assert ref.abs().max().item() <= bound


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-2])
def test_grpo_options(norm, epsilon):
    for seed in range(4):
        rewards, mask, uids = make_batch(200 + seed)
        for name in ("grpo", "grpo_vectorized"):
            kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, epsilon=epsilon,
                      norm_adv_by_std_in_grpo=norm)
            ref, _ = verl_call(name, **kw)
            ours, _ = ours_call(name, **kw)
            assert_close_verl(name, ours, ref, tolerance(name, rewards, mask, uids, ref, epsilon=epsilon, norm=norm))


@pytest.mark.parametrize("f_norm", [1.0, 3.0])
def test_gpg_f_norm_and_all_zero_scores(f_norm):
    for seed in range(3):
        rewards, mask, uids = make_batch(300 + seed)
        kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, f_norm=f_norm, alpha=5.0)
        ref, _ = verl_call("gpg", **kw)
        ours, _ = ours_call("gpg", **kw)
        assert_close_verl("gpg", ours, ref, tolerance("gpg", rewards, mask, uids, ref, f_norm=f_norm))
    rewards = torch.zeros(6, 3)  # count_nonzero = 0 -> alpha = bs / 1
    mask = torch.ones(6, 3, dtype=torch.int64)
    uids = np.array(list("aabbbc"), dtype=object)
    ref, _ = verl_call("gpg", token_level_rewards=rewards, response_mask=mask, index=uids, f_norm=f_norm)
    ours, _ = ours_call("gpg", token_level_rewards=rewards, response_mask=mask, index=uids, f_norm=f_norm)
    assert torch.equal(ours, ref)


def test_opo_all_masked_group_is_nan_like_verl():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.5], [1.0, 0.0], [0.0, 2.0], [0.0, 0.3]])
    mask = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1], [1, 1]])
    uids = np.array(["a", "a", "b", "b", "c"], dtype=object)  # group a: lengths sum to 0 -> 0/0
    ref, _ = verl_call("opo", token_level_rewards=rewards, response_mask=mask, index=uids)
    ours, _ = ours_call("opo", token_level_rewards=rewards, response_mask=mask, index=uids)
    assert torch.isnan(ref[:2]).all()
    assert_close_verl("opo", ours, ref, tolerance("opo", rewards, mask, uids, ref))


def test_reinforce_pp_baseline_mask_too_small_raises_like_verl():
    rewards = torch.randn(3, 4)
    uids = np.array(["a", "a", "b"], dtype=object)
    one_token = torch.zeros(3, 4, dtype=torch.int64)
    one_token[0, 0] = 1
    for mask in (torch.zeros(3, 4, dtype=torch.int64), one_token):
        for fn in (VERL["reinforce_plus_plus_baseline"], fv.compute_reinforce_plus_plus_baseline_outcome_advantage):
            with pytest.raises(ValueError):
                fn(token_level_rewards=rewards.clone(), response_mask=mask, index=uids, config={})


def test_index_forms_agree():
    rewards, mask, uids = make_batch(5)
    ref, _ = fv.compute_grpo_outcome_advantage(rewards, mask, uids)
    as_int = {u: 7 * i + 3 for i, u in enumerate(dict.fromkeys(uids.tolist()))}
    for form in (uids.astype(str), uids.tolist(), np.array([as_int[u] for u in uids]),
                 torch.tensor([as_int[u] for u in uids])):
        ours, _ = fv.compute_grpo_outcome_advantage(rewards, mask, form)
        assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_passk_matches_verl(norm, dtype):
    cfg = {"norm_adv_by_std_in_grpo": norm}
    for seed in range(6):
        kinds = ("rand", "binary", "dyadic", "near") if seed % 2 else ("rand", "binary")
        rewards, mask, uids = make_batch(400 + seed, dtype=dtype, singletons=False, kinds=kinds, dense=seed == 3)
        kw = dict(token_level_rewards=rewards, response_mask=mask, index=uids, config=cfg,
                  norm_adv_by_std_in_grpo=not norm)  # the argument is ignored: config decides
        ref, ref_r = verl_call("grpo_passk", **kw)
        ours, ours_r = ours_call("grpo_passk", **kw)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        scores = rewards.sum(-1)
        n, mean, std, _ = group_stats(scores, uids)
        gain = 1.0 / (std + 1e-6) if norm else torch.ones_like(std)
        tol = 1e-6 + 1e-6 * ref.double().abs() + (2 * ulp(scores, dtype) * gain)[:, None]
        assert ((ours.double() - ref.double()).abs() <= tol).all()
        assert torch.equal(ours, ours_r)
        # only the best response of each group is nonzero
        assert ((ours != 0).any(-1).sum() <= len(set(uids.tolist())))


def test_passk_singleton_and_missing_config_raise():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    mask = torch.ones(3, 1, dtype=torch.int64)
    uids = np.array(["a", "a", "b"], dtype=object)
    for fn in (VERL["grpo_passk"], fv.compute_grpo_passk_outcome_advantage):
        with pytest.raises(ValueError):
            fn(rewards.clone(), mask, uids, config={})
    with pytest.raises((ValueError, AssertionError)):
        fv.compute_grpo_passk_outcome_advantage(rewards, mask, np.array(["a", "a", "a"], dtype=object))


# ------------------------------------------------------------------------------------------ ReMax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
def test_remax_matches_verl(dtype, mask_dtype):
    for seed in range(3):
        rewards, mask, _ = make_batch(500 + seed, dtype=dtype, mask_dtype=mask_dtype, dense=True)
        baselines = torch.randn(rewards.shape[0]).to(dtype)
        ref_a, ref_r = VERL["remax"](token_level_rewards=rewards, reward_baselines=baselines,
                                     response_mask=mask, config={})
        a, r = fv.compute_remax_outcome_advantage(token_level_rewards=rewards, reward_baselines=baselines,
                                                  response_mask=mask, config={})
        assert a.dtype == ref_a.dtype and r.dtype == ref_r.dtype
        torch.testing.assert_close(a, ref_a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r, ref_r, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ API and registry


@pytest.mark.parametrize("name", list(fv.ESTIMATORS))
def test_signature_matches_verl(name):
    ours = inspect.signature(fv.ESTIMATORS[name])
    theirs = inspect.signature(VERL[name])
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
           [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
    assert fv.ESTIMATORS[name].__name__ == VERL[name].__name__


def test_install_uninstall_round_trip():
    names = fv.install()
    assert sorted(names) == sorted(fv.ESTIMATORS)
    for name in names:
        assert core_algos.get_adv_estimator_fn(name) is fv.ESTIMATORS[name]
        assert core_algos.get_adv_estimator_fn(core_algos.AdvantageEstimator(name)) is fv.ESTIMATORS[name]
    assert core_algos.compute_grpo_outcome_advantage is fv.compute_grpo_outcome_advantage
    assert core_algos.get_adv_estimator_fn("gae") is not None  # others untouched
    assert fv.install() == names  # idempotent: the saved originals stay verl's
    restored = fv.uninstall()
    assert sorted(restored) == sorted(fv.ESTIMATORS)
    for name in names:
        assert core_algos.get_adv_estimator_fn(name) is VERL[name]
    assert core_algos.compute_grpo_outcome_advantage is VERL_GRPO_ATTR
    assert fv.uninstall() == []


def _spy_on_installed(estimator, calls):
    original = fv.ESTIMATORS[estimator]

    def spy(*args, **kwargs):
        calls.append(estimator)
        return original(*args, **kwargs)

    if estimator == "grpo":
        core_algos.compute_grpo_outcome_advantage = spy
    else:
        core_algos.ADV_ESTIMATOR_REGISTRY[estimator] = spy


def _as_verl_trainer_calls(estimator, rewards, mask, uids, config):
    """What verl 0.9.1's ray_trainer.compute_advantage does for an outcome estimator: GRPO through
    the core_algos module attribute, the others through the registry with these keyword args."""
    if estimator == "grpo":
        return core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=rewards, response_mask=mask, index=uids,
            norm_adv_by_std_in_grpo=config.get("norm_adv_by_std_in_grpo", True))[0]
    fn = core_algos.get_adv_estimator_fn(estimator)
    return fn(token_level_rewards=rewards, response_mask=mask, config=config, index=uids)[0]


@pytest.mark.parametrize("estimator", ["grpo", "grpo_passk", "rloo", "opo", "gpg", "reinforce_plus_plus_baseline"])
def test_installed_estimators_serve_the_trainer_call_path(estimator):
    rewards, mask, uids = make_batch(600, singletons=estimator != "grpo_passk")
    config = {"norm_adv_by_std_in_grpo": True}
    ref = _as_verl_trainer_calls(estimator, rewards.clone(), mask, uids, config)
    fv.install()
    calls = []
    _spy_on_installed(estimator, calls)
    ours = _as_verl_trainer_calls(estimator, rewards.clone(), mask, uids, config)
    assert calls == [estimator]
    if estimator == "grpo_passk":
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    else:
        assert_close_verl(estimator, ours, ref, tolerance(estimator, rewards, mask, uids, ref))
    fv.uninstall()
    assert torch.equal(_as_verl_trainer_calls(estimator, rewards.clone(), mask, uids, config), ref)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_installed_estimators_serve_verl_compute_advantage(estimator):
    """verl's own ray_trainer.compute_advantage picks ours up after install() (GRPO through the
    rebound module attribute, the others through the registry). Skipped where the trainer module
    cannot be imported (it pulls in rollout dependencies such as cachetools)."""
    ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")
    from verl import DataProto

    rewards, mask, uids = make_batch(600)

    def run():
        data = DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                                   non_tensors={"uid": uids.copy()})
        out = ray_trainer.compute_advantage(data, adv_estimator=estimator,
                                            config={"norm_adv_by_std_in_grpo": True})
        return out.batch["advantages"]

    ref = run()
    fv.install()
    calls = []
    _spy_on_installed(estimator, calls)
    ours = run()
    assert calls == [estimator], "verl did not call the installed function"
    assert_close_verl(estimator, ours, ref, tolerance(estimator, rewards, mask, uids, ref))
