"""Token-level credit assignment (so far: broadcast_to_tokens)."""
import pytest
import torch

import fastrl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "values_dtype, mask_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bool), (torch.float32, torch.int64),
     (torch.bfloat16, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (7, 13), (2048, 1100)])  # the last one: > 8 MiB output
def test_bitwise_equal_to_the_trainers_expression(device, values_dtype, mask_dtype, shape):
    gen = torch.Generator().manual_seed(0)
    B, T = shape
    values = torch.randn(B, generator=gen).to(values_dtype).to(device)
    mask = (torch.rand(B, T, generator=gen) < 0.7).to(mask_dtype).to(device)
    got = fastrl.credit.broadcast_to_tokens(values, mask)
    want = values.unsqueeze(-1) * mask
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_gradient_and_opcheck():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(5, 4, generator=gen) < 0.5).double()
    torch.autograd.gradcheck(lambda v: fastrl.credit.broadcast_to_tokens(v, mask), (values,))
    torch.library.opcheck(torch.ops.fastrl.broadcast_to_tokens.default, (values.detach().float(), mask.float()))


def test_torch_compile_has_no_graph_break():
    values, mask = torch.randn(4), torch.ones(4, 6)
    compiled = torch.compile(lambda v, m: fastrl.credit.broadcast_to_tokens(v, m) + 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(values, mask), values.unsqueeze(-1) * mask + 1)


@pytest.mark.parametrize(
    "values, mask, match",
    [
        (torch.randn(3, 1), torch.ones(3, 4), "`values` must be 1-D"),
        (torch.randn(3), torch.ones(12), "`mask` must be 2-D"),
        (torch.randn(3), torch.ones(4, 4), "`mask` has 4 rows but `values` has 3"),
    ],
)
def test_bad_input(values, mask, match):
    with pytest.raises(RuntimeError, match=match):
        fastrl.credit.broadcast_to_tokens(values, mask)


# ------------------------------------------------------------------ GAE, returns, masked statistics

import types  # noqa: E402

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fastrl.reference import credit as ref  # noqa: E402

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
import fastrl.integrations.verl as fverl  # noqa: E402

MODES = ["skip", "reset", "cumsum"]


def multiturn_batch(B, T, seed, *, mask_dtype=torch.int64, all_masked_rows=(), dtype=torch.float32):
    """Random rewards/values; per row a random length (trailing padding) and interior masked spans
    (tool observations); the rows in `all_masked_rows` fully masked."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen).to(dtype)
    values = torch.randn(B, T, generator=gen).to(dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for b in range(B):
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):  # up to two observation spans
            s = int(torch.randint(0, T, (1,), generator=gen))
            e = s + int(torch.randint(1, max(2, T // 4), (1,), generator=gen))
            mask[b, s:e] = False
    for b in all_masked_rows:
        mask[b] = False
    return rewards, values, mask.to(mask_dtype)


def pack(x, mask):
    """Packed [N] of each row's first `length` tokens (up to its last valid one) and cu_seqlens."""
    m = mask.bool()
    idx = torch.arange(m.shape[1])
    lengths = torch.where(m.any(1), (idx[None, :] * m).max(1).values + 1, torch.zeros_like(m[:, 0], dtype=torch.int64))
    cu = torch.zeros(m.shape[0] + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    keep = idx[None, :] < lengths[:, None]
    return x[keep], cu, keep


def assert_returns_match(got, want, mask_dtype):
    if mask_dtype == torch.float64:  # verl's carries turn fp64 mid-loop (its mask multiplies), ours fp32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # same fp32 operations in the same order: bitwise
        assert torch.equal(got, want)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("B, T", [(16, 64), (5, 1), (3, 300)])
def test_gae_dropin_matches_verl(mask_dtype, B, T):
    r, v, m = multiturn_batch(B, T, seed=B * T, mask_dtype=mask_dtype, all_masked_rows=(1,))
    m[0, 0] = m[-1, -1] = 1  # at least 2 valid tokens: verl's whitening raises otherwise
    want_adv, want_ret = verl_core.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    got_adv, got_ret = fverl.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    assert got_ret.dtype == want_ret.dtype and got_adv.dtype == want_adv.dtype
    assert_returns_match(got_ret, want_ret, mask_dtype)
    torch.testing.assert_close(got_adv, want_adv, rtol=1e-6, atol=1e-6)  # verl whitens in fp32, we in fp64


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("B, T", [(16, 64), (5, 1), (3, 300)])
def test_reinforce_pp_dropin_matches_verl(mask_dtype, B, T):
    r, _, m = multiturn_batch(B, T, seed=7 + B, all_masked_rows=(0,), mask_dtype=mask_dtype)
    m[1, 0] = m[-1, -1] = 1  # at least 2 valid tokens: verl's whitening raises otherwise
    cfg = types.SimpleNamespace(gamma=0.97)
    want_adv, want_ret = verl_core.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    got_adv, got_ret = fverl.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    assert got_ret.dtype == want_ret.dtype and got_adv.dtype == want_adv.dtype
    assert_returns_match(got_ret, want_ret, mask_dtype)
    tol = 1e-5 if mask_dtype == torch.float64 else 1e-6  # fp64 mask: verl's returns carry in fp64, ours fp32
    torch.testing.assert_close(got_adv, want_adv, rtol=tol, atol=tol)
    assert fverl.ESTIMATORS["gae"] is fverl.compute_gae_advantage_return
    assert fverl.ESTIMATORS["reinforce_plus_plus"] is fverl.compute_reinforce_plus_plus_outcome_advantage


def test_reinforce_pp_dropin_needs_config():
    with pytest.raises(ValueError, match="config"):
        fverl.compute_reinforce_plus_plus_outcome_advantage(torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.float64])
def test_gae_and_returns_match_reference(dtype, mask_dtype):
    r, v, m = multiturn_batch(9, 40, seed=3, mask_dtype=mask_dtype, all_masked_rows=(4,), dtype=dtype)
    got = fastrl.credit.gae(r, v, m, 0.9, 0.8)
    want = ref.gae(r, v, m, 0.9, 0.8)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for g, w in zip(got, want):
        assert g.dtype == acc
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    for mode in MODES:
        got = fastrl.credit.discounted_returns(r, m, 0.9, mode=mode)
        torch.testing.assert_close(got, ref.discounted_returns(r, m, 0.9, mode=mode), rtol=1e-6, atol=1e-6)


def test_gae_masked_semantics_by_hand():
    # row: valid, masked (observation), valid, padding; gamma = lam = 1
    r = torch.tensor([[0.0, 7.0, 1.0, 3.0]])
    v = torch.tensor([[0.5, 9.0, 0.25, 4.0]])
    m = torch.tensor([[1, 0, 1, 0]])
    adv, ret = fastrl.credit.gae(r, v, m, 1.0, 1.0)
    # t=2: delta = 1 - 0.25 = 0.75; t=1 masked: carries 0.75; t=0: delta = 0 + 0.25 - 0.5, A = -0.25 + 0.75
    assert adv.tolist() == [[0.5, 0.75, 0.75, 0.0]]
    assert ret.tolist() == [[1.0, 9.75, 1.0, 4.0]]


def test_returns_modes_by_hand():
    r = torch.tensor([[1.0, 5.0, 1.0, 2.0]])
    m = torch.tensor([[1, 0, 1, 0]])
    assert fastrl.credit.discounted_returns(r, m, 0.5, mode="skip").tolist() == [[1.5, 0.0, 1.0, 0.0]]
    assert fastrl.credit.discounted_returns(r, m, 0.5, mode="reset").tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert fastrl.credit.discounted_returns(r, m, 0.5, mode="cumsum").tolist() == [[1.25, 0.5, 1.0, 0.0]]


def test_cumsum_mode_is_remax_returns():
    r, _, m = multiturn_batch(8, 50, seed=11, mask_dtype=torch.float32)
    want = torch.cumsum((r * m).flip(-1), dim=-1).flip(-1)  # verl's ReMax returns
    torch.testing.assert_close(fastrl.credit.discounted_returns(r, m, 1.0, mode="cumsum"), want,
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_padded(mode):
    r, v, m = multiturn_batch(12, 33, seed=5, all_masked_rows=(2, 3))
    rp, cu, keep = pack(r, m)
    vp, mp = v[keep], m[keep]
    adv, ret = fastrl.credit.gae(r, v, m, 0.99, 0.9)
    padv, pret = fastrl.credit.gae(rp, vp, mp, 0.99, 0.9, cu_seqlens=cu)
    assert torch.equal(padv, adv[keep]) and torch.equal(pret, ret[keep])
    want = fastrl.credit.discounted_returns(r, m, 0.9, mode=mode)[keep]
    assert torch.equal(fastrl.credit.discounted_returns(rp, mp, 0.9, mode=mode, cu_seqlens=cu), want)
    # and the reference agrees on the packed layout
    ref_adv, _ = ref.gae(rp, vp, mp, 0.99, 0.9, cu_seqlens=cu)
    torch.testing.assert_close(padv, ref_adv, rtol=1e-6, atol=1e-6)


def test_empty_inputs():
    for shape in [(0, 4), (3, 0)]:
        adv, ret = fastrl.credit.gae(torch.zeros(shape), torch.zeros(shape), torch.ones(shape), 1.0, 1.0)
        assert adv.shape == ret.shape == shape
    cu = torch.zeros(3, dtype=torch.int64)  # two empty packed rows
    assert fastrl.credit.discounted_returns(torch.zeros(0), torch.zeros(0), 1.0, cu_seqlens=cu).shape == (0,)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.bool])
def test_masked_statistics_match_verl(shift_mean, mask_dtype):
    r, _, m = multiturn_batch(20, 70, seed=13, mask_dtype=mask_dtype)
    x = r * 3 + 1
    x[~m.bool()] = float("nan")  # outside the mask, even a NaN does not reach the statistics
    torch.testing.assert_close(fastrl.credit.masked_mean(x, m), verl_F.masked_mean(x, m), rtol=1e-6, atol=1e-7)
    for unbiased in (True, False):
        torch.testing.assert_close(fastrl.credit.masked_var(x, m, unbiased=unbiased),
                                   verl_F.masked_var(x, m, unbiased=unbiased), rtol=1e-6, atol=1e-7)
    got = fastrl.credit.masked_whiten(x, m, shift_mean=shift_mean)
    torch.testing.assert_close(got, verl_F.masked_whiten(x, m, shift_mean=shift_mean), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    torch.testing.assert_close(got, ref.masked_whiten(x, m, shift_mean=shift_mean), rtol=1e-6, atol=1e-6,
                               equal_nan=True)


def test_masked_statistics_edge_cases():
    x = torch.tensor([1.0, 2.0, 4.0])
    none = torch.zeros(3)
    assert fastrl.credit.masked_mean(x, none).item() == 0.0  # verl: 0 / (0 + 1e-8)
    assert fastrl.credit.masked_var(x, none, unbiased=False).item() == 0.0
    biased = fastrl.credit.masked_whiten(x, none, unbiased=False, eps=1e-8)
    torch.testing.assert_close(biased, x * 1e4)
    for mask, n in [(none, 0), (torch.tensor([0.0, 1.0, 0.0]), 1)]:
        with pytest.raises(ValueError, match=f"at least 2 elements where `mask` is 1, got {n}"):
            fastrl.credit.masked_whiten(x, mask)
        with pytest.raises(ValueError, match=f"got {n}"):
            fastrl.credit.masked_var(x, mask)
        with pytest.raises(ValueError, match=f"at least 2 elements where `mask` is 1, got {n}"):
            ref.masked_whiten(x, mask)
        with pytest.raises(ValueError):  # verl raises the same exception type
            verl_F.masked_whiten(x, mask)
    with pytest.raises(ValueError, match=r"got 1 \(verl"):  # the verl drop-ins raise with it
        fverl.compute_reinforce_plus_plus_outcome_advantage(torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]),
                                                            config=types.SimpleNamespace(gamma=1.0))


def test_deterministic_across_thread_counts():
    r, v, m = multiturn_batch(64, 3000, seed=17)
    x = r.flatten().repeat(3)  # > several fixed chunks
    mx = m.flatten().repeat(3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (fastrl.credit.gae(r, v, m, 0.99, 0.95), fastrl.credit.masked_whiten(x, mx),
               torch.ops.fastrl.masked_moments(x, mx))
        torch.set_num_threads(max(2, threads))
        many = (fastrl.credit.gae(r, v, m, 0.99, 0.95), fastrl.credit.masked_whiten(x, mx),
                torch.ops.fastrl.masked_moments(x, mx))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one[0], many[0]))
    assert torch.equal(one[1], many[1])
    assert all(torch.equal(a, b) for a, b in zip(one[2], many[2]))


def test_opcheck_credit_ops():
    r, v, m = multiturn_batch(4, 9, seed=19, mask_dtype=torch.float32)
    rp, cu, keep = pack(r, m)
    ops = torch.ops.fastrl
    torch.library.opcheck(ops.gae.default, (r, v, m, None, 0.9, 0.8))
    torch.library.opcheck(ops.gae.default, (rp, v[keep], m[keep], cu, 0.9, 0.8))
    torch.library.opcheck(ops.discounted_returns.default, (r, m, None, 0.9, "skip"))
    torch.library.opcheck(ops.masked_moments.default, (r, m))
    torch.library.opcheck(ops.masked_whiten.default, (r, m, True, True, 1e-8))


def test_torch_compile_gae_no_graph_break():
    r, v, m = multiturn_batch(3, 8, seed=23)
    f = torch.compile(lambda r, v, m: fastrl.credit.masked_whiten(fastrl.credit.gae(r, v, m, 0.9, 0.9)[0], m),
                      fullgraph=True, backend="eager")
    torch.testing.assert_close(f(r, v, m), fverl.compute_gae_advantage_return(r, v, m, 0.9, 0.9)[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 6), T=st.integers(1, 40), seed=st.integers(0, 2**16),
       gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), mode=st.sampled_from(MODES))
def test_hypothesis_against_reference(B, T, seed, gamma, lam, mode):
    r, v, m = multiturn_batch(B, T, seed=seed, mask_dtype=torch.bool)
    for g, w in zip(fastrl.credit.gae(r, v, m, gamma, lam), ref.gae(r, v, m, gamma, lam)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fastrl.credit.discounted_returns(r, m, gamma, mode=mode),
                               ref.discounted_returns(r, m, gamma, mode=mode), rtol=1e-5, atol=1e-5)
    rp, cu, keep = pack(r, m)
    got = fastrl.credit.gae(rp, v[keep], m[keep], gamma, lam, cu_seqlens=cu)[0]
    assert torch.equal(got, fastrl.credit.gae(r, v, m, gamma, lam)[0][keep])


def _gae(**kw):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3), gamma=0.9, lam=0.9)
    args.update(kw)
    return fastrl.credit.gae(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(values=torch.zeros(2, 4)), r"`values` has shape \[2, 4\] but `rewards` has shape \[2, 3\]"),
        (dict(mask=torch.ones(3, 3)), r"`mask` has shape \[3, 3\] but `rewards`"),
        (dict(mask=torch.full((2, 3), 0.5)), r"`mask` must hold only 0 and 1, got 0.5 at flat index 0"),
        (dict(mask=torch.tensor([[1, 1, 1], [1, 2, 1]])), r"got 2 at flat index 4"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bfloat16)), r"`mask` must be bool, uint8, int32, int64"),
        (dict(gamma=1.5), r"`gamma` must lie in \[0, 1\], got 1.5"),
        (dict(lam=-0.1), r"`lam` must lie in \[0, 1\], got -0.1"),
        (dict(gamma=float("nan")), r"`gamma` must lie in \[0, 1\]"),
        (dict(rewards=torch.zeros(2, 3, dtype=torch.int64)), r"`rewards` must be a floating tensor"),
        (dict(rewards=torch.zeros(6), values=torch.zeros(6), mask=torch.ones(6)), r"`rewards` must be 2-D"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6])), r"`rewards` must be 1-D"),
    ],
)
def test_gae_bad_input(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _gae(**kwargs)


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([0, 4, 3, 6]), r"non-decreasing, got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 3"),
        (torch.tensor([0, 3, 5]), r"must end at the number of tokens N = 6 .*got cu_seqlens\[-1\] = 5"),
        (torch.tensor([1, 3, 6]), r"must start at 0"),
        (torch.tensor([0, 3, 6], dtype=torch.int32), r"`cu_seqlens` must be Long"),
        (torch.tensor([[0, 3, 6]]), r"`cu_seqlens` must be 1-D"),
    ],
)
def test_packed_bad_cu_seqlens(cu, match):
    x = torch.zeros(6)
    with pytest.raises(RuntimeError, match=match):
        fastrl.credit.discounted_returns(x, torch.ones(6), 0.9, cu_seqlens=cu)


def test_other_bad_input():
    with pytest.raises(RuntimeError, match=r"`mode` must be one of 'skip', 'reset', 'cumsum'; got 'sum'"):
        fastrl.credit.discounted_returns(torch.zeros(2, 3), torch.ones(2, 3), 0.9, mode="sum")
    with pytest.raises(RuntimeError, match=r"`mask` has shape \[4\] but `x` has shape \[3\]"):
        fastrl.credit.masked_whiten(torch.zeros(3), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"`mask` must hold only 0 and 1, got -1"):
        fastrl.credit.masked_mean(torch.zeros(3), torch.tensor([1, -1, 0]))
    with pytest.raises(RuntimeError, match=r"`eps` must be >= 0"):
        fastrl.credit.masked_whiten(torch.zeros(3), torch.ones(3), eps=-1.0)


def test_inputs_are_not_modified():
    r, v, m = multiturn_batch(4, 10, seed=29)
    before = [t.clone() for t in (r, v, m)]
    fverl.compute_gae_advantage_return(r, v, m, 0.9, 0.9)
    fverl.compute_reinforce_plus_plus_outcome_advantage(r, m, config=types.SimpleNamespace(gamma=0.9))
    assert all(torch.equal(a, b) for a, b in zip(before, (r, v, m)))


def test_backends_lists_credit_ops():
    report = fastrl.backends()
    for op in ("gae", "discounted_returns", "masked_moments", "masked_whiten"):
        assert report[op]["cpu"] == "available" and report[op]["reference"] == "available"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_matches_cpu_and_is_deterministic():
    r, v, m = multiturn_batch(32, 5000, seed=31, all_masked_rows=(3,))
    rp, cu, keep = pack(r, m)
    for got, want in zip(fastrl.credit.gae(r.cuda(), v.cuda(), m.cuda(), 0.99, 0.95), fastrl.credit.gae(r, v, m, 0.99, 0.95)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    a = fastrl.credit.gae(rp.cuda(), v[keep].cuda(), m[keep].cuda(), 0.99, 0.95, cu_seqlens=cu.cuda())[0]
    b = fastrl.credit.gae(rp.cuda(), v[keep].cuda(), m[keep].cuda(), 0.99, 0.95, cu_seqlens=cu.cuda())[0]
    assert torch.equal(a, b)
    for mode in MODES:
        torch.testing.assert_close(fastrl.credit.discounted_returns(r.cuda(), m.cuda(), 0.99, mode=mode).cpu(),
                                   fastrl.credit.discounted_returns(r, m, 0.99, mode=mode), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fastrl.credit.masked_whiten(r.cuda(), m.cuda()).cpu(),
                               fastrl.credit.masked_whiten(r, m), rtol=1e-6, atol=1e-6)
