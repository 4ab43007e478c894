"""Best-of-N family (fastrl.sampling.groups): the compiled best_of_n vs its brute-force reference,
pairs, filters, the quantile mask, exact pass@k / best@k / worst@k / maj@k vs enumeration of all
k-subsets (maj@k also vs an exact-integer DP), resampling, bad input, opcheck, determinism, no host
sync on the device paths (meta tensors), CPU == CUDA."""
from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastrl
from fastrl.reference import selection as ref
from fastrl.sampling.groups import (best_at_k, best_of_n, filter_groups, maj_at_k, pass_at_k, quantile_mask,
                                    resample, select_pairs, worst_at_k)

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])
NAN = float("nan")


def ragged(gen, num_groups, max_size, *, levels=4, nan_frac=0.0, min_size=1):
    """Shuffled groups of random sizes; integer-valued scores in [0, levels) so ties are common."""
    sizes = torch.randint(min_size, max_size + 1, (num_groups,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(num_groups), sizes)
    scores = torch.randint(0, levels, (ids.numel(),), generator=gen).double() * 0.5 - 0.3
    scores[torch.rand(ids.numel(), generator=gen) < nan_frac] = NAN
    perm = torch.randperm(ids.numel(), generator=gen)
    return scores[perm], ids[perm]


# ------------------------------------------------------------------------------------ best_of_n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("largest", [True, False])
def test_best_of_n_matches_reference(device, dtype, k, largest):
    gen = torch.Generator().manual_seed(100 * k + largest)
    scores, ids = ragged(gen, 40, 7, nan_frac=0.1)
    scores = scores.to(dtype)
    got = best_of_n(scores.to(device), ids.to(device), k, largest=largest, num_groups=43)  # 3 empty groups
    want = ref.best_of_n(scores, ids, k, largest=largest, num_groups=43)
    assert got.dtype == torch.int64 and got.shape == (43, k)
    assert torch.equal(got.cpu(), want)


@settings(max_examples=40, deadline=None)
@given(num_groups=st.integers(1, 30), max_size=st.integers(1, 12), k=st.integers(1, 14),
       levels=st.integers(1, 50), nan_frac=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_best_of_n_hypothesis(num_groups, max_size, k, levels, nan_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    scores, ids = ragged(gen, num_groups, max_size, levels=levels, nan_frac=nan_frac)
    for largest in (True, False):
        assert torch.equal(best_of_n(scores, ids, k, largest=largest, num_groups=num_groups),
                           ref.best_of_n(scores, ids, k, largest=largest, num_groups=num_groups))


def test_best_of_n_by_hand_ties_nan_inf():
    s = torch.tensor([2.0, NAN, 5.0, 5.0, float("inf"), -float("inf"), 1.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    assert best_of_n(s, ids, 3).tolist() == [[2, 3, 0], [4, 5, -1], [6, -1, -1]]
    assert best_of_n(s, ids, 2, largest=False).tolist() == [[0, 2], [5, 4], [6, -1]]
    assert best_of_n(s, ids).tolist() == [[2], [4], [6]]  # num_groups defaults to max + 1


def test_best_of_n_signed_zeros_tie_and_extreme_values():
    # -0.0 == +0.0 ties by index (the CPU lists compare bit patterns: zeros are canonicalized);
    # the extreme finite values and the infinities keep their order in both directions
    big = torch.finfo(torch.float32).max
    s = torch.tensor([0.0, -0.0, -0.0, 0.0, -big, big, -float("inf"), float("inf"), 1e-45, -1e-45])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype)
        assert best_of_n(x, ids, 4).tolist() == [[0, 1, 2, 3], [7, 5, 4, 6], [8, 9, -1, -1]]
        assert best_of_n(x, ids, 4, largest=False).tolist() == [[0, 1, 2, 3], [6, 4, 5, 7], [9, 8, -1, -1]]
        assert torch.equal(best_of_n(x, ids, 4), ref.best_of_n(x, ids, 4, num_groups=3))


def test_best_of_n_edges():
    e = torch.empty(0)
    ei = torch.empty(0, dtype=torch.int64)
    assert best_of_n(e, ei, 2).shape == (0, 2)
    assert best_of_n(e, ei, 2, num_groups=3).tolist() == [[-1, -1]] * 3
    s = torch.tensor([NAN, NAN])
    assert best_of_n(s, torch.tensor([0, 0]), 1).tolist() == [[-1]]  # all-NaN group: nothing to select
    # k larger than every group: documented -1 padding
    assert best_of_n(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), 4).tolist() == [[0, -1, -1, -1], [1, -1, -1, -1]]


def test_best_of_n_noncontiguous_and_unmodified():
    gen = torch.Generator().manual_seed(3)
    scores, ids = ragged(gen, 30, 6)
    wide = torch.stack([scores, scores + 1], 1)
    s0, i0 = wide.clone(), ids.clone()
    assert torch.equal(best_of_n(wide[:, 1], ids, 3), best_of_n(wide[:, 1].contiguous(), ids, 3))
    assert torch.equal(wide, s0) and torch.equal(ids, i0)


# the CPU's list lengths: fixed 2, 4 (k = 3 and 4), 16 (k = 11), an insertion list past 16; 64-bit
# list entries (fp32) and 128-bit ones (fp64)
@pytest.mark.parametrize("k", [2, 3, 4, 11, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_best_of_n_deterministic_across_thread_counts_and_batch_invariant(k, dtype):
    gen = torch.Generator().manual_seed(5)
    scores, ids = ragged(gen, 5000, 24, levels=3, nan_frac=0.05)
    scores = scores.to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = best_of_n(scores, ids, k, num_groups=5000)
        torch.set_num_threads(max(2, before))
        many = best_of_n(scores, ids, k, num_groups=5000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    assert torch.equal(many, ref.best_of_n(scores, ids, k, num_groups=5000))  # k = 2: > 1 chunk table merged
    # a group's selection does not depend on the other groups of the batch
    keep = ids < 100
    sub = best_of_n(scores[keep], ids[keep], k, num_groups=100)
    pos = torch.nonzero(keep)[:, 0]
    assert torch.equal(torch.where(sub >= 0, pos[sub.clamp(min=0)], -1), one[:100])


def test_best_of_n_reference_backend_gives_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    scores, ids = ragged(gen, 25, 6, nan_frac=0.1)
    fast = best_of_n(scores, ids, 3, largest=False)
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    assert torch.equal(best_of_n(scores, ids, 3, largest=False), fast)


def test_best_of_n_opcheck():
    gen = torch.Generator().manual_seed(6)
    scores, ids = ragged(gen, 12, 5)
    for k, largest in ((1, True), (3, False)):
        torch.library.opcheck(torch.ops.fastrl.best_of_n.default, (scores.float(), ids, 12, k, largest))


def test_best_of_n_torch_compile_has_no_graph_break():
    gen = torch.Generator().manual_seed(7)
    scores, ids = ragged(gen, 12, 5)
    fn = torch.compile(lambda s, i: best_of_n(s, i, 2, num_groups=12), fullgraph=True, backend="eager")
    assert torch.equal(fn(scores, ids), best_of_n(scores, ids, 2, num_groups=12))


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.ones(3), torch.zeros(3, dtype=torch.int64), 0), {}, ValueError, "`k` must be an int >= 1, got 0"),
    ((torch.ones(3), torch.zeros(3, dtype=torch.int64), -2), {}, ValueError, "`k`"),
    ((torch.ones(3), torch.zeros(3, dtype=torch.int64), 1.5), {}, ValueError, "`k`"),
    ((torch.ones(3), torch.zeros(3, dtype=torch.int32)), {}, ValueError, "`group_ids` must be int64, got torch.int32"),
    ((torch.ones(3), torch.zeros(2, dtype=torch.int64)), {}, ValueError, r"`group_ids` must have the shape of `scores` \(3,\), got \(2,\)"),
    ((torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)), {}, ValueError, "float tensor, got torch.int64"),
    ((torch.ones(2, 2), torch.zeros(2, dtype=torch.int64)), {}, ValueError, r"1-D \[B\], got shape \(2, 2\)"),
    ((torch.ones(3), torch.tensor([0, 5, 1])), {"num_groups": 2}, RuntimeError, r"\[0, num_groups=2\), got group_ids\[1\] = 5"),
    ((torch.ones(3), torch.tensor([0, -1, 1])), {}, RuntimeError, r"got group_ids\[1\] = -1"),
    ((torch.ones(4), torch.tensor([0, 1, 7, -1]), 3), {"num_groups": 2}, RuntimeError, r"got group_ids\[2\] = 7"),
    ((torch.ones(3), torch.tensor([0, 0, 0])), {"num_groups": 0}, RuntimeError, "`num_groups` is 0 but there are 3"),
    (([1.0], torch.tensor([0])), {}, TypeError, "`scores` must be a torch tensor"),
])
def test_best_of_n_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        best_of_n(*args, **kwargs)


# ------------------------------------------------------------------------------------ pairs


def test_select_pairs_best_worst_and_all_pairs_match_reference():
    gen = torch.Generator().manual_seed(8)
    scores, ids = ragged(gen, 30, 6, levels=5, nan_frac=0.1)
    for margin in (0.0, 0.6):
        c, r = select_pairs(scores, ids, margin=margin, num_groups=31)
        best = ref.best_of_n(scores, ids, 1, num_groups=31)[:, 0]
        worst = ref.best_of_n(scores, ids, 1, largest=False, num_groups=31)[:, 0]
        x = scores.double()
        ok = (best >= 0) & (x[best.clamp(min=0)] - x[worst.clamp(min=0)] > margin)
        assert torch.equal(c, torch.where(ok, best, -1)) and torch.equal(r, torch.where(ok, worst, -1))
        c, r = select_pairs(scores, ids, mode="all_pairs", margin=margin)
        wc, wr = ref.all_pairs(scores, ids, margin, 30)
        assert c.tolist() == wc and r.tolist() == wr


def test_select_pairs_best_random_is_valid_reproducible_and_uniform():
    # 3000 copies of one group [3, 1, 2, 1, 3, nan] (indices 0..5): chosen = 0 (best, lower index),
    # rejected uniform over the members strictly below 3: indices 1, 2, 3
    G = 3000
    group = torch.tensor([3.0, 1.0, 2.0, 1.0, 3.0, NAN])
    scores = group.repeat(G)
    ids = torch.arange(G).repeat_interleave(6)
    c1, r1 = select_pairs(scores, ids, mode="best_random", generator=torch.Generator().manual_seed(0))
    c2, r2 = select_pairs(scores, ids, mode="best_random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    assert torch.equal(c1 % 6, torch.zeros(G, dtype=torch.int64)) and torch.equal(c1 // 6, torch.arange(G))
    assert torch.equal(r1 // 6, torch.arange(G))
    counts = torch.bincount(r1 % 6, minlength=6).double()
    assert counts[[0, 4, 5]].sum() == 0
    chi2 = float(((counts[1:4] - G / 3) ** 2 / (G / 3)).sum())
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001
    # margin: only index 1 and 3 (score 1) are more than 1.5 below the best
    _, r = select_pairs(scores, ids, mode="best_random", margin=1.5, generator=torch.Generator().manual_seed(1))
    assert set((r % 6).tolist()) == {1, 3}
    # a constant group has no pair
    c, r = select_pairs(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), mode="best_random")
    assert c.tolist() == [-1] and r.tolist() == [-1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="random"), "`mode` must be one of"),
    (dict(margin=-1.0), "`margin` must be a float >= 0, got -1.0"),
])
def test_select_pairs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_pairs(torch.ones(2), torch.tensor([0, 0]), **kwargs)


@settings(max_examples=30, deadline=None)
@given(num_groups=st.integers(1, 25), max_size=st.integers(1, 9), levels=st.integers(1, 6),
       margin=st.sampled_from([0.0, 0.4, 1.0]), nan_frac=st.sampled_from([0.0, 0.2]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_select_pairs_max_pairs_matches_brute_force(num_groups, max_size, levels, margin, nan_frac, dtype, seed):
    """The sync-free all_pairs (compiled op): the brute-force pairs, in order, -1 padded or cut."""
    gen = torch.Generator().manual_seed(seed)
    scores, ids = ragged(gen, num_groups, max_size, levels=levels, nan_frac=nan_frac)
    scores = scores.to(dtype)
    wc, wr = ref.all_pairs(scores, ids, margin, num_groups + 2)
    for cap in (0, len(wc) // 2, len(wc), len(wc) + 5):
        c, r = select_pairs(scores, ids, mode="all_pairs", margin=margin, max_pairs=cap, num_groups=num_groups + 2)
        kept = min(cap, len(wc))
        assert c.shape == r.shape == (cap,) and c.dtype == torch.int64
        assert c.tolist() == wc[:kept] + [-1] * (cap - kept) and r.tolist() == wr[:kept] + [-1] * (cap - kept)


def test_select_pairs_max_pairs_reference_backend_opcheck_and_bad_input(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    scores, ids = ragged(gen, 40, 8, levels=3)
    got = select_pairs(scores, ids, mode="all_pairs", margin=0.1, max_pairs=300)
    full = select_pairs(scores, ids, mode="all_pairs", margin=0.1)
    assert 0 < full[0].numel() < 300 and int((got[0] >= 0).sum()) == full[0].numel()  # valid: a prefix
    torch.library.opcheck(torch.ops.fastrl.all_pairs.default, (scores, ids, 40, 0.1, 300))
    torch.library.opcheck(torch.ops.fastrl.all_pairs.default, (scores.float(), ids, 40, 0.0, 7))
    caps = (5, 300, None)  # None: the default, data-sized output
    compiled = [select_pairs(scores, ids, mode="all_pairs", margin=0.1, max_pairs=cap) for cap in caps]
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")  # the vectorized candidate list
    for cap, got in zip(caps, compiled):
        want = select_pairs(scores, ids, mode="all_pairs", margin=0.1, max_pairs=cap)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.undo()
    one, two = torch.ones(2), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="`max_pairs` applies to mode='all_pairs' only, got mode='best_worst'"):
        select_pairs(one, two, max_pairs=3)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"`max_pairs` must be an int >= 0, got {bad!r}"):
            select_pairs(one, two, mode="all_pairs", max_pairs=bad)
    with pytest.raises(ValueError, match=r"\[0, num_groups=1\), got group_ids\[1\] = 1"):
        select_pairs(one, torch.tensor([0, 1]), mode="all_pairs", max_pairs=3, num_groups=1)
    with pytest.raises(ValueError, match="`margin` must be >= 0, got -1"):
        torch.ops.fastrl.all_pairs(one, two, 1, -1.0, 3)
    with pytest.raises(ValueError, match="`max_pairs` must be >= 0, got -2"):
        torch.ops.fastrl.all_pairs(one, two, 1, 0.0, -2)
    e = torch.empty(0)
    c, r = select_pairs(e, e.long(), mode="all_pairs", max_pairs=2, num_groups=3)
    assert c.tolist() == r.tolist() == [-1, -1]


# ------------------------------------------------------------------------------------ filters


def numpy_dapo_rule(scores, ids, num_groups, **kwargs) -> list[bool]:
    """filter_groups' keep_groups by numpy, group by group (DAPO's rule in verl's recipe)."""
    want = []
    for g in range(num_groups):
        v = scores[ids == g].double().numpy()
        if v.size == 0 or np.isnan(v).any():
            want.append(False)
            continue
        with np.errstate(invalid="ignore"):  # the std / mean of a group with infinities: NaN
            std = np.std(v, ddof=1) if kwargs.get("unbiased") and v.size > 1 else np.std(v) if v.size > 1 else np.nan
            keep = bool(std > kwargs.get("min_std", 0.0)) or (v.size == 1 and kwargs.get("keep_singletons", True))
            keep &= v.mean() >= kwargs.get("min_mean", -np.inf) and v.mean() <= kwargs.get("max_mean", np.inf)
        want.append(bool(keep))
    return want


@pytest.mark.parametrize("kwargs", [dict(), dict(min_std=0.3), dict(unbiased=True, keep_singletons=False),
                                    dict(min_mean=0.15, max_mean=0.75)])
def test_filter_groups_matches_numpy_rule(kwargs):
    gen = torch.Generator().manual_seed(9)
    scores, ids = ragged(gen, 60, 5, levels=3, nan_frac=0.02)
    keep_s, keep_g = filter_groups(scores, ids, num_groups=62, **kwargs)
    assert keep_g.tolist() == numpy_dapo_rule(scores, ids, 62, **kwargs)
    assert torch.equal(keep_s, keep_g[ids])


def test_filter_groups_constant_group_is_dropped_exactly():
    s = torch.full((4,), 0.1)  # 0.1 is not dyadic: a naive std leaves rounding noise
    keep_s, keep_g = filter_groups(s, torch.tensor([0, 0, 0, 0]))
    assert keep_g.tolist() == [False] and keep_s.tolist() == [False] * 4
    with pytest.raises(ValueError, match="`min_std` must be >= 0"):
        filter_groups(s, torch.zeros(4, dtype=torch.int64), min_std=-1.0)


# ------------------------------------------------------------------------------------ quantile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.77, 0.9, 1.0])
def test_quantile_mask_equals_torch_quantile(dtype, q):
    gen = torch.Generator().manual_seed(int(q * 100))
    for n in (1, 2, 7, 1000):
        x = torch.randn(n, 13, generator=gen, dtype=dtype)
        m = torch.rand(n, 13, generator=gen) < 0.6
        m[0, 0] = True
        got, t = quantile_mask(x, m, q)
        want_t = torch.quantile(x[m], q)
        assert torch.equal(t, want_t)
        assert torch.equal(got, (x >= want_t) & m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_quantile_mask_device_path_equals_torch_quantile(monkeypatch, dtype):
    """The device path (one sort, no host sync) run on the CPU: exact on ties, zeros of
    both signs, infinities, tiny and huge values, NaN outside the mask; NaN inside / empty mask."""
    import fastrl.sampling.groups as groups

    monkeypatch.setattr(groups, "_CPU_SELECT", "sort")
    gen = torch.Generator().manual_seed(31)
    for n in (1, 2, 3, 50, 4000):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
        x = torch.where(torch.rand(n, generator=gen) < 0.3, x.round(), x)  # ties, 0.0 and -0.0
        x[torch.rand(n, generator=gen) < 0.05] = float("inf")
        x[torch.rand(n, generator=gen) < 0.05] = -float("inf")
        x = x.to(dtype)
        m = torch.rand(n, generator=gen) < 0.7
        m[0] = True
        x[~m & (torch.rand(n, generator=gen) < 0.5)] = NAN  # unmasked NaN: ignored
        for q in (0.0, 0.13, 0.5, 0.9, 1.0):
            got, t = quantile_mask(x, m, q)
            want = torch.quantile(x[m].float() if dtype == torch.float16 else x[m], q)
            assert torch.equal(t, want) or (torch.isnan(t) and torch.isnan(want)), (n, q, t, want)
            assert torch.equal(got, (x.to(want.dtype) >= want) & m)
    x = torch.tensor([1.0, NAN, 3.0])
    assert torch.isnan(quantile_mask(x, torch.tensor([True, True, False]), 0.5)[1])
    got, t = quantile_mask(x, torch.zeros(3, dtype=torch.bool), 0.5)
    assert torch.isnan(t) and not got.any()


def test_quantile_mask_matches_trl_high_entropy_mask():
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

    accel = types.SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t, gather=lambda t: t)
    fake = types.SimpleNamespace(accelerator=accel)
    gen = torch.Generator().manual_seed(10)
    ent = torch.rand(8, 50, generator=gen, dtype=torch.float64).float() * 3
    mask = (torch.arange(50)[None] < torch.randint(1, 50, (8, 1), generator=gen)).long()
    for q in (0.2, 0.8):
        assert torch.equal(quantile_mask(ent, mask, q)[0], GRPOTrainer.get_high_entropy_mask(fake, ent, mask, q))
    assert torch.equal(quantile_mask(ent, torch.zeros_like(mask), 0.5)[0],
                       GRPOTrainer.get_high_entropy_mask(fake, ent, torch.zeros_like(mask), 0.5))


def test_quantile_mask_nan_empty_half_and_bad_input():
    x = torch.tensor([1.0, NAN, 3.0])
    got, t = quantile_mask(x, torch.tensor([True, True, False]), 0.5)
    assert torch.isnan(t) and not got.any()
    got, t = quantile_mask(x, torch.tensor([True, False, True]), 0.5)  # the NaN is not masked
    assert t.item() == 2.0 and got.tolist() == [False, False, True]
    got, t = quantile_mask(x, torch.zeros(3, dtype=torch.bool), 0.5)
    assert torch.isnan(t) and not got.any()
    h = torch.tensor([0.5, 0.25, 1.0], dtype=torch.bfloat16)
    got, t = quantile_mask(h, torch.ones(3), 0.5)
    assert t.dtype == torch.float32 and t.item() == 0.5 and got.tolist() == [True, False, True]
    for q in (-0.1, 1.5, NAN, True):
        with pytest.raises(ValueError, match="`q` must be a float in \\[0, 1\\]"):
            quantile_mask(x, torch.ones(3), q)
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `x` \(3,\), got \(2,\)"):
        quantile_mask(x, torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="`x` must be a float tensor"):
        quantile_mask(torch.ones(3, dtype=torch.int64), torch.ones(3), 0.5)


def test_quantile_mask_above_torch_quantile_limit():
    n = (1 << 24) + 3
    x = torch.randperm(n, generator=torch.Generator().manual_seed(11)).double()  # values 0..n-1
    m = torch.ones(n, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    got, t = quantile_mask(x, m, 0.3)
    p = 0.3 * (n - 1)  # sorted values are 0..n-1: the quantile is p itself (interpolated)
    assert abs(t.item() - p) < 1e-6
    assert int(got.sum()) == n - int(np.ceil(p))


# ------------------------------------------------------------------------------------ estimators


def small_groups(seed, num_groups=12, max_size=7, levels=3):
    gen = torch.Generator().manual_seed(seed)
    return ragged(gen, num_groups, max_size, levels=levels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pass_at_k_equals_enumeration(seed):
    scores, ids = small_groups(seed)
    correct = scores > 0.0
    ks = [1, 2, 3, 5, 7]
    got = pass_at_k(correct, ids, ks, num_groups=13)  # group 12 is empty: NaN
    assert got.dtype == torch.float64 and got.shape == (13, 5)
    for j, k in enumerate(ks):
        want = ref.pass_at_k(correct, ids, k, num_groups=13)
        torch.testing.assert_close(got[:, j], want, rtol=1e-14, atol=1e-15, equal_nan=True)
    # numbers: nonzero = correct
    torch.testing.assert_close(pass_at_k(correct.float(), ids, 2), got[:12, 1], rtol=0, atol=0, equal_nan=True)
    assert pass_at_k(correct, ids, 3).shape == (12,)


def test_pass_at_k_large_groups_stable():
    # n = 1000, c = 1: pass@k = k/n exactly; binomials this large overflow a naive ratio
    correct = torch.zeros(1000, dtype=torch.bool)
    correct[17] = True
    got = pass_at_k(correct, torch.zeros(1000, dtype=torch.int64), [1, 10, 500, 1000])
    torch.testing.assert_close(got, torch.tensor([[0.001, 0.01, 0.5, 1.0]], dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.fixture(params=["compiled", "torch"])
def estimator_path(request, monkeypatch):
    """best_at_k / worst_at_k run the compiled op on the CPU; "torch" forces the vectorized PyTorch
    path (what CUDA tensors and FASTRL_BACKEND=reference run)."""
    if request.param == "torch":
        monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    return request.param


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_and_worst_at_k_equal_enumeration(seed, estimator_path):
    scores, ids = small_groups(seed, levels=4)
    scores = scores + torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed)) * (seed > 0)
    ks = [1, 2, 4, 7]
    best = best_at_k(scores, ids, ks, num_groups=13)
    worst = worst_at_k(scores, ids, ks, num_groups=13)
    for j, k in enumerate(ks):
        torch.testing.assert_close(best[:, j], ref.best_at_k(scores, ids, k, num_groups=13),
                                   rtol=1e-13, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(worst[:, j], ref.best_at_k(scores, ids, k, num_groups=13, largest=False),
                                   rtol=1e-13, atol=1e-14, equal_nan=True)


def test_best_at_k_with_replacement_equals_enumeration_of_tuples(estimator_path):
    scores, ids = small_groups(3, num_groups=6, max_size=5, levels=5)
    got = best_at_k(scores, ids, [1, 2, 3, 6], replacement=True)
    for j, k in enumerate([1, 2, 3, 6]):
        torch.testing.assert_close(got[:, j], ref.best_at_k_with_replacement(scores, ids, k, num_groups=6),
                                   rtol=1e-13, atol=1e-14)
    assert not torch.isnan(got).any()  # any k is valid with replacement


def test_best_at_k_compiled_and_torch_paths_agree_deterministically(monkeypatch):
    gen = torch.Generator().manual_seed(14)
    scores, ids = ragged(gen, 3000, 20, levels=1000, nan_frac=0.002)
    scores = scores.float()
    scores[:3] = torch.tensor([float("inf"), -float("inf"), 0.0])
    ks = [1, 2, 3, 8, 20]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [best_at_k(scores, ids, ks, replacement=r) for r in (False, True)]
        torch.set_num_threads(max(2, before))
        many = [best_at_k(scores, ids, ks, replacement=r) for r in (False, True)]
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    for a, b, r in zip(one, many, (False, True)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
        torch.testing.assert_close(a, best_at_k(scores, ids, ks, replacement=r), rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


def test_expected_best_of_k_opcheck():
    gen = torch.Generator().manual_seed(15)
    scores, ids = ragged(gen, 10, 6, levels=9, min_size=4)
    for replacement, largest in ((False, True), (True, False)):
        torch.library.opcheck(torch.ops.fastrl.expected_best_of_k.default,
                              (scores.float(), ids, 10, [1, 2, 4], replacement, largest))


def test_best_at_k_relation_to_verl_bootstrap_metric():
    """verl's bootstrap mean is a Monte-Carlo estimate of the *with-replacement* expectation: it lies
    within a few standard errors of best_at_k(replacement=True); the exact without-replacement value
    (what pass@k-style metrics mean) is larger for k > 1 in a group with distinct scores."""
    metric_utils = pytest.importorskip("verl.trainer.ppo.metric_utils")
    vals = [0.1, 0.9, 0.4, 0.4, 0.7, 0.0, 0.25, 1.0]
    x = torch.tensor(vals, dtype=torch.float64)
    ids = torch.zeros(8, dtype=torch.int64)
    for k in (2, 4, 8):
        (bm, bs), (wm, ws) = metric_utils.bootstrap_metric(vals, k, [np.max, np.min], n_bootstrap=1000, seed=42)
        se_b, se_w = bs / np.sqrt(1000), ws / np.sqrt(1000)
        assert abs(bm - best_at_k(x, ids, k, replacement=True).item()) < 4 * se_b
        assert abs(wm - worst_at_k(x, ids, k, replacement=True).item()) < 4 * se_w
        assert best_at_k(x, ids, k).item() > best_at_k(x, ids, k, replacement=True).item()
    assert best_at_k(x, ids, 8).item() == 1.0  # all 8 drawn without replacement: the max itself


def test_estimators_nan_k_too_large_and_bad_input(estimator_path):
    s = torch.tensor([1.0, NAN, 2.0, 3.0])
    ids = torch.tensor([0, 0, 1, 1])
    out = best_at_k(s, ids, [1, 2, 3])
    assert torch.isnan(out[0]).all()  # a NaN score makes its group NaN
    assert out[1, :2].tolist() == [2.5, 3.0] and torch.isnan(out[1, 2])  # k > n: NaN
    for fn, args in ((pass_at_k, (s > 1, ids)), (best_at_k, (s, ids)), (worst_at_k, (s, ids))):
        for k in (0, [], [1, 0], 2.0, [True]):
            with pytest.raises(ValueError, match="`k` must be an int >= 1 or a non-empty list"):
                fn(*args, k)
        with pytest.raises(ValueError, match=r"\[0, num_groups=1\), got group_ids\[2\] = 1"):
            fn(*args, 1, num_groups=1)


# ------------------------------------------------------------------------------------ maj@k


@pytest.mark.parametrize("seed", [0, 1])
def test_maj_at_k_equals_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (10,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(10), sizes)
    answers = torch.randint(0, 4, (ids.numel(),), generator=gen)
    correct = answers == 1  # consistent within an answer
    perm = torch.randperm(ids.numel(), generator=gen)
    ids, answers, correct = ids[perm], answers[perm], correct[perm]
    ks = [1, 2, 3, 4, 8]
    got = maj_at_k(answers, correct, ids, ks)
    for j, k in enumerate(ks):
        torch.testing.assert_close(got[:, j], ref.maj_at_k(answers, correct, ids, k, num_groups=10),
                                   rtol=1e-13, atol=1e-14, equal_nan=True)


def random_votes(seed, num_groups, max_size, num_answers, min_size=1):
    """Shuffled ragged groups of answer ids; answers 1, 4, 7 are correct (several correct answers
    can tie)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_size, max_size + 1, (num_groups,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(num_groups), sizes)
    answers = torch.randint(0, num_answers, (ids.numel(),), generator=gen)
    perm = torch.randperm(ids.numel(), generator=gen)
    return answers[perm], answers[perm] % 3 == 1, ids[perm]


@settings(max_examples=20, deadline=None)
@given(num_groups=st.integers(1, 4), max_size=st.integers(1, 14), num_answers=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_maj_at_k_compiled_equals_exact_dp(num_groups, max_size, num_answers, seed):
    answers, correct, ids = random_votes(seed, num_groups, max_size, num_answers)
    ks = [1, 2, 3, 5, 8, 13, 15]
    got = maj_at_k(answers, correct, ids, ks, num_groups=num_groups + 1)  # the last group is empty: NaN
    want = ref.maj_at_k_dp(answers, correct, ids, ks, num_groups=num_groups + 1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15, equal_nan=True)


def test_maj_at_k_large_group_and_reference_backend(monkeypatch):
    # n = 150..200, binomials up to C(200, 25) ~ 5e31: the scaled fp64 DP stays at full precision
    answers, correct, ids = random_votes(21, 2, 200, 5, min_size=150)
    ks = [1, 7, 25]
    got = maj_at_k(answers, correct, ids, ks)
    want = ref.maj_at_k_dp(answers, correct, ids, ks, num_groups=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    small = random_votes(22, 5, 7, 3)
    assert torch.equal(maj_at_k(*small, [1, 3]).nan_to_num(-1), ref.maj_at_k_dp(*small, [1, 3], num_groups=5).nan_to_num(-1))


def test_maj_at_k_deterministic_across_thread_counts_and_opcheck():
    answers, correct, ids = random_votes(23, 300, 16, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maj_at_k(answers, correct, ids, [1, 4, 16])
        torch.set_num_threads(max(2, before))
        many = maj_at_k(answers, correct, ids, [1, 4, 16])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.nan_to_num(-1), many.nan_to_num(-1))
    # a group's value does not depend on the other groups of the batch
    keep = ids < 10
    assert torch.equal(maj_at_k(answers[keep], correct[keep], ids[keep], [1, 4, 16]).nan_to_num(-1),
                       one[:10].nan_to_num(-1))
    small = random_votes(24, 6, 8, 3, min_size=5)  # no NaN (k <= n): opcheck compares outputs with ==
    torch.library.opcheck(torch.ops.fastrl.maj_at_k.default, (*small, 6, [1, 2, 5]))


def test_maj_at_k_ties_and_bad_input():
    # answers A (correct) x2, B (wrong) x2: k=2 draws AA (1/6), BB (1/6), AB (4/6, a tie: 1/2)
    got = maj_at_k(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0]), torch.zeros(4, dtype=torch.int64), 2)
    torch.testing.assert_close(got, torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="answer id 0 has both"):
        maj_at_k(torch.tensor([0, 0]), torch.tensor([1, 0]), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="`answer_ids` must be int64"):
        maj_at_k(torch.tensor([0, 0], dtype=torch.int32), torch.tensor([1, 1]), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="answer id 5 has both in group 1"):  # the first bad group
        maj_at_k(torch.tensor([3, 5, 5, 5, 3]), torch.tensor([1, 0, 0, 1, 0]), torch.tensor([0, 1, 1, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"\[0, num_groups=1\), got group_ids\[1\] = 1"):
        maj_at_k(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]), 1, num_groups=1)
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        maj_at_k(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 0]), [2, 0])
    e = torch.empty(0, dtype=torch.int64)
    assert maj_at_k(e, e, e, [1, 2], num_groups=2).isnan().all()  # empty groups: NaN


# ------------------------------------------------------------------------------------ resample


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resample_distribution_and_reproducibility(method):
    # 2000 copies of 2 groups: weights [1, 0, 3, 4] and [2, 2]; member frequencies must match w / sum w
    reps = 2000
    w1, w2 = torch.tensor([1.0, 0.0, 3.0, 4.0]), torch.tensor([2.0, 2.0])
    weights = torch.cat([w1, w2]).repeat(reps)
    ids = torch.tensor([0, 0, 0, 0, 1, 1]).repeat(reps) + 2 * torch.arange(reps).repeat_interleave(6)
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))
    weights, ids = weights[perm], ids[perm]
    a = resample(weights, ids, 5, method=method, generator=torch.Generator().manual_seed(1))
    b = resample(weights, ids, 5, method=method, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2 * reps, 5)
    assert torch.equal(ids[a], torch.arange(2 * reps)[:, None].expand(-1, 5))  # draws stay in their group
    p = ref.resample_probabilities(weights, ids, num_groups=2 * reps)
    assert float(p[a].min()) > 0  # zero-weight members are never drawn
    # chi-square on the pooled frequencies of the four members of the first group kind
    slot = perm % 6  # position of each (shuffled) sample within its group kind
    counts = torch.bincount(slot[a[0::2]].flatten(), minlength=6)[:4].double()
    expect = w1 / w1.sum() * counts.sum()
    nz = expect > 0
    chi2 = float(((counts[nz] - expect[nz]) ** 2 / expect[nz]).sum())
    assert chi2 < 13.8  # 2 dof, p = 0.001
    if method == "systematic":  # each member drawn floor(n p) or ceil(n p) times per group
        per_group = torch.stack([(slot[a[0::2]] == j).sum(1) for j in range(4)], 1).double()
        np_ = 5 * w1 / w1.sum()
        assert bool(((per_group >= np_.floor()) & (per_group <= np_.ceil())).all())


def test_resample_empty_group_and_bad_input():
    out = resample(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), 3, num_groups=3)
    assert out[0].tolist() == [0, 0, 0] and out[1].tolist() == [-1, -1, -1] and out[2].tolist() == [1, 1, 1]
    ids = torch.tensor([0, 0, 1])
    for w, match in ((torch.tensor([1.0, -1.0, 1.0]), "finite and >= 0"), (torch.tensor([1.0, NAN, 1.0]), "finite"),
                     (torch.tensor([1.0, float("inf"), 1.0]), "finite"),
                     (torch.tensor([1.0, 1.0, 0.0]), "every weight of group 1 is zero")):
        with pytest.raises(ValueError, match=match):
            resample(w, ids, 2)
    with pytest.raises(ValueError, match="`n` must be an int >= 1, got 0"):
        resample(torch.ones(3), ids, 0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        resample(torch.ones(3), ids, 2, method="stratified")


def test_resample_reads_the_host_once(monkeypatch):
    """All of resample's checks and its padded width come back in one read (one sync on a GPU)."""
    reads = []
    real_tolist = torch.Tensor.tolist

    def counted(self):
        reads.append(self.numel())
        return real_tolist(self)

    def boom(*a, **k):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    for name in ("item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    w, ids = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0]), torch.tensor([1, 0, 1, 1, 3])
    for method in ("multinomial", "systematic"):
        out = resample(w, ids, 4, method=method, generator=torch.Generator().manual_seed(0), num_groups=4)
        assert out.shape == (4, 4)
    assert reads == [4, 4]
    monkeypatch.undo()
    assert out[2].tolist() == [-1] * 4 and set(out[0].tolist()) == {1} and set(out[3].tolist()) == {4}


# ------------------------------------------------------------------------------------ host syncs


@pytest.fixture
def no_host_sync(monkeypatch):
    """Makes every Python-level way to read a tensor's data on the host raise."""
    def boom(*a, **k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def test_device_paths_run_without_host_sync(no_host_sync):
    """The device (non-CPU) paths on meta tensors, which have no data: a host sync raises there
    (and the patched Tensor methods raise anywhere). Meta takes the same branches as CUDA."""
    B, G = 40, 9
    s = torch.empty(B, device="meta")
    ids = torch.empty(B, dtype=torch.int64, device="meta")
    assert best_of_n(s, ids, 3, num_groups=G).shape == (G, 3)
    assert pass_at_k(s > 0, ids, [1, 4], num_groups=G).shape == (G, 2)
    assert pass_at_k(s > 0, ids, 2, num_groups=G).shape == (G,)
    for fn in (best_at_k, worst_at_k):
        assert fn(s, ids, [1, 2, 8], num_groups=G).shape == (G, 3)
        assert fn(s, ids, 2, replacement=True, num_groups=G).shape == (G,)
    keep_s, keep_g = filter_groups(s, ids, min_std=0.1, min_mean=0.2, num_groups=G)
    assert keep_s.shape == (B,) and keep_g.shape == (G,)
    for mode in ("best_worst", "best_random"):
        c, r = select_pairs(s, ids, mode=mode, margin=0.5, num_groups=G)
        assert c.shape == r.shape == (G,) and c.device.type == "meta"
    c, r = select_pairs(s, ids, mode="all_pairs", margin=0.5, num_groups=G, max_pairs=17)
    assert c.shape == r.shape == (17,) and c.device.type == "meta"
    assert maj_at_k(ids, s > 0, ids, [1, 3], num_groups=G).shape == (G, 2)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        keep, t = quantile_mask(torch.empty(5, 8, device="meta", dtype=dtype), torch.empty(5, 8, device="meta"), 0.3)
        assert keep.shape == (5, 8) and keep.dtype == torch.bool and t.shape == ()


def test_group_counts_ignore_out_of_range_ids():
    """What the device paths do with an out-of-range id (no sync to raise): count it nowhere."""
    from fastrl.sampling.groups import _group_counts

    ids = torch.tensor([0, 2, -1, 5, 2, 3])
    assert _group_counts(ids, 4).tolist() == [1, 0, 2, 1]
    assert _group_counts(ids, 4, weights=torch.tensor([1, 1, 1, 1, 0, 1]).bool()).tolist() == [1, 0, 1, 1]
    assert _group_counts(ids[:0], 0).shape == (0,)


# ------------------------------------------------------------------------ empty batch, infinities


def test_empty_batch_gives_documented_results(estimator_path):
    e, ei = torch.empty(0), torch.empty(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    for G in (None, 3):
        kw, rows = ({}, 0) if G is None else ({"num_groups": G}, G)
        assert best_of_n(e, ei, 2, **kw).tolist() == [[-1, -1]] * rows
        for fn, x in ((pass_at_k, e.bool()), (best_at_k, e), (worst_at_k, e)):
            out = fn(x, ei, [1, 2], **kw)
            assert out.shape == (rows, 2) and out.dtype == torch.float64 and out.isnan().all()
            assert fn(x, ei, 3, **kw).shape == (rows,)
        for fn in (best_at_k, worst_at_k):
            out = fn(e, ei, [1, 4], replacement=True, **kw)
            assert out.shape == (rows, 2) and out.isnan().all()
        keep_s, keep_g = filter_groups(e, ei, min_std=0.1, **kw)
        assert keep_s.shape == (0,) and keep_s.dtype == keep_g.dtype == torch.bool and keep_g.tolist() == [False] * rows
        for method in ("multinomial", "systematic"):
            out = resample(e, ei, 4, method=method, generator=gen, **kw)
            assert out.shape == (rows, 4) and out.dtype == torch.int64 and (out == -1).all()
        for mode in ("best_worst", "best_random"):
            c, r = select_pairs(e, ei, mode=mode, generator=gen, **kw)
            assert c.dtype == torch.int64 and c.tolist() == r.tolist() == [-1] * rows
        c, r = select_pairs(e, ei, mode="all_pairs", **kw)
        assert c.shape == r.shape == (0,) and c.dtype == torch.int64
        c, r = select_pairs(e, ei, mode="all_pairs", max_pairs=2, num_groups=rows)
        assert c.tolist() == r.tolist() == [-1, -1]
    for shape in ((0,), (0, 3), (4, 0)):  # zero-element quantile_mask: no masked token
        keep, t = quantile_mask(torch.empty(shape), torch.ones(shape, dtype=torch.bool), 0.5)
        assert keep.shape == shape and keep.dtype == torch.bool and t.shape == () and torch.isnan(t)


def expectation_by_enumeration(vals: list[float], k: int, pick, replacement: bool) -> float:
    """Mean of ``pick`` over every k-subset (every k-tuple with replacement), in Python floats:
    ``inf + -inf`` is NaN there as in the estimators."""
    draws = list(itertools.product(vals, repeat=k) if replacement else itertools.combinations(vals, k))
    return sum(pick(d) for d in draws) / len(draws) if draws else NAN


def test_best_and_worst_at_k_with_infinities(estimator_path):
    inf = float("inf")
    groups = [[inf, -inf, 1.0], [inf, 1.0, 2.0], [-inf, 1.0, 2.0], [inf, inf], [-inf, -inf, 3.0], [0.5, 2.5, -1.0]]
    ids = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    scores = torch.tensor([v for g in groups for v in g])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(5))
    scores, ids = scores[perm], ids[perm]
    ks = [1, 2, 3]
    for replacement in (False, True):
        best = best_at_k(scores, ids, ks, replacement=replacement)
        worst = worst_at_k(scores, ids, ks, replacement=replacement)
        for fn, got in ((max, best), (min, worst)):
            want = torch.tensor([[expectation_by_enumeration(g, k, fn, replacement) for k in ks] for g in groups],
                                dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    # the docstrings' example: k = 1 averages +inf and -inf (undefined: NaN); k >= 2 has max +inf
    one = torch.zeros(3, dtype=torch.int64)
    assert str(best_at_k(torch.tensor([inf, -inf, 1.0]), one, ks).tolist()) == "[[nan, inf, inf]]"
    assert str(worst_at_k(torch.tensor([inf, -inf, 1.0]), one, ks).tolist()) == "[[nan, -inf, -inf]]"
    assert best_at_k(torch.tensor([inf, -inf, 1.0]), one, ks, replacement=True).isnan().all()


def test_filter_groups_with_infinities():
    inf = float("inf")
    groups = [[inf, 1.0], [inf, inf], [-inf, -inf], [inf, -inf], [inf], [-inf], [1.0, 2.0], [2.0, 2.0]]
    ids = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    scores = torch.tensor([v for g in groups for v in g])
    for kwargs in (dict(), dict(keep_singletons=False), dict(max_mean=3.0), dict(min_mean=0.0), dict(unbiased=True)):
        keep_s, keep_g = filter_groups(scores, ids, **kwargs)
        assert keep_g.tolist() == numpy_dapo_rule(scores, ids, len(groups), **kwargs)
        assert torch.equal(keep_s, keep_g[ids])
    # as documented: only the ordinary varying group and the infinite singletons survive
    assert filter_groups(scores, ids)[1].tolist() == [False, False, False, False, True, True, True, False]


def test_select_pairs_with_infinities():
    inf = float("inf")
    groups = [[inf, 1.0], [inf, inf], [-inf, -inf], [inf, -inf], [5.0, inf, 2.0, inf], [-inf, 0.5], [3.0, -inf, -inf]]
    ids = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    scores = torch.tensor([v for g in groups for v in g])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(6))
    scores, ids = scores[perm], ids[perm]
    x = scores.tolist()
    members = [[i for i in range(len(x)) if ids[i] == g] for g in range(len(groups))]
    for margin in (0.0, 1e300):
        c, r = select_pairs(scores, ids, mode="all_pairs", margin=margin)
        want_c, want_r = ref.all_pairs(scores, ids, margin, len(groups))
        assert c.tolist() == want_c and r.tolist() == want_r
        cm, rm = select_pairs(scores, ids, mode="all_pairs", margin=margin, max_pairs=len(want_c) + 2)
        assert cm.tolist() == want_c + [-1, -1] and rm.tolist() == want_r + [-1, -1]
        best = [min(m, key=lambda i: (-x[i], i)) for m in members]
        worst = [min(m, key=lambda i: (x[i], i)) for m in members]
        paired = [x[b] - x[w] > margin for b, w in zip(best, worst)]
        c, r = select_pairs(scores, ids, mode="best_worst", margin=margin)
        assert c.tolist() == [b if p else -1 for b, p in zip(best, paired)]
        assert r.tolist() == [w if p else -1 for w, p in zip(worst, paired)]
        c, r = select_pairs(scores, ids, mode="best_random", margin=margin, generator=torch.Generator().manual_seed(7))
        for g, m in enumerate(members):
            eligible = [i for i in m if x[best[g]] - x[i] > margin]
            assert (c[g].item(), r[g].item() in eligible) == ((best[g], True) if eligible else (-1, False))
    # equal infinities never pair; +inf beats a finite score or -inf by more than any finite margin
    assert paired == [True, False, False, True, True, True, True]


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("k", [1, 3, 16, 21])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_best_of_n_cuda_is_bitwise_equal_to_cpu(k, dtype):
    """float32/16: the atomicMax cascade of packed keys; float64: the two cascades (scores, then
    the indices of tied scores)."""
    gen = torch.Generator().manual_seed(12)
    scores, ids = ragged(gen, 3000, 16, levels=5, nan_frac=0.05)
    scores[::7] = torch.randn(scores[::7].shape, generator=gen, dtype=torch.float64)
    scores[::11] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0], dtype=torch.float64).repeat(
        len(scores[::11]) // 4 + 1)[:len(scores[::11])]
    scores = scores.to(dtype)
    for largest in (True, False):
        cpu = best_of_n(scores, ids, k, largest=largest, num_groups=3001)
        gpu = best_of_n(scores.cuda(), ids.cuda(), k, largest=largest, num_groups=3001)
        assert torch.equal(cpu, gpu.cpu())
    bad = ids.clone()
    bad[0] = -1  # CUDA ignores an out-of-range id instead of raising (no host sync)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0] = False
    gpu = best_of_n(scores.cuda(), bad.cuda(), k, num_groups=3000).cpu()
    sub = best_of_n(scores[keep], ids[keep], k, num_groups=3000)
    pos = torch.nonzero(keep)[:, 0]
    assert torch.equal(gpu, torch.where(sub >= 0, pos[sub.clamp(min=0)], -1))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_best_of_n_cuda_contended_groups(k, dtype):
    """A few huge groups (every atomic of a group on the same k slots) and many ties (float64:
    thousands of samples tied on each slot of the cut): still the sorted top k, the same bits as
    the CPU, run after run."""
    gen = torch.Generator().manual_seed(13)
    n = 300_000
    ids = torch.randint(0, 3, (n,), generator=gen)
    scores = ((torch.randint(0, 50, (n,), generator=gen).float() - 25.0) / 4).to(dtype)
    cpu = best_of_n(scores, ids, k, num_groups=4)
    for _ in range(3):
        assert torch.equal(best_of_n(scores.cuda(), ids.cuda(), k, num_groups=4).cpu(), cpu)
    assert (cpu[3] == -1).all()


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_expected_best_of_k_cuda_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(16)
    scores, ids = ragged(gen, 2000, 20, levels=1000, nan_frac=0.002)
    scores = scores.to(dtype)
    scores[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0]).to(dtype)
    ks = list(range(1, 41))  # > 32 ks: two kernel launches
    for fn in (best_at_k, worst_at_k):
        cpu = fn(scores, ids, ks, num_groups=2001)  # an empty last group
        gpu = fn(scores.cuda(), ids.cuda(), ks, num_groups=2001).cpu()
        assert torch.equal(cpu.nan_to_num(7.5), gpu.nan_to_num(7.5))  # bitwise, NaN where CPU has NaN
        cpu = fn(scores, ids, [1, 3, 50], replacement=True, num_groups=2001)
        gpu = fn(scores.cuda(), ids.cuda(), [1, 3, 50], replacement=True, num_groups=2001).cpu()
        torch.testing.assert_close(cpu, gpu, rtol=1e-14, atol=1e-14, equal_nan=True)  # pow: last bits


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
def test_sync_free_paths_on_cuda_equal_cpu_and_ignore_bad_ids():
    gen = torch.Generator().manual_seed(17)
    scores, ids = ragged(gen, 500, 9, levels=4)
    G = 500
    c = scores > 0
    torch.testing.assert_close(pass_at_k(c.cuda(), ids.cuda(), [1, 3], num_groups=G).cpu(),
                               pass_at_k(c, ids, [1, 3], num_groups=G), rtol=0, atol=0, equal_nan=True)
    for kw in (dict(), dict(min_std=0.3, min_mean=0.0)):
        ks, kg = filter_groups(scores.cuda(), ids.cuda(), num_groups=G, **kw)
        ws, wg = filter_groups(scores, ids, num_groups=G, **kw)
        assert torch.equal(ks.cpu(), ws) and torch.equal(kg.cpu(), wg)
    for mode in ("best_worst", "all_pairs"):
        got = select_pairs(scores.cuda(), ids.cuda(), mode=mode, margin=0.2, num_groups=G)
        want = select_pairs(scores, ids, mode=mode, margin=0.2, num_groups=G)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    c_r, r_r = select_pairs(scores.cuda(), ids.cuda(), mode="best_random", num_groups=G,
                            generator=torch.Generator("cuda").manual_seed(0))
    c_w, _ = select_pairs(scores, ids, num_groups=G)
    assert torch.equal(c_r.cpu(), c_w)
    ok = c_r >= 0
    assert bool((scores.cuda()[c_r[ok]] > scores.cuda()[r_r[ok]]).all())
    bad = ids.clone()
    bad[:5] = torch.tensor([-1, G, G + 7, -3, 10 * G])  # ignored on CUDA (the CPU raises)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:5] = False
    for fn in (lambda s, i: pass_at_k(s > 0, i, [1, 2], num_groups=G), lambda s, i: best_at_k(s, i, [1, 2], num_groups=G),
               lambda s, i: select_pairs(s, i, mode="all_pairs", num_groups=G)[0].numel()):
        got = fn(scores.cuda(), bad.cuda())
        want = fn(scores[keep], ids[keep])
        if isinstance(got, int):
            assert got == want
        else:
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
def test_maj_at_k_cuda_is_bitwise_equal_to_cpu():
    answers, correct, ids = random_votes(40, 1500, 24, 6)
    ks = list(range(1, 41))  # > 32 ks: two write launches; k > n: NaN
    cpu = maj_at_k(answers, correct, ids, ks, num_groups=1501)  # an empty last group
    gpu = maj_at_k(answers.cuda(), correct.cuda(), ids.cuda(), ks, num_groups=1501).cpu()
    assert torch.equal(cpu.nan_to_num(7.5), gpu.nan_to_num(7.5))
    big = random_votes(41, 2, 300, 9, min_size=250)  # large groups: many lanes per DP step
    assert torch.equal(maj_at_k(*big, [1, 5, 60]), maj_at_k(*(t.cuda() for t in big), [1, 5, 60]).cpu())
    # many states per lane: a k of 300 in one group of 350-400
    huge = random_votes(43, 1, 400, 4, min_size=350)
    assert torch.equal(maj_at_k(*huge, [2, 100, 300]), maj_at_k(*(t.cuda() for t in huge), [2, 100, 300]).cpu())
    # where the CPU raises, CUDA (no host sync) gives a NaN row / ignores the sample
    a, c, g = answers.clone(), correct.clone(), ids.clone()
    first = int(torch.nonzero(g == 3)[0, 0])
    c[first] = ~c[first]  # group 3: one answer id both correct and wrong
    g[0] = -1
    gpu = maj_at_k(a.cuda(), c.cuda(), g.cuda(), [1, 2], num_groups=1500).cpu()
    assert gpu[3].isnan().all()
    keep = (torch.arange(g.numel()) > 0) & (g != 3)
    want = maj_at_k(a[keep], c[keep], g[keep], [1, 2], num_groups=1500)
    others = torch.arange(1500) != 3
    assert torch.equal(gpu[others].nan_to_num(7.5), want[others].nan_to_num(7.5))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
def test_all_pairs_max_pairs_and_quantile_mask_cuda_equal_cpu():
    gen = torch.Generator().manual_seed(42)
    scores, ids = ragged(gen, 700, 12, levels=5, nan_frac=0.05)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for cap, margin in ((0, 0.0), (10, 0.0), (100000, 0.4)):
            want = select_pairs(scores.to(dtype), ids, mode="all_pairs", margin=margin, max_pairs=cap, num_groups=701)
            got = select_pairs(scores.to(dtype).cuda(), ids.cuda(), mode="all_pairs", margin=margin, max_pairs=cap,
                               num_groups=701)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(300, 517, generator=gen).to(dtype)
        m = torch.rand(300, 517, generator=gen) < 0.6
        for q in (0.0, 0.2, 0.77, 1.0):
            got, t = quantile_mask(x.cuda(), m.cuda(), q)
            want, wt = quantile_mask(x, m, q)
            assert torch.equal(t.cpu(), wt) and torch.equal(got.cpu(), want)


def test_docstring_examples():
    import doctest

    import fastrl.sampling.groups as groups

    result = doctest.testmod(groups, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 15 and result.failed == 0
