"""The group-advantage op: compiled kernels vs the fp64 reference, edge cases, opcheck, determinism,
bad inputs, and group_index."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastrl
from fastrl.reference import advantages as ref

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])
OPTION_SETS = [
    dict(),
    dict(scale="none"),
    dict(baseline="leave_one_out", scale="none"),
    dict(baseline="leave_one_out"),
    dict(baseline="weighted_mean", scale="none"),
    dict(baseline="none", scale="batch_std"),
    dict(scale="batch_std"),
    dict(unbiased=False, eps_on="var", eps=1e-4),
    dict(singleton="zero", nan="ignore", eps=1e-4),
    dict(scale="batch_std", singleton="zero", nan="ignore", eps=1e-4),
]


def ragged_batch(gen, num_groups, max_size, dtype=torch.float32, integer_scores=False):
    """Random group sizes 1..max_size (singletons included), shuffled order, some constant groups."""
    sizes = torch.randint(1, max_size + 1, (num_groups,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(num_groups), sizes)
    if integer_scores:
        scores = torch.randint(0, 3, (ids.numel(),), generator=gen).double()
    else:
        scores = torch.randn(ids.numel(), generator=gen, dtype=torch.float64) * 3 + 1
    constant = torch.rand(num_groups, generator=gen) < 0.2  # zero-variance groups, non-dyadic value
    scores = torch.where(constant[ids], torch.full_like(scores, 0.1), scores)
    perm = torch.randperm(ids.numel(), generator=gen)
    return scores[perm].to(dtype), ids[perm]


def kernel_args(opts):
    return dict(
        baseline=opts.get("baseline", "mean"),
        scale=opts.get("scale", "group_std"),
        unbiased=opts.get("unbiased", True),
        eps=opts.get("eps", 1e-6),
        eps_on_var=opts.get("eps_on", "std") == "var",
        singleton_zero=opts.get("singleton", "passthrough") == "zero",
        ignore_nan=opts.get("nan", "propagate") == "ignore",
    )


def assert_matches_reference(scores, ids, num_groups, opts, weights=None):
    adv, stats = fastrl.group_advantages(scores, ids, num_groups=num_groups, weights=weights,
                                         return_stats=True, **opts)
    want = ref.group_advantages(scores.cpu(), ids.cpu(), num_groups=num_groups,
                                weights=None if weights is None else weights.cpu(), **kernel_args(opts))
    got = (adv, stats.count, stats.mean, stats.std, stats.min, stats.max)
    for name, g, w in zip(["adv", "count", "mean", "std", "min", "max"], got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "grpo")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(device, opts, dtype):
    gen = torch.Generator().manual_seed(hash((str(opts), str(dtype))) % 2**31)
    scores, ids = ragged_batch(gen, num_groups=37, max_size=9, dtype=dtype)
    if opts.get("nan") == "ignore":
        scores[torch.rand(scores.numel(), generator=gen) < 0.15] = float("nan")
    lengths = torch.randint(1, 500, (scores.numel(),), generator=gen)
    weights = lengths if opts.get("baseline") == "weighted_mean" else None
    assert_matches_reference(scores.to(device), ids.to(device), 37, opts,
                             None if weights is None else weights.to(device))


@settings(max_examples=60, deadline=None)
@given(
    num_groups=st.integers(1, 40),
    max_size=st.integers(1, 12),
    extra_groups=st.integers(0, 3),
    opts=st.sampled_from(OPTION_SETS),
    integer_scores=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_vs_reference(num_groups, max_size, extra_groups, opts, integer_scores, seed):
    gen = torch.Generator().manual_seed(seed)
    scores, ids = ragged_batch(gen, num_groups, max_size, integer_scores=integer_scores)
    weights = torch.rand(scores.numel(), generator=gen) * 100 if opts.get("baseline") == "weighted_mean" else None
    # extra_groups: ids that never occur (empty groups) must report NaN stats and not disturb the rest
    assert_matches_reference(scores, ids, num_groups + extra_groups, opts, weights)


def test_grpo_formula_by_hand():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    ids = torch.tensor([0, 1, 0, 1, 0, 2])
    adv, stats = fastrl.group_advantages(scores, ids, return_stats=True)
    g0 = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    expect0 = (g0 - g0.mean()) / (g0.std() + 1e-6)
    torch.testing.assert_close(adv[[0, 2, 4]].double(), expect0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(adv[[1, 3]], torch.tensor([-0.25, 0.25]) / (torch.tensor([0.0, 0.5]).std() + 1e-6))
    assert adv[5].item() == pytest.approx(2.0 / (1 + 1e-6))  # verl's singleton rule: mean 0, std 1
    assert stats.count.tolist() == [3, 2, 1]
    assert stats.zero_variance.tolist() == [False, False, True]


def test_zero_variance_group_is_exactly_zero():
    # torch.mean in fp32 of [0.1]*3 differs from 0.1 by an ulp; fp64 two-pass statistics do not.
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=torch.float32)
    ids = torch.tensor([0, 0, 0, 1, 1])
    adv, stats = fastrl.group_advantages(scores, ids, return_stats=True)
    assert torch.equal(adv, torch.zeros(5))
    assert stats.zero_variance.all()
    assert torch.equal(stats.std, torch.zeros(2))


def test_singleton_rules():
    scores = torch.tensor([3.0, 1.0, 2.0])
    ids = torch.tensor([0, 1, 1])
    assert fastrl.group_advantages(scores, ids)[0].item() == pytest.approx(3.0 / (1 + 1e-6))
    assert fastrl.group_advantages(scores, ids, scale="none")[0].item() == 3.0
    assert fastrl.group_advantages(scores, ids, baseline="leave_one_out", scale="none")[0].item() == 3.0
    assert fastrl.group_advantages(scores, ids, singleton="zero")[0].item() == 0.0


def test_nan_policies():
    scores = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    ids = torch.tensor([0, 0, 0, 1])
    propagated = fastrl.group_advantages(scores, ids)
    assert torch.isnan(propagated[:3]).all() and not torch.isnan(propagated[3])
    ignored, stats = fastrl.group_advantages(scores, ids, nan="ignore", return_stats=True)
    assert ignored[1].item() == 0.0
    assert stats.count.tolist() == [2, 1]
    torch.testing.assert_close(ignored[[0, 2]], torch.tensor([-1.0, 1.0]) / (2**0.5 + 1e-6))


def test_empty_batch():
    adv, stats = fastrl.group_advantages(torch.empty(0), torch.empty(0, dtype=torch.int64), return_stats=True)
    assert adv.shape == (0,) and stats.count.shape == (0,)


def test_noncontiguous_inputs_give_the_contiguous_result():
    gen = torch.Generator().manual_seed(3)
    scores, ids = ragged_batch(gen, 20, 6)
    wide = torch.stack([scores, torch.randn(scores.numel(), generator=gen)], dim=1)[:, 0]
    assert not wide.is_contiguous()
    assert torch.equal(fastrl.group_advantages(wide, ids), fastrl.group_advantages(scores, ids))


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(4)
    scores, ids = ragged_batch(gen, 20, 6)
    s0, i0 = scores.clone(), ids.clone()
    fastrl.group_advantages(scores, ids, nan="ignore")
    assert torch.equal(scores, s0) and torch.equal(ids, i0)


def test_deterministic_across_thread_counts_and_batch_invariant():
    gen = torch.Generator().manual_seed(5)
    scores, ids = ragged_batch(gen, 3000, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastrl.group_advantages(scores, ids, return_stats=True)
        torch.set_num_threads(max(2, before))
        many = fastrl.group_advantages(scores, ids, return_stats=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0])
    for a, b in zip(one[1], many[1]):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    # a group's advantages do not depend on the other groups in the batch (group-std scaling)
    keep = ids < 10
    alone = fastrl.group_advantages(scores[keep], ids[keep], num_groups=10)
    assert torch.equal(alone, one[0][keep])


def test_opcheck():
    # groups of 2..5 members: no NaN statistics (opcheck compares outputs without equal_nan)
    gen = torch.Generator().manual_seed(6)
    ids = torch.repeat_interleave(torch.arange(12), torch.randint(2, 6, (12,), generator=gen))
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    scores = torch.randn(ids.numel(), generator=gen)
    for opts in OPTION_SETS[:4]:
        args = kernel_args(opts)
        torch.library.opcheck(torch.ops.fastrl.group_advantages.default,
                              (scores, ids, None, 12, args["baseline"], args["scale"], args["unbiased"],
                               args["eps"], args["eps_on_var"], args["singleton_zero"], args["ignore_nan"]))
    torch.library.opcheck(torch.ops.fastrl.group_advantages.default,
                          (scores, ids, torch.rand(scores.numel()), 12, "weighted_mean", "none", True, 1e-6,
                           False, False, False))


def test_torch_compile_has_no_graph_break():
    gen = torch.Generator().manual_seed(7)
    scores, ids = ragged_batch(gen, 12, 5)

    def step(s, g):
        return fastrl.group_advantages(s * 2.0, g, num_groups=12).clamp(-5, 5)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(scores, ids), step(scores, ids))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "scores, ids, kwargs, match",
    [
        (torch.randn(4), torch.tensor([0, 0, 1]), {}, "`group_ids` has 3 entries but `scores` has 4"),
        (torch.randn(2, 2), torch.tensor([0, 0]), {"num_groups": 1}, "`scores` must be 1-D"),
        (torch.randn(3), torch.tensor([0.0, 1.0, 1.0]), {}, "`group_ids` must be int64"),
        (torch.randn(3), torch.tensor([0, -1, 1]), {"num_groups": 2}, r"group_ids\[1\] = -1"),
        (torch.randn(3), torch.tensor([0, 2, 1]), {"num_groups": 2}, r"\[0, num_groups=2\)"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1]), {}, "`scores` must be a floating tensor"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"baseline": "median"}, "`baseline` must be one of"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"scale": "mad"}, "`scale` must be one of"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"eps": -1.0}, "`eps` must be >= 0"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"eps_on": "mean"}, "`eps_on` must be"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"singleton": "drop"}, "`singleton` must be"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"nan": "raise"}, "`nan` must be"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"baseline": "weighted_mean"}, "needs `weights`"),
        (torch.randn(3), torch.tensor([0, 0, 1]), {"baseline": "weighted_mean", "weights": torch.ones(2)},
         "`weights` has 2 entries"),
        (torch.randn(3), torch.tensor([0, 0, 0]), {"num_groups": 0}, "`num_groups` is 0"),
    ],
)
def test_bad_input(scores, ids, kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        fastrl.group_advantages(scores, ids, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_and_cuda_out_of_range_ids():
    with pytest.raises(RuntimeError, match="same device"):
        fastrl.group_advantages(torch.randn(3, device="cuda"), torch.tensor([0, 0, 1]), num_groups=2)
    adv = fastrl.group_advantages(torch.randn(3, device="cuda"), torch.tensor([0, 5, 0], device="cuda"),
                                  num_groups=2)
    assert torch.isnan(adv[1]) and not torch.isnan(adv[[0, 2]]).any()


# ---------------------------------------------------------------------------------------- group_index


@pytest.mark.parametrize(
    "uids",
    [
        np.array(["q7", "q3", "q7", "q1", "q3"], dtype=object),
        np.array(["q7", "q3", "q7", "q1", "q3"]),
        np.array([b"q7", b"q3", b"q7", b"q1", b"q3"]),
        np.array([70, 30, 70, 10, 30]),
        ["q7", "q3", "q7", "q1", "q3"],
        ("q7", "q3", "q7", "q1", "q3"),
        [("a", 7), ("b", 3), ("a", 7), 1, ("b", 3)],
        torch.tensor([70, 30, 70, 10, 30]),
        torch.tensor([70, 30, 70, 10, 30], dtype=torch.int32),
    ],
)
def test_group_index_first_appearance_order(uids):
    assert fastrl.group_index(uids).tolist() == [0, 1, 0, 2, 1]


def test_group_index_matches_np_unique_partition():
    rng = np.random.default_rng(0)
    uids = np.array([f"uid-{rng.integers(0, 500)}-é" for _ in range(5000)], dtype=object)
    ids = fastrl.group_index(uids).numpy()
    _, inverse = np.unique(uids, return_inverse=True)
    assert len(set(zip(ids.tolist(), inverse.tolist()))) == len(set(inverse.tolist())) == ids.max() + 1
    first = {}
    for i, u in enumerate(uids):
        first.setdefault(u, len(first))
    assert ids.tolist() == [first[u] for u in uids]


def test_group_index_empty_and_bad_input():
    assert fastrl.group_index(np.array([], dtype=object)).numel() == 0
    with pytest.raises(ValueError, match="float uids are ambiguous"):
        fastrl.group_index(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be 1-D"):
        fastrl.group_index(np.array([["a"]]))
    with pytest.raises(ValueError, match="integer tensor"):
        fastrl.group_index(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="numpy array, list, tuple or integer tensor"):
        fastrl.group_index("abc")


# ------------------------------------------------------------------------------------ packaging / env


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_missing_extension_error_says_how_to_build():
    out = run_python("import sys; sys.modules['fastrl._C'] = None; import fastrl")
    assert out.returncode != 0
    assert "pip install --no-build-isolation -e ." in out.stderr


def test_reference_backend_env_gives_the_same_numbers():
    code = (
        "import torch, fastrl; g=torch.Generator().manual_seed(0); s=torch.randn(200, generator=g);"
        "i=torch.randint(0, 30, (200,), generator=g); print(repr(fastrl.group_advantages(s, i, num_groups=30).tolist()))"
    )
    compiled = run_python(code)
    reference = run_python(code, FASTRL_BACKEND="reference")
    assert compiled.returncode == 0 and reference.returncode == 0, compiled.stderr + reference.stderr
    a = torch.tensor(eval(compiled.stdout))
    b = torch.tensor(eval(reference.stdout))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backends_report():
    report = fastrl.backends()
    assert report["group_advantages"]["cpu"] == "available"
    assert report["group_advantages"]["reference"] == "available"
    cuda = report["group_advantages"]["cuda"]
    assert cuda == "available" if torch.cuda.is_available() and fastrl._extension.cuda_built() else cuda.startswith("unavailable: ")


def test_inf_scores_propagate_to_their_group_only():
    scores = torch.tensor([1.0, float("inf"), 3.0, 5.0, 6.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    adv, stats = fastrl.group_advantages(scores, ids, return_stats=True)
    assert torch.isnan(adv[:3]).all()  # mean inf, inf - inf = NaN, std NaN
    assert stats.max[0] == float("inf") and stats.min[0] == 1.0
    torch.testing.assert_close(adv[3:], torch.tensor([-0.5, 0.5]) / (0.5**0.5 + 1e-6))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fastrl._extension.cuda_built()), reason="needs a CUDA GPU and the CUDA build")
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "grpo")
def test_cuda_is_bitwise_equal_to_cpu(opts):
    gen = torch.Generator().manual_seed(11)
    scores, ids = ragged_batch(gen, 3000, 16)
    if opts.get("nan") == "ignore":
        scores[torch.rand(scores.numel(), generator=gen) < 0.1] = float("nan")
    weights = torch.rand(scores.numel(), generator=gen) * 100 if opts.get("baseline") == "weighted_mean" else None
    cpu = fastrl.group_advantages(scores, ids, num_groups=3000, weights=weights, return_stats=True, **opts)
    gpu = fastrl.group_advantages(scores.cuda(), ids.cuda(), num_groups=3000,
                                  weights=None if weights is None else weights.cuda(), return_stats=True, **opts)
    assert torch.equal(cpu[0], gpu[0].cpu())
    for a, b in zip(cpu[1], gpu[1]):
        assert torch.equal(a.nan_to_num(), b.cpu().nan_to_num())
