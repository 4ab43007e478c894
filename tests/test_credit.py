"""Token-level credit assignment (fastrl.credit) and its verl drop-ins."""
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

import math  # noqa: E402
import re  # noqa: E402
import types  # noqa: E402

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fastrl.reference import credit as ref  # noqa: E402
from _isa import assert_same_bits, run_capped  # noqa: E402
from _dist import run_ranks  # noqa: E402
from _optional import optional_module  # noqa: E402

verl_core = optional_module("verl.trainer.ppo.core_algos")
verl_F = optional_module("verl.utils.torch_functional")
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


@pytest.mark.parametrize("dtype, mask_dtype, fused", [
    (torch.float32, torch.int64, True), (torch.float32, torch.bool, True), (torch.float32, torch.float32, True),
    (torch.float64, torch.int64, True), (torch.float32, torch.float64, False), (torch.bfloat16, torch.int64, False)])
def test_gae_dropin_whitening_is_fused_where_the_dtype_allows(dtype, mask_dtype, fused):
    r, v, m = multiturn_batch(9, 70, seed=19, mask_dtype=mask_dtype, all_masked_rows=(2,), dtype=dtype)
    got_adv, got_ret = fverl.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    adv, ret = fastrl.credit.gae(r, v, m, 0.99, 0.95)
    out_dtype = torch.promote_types(dtype, mask_dtype)
    unfused = fastrl.credit.masked_whiten(adv.to(out_dtype), m)
    assert got_adv.dtype == got_ret.dtype == out_dtype and torch.equal(got_ret, ret.to(out_dtype))
    if fused:  # the scan's fused statistics: the same op as gae(whiten=True), equal to the unfused up to fp64 rounding
        assert torch.equal(got_adv, fastrl.credit.gae(r, v, m, 0.99, 0.95, whiten=True)[0])
        torch.testing.assert_close(got_adv, unfused, rtol=2e-7 if dtype == torch.float32 else 1e-12, atol=1e-7)
    else:
        assert torch.equal(got_adv, unfused)
    with pytest.raises(ValueError, match="at least 2 elements"):  # verl raises for < 2 valid tokens too
        fverl.compute_gae_advantage_return(r[:1], v[:1], torch.zeros_like(m[:1]), gamma=0.99, lam=0.95)


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
    if mask_dtype == torch.int64:  # the fused path: the same op as discounted_returns(whiten=True)
        fused = fastrl.credit.discounted_returns(r, m, 0.97, whiten=True)
        assert torch.equal(got_adv, fused[0]) and torch.equal(got_ret, fused[1])
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, mask_dtype", [(torch.float32, torch.int64), (torch.float32, torch.bool),
                                               (torch.float64, torch.float32), (torch.bfloat16, torch.float64)])
def test_returns_whiten_fused_matches_scan_then_whiten(mode, dtype, mask_dtype):
    r, _, m = multiturn_batch(12, 41, seed=29, all_masked_rows=(4,), dtype=dtype, mask_dtype=mask_dtype)
    d = (torch.rand(12, 41, generator=torch.Generator().manual_seed(3)) < 0.05).to(torch.int64)
    kw = dict(mode=mode, dones=d, turn_gamma=0.5)
    adv, ret = fastrl.credit.discounted_returns(r, m, 0.9, whiten=True, **kw)
    plain = fastrl.credit.discounted_returns(r, m, 0.9, **kw)
    assert adv.dtype == ret.dtype == plain.dtype and torch.equal(ret, plain)
    # what the fused op stands for (its mask product stays in the returns' dtype: exact for 0/1)
    want = (fastrl.credit.masked_whiten(plain, m) * m).to(plain.dtype)
    torch.testing.assert_close(adv, want, rtol=2e-7 if plain.dtype == torch.float32 else 1e-12, atol=1e-7)
    assert torch.equal(adv[~m.bool()], torch.zeros_like(adv[~m.bool()]))
    ref_adv, ref_ret = ref.discounted_returns(r, m, 0.9, whiten=True, **kw)
    torch.testing.assert_close(adv, ref_adv.to(adv.dtype), rtol=1e-6, atol=1e-6)
    # packed layout: the same rows, the same statistics
    rp, cu, keep = pack(r, m)
    padv, pret = fastrl.credit.discounted_returns(rp, m[keep], 0.9, cu_seqlens=cu, whiten=True, mode=mode,
                                                  dones=d[keep], turn_gamma=0.5)
    assert torch.equal(pret, ret[keep])
    torch.testing.assert_close(padv, adv[keep], rtol=2e-7 if plain.dtype == torch.float32 else 1e-12, atol=1e-7)


def test_returns_whiten_edge_cases():
    with pytest.raises(ValueError, match="at least 2 elements.*got 0"):  # verl raises: so do we
        fastrl.credit.discounted_returns(torch.randn(2, 3), torch.zeros(2, 3), 0.9, whiten=True)
    with pytest.raises(ValueError, match="at least 2 elements.*got 1"):
        fastrl.credit.discounted_returns(torch.randn(2, 3), torch.tensor([[0, 1, 0], [0, 0, 0]]), 0.9, whiten=True)
    with pytest.raises(RuntimeError, match="`mask` must hold only 0 and 1, got 2"):
        fastrl.credit.discounted_returns(torch.randn(2, 3), torch.tensor([[1, 1, 2], [1, 0, 0]]), 0.9, whiten=True)
    r, _, m = multiturn_batch(3, 9, seed=31)
    m[0, :2] = 1
    torch.library.opcheck(torch.ops.fastrl.discounted_returns_whiten.default, (r, m, None, 0.9, "skip", None, 0.0))
    f = torch.compile(lambda r, m: fastrl.credit.discounted_returns(r, m, 0.9, whiten=True), fullgraph=True,
                      backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(f(r, m), fastrl.credit.discounted_returns(r, m, 0.9, whiten=True)))


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
               torch.ops.fastrl.masked_moments(x, mx), fastrl.credit.discounted_returns(r, m, 0.99, whiten=True))
        torch.set_num_threads(max(2, threads))
        many = (fastrl.credit.gae(r, v, m, 0.99, 0.95), fastrl.credit.masked_whiten(x, mx),
                torch.ops.fastrl.masked_moments(x, mx), fastrl.credit.discounted_returns(r, m, 0.99, whiten=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one[0], many[0]))
    assert torch.equal(one[1], many[1])
    assert all(torch.equal(a, b) for a, b in zip(one[2], many[2]))
    assert all(torch.equal(a, b) for a, b in zip(one[3], many[3]))


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


# ------------------------------------------------------------------ KL penalty, token rewards

VERL_KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]
VERL_KINDS_ALL = VERL_KINDS + [k + "+" for k in VERL_KINDS]
OPENRLHF_KINDS = ["k1", "k2", "k3"]


def logprob_pair(shape, seed, *, dtype=torch.float32, spread=3.0):
    """Random log-probs of a policy and a reference; `spread` scales their difference (large
    spreads reach verl's k3 clamps: |ref - logp| > 20 and k3 > 10)."""
    gen = torch.Generator().manual_seed(seed)
    ref_logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 5
    logp = ref_logp + torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    return logp.to(dtype), ref_logp.to(dtype)


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator, clamp=True):
    """OpenRLHF's compute_approx_kl, formula for formula from openrlhf/models/utils.py (2025, commit
    473f61bd); clamp=False: the same file before the final clamp was added (commit 02a26057)."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    if kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10) if clamp else log_ratio


def openrlhf_compute_reward(r, kl_coef, kl, action_mask, reward_clip_range=None):
    """OpenRLHF's compute_reward (padded path), formula for formula from openrlhf/models/utils.py."""
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    return last_reward + kl_reward


def assert_kl_close(got, want, kind):
    """(value, grad_logp, grad_ref) triples. k1/abs/k2 are the same float operations: bitwise. k3
    calls exp (libm here, torch's vectorized exp there: 1 ulp apart) and autograd sums its gradient
    as g*e - g where we compute g*(1 - e): equal to a few ulps of |g| and of 1."""
    if kind.rstrip("+") not in ("k3", "low_var_kl"):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
        return
    arith_eps = torch.finfo(got[0].dtype if got[0].dtype == torch.float64 else torch.float32).eps
    for g, w in zip(got, want):
        if g.dtype in (torch.bfloat16, torch.float16):  # one rounding of two fp32 values a few ulps apart
            torch.testing.assert_close(g, w, rtol=2e-2, atol=0)
        else:  # gradients reach |w| * e^2.5 before verl's clamp: a few ulps of ~10
            torch.testing.assert_close(g, w, rtol=4 * arith_eps, atol=64 * arith_eps)


def value_and_grads(fn, logp, ref_logp, seed=0):
    """fn(logp, ref_logp) and the gradients of <fn(...), w> for a fixed random w."""
    logp = logp.detach().clone().requires_grad_(True)
    ref_logp = ref_logp.detach().clone().requires_grad_(True)
    out = fn(logp, ref_logp)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    out.backward(w)
    return out.detach(), logp.grad, ref_logp.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", VERL_KINDS_ALL)
def test_kl_penalty_matches_verl(kind, dtype):
    logp, ref_logp = logprob_pair((37, 211), seed=41, dtype=dtype, spread=8.0)  # reaches every clamp
    got = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, kind), logp, ref_logp)
    want = value_and_grads(lambda a, b: verl_core.kl_penalty(a, b, kind), logp, ref_logp)
    dropin = value_and_grads(lambda a, b: fverl.kl_penalty(a, b, kind), logp, ref_logp)
    assert got[0].dtype == want[0].dtype == dtype
    assert_kl_close(got, want, kind)
    assert all(torch.equal(a, b) for a, b in zip(dropin, got))


def test_kl_penalty_hits_verls_clamps():
    # d = logp - ref = -30: verl clamps ref - logp to 20, then k3 = e^20 - 21 to 10 (zero gradient);
    # d = +30: ref - logp clamped to -20, k3 = e^-20 + 19 -> 10; d = 1: no clamp active
    logp = torch.tensor([-31.0, 29.0, 0.0], dtype=torch.float64)
    ref_logp = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    out, g_logp, g_ref = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, "k3"), logp, ref_logp, seed=3)
    assert out[:2].tolist() == [10.0, 10.0]
    torch.testing.assert_close(out[2], torch.tensor(math.exp(-1.0) + 1.0 - 1.0, dtype=torch.float64))
    w = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert g_logp[:2].tolist() == [0.0, 0.0] and g_ref[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(g_logp[2], w[2] * (1 - math.exp(-1.0)))
    torch.testing.assert_close(g_ref[2], -g_logp[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", OPENRLHF_KINDS)
def test_kl_penalty_openrlhf_convention(kind, dtype):
    logp, ref_logp = logprob_pair((29, 97), seed=43, dtype=dtype, spread=6.0)  # reaches the +-10 clamp
    got = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, kind, convention="openrlhf"), logp, ref_logp)
    want = value_and_grads(lambda a, b: openrlhf_compute_approx_kl(a, b, kind), logp, ref_logp)
    reference = value_and_grads(lambda a, b: ref.kl_penalty(a, b, kind, convention="openrlhf"), logp, ref_logp)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert (got[0].abs() == 10).any() and (got[0].abs() < 10).any()
    assert_kl_close(got, want, kind)
    assert_kl_close(got, reference, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", OPENRLHF_KINDS)
def test_kl_penalty_openrlhf_unclamped_convention(kind, dtype):
    logp, ref_logp = logprob_pair((29, 97), seed=44, dtype=dtype, spread=6.0)  # past the +-10 clamp
    f = lambda a, b: fastrl.credit.kl_penalty(a, b, kind, convention="openrlhf_unclamped")  # noqa: E731
    got = value_and_grads(f, logp, ref_logp)
    want = value_and_grads(lambda a, b: openrlhf_compute_approx_kl(a, b, kind, clamp=False), logp, ref_logp)
    reference = value_and_grads(lambda a, b: ref.kl_penalty(a, b, kind, convention="openrlhf_unclamped"),
                                logp, ref_logp)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert (got[0].abs() > 10).any()  # no clamp: values and gradients beyond the clamped convention's
    assert_kl_close(got, want, kind)
    assert_kl_close(got, reference, kind)
    clamped = fastrl.credit.kl_penalty(logp, ref_logp, kind, convention="openrlhf")
    inside = got[0].abs() <= 10
    assert torch.equal(got[0][inside], clamped[inside]) and torch.equal(clamped[~inside].abs(), torch.full_like(clamped[~inside], 10))


def test_kl_penalty_openrlhf_unclamped_extremes():
    # d = logp - ref: -100 -> k3 = exp(100) overflows fp32 (+inf, as torch.exp); +100 -> exp(-100) = 0,
    # k3 = (0 - 1) + 100 = 99; NaN propagates. Gradients 1 - exp(-d): -inf, 1, NaN.
    logp = torch.tensor([-100.0, 100.0, float("nan"), 0.5])
    ref_logp = torch.zeros(4)
    out, g_logp, g_ref = value_and_grads(
        lambda a, b: fastrl.credit.kl_penalty(a, b, "k3", convention="openrlhf_unclamped"), logp, ref_logp, seed=5)
    want, w_logp, w_ref = value_and_grads(lambda a, b: openrlhf_compute_approx_kl(a, b, "k3", clamp=False),
                                          logp, ref_logp, seed=5)
    assert out[0] == float("inf") and out[1] == 99.0 and out[2].isnan()
    for g, w in ((out, want), (g_logp, w_logp), (g_ref, w_ref)):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        finite = g.isfinite()
        torch.testing.assert_close(g[finite], w[finite], rtol=4e-7, atol=1e-6)


_KL_ISA_SCRIPT = """
import sys, torch, fastrl
cases = torch.load(sys.argv[1])
out = []
for logp, ref_logp, kind, convention in cases:
    a = logp.clone().requires_grad_(True)
    v = fastrl.credit.kl_penalty(a, ref_logp, kind, convention=convention)
    w = torch.linspace(-2, 2, v.numel()).reshape(v.shape).to(v.dtype)
    v.backward(w)
    out.append((v.detach(), a.grad))
torch.save(out, sys.argv[2])
"""


def _kl_isa_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for convention in ("verl", "openrlhf", "openrlhf_unclamped"):
            for n in (1, 7, 16, 37, 1000):  # whole vectors and padded tails of every width
                logp, ref_logp = logprob_pair((n,), seed=n, dtype=dtype, spread=30.0)
                cases.append((logp, ref_logp, "k3", convention))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.0, -88.0, 90.0, -90.0,
                            20.0, -20.0, 1e-30, -1e-30, 3.0, -3.0, 19.999998])
    for convention in ("verl", "openrlhf", "openrlhf_unclamped"):
        cases.append((special, torch.zeros_like(special), "k3", convention))
    return cases


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_kl_penalty_k3_same_bits_on_every_cpu_isa(isa, tmp_path):
    # The fp32 k3 runs on SIMD lanes for the widest ISA (cpu/simd.h); FASTRL_CPU_ISA caps it (read
    # once per process, hence the subprocess). Every path runs the same operations per lane.
    cases = _kl_isa_cases()
    got = run_capped(isa, _KL_ISA_SCRIPT, cases, tmp_path)
    for (logp, ref_logp, kind, convention), (value, grad) in zip(cases, got):
        a = logp.clone().requires_grad_(True)
        v = fastrl.credit.kl_penalty(a, ref_logp, kind, convention=convention)
        v.backward(torch.linspace(-2, 2, v.numel()).reshape(v.shape).to(v.dtype))
        for x, y in ((value, v.detach()), (grad, a.grad)):
            assert_same_bits(x, y)


@pytest.mark.parametrize("convention", ["verl", "openrlhf", "openrlhf_unclamped"])
def test_kl_penalty_k3_tail_lanes_equal_whole_vectors(convention):
    # An element gives the same bits in a vector body, in a zero-padded tail, or alone.
    logp, ref_logp = logprob_pair((53,), seed=61, spread=10.0)
    a = logp.clone().requires_grad_(True)
    full = fastrl.credit.kl_penalty(a, ref_logp, "k3", convention=convention)
    full.backward(torch.ones(53))
    for i in (0, 7, 15, 16, 31, 47, 52):
        b = logp[i:i + 1].clone().requires_grad_(True)
        one = fastrl.credit.kl_penalty(b, ref_logp[i:i + 1], "k3", convention=convention)
        one.backward(torch.ones(1))
        assert torch.equal(one, full[i:i + 1]) and torch.equal(b.grad, a.grad[i:i + 1])
    # and against the formula in fp64: a few ulps of exp (cpu/simd.h's fast_exp is ~1 ulp)
    x = ref_logp.double() - logp.double()
    if convention == "verl":
        x = x.clamp(-20, 20)
    want = x.exp() - x - 1
    if convention != "openrlhf_unclamped":
        want = want.clamp(-10, 10)
    torch.testing.assert_close(full.double(), want, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("kind", VERL_KINDS_ALL)
def test_kl_penalty_half_precision_rounds_once(kind):
    logp, ref_logp = logprob_pair((8, 300), seed=47, dtype=torch.bfloat16)
    got = fastrl.credit.kl_penalty(logp, ref_logp, kind)
    assert got.dtype == torch.bfloat16
    # fp32 arithmetic on the bf16 inputs, rounded once: the fp32 result rounded to bf16
    want = fastrl.credit.kl_penalty(logp.float(), ref_logp.float(), kind).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, verl_core.kl_penalty(logp, ref_logp, kind), rtol=0.05, atol=0.15)
    mixed = fastrl.credit.kl_penalty(logp, ref_logp.float(), kind)  # promoted as torch promotes
    assert mixed.dtype == torch.float32
    assert_kl_close((mixed,), (verl_core.kl_penalty(logp, ref_logp.float(), kind),), kind)


@pytest.mark.parametrize("kind, convention", [(k, "verl") for k in VERL_KINDS] + [(k, "openrlhf") for k in OPENRLHF_KINDS]
                         + [(k, "openrlhf_unclamped") for k in OPENRLHF_KINDS])
def test_kl_penalty_gradcheck(kind, convention):
    logp, ref_logp = logprob_pair((4, 9), seed=53, dtype=torch.float64, spread=1.0)
    if convention != "openrlhf_unclamped":  # plus points where a clamp is active (zero gradient), away from its boundary
        logp = torch.cat([logp.flatten(), torch.tensor([-40.0, 25.0, -13.0, 12.0], dtype=torch.float64)])
        ref_logp = torch.cat([ref_logp.flatten(), torch.zeros(4, dtype=torch.float64)])
    logp.requires_grad_(True)
    ref_logp.requires_grad_(True)
    # OpenRLHF computes in fp32 whatever the inputs: finite differences at fp32 resolution
    tol = dict(eps=1e-3, atol=5e-3, rtol=5e-3) if convention != "verl" else {}
    torch.autograd.gradcheck(lambda a, b: fastrl.credit.kl_penalty(a, b, kind, convention=convention),
                             (logp, ref_logp), **tol)


@pytest.mark.parametrize("kind", VERL_KINDS)
def test_kl_penalty_straight_through_has_k2_gradient(kind):
    logp, ref_logp = logprob_pair((6, 20), seed=57, dtype=torch.float64, spread=8.0)
    value, g_logp, g_ref = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, kind + "+"), logp, ref_logp)
    k2 = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, "k2"), logp, ref_logp)
    assert torch.equal(value, fastrl.credit.kl_penalty(logp, ref_logp, kind))
    assert torch.equal(g_logp, k2[1]) and torch.equal(g_ref, k2[2])
    torch.testing.assert_close(g_logp, (logp - ref_logp) * torch.randn(
        6, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


def test_kl_penalty_reference_backend_matches():
    logp, ref_logp = logprob_pair((5, 40), seed=59, spread=8.0)
    for kind in VERL_KINDS_ALL:
        got = value_and_grads(lambda a, b: fastrl.credit.kl_penalty(a, b, kind), logp, ref_logp)
        want = value_and_grads(lambda a, b: ref.kl_penalty(a, b, kind), logp, ref_logp)
        assert_kl_close(got, want, kind)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("k4",), {}, ValueError,
         r"`kind` must be one of 'k1', 'kl', 'abs', 'k2', 'mse', 'k3', 'low_var_kl'.*got 'k4'"),
        (("full",), {}, ValueError, r"'full' needs the full-vocabulary distributions"),
        (("abs",), dict(convention="openrlhf"), ValueError,
         r"`kind` must be one of 'k1', 'k2', 'k3' with convention='openrlhf', got 'abs'"),
        (("k3+",), dict(convention="openrlhf"), ValueError, r"got 'k3\+'"),
        (("k1",), dict(convention="trl"), ValueError,
         r"`convention` must be 'verl', 'openrlhf' or 'openrlhf_unclamped', got 'trl'"),
        (("abs",), dict(convention="openrlhf_unclamped"), ValueError,
         r"`kind` must be one of 'k1', 'k2', 'k3' with convention='openrlhf_unclamped', got 'abs'"),
    ],
)
def test_kl_penalty_bad_kind(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastrl.credit.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), *args, **kwargs)


def test_kl_penalty_bad_tensors():
    with pytest.raises(RuntimeError, match=r"`ref_logp` has shape \[2, 4\] but `logp` has shape \[2, 3\]"):
        fastrl.credit.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4), "k1")
    with pytest.raises(RuntimeError, match=r"`logp` must be a floating tensor"):
        fastrl.credit.kl_penalty(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), "k1")
    for kind in ("full", "unknown", "k3++"):  # the drop-in raises what verl raises
        with pytest.raises(NotImplementedError):
            verl_core.kl_penalty(torch.zeros(2), torch.zeros(2), kind)
        with pytest.raises(NotImplementedError, match="valid: k1, kl, abs"):
            fverl.kl_penalty(torch.zeros(2), torch.zeros(2), kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compute_rewards_dropin_matches_verl(dtype):
    logp, ref_logp = logprob_pair((6, 50), seed=61, dtype=dtype)
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(62)).to(dtype)
    got = fverl.compute_rewards(scores, logp, ref_logp, 0.05)
    want = verl_core.compute_rewards(scores, logp, ref_logp, 0.05)
    assert got.dtype == want.dtype and torch.equal(got, want)


def reward_batch(B, T, seed, *, mask_dtype=torch.int64, dtype=torch.float32):
    r, v, m = multiturn_batch(B, T, seed, mask_dtype=mask_dtype, all_masked_rows=(1,) if B > 1 else ())
    scores = r[:, 0] * 3
    return scores, m, v.abs() * 0.1


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_token_rewards_match_openrlhf(mask_dtype, clip):
    scores, m, kl = reward_batch(16, 70, seed=67, mask_dtype=mask_dtype)
    got = fastrl.credit.token_rewards(scores, m, kl=kl, kl_coef=0.02, clip=clip)
    want = openrlhf_compute_reward(scores, 0.02, kl, m, None if clip is None else (-clip, clip))
    valid = m.bool()
    has_token = valid.any(1)
    assert got.dtype == torch.float32 and got.shape == m.shape
    assert torch.equal(got[valid], want[valid])  # the same fp32 operations
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    assert not has_token.all() and (got[~has_token] == 0).all()  # an all-masked row: score dropped
    torch.testing.assert_close(got, ref.token_rewards(scores, m, kl=kl, kl_coef=0.02, clip=clip), rtol=0, atol=0)
    if clip is not None:  # clipping reached some score
        assert (scores.abs() > clip).any()


def test_token_rewards_by_hand():
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    got = fastrl.credit.token_rewards(torch.tensor([2.0, 7.0, -5.0]), m, kl=torch.ones(3, 5), kl_coef=0.5, clip=3.0)
    assert got.tolist() == [[-0.5, -0.5, 0.0, 1.5, 0.0], [0.0] * 5, [-3.5, 0.0, 0.0, 0.0, 0.0]]
    assert fastrl.credit.token_rewards(torch.tensor([2.0, 7.0, -5.0]), m).tolist() == \
        [[0.0, 0.0, 0.0, 2.0, 0.0], [0.0] * 5, [-5.0, 0.0, 0.0, 0.0, 0.0]]


def test_token_rewards_packed_equals_padded():
    scores, m, kl = reward_batch(12, 41, seed=71)
    _, cu, keep = pack(kl, m)
    padded = fastrl.credit.token_rewards(scores, m, kl=kl, kl_coef=0.1, clip=2.0)
    packed = fastrl.credit.token_rewards(scores, m[keep], kl=kl[keep], kl_coef=0.1, clip=2.0, cu_seqlens=cu)
    assert torch.equal(packed, padded[keep])
    torch.testing.assert_close(packed, ref.token_rewards(scores, m[keep], kl=kl[keep], kl_coef=0.1, clip=2.0,
                                                         cu_seqlens=cu), rtol=0, atol=0)


def test_token_rewards_dtypes():
    scores, m, kl = reward_batch(4, 9, seed=73)
    assert fastrl.credit.token_rewards(scores.double(), m, kl=kl).dtype == torch.float64
    assert fastrl.credit.token_rewards(scores.bfloat16(), m).dtype == torch.float32
    got = fastrl.credit.token_rewards(scores.bfloat16(), m, kl=kl.bfloat16(), kl_coef=0.3)
    want = ref.token_rewards(scores.bfloat16(), m, kl=kl.bfloat16(), kl_coef=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _token_rewards(**kw):
    args = dict(scores=torch.zeros(2), mask=torch.ones(2, 3), kl=torch.zeros(2, 3), kl_coef=0.1)
    args.update(kw)
    return fastrl.credit.token_rewards(**args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(kl_coef=-0.1), ValueError, r"`kl_coef` must be >= 0, got -0.1"),
        (dict(clip=0.0), ValueError, r"`clip` must be > 0 .*got 0"),
        (dict(clip=-1.0), ValueError, r"`clip` must be > 0 .*got -1"),
        (dict(scores=torch.zeros(3)), RuntimeError, r"`scores` has 3 entries but `mask` has 2 rows"),
        (dict(scores=torch.zeros(2, 1)), RuntimeError, r"`scores` must be 1-D"),
        (dict(kl=torch.zeros(2, 4)), RuntimeError, r"`kl` has shape \[2, 4\] but `mask` has shape \[2, 3\]"),
        (dict(mask=torch.tensor([[1, 0, 3], [1, 1, 1]]), kl=None), RuntimeError, r"`mask` must hold only 0 and 1, got 3"),
        (dict(scores=torch.zeros(2, dtype=torch.int64)), RuntimeError, r"`scores` must be a floating tensor"),
        (dict(mask=torch.ones(6), kl=None, cu_seqlens=torch.tensor([0, 2, 5])), RuntimeError,
         r"`cu_seqlens` must end at the number of tokens N = 6"),
    ],
)
def test_token_rewards_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _token_rewards(**kwargs)


def test_opcheck_kl_and_rewards():
    logp, ref_logp = logprob_pair((3, 7), seed=79)
    ops = torch.ops.fastrl
    for kind, convention in [("k3", "verl"), ("abs+", "verl"), ("k3", "openrlhf"), ("k3", "openrlhf_unclamped"),
                             ("k2", "openrlhf_unclamped")]:
        torch.library.opcheck(ops.kl_penalty.default, (logp.requires_grad_(True), ref_logp, kind, convention))
        torch.library.opcheck(ops.kl_penalty_backward.default, (torch.ones(3, 7), logp.detach(), ref_logp, kind, convention))
    scores, m, kl = reward_batch(4, 9, seed=83, mask_dtype=torch.float32)
    _, cu, keep = pack(kl, m)
    torch.library.opcheck(ops.token_rewards.default, (scores, m, kl, None, 0.1, 1.0))
    torch.library.opcheck(ops.token_rewards.default, (scores, m[keep], None, cu, 0.0, None))


def test_torch_compile_kl_and_rewards_no_graph_break():
    logp, ref_logp = logprob_pair((3, 8), seed=89)
    m = torch.ones(3, 8)
    f = torch.compile(lambda a, b, s: fastrl.credit.token_rewards(s, m, kl=fastrl.credit.kl_penalty(a, b, "k3"),
                                                                  kl_coef=0.1), fullgraph=True, backend="eager")
    s = torch.tensor([1.0, 0.0, -1.0])
    want = fastrl.credit.token_rewards(s, m, kl=fastrl.credit.kl_penalty(logp, ref_logp, "k3"), kl_coef=0.1)
    assert torch.equal(f(logp, ref_logp, s), want)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 6), T=st.integers(0, 30), seed=st.integers(0, 2**16),
       kind=st.sampled_from(VERL_KINDS_ALL), spread=st.floats(0.0, 30.0),
       kl_coef=st.floats(0.0, 2.0), clip=st.one_of(st.none(), st.floats(0.01, 5.0)))
def test_hypothesis_kl_and_rewards(B, T, seed, kind, spread, kl_coef, clip):
    logp, ref_logp = logprob_pair((B, T), seed=seed, spread=spread)
    kl = fastrl.credit.kl_penalty(logp, ref_logp, kind)
    assert_kl_close((kl,), (verl_core.kl_penalty(logp, ref_logp, kind),), kind)
    scores, m, _ = reward_batch(B, max(T, 1), seed=seed)
    m = m[:, :T]
    got = fastrl.credit.token_rewards(scores, m, kl=kl, kl_coef=kl_coef, clip=clip)
    torch.testing.assert_close(got, ref.token_rewards(scores, m, kl=kl, kl_coef=kl_coef, clip=clip), rtol=0, atol=0)
    rows = m.bool().any(1)
    if T > 0 and rows.any():
        want = openrlhf_compute_reward(scores, kl_coef, kl, m, None if clip is None else (-clip, clip))
        valid = m.bool()
        assert torch.equal(got[valid], want[valid])


# ---------------------------------------------------------------- distributed statistics (gloo)

def _distributed_statistics_worker(rank, world_size, init_method, xs, masks, out_dir):
    """One gloo rank: the statistics of its shard with process_group=WORLD, saved for the parent."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        group = dist.group.WORLD
        x, m = xs[rank], masks[rank]
        out = {(s, u): fastrl.credit.masked_whiten(x, m, shift_mean=s, unbiased=u, process_group=group)
               for s in (True, False) for u in (True, False)}
        out["mean"] = fastrl.credit.masked_mean(x, m, process_group=group)
        out["var"] = fastrl.credit.masked_var(x, m, process_group=group)
        try:
            fastrl.credit.masked_whiten(x, torch.zeros_like(m), process_group=group)
        except ValueError as e:  # every rank: the global count is 0
            out["error"] = str(e)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_whitening_equals_single_process(tmp_path):
    gen = torch.Generator().manual_seed(97)
    # uneven shards, far-off means (the merge must be stable), rank 1 with an all-masked row
    xs = [torch.randn(5, 40, generator=gen, dtype=torch.float64) * 3 + 100,
          torch.randn(3, 17, generator=gen, dtype=torch.float64) * 0.5 + 90]
    masks = [(torch.rand(5, 40, generator=gen) < 0.7).long(), (torch.rand(3, 17, generator=gen) < 0.5).long()]
    masks[1][0] = 0
    run_ranks(_distributed_statistics_worker, (2, f"file://{tmp_path}/init", xs, masks, str(tmp_path)), 2)
    x_all = torch.cat([x.flatten() for x in xs])
    m_all = torch.cat([m.flatten() for m in masks])
    sizes = [x.numel() for x in xs]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for shift_mean in (True, False):
            for unbiased in (True, False):
                want = fastrl.credit.masked_whiten(x_all, m_all, shift_mean=shift_mean, unbiased=unbiased)
                want = want.split(sizes)[rank].view_as(xs[rank])
                torch.testing.assert_close(got[(shift_mean, unbiased)], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["mean"], fastrl.credit.masked_mean(x_all, m_all), rtol=1e-13, atol=0)
        torch.testing.assert_close(got["var"], fastrl.credit.masked_var(x_all, m_all), rtol=1e-12, atol=0)
        assert "at least 2 elements where `mask` is 1, got 0" in got["error"]
        # and not the local statistics
        local = fastrl.credit.masked_whiten(xs[rank], masks[rank])
        assert (got[(True, True)] - local).abs().max() > 0.1


def test_backends_lists_kl_and_reward_ops():
    report = fastrl.backends()
    for op in ("kl_penalty", "token_rewards"):
        assert report[op]["cpu"] == "available" and report[op]["reference"] == "available"


# ------------------------------------------------------------------------------- segment_reduce

REDUCTIONS = ["sum", "mean", "geomean", "last"]


def segment_batch(B, T, seed, *, dtype=torch.float32, mask_dtype=torch.int64, all_masked_rows=()):
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(B, T, generator=gen)).to(dtype)
    _, _, mask = multiturn_batch(B, T, seed, mask_dtype=mask_dtype, all_masked_rows=all_masked_rows)
    return x, mask


def segment_by_loops(x, mask, reduce):
    """Independent per-row Python loop in fp64."""
    out = []
    for row, mrow in zip(x.double().tolist(), mask.bool().tolist()):
        vals = [v for v, k in zip(row, mrow) if k]
        if reduce == "sum":
            out.append(math.fsum(vals))
        elif reduce == "mean":
            out.append(math.fsum(vals) / len(vals) if vals else 0.0)
        elif reduce == "geomean":
            out.append(math.exp(math.fsum(vals) / len(vals)) if vals else 1.0)
        else:
            out.append(vals[-1] if vals else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_segment_reduce_matches_reference(reduce, dtype, mask_dtype):
    x, mask = segment_batch(37, 29, 3, dtype=dtype, mask_dtype=mask_dtype, all_masked_rows=(0, 5))
    got = fastrl.credit.segment_reduce(x, mask, reduce=reduce)
    want = ref.segment_reduce(x, mask, reduce=reduce)
    assert got.shape == (37,) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert want.dtype == got.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), segment_by_loops(x, mask, reduce), rtol=1e-6, atol=1e-6)


def test_segment_reduce_by_hand():
    x = torch.tensor([[0.1, 0.3, 9.0], [-0.2, float("nan"), 0.0], [1.0, 2.0, 3.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    sr = fastrl.credit.segment_reduce
    torch.testing.assert_close(sr(x, m, reduce="sum"), torch.tensor([0.4, -0.2, 0.0]))
    torch.testing.assert_close(sr(x, m, reduce="mean"), torch.tensor([0.2, -0.2, 0.0]))
    torch.testing.assert_close(sr(x, m, reduce="geomean"), torch.tensor([math.exp(0.2), math.exp(-0.2), 1.0]))
    torch.testing.assert_close(sr(x, m, reduce="last"), torch.tensor([0.3, -0.2, 0.0]))
    torch.testing.assert_close(sr(x[::2]), torch.tensor([9.4, 6.0]))  # no mask: every token
    assert sr(x[[0, 2]], reduce="last").tolist() == [9.0, 3.0]


def test_segment_reduce_geomean_is_gspo_ratio():
    gen = torch.Generator().manual_seed(7)
    logp, old = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(4, 9, generator=gen, dtype=torch.float64)
    m = (torch.rand(4, 9, generator=gen) < 0.8).double()
    m[:, 0] = 1
    gspo = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1))
    torch.testing.assert_close(fastrl.credit.segment_reduce(logp - old, m, reduce="geomean"), gspo)
    prod = torch.stack([torch.prod(torch.exp(logp - old)[b][m[b].bool()]) ** (1 / m[b].sum()) for b in range(4)])
    torch.testing.assert_close(fastrl.credit.segment_reduce(logp - old, m, reduce="geomean"), prod)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_segment_reduce_packed_equals_padded(reduce, with_mask):
    x, mask = segment_batch(23, 31, 11, all_masked_rows=(3,))
    xp, cu, keep = pack(x, mask)
    mp = mask[keep] if with_mask else None
    padded_mask = mask if with_mask else keep.long()
    got = fastrl.credit.segment_reduce(xp, mp, cu_seqlens=cu, reduce=reduce)
    assert got.shape == (23,)
    assert torch.equal(got, fastrl.credit.segment_reduce(x, padded_mask, reduce=reduce))
    torch.testing.assert_close(got, ref.segment_reduce(xp, mp, cu_seqlens=cu, reduce=reduce), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_segment_reduce_empty_inputs(reduce):
    sr = fastrl.credit.segment_reduce
    empty_value = 1.0 if reduce == "geomean" else 0.0
    assert sr(torch.zeros(0, 5), torch.zeros(0, 5), reduce=reduce).shape == (0,)
    assert sr(torch.zeros(3, 0), torch.zeros(3, 0), reduce=reduce).tolist() == [empty_value] * 3
    got = sr(torch.zeros(0), cu_seqlens=torch.zeros(3, dtype=torch.int64), reduce=reduce)
    assert got.tolist() == [empty_value] * 2
    assert sr(torch.zeros(0), cu_seqlens=torch.zeros(1, dtype=torch.int64), reduce=reduce).shape == (0,)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    sr(x, torch.zeros(4, 6), reduce=reduce).sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("packed", [False, True])
def test_segment_reduce_gradcheck(reduce, packed):
    x, mask = segment_batch(6, 8, 5, dtype=torch.float64, all_masked_rows=(2,))
    if packed:
        x, cu, keep = pack(x, mask)
        mask = mask[keep]
    else:
        cu = None
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda v: fastrl.credit.segment_reduce(v, mask, cu_seqlens=cu, reduce=reduce), (x,))
    torch.autograd.gradcheck(lambda v: fastrl.credit.segment_reduce(v, cu_seqlens=cu, reduce=reduce), (x,))
    # and the same gradient as autograd through the reference
    g = torch.randn(6, dtype=torch.float64)
    (got,) = torch.autograd.grad(fastrl.credit.segment_reduce(x, mask, cu_seqlens=cu, reduce=reduce), x, g)
    (want,) = torch.autograd.grad(ref.segment_reduce(x, mask, cu_seqlens=cu, reduce=reduce), x, g)
    torch.testing.assert_close(got, want)


def test_segment_reduce_grad_dtype_and_masked_nan():
    x = torch.tensor([[0.5, float("nan"), 1.5]], dtype=torch.bfloat16, requires_grad=True)
    m = torch.tensor([[1, 0, 1]])
    fastrl.credit.segment_reduce(x, m, reduce="mean").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.tolist() == [[0.5, 0.0, 0.5]]


def test_segment_reduce_opcheck():
    ops = torch.ops.fastrl
    x, mask = segment_batch(5, 7, 2, all_masked_rows=(1,))
    xp, cu, keep = pack(x, mask)
    for reduce in REDUCTIONS:
        torch.library.opcheck(ops.segment_reduce.default, (x.clone().requires_grad_(True), mask, None, reduce))
        torch.library.opcheck(ops.segment_reduce.default, (xp.clone().requires_grad_(True), mask[keep], cu, reduce))
        torch.library.opcheck(ops.segment_reduce.default, (xp.double().requires_grad_(True), None, cu, reduce))
        torch.library.opcheck(ops.segment_reduce_backward.default, (torch.ones(5), x, mask, None, reduce))


def test_segment_reduce_torch_compile_no_graph_break():
    x, mask = segment_batch(4, 6, 1)
    fn = torch.compile(lambda v, m: fastrl.credit.segment_reduce(v, m, reduce="geomean") * 2, fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(x, mask), 2 * ref.segment_reduce(x, mask, reduce="geomean"))


def test_segment_reduce_deterministic_across_thread_counts():
    x, mask = segment_batch(300, 700, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [fastrl.credit.segment_reduce(x, mask, reduce=r) for r in REDUCTIONS]
    finally:
        torch.set_num_threads(threads)
    for r, a in zip(REDUCTIONS, one):
        assert torch.equal(a, fastrl.credit.segment_reduce(x, mask, reduce=r))


def test_segment_reduce_reference_backend(monkeypatch):
    x, mask = segment_batch(5, 9, 6)
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    got = fastrl.credit.segment_reduce(x, mask, reduce="last")
    monkeypatch.undo()
    assert torch.equal(got, fastrl.credit.segment_reduce(x, mask, reduce="last"))


def _segment(**kw):
    args = dict(x=torch.randn(3, 4), mask=torch.ones(3, 4), cu_seqlens=None, reduce="sum")
    args.update(kw)
    return fastrl.credit.segment_reduce(args.pop("x"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(reduce="max"), ValueError, r"must be one of 'sum', 'mean', 'geomean', 'last'; got 'max'"),
        (dict(mask=torch.ones(3, 5)), RuntimeError, r"`mask` has shape \[3, 5\] but `x` has shape \[3, 4\]"),
        (dict(mask=torch.full((3, 4), 2.0)), RuntimeError, r"`mask` must hold only 0 and 1, got 2 at flat index 0"),
        (dict(mask=torch.tensor([[1, 1, 1, 1], [1, 0, -1, 1], [1, 1, 1, 1]])), RuntimeError,
         r"only 0 and 1, got -1 at flat index 6"),
        (dict(x=torch.ones(3, 4, dtype=torch.int64)), RuntimeError, "`x` must be a floating tensor"),
        (dict(x=torch.randn(12)), RuntimeError, "`x` must be 2-D"),
        (dict(x=torch.randn(12), mask=None, cu_seqlens=torch.tensor([0, 5, 11])), RuntimeError,
         "`cu_seqlens` must end at the number of tokens N = 12"),
        (dict(cu_seqlens=torch.tensor([0, 12])), RuntimeError, "`x` must be 1-D"),
        (dict(mask=torch.ones(3, 4, dtype=torch.float16)), RuntimeError, "`mask` must be bool, uint8"),
    ],
)
def test_segment_reduce_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _segment(**kwargs)


def test_segment_reduce_reference_bad_reduce():
    with pytest.raises(ValueError, match="'sum', 'mean', 'geomean', 'last'; got 'min'"):
        ref.segment_reduce(torch.randn(2, 3), reduce="min")


def test_backends_lists_segment_reduce():
    report = fastrl.backends()["segment_reduce"]
    assert report["cpu"] == "available" and report["reference"] == "available"
    if not torch.cuda.is_available():  # a CUDA kernel exists now; here it is unavailable for lack of a GPU
        assert report["cuda"].startswith("unavailable")


# ------------------------------------------------------------------ GAE turn ends (dones) and modes

GAE_MODES = ["skip", "reset", "dense"]


def turn_batch(B, T, seed, *, mask_dtype=torch.int64, dtype=torch.float32, p_done=0.08):
    """A multi-turn batch plus random turn-end flags (on valid and on masked tokens)."""
    r, v, m = multiturn_batch(B, T, seed, mask_dtype=mask_dtype, all_masked_rows=(1,) if B > 2 else (), dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    dones = torch.rand(B, T, generator=gen) < p_done
    return r, v, m, dones


def openrlhf_get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's get_advantages_and_returns (padded path), formula for formula from
    openrlhf/trainer/ppo_utils/experience_maker.py."""
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    values = action_mask * values
    rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def openrlhf_get_cumulative_returns(rewards, action_mask, gamma):
    """OpenRLHF's get_cumulative_returns (padded path), formula for formula."""
    returns = torch.zeros_like(rewards)
    cumulative_return = torch.zeros(rewards.size(0))
    rewards = action_mask * rewards
    for t in reversed(range(rewards.size(1))):
        cumulative_return = rewards[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    return returns


def test_gae_without_turn_ends_is_bitwise_the_plain_call():
    r, v, m, _ = turn_batch(10, 60, seed=101)
    plain = fastrl.credit.gae(r, v, m, 0.99, 0.95)
    for dones in (None, torch.zeros(10, 60, dtype=torch.bool), torch.zeros(10, 60)):
        got = fastrl.credit.gae(r, v, m, 0.99, 0.95, dones=dones, turn_gamma=0.5, turn_lam=0.5)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
    # turn_gamma = gamma and turn_lam = lam make a turn end an ordinary step
    _, _, _, dones = turn_batch(10, 60, seed=101)
    got = fastrl.credit.gae(r, v, m, 0.99, 0.95, dones=dones, turn_gamma=0.99, turn_lam=0.95)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_gae_turn_ends_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    v = torch.tensor([[0.5, 0.25, 1.0, 0.0]])
    ones = torch.ones(1, 4)
    d = torch.tensor([[0, 1, 0, 0]])
    # hard reset after t=1: t=2 A=1; t=1 delta = 0 - 0.25 (no bootstrap), no carry; t=0 A = 0.75 - 0.25
    adv, ret = fastrl.credit.gae(r, v, ones, 1.0, 1.0, dones=d)
    assert adv.tolist() == [[0.5, -0.25, 1.0, 0.0]] and ret.tolist() == [[1.0, 0.0, 2.0, 0.0]]
    # the flag on a masked token ends the turn at the valid token before it (t=0)
    m = torch.tensor([[1, 0, 1, 1]])
    adv, ret = fastrl.credit.gae(r, v, m, 1.0, 1.0, dones=d)
    assert adv.tolist() == [[0.5, 1.0, 1.0, 0.0]] and ret.tolist() == [[1.0, 1.25, 2.0, 0.0]]
    # turn-level discount: t=1 delta = 0 + 0.5 * 1 - 0.25, A = 0.25 + 0.5 * 1; t=0 A = 0.75 + 0.75
    adv, _ = fastrl.credit.gae(r, v, ones, 1.0, 1.0, dones=d, turn_gamma=0.5, turn_lam=1.0)
    assert adv.tolist() == [[1.5, 0.75, 1.0, 0.0]]
    # turn_lam defaults to lam: t=1 A = 0.25 + 0.5 * 0.5 * A_2; t=0 (inside a turn) A = 0.75 + 1 * 0.5 * A_1
    adv, _ = fastrl.credit.gae(r, v, ones, 1.0, 0.5, dones=d, turn_gamma=0.5)
    assert adv.tolist() == [[1.0, 0.5, 1.0, 0.0]]


def test_gae_hard_turn_ends_equal_separate_episodes():
    """turn_gamma = 0 cuts a row into independent episodes: the same as GAE over each turn as its
    own packed row."""
    gen = torch.Generator().manual_seed(103)
    B, T = 6, 50
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    m = torch.ones(B, T, dtype=torch.bool)
    dones = torch.rand(B, T, generator=gen) < 0.1
    adv, ret = fastrl.credit.gae(r, v, m, 0.97, 0.9, dones=dones)
    ends = dones.clone()
    ends[:, -1] = True
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), (ends.flatten().nonzero().flatten() + 1)])
    padv, pret = fastrl.credit.gae(r.flatten(), v.flatten(), m.flatten(), 0.97, 0.9, cu_seqlens=cu)
    assert torch.equal(adv.flatten(), padv) and torch.equal(ret.flatten(), pret)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", GAE_MODES)
@pytest.mark.parametrize("with_dones", [False, True])
def test_gae_modes_and_turn_ends_match_reference(dtype, mode, with_dones):
    r, v, m, dones = turn_batch(9, 70, seed=107, dtype=dtype, mask_dtype=torch.float32)
    kw = dict(mode=mode, dones=dones.to(torch.int32) if with_dones else None, turn_gamma=0.7, turn_lam=0.6)
    got = fastrl.credit.gae(r, v, m, 0.9, 0.8, **kw)
    want = ref.gae(r, v, m, 0.9, 0.8, **kw)
    for g, w in zip(got, want):
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(g, w)  # the same operations in the same order
    if with_dones:  # the flags changed something
        assert not torch.equal(got[0], fastrl.credit.gae(r, v, m, 0.9, 0.8, mode=mode)[0])


def test_gae_reset_mode_semantics():
    r, v, m, _ = turn_batch(8, 40, seed=109)
    adv, ret = fastrl.credit.gae(r, v, m, 0.95, 0.9, mode="reset")
    masked = ~m.bool()
    assert (adv[masked] == 0).all() and torch.equal(ret[masked], v[masked])
    # each maximal valid span is its own episode: the same as hard turn ends on masked tokens
    skip = fastrl.credit.gae(r, v, m, 0.95, 0.9, dones=masked)
    assert torch.equal(adv[~masked], skip[0][~masked])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0)])
def test_gae_dense_mode_matches_openrlhf(mask_dtype, gamma, lam):
    r, v, m, _ = turn_batch(12, 80, seed=113, mask_dtype=mask_dtype)
    want_adv, want_ret = openrlhf_get_advantages_and_returns(v, r, m, gamma, lam)
    got_adv, got_ret = fastrl.credit.gae(r, v, m, gamma, lam, mode="dense")
    torch.testing.assert_close(got_adv, want_adv, rtol=0, atol=0)  # the same fp32 operations
    torch.testing.assert_close(got_ret, want_ret, rtol=0, atol=0)
    # interior masked spans make it differ from verl's transparent tokens
    assert not torch.equal(got_adv, fastrl.credit.gae(r, v, m, gamma, lam)[0])
    # OpenRLHF's cumulative returns are the masked reverse cumsum
    torch.testing.assert_close(fastrl.credit.discounted_returns(r, m, gamma, mode="cumsum"),
                               openrlhf_get_cumulative_returns(r, m, gamma), rtol=0, atol=0)


@pytest.mark.parametrize("mode", GAE_MODES)
def test_gae_turn_ends_packed_equals_padded(mode):
    r, v, m, dones = turn_batch(11, 37, seed=127)
    rp, cu, keep = pack(r, m)
    got = fastrl.credit.gae(rp, v[keep], m[keep], 0.99, 0.9, cu_seqlens=cu, dones=dones[keep], mode=mode,
                            turn_gamma=0.5)
    want = fastrl.credit.gae(r, v, m, 0.99, 0.9, dones=dones, mode=mode, turn_gamma=0.5)
    if mode == "dense":  # packing drops each row's trailing padding, which dense mode steps through with zeros
        want = fastrl.credit.gae(r * m, v * m, m, 0.99, 0.9, dones=dones & keep, mode=mode, turn_gamma=0.5)
    assert torch.equal(got[0], want[0][keep]) and torch.equal(got[1], want[1][keep])
    ref_adv, _ = ref.gae(rp, v[keep], m[keep], 0.99, 0.9, cu_seqlens=cu, dones=dones[keep], mode=mode, turn_gamma=0.5)
    assert torch.equal(got[0], ref_adv)


def test_gae_turn_ends_deterministic_across_thread_counts():
    r, v, m, dones = turn_batch(64, 2000, seed=131)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastrl.credit.gae(r, v, m, 0.99, 0.95, dones=dones, turn_gamma=0.9)
        torch.set_num_threads(max(2, threads))
        many = fastrl.credit.gae(r, v, m, 0.99, 0.95, dones=dones, turn_gamma=0.9)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 5), T=st.integers(1, 30), seed=st.integers(0, 2**16), gamma=st.floats(0.0, 1.0),
       lam=st.floats(0.0, 1.0), turn_gamma=st.floats(0.0, 1.0), turn_lam=st.floats(0.0, 1.0),
       mode=st.sampled_from(GAE_MODES), p_done=st.sampled_from([0.0, 0.2, 1.0]))
def test_hypothesis_gae_turn_ends(B, T, seed, gamma, lam, turn_gamma, turn_lam, mode, p_done):
    r, v, m, dones = turn_batch(B, T, seed, mask_dtype=torch.bool, p_done=p_done)
    kw = dict(dones=dones, mode=mode, turn_gamma=turn_gamma, turn_lam=turn_lam)
    for g, w in zip(fastrl.credit.gae(r, v, m, gamma, lam, **kw), ref.gae(r, v, m, gamma, lam, **kw)):
        assert torch.equal(g, w)


def test_opcheck_gae_turn_ends():
    r, v, m, dones = turn_batch(4, 9, seed=137, mask_dtype=torch.float32)
    rp, cu, keep = pack(r, m)
    gae_op = torch.ops.fastrl.gae.default
    torch.library.opcheck(gae_op, (r, v, m, None, 0.9, 0.8, dones, "skip", 0.5, 0.5))
    torch.library.opcheck(gae_op, (rp, v[keep], m[keep], cu, 0.9, 0.8, dones[keep].float(), "dense", 0.0, 1.0))
    torch.library.opcheck(gae_op, (r, v, m, None, 0.9, 0.8, None, "reset", 0.0, 1.0))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dones=torch.zeros(2, 4)), RuntimeError, r"`dones` has shape \[2, 4\] but `mask` has shape \[2, 3\]"),
        (dict(dones=torch.full((2, 3), 0.5)), RuntimeError, r"`dones` must hold only 0 and 1, got 0.5 at flat index 0"),
        (dict(dones=torch.tensor([[0, 0, 0], [0, 3, 0]])), RuntimeError, r"`dones` must hold only 0 and 1, got 3 at flat index 4"),
        (dict(dones=torch.zeros(2, 3, dtype=torch.float16)), RuntimeError, r"`dones` must be bool, uint8"),
        (dict(turn_gamma=1.5), RuntimeError, r"`turn_gamma` must lie in \[0, 1\], got 1.5"),
        (dict(turn_lam=-0.5), RuntimeError, r"`turn_lam` must lie in \[0, 1\], got -0.5"),
        (dict(mode="sum"), ValueError, r"gae `mode` must be one of 'skip', 'reset', 'dense'; got 'sum'"),
    ],
)
def test_gae_turn_ends_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _gae(**kwargs)
    if "mode" in kwargs:
        with pytest.raises(ValueError, match="gae `mode` must be one of"):
            ref.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.9, 0.9, mode=kwargs["mode"])


def test_gae_nonfinite_inputs_propagate_like_verl():
    """NaN/Inf are not errors (documented): a NaN reward poisons its own and the earlier positions of
    its row (through the carry), as in verl; a NaN at a masked token never reaches a valid one."""
    r, v, m = multiturn_batch(4, 30, seed=139)
    m[:, :] = 1
    m[0, 10] = 0
    r[0, 20] = float("nan")
    r[2, 10] = float("nan")
    r[0, 10] = float("inf")  # masked: skipped
    r2 = r.clone()
    r2[0, 10] = 0.0
    got = fastrl.credit.gae(r, v, m, 0.99, 0.95)[0]
    want = verl_core.compute_gae_advantage_return(r2, v, m, gamma=0.99, lam=0.95)
    assert torch.isnan(got[0, :21]).all() and torch.isfinite(got[0, 21:]).all()
    assert torch.isnan(got[2, :11]).all() and torch.isfinite(got[2, 11:]).all()
    assert torch.isfinite(got[[1, 3]]).all()
    raw = fastrl.credit.gae(r2, v, m, 0.99, 0.95)[0]
    assert torch.equal(torch.isnan(raw), torch.isnan(got))
    assert want[0].isnan().any()  # verl propagates it too (then whitens with it)


# ------------------------------------------------------------------------------- implicit rewards


def implicit_batch(B, T, seed, *, dtype=torch.float32, mask_dtype=torch.int64, p_end=0.1):
    logp, ref_logp = logprob_pair((B, T), seed, dtype=dtype, spread=0.5)
    _, _, m = multiturn_batch(B, T, seed, mask_dtype=mask_dtype, all_masked_rows=(1,) if B > 2 else ())
    ends = torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 2)) < p_end
    return logp, ref_logp, m, ends


def test_implicit_rewards_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -3.0]])
    rf = torch.tensor([[-1.5, -1.0, -0.5, -2.0, -1.0]])
    m = torch.tensor([[1, 1, 0, 1, 0]])
    beta = 0.5
    assert fastrl.credit.implicit_rewards(lp, rf, beta, mask=m).tolist() == [[0.25, -0.5, 0.0, 0.5, 0.0]]
    # steps [0, 1] and [2, 4]; the second's flag (t=4) is masked: placed at its last valid token t=3
    got = fastrl.credit.implicit_rewards(lp, rf, beta, mask=m, step_ends=torch.tensor([[0, 1, 0, 0, 1]]))
    assert got.tolist() == [[0.0, -0.25, 0.0, 0.5, 0.0]]
    # no flag: the whole response is one step (PRIME's "whole" granularity)
    got = fastrl.credit.implicit_rewards(lp, rf, beta, mask=m, step_ends=torch.zeros(1, 5))
    assert got.tolist() == [[0.0, 0.0, 0.0, 0.25, 0.0]]
    # a flag on a masked token right after a closed step, or before any valid token: nothing to close
    got = fastrl.credit.implicit_rewards(lp, rf, beta, mask=torch.tensor([[0, 1, 1, 1, 1]]),
                                         step_ends=torch.tensor([[1, 1, 1, 0, 0]]))
    assert got.tolist() == [[0.0, -0.5, 0.0, 0.0, -0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, None])
@pytest.mark.parametrize("with_ends", [False, True])
def test_implicit_rewards_match_reference(dtype, mask_dtype, with_ends):
    logp, ref_logp, m, ends = implicit_batch(8, 45, seed=149, dtype=dtype, mask_dtype=mask_dtype or torch.int64)
    mask = None if mask_dtype is None else m
    kw = dict(mask=mask, step_ends=ends if with_ends else None)
    got = fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, **kw)
    want = ref.implicit_rewards(logp, ref_logp, 0.05, **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got, want)  # per token: the same two operations; step sums: fp64 in token order
    if with_ends:  # the step sums conserve the total reward of each row
        per_token = fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, mask=mask)
        torch.testing.assert_close(got.double().sum(1), per_token.double().sum(1), rtol=1e-6, atol=1e-6)


def test_implicit_rewards_are_prime_returns_input():
    """PRIME: returns = reverse cumsum (gamma = 1) of the implicit token rewards; the row total is
    beta * the sequence log-ratio (segment_reduce sum)."""
    logp, ref_logp, m, _ = implicit_batch(6, 40, seed=151)
    r = fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, mask=m)
    returns = fastrl.credit.discounted_returns(r, m, 1.0, mode="cumsum")
    want = torch.flip(torch.cumsum(torch.flip(0.05 * (logp - ref_logp) * m, [1]).double(), 1), [1])
    torch.testing.assert_close(returns.double(), want, rtol=1e-5, atol=1e-6)
    total = 0.05 * fastrl.credit.segment_reduce(logp - ref_logp, m, reduce="sum")
    torch.testing.assert_close(returns[:, 0], total, rtol=1e-5, atol=1e-6)
    adv, _ = fastrl.credit.gae(r, torch.zeros_like(r), m, 1.0, 1.0)  # usable as GAE rewards too
    torch.testing.assert_close(adv[m.bool()], returns[m.bool()], rtol=1e-5, atol=1e-6)


def test_implicit_rewards_packed_equals_padded():
    logp, ref_logp, m, ends = implicit_batch(10, 33, seed=157)
    lp, cu, keep = pack(logp, m)
    for step_ends in (None, ends):
        got = fastrl.credit.implicit_rewards(lp, ref_logp[keep], 0.1, mask=m[keep], cu_seqlens=cu,
                                             step_ends=None if step_ends is None else step_ends[keep])
        want = fastrl.credit.implicit_rewards(logp, ref_logp, 0.1, mask=m, step_ends=step_ends)
        assert torch.equal(got, want[keep])
        torch.testing.assert_close(got, ref.implicit_rewards(lp, ref_logp[keep], 0.1, mask=m[keep], cu_seqlens=cu,
                                                             step_ends=None if step_ends is None else step_ends[keep]),
                                   rtol=0, atol=0)
    # no mask with cu_seqlens: every packed token is valid
    got = fastrl.credit.implicit_rewards(lp, ref_logp[keep], 0.1, cu_seqlens=cu, step_ends=torch.zeros_like(lp))
    assert torch.equal(got, ref.implicit_rewards(lp, ref_logp[keep], 0.1, cu_seqlens=cu,
                                                 step_ends=torch.zeros_like(lp)))


def test_implicit_rewards_opcheck_compile_and_reference_backend(monkeypatch):
    logp, ref_logp, m, ends = implicit_batch(4, 9, seed=163, mask_dtype=torch.float32)
    lp, cu, keep = pack(logp, m)
    op = torch.ops.fastrl.implicit_rewards.default
    torch.library.opcheck(op, (logp, ref_logp, m, None, ends, 0.05))
    torch.library.opcheck(op, (lp, ref_logp[keep], None, cu, None, 0.05))
    f = torch.compile(lambda a, b: fastrl.credit.implicit_rewards(a, b, 0.05, mask=m, step_ends=ends) * 2,
                      fullgraph=True, backend="eager")
    assert torch.equal(f(logp, ref_logp), 2 * fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, mask=m, step_ends=ends))
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    got = fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, mask=m, step_ends=ends)
    monkeypatch.undo()
    assert torch.equal(got, fastrl.credit.implicit_rewards(logp, ref_logp, 0.05, mask=m, step_ends=ends))


def _implicit(**kw):
    args = dict(logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3), beta=0.1, mask=torch.ones(2, 3))
    args.update(kw)
    return fastrl.credit.implicit_rewards(args.pop("logp"), args.pop("ref_logp"), args.pop("beta"), **args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(ref_logp=torch.zeros(2, 4)), RuntimeError, r"`ref_logp` has shape \[2, 4\] but `logp` has shape \[2, 3\]"),
        (dict(mask=torch.ones(3, 3)), RuntimeError, r"`mask` has shape \[3, 3\] but `logp`"),
        (dict(mask=torch.full((2, 3), 0.5)), RuntimeError, r"`mask` must hold only 0 and 1, got 0.5"),
        (dict(step_ends=torch.full((2, 3), 2)), RuntimeError, r"`step_ends` must hold only 0 and 1, got 2"),
        (dict(step_ends=torch.zeros(2, 2)), RuntimeError, r"`step_ends` has shape \[2, 2\] but `logp`"),
        (dict(beta=float("nan")), ValueError, r"`beta` must be finite, got nan"),
        (dict(logp=torch.zeros(2, 3, dtype=torch.int64)), RuntimeError, r"`logp` must be a floating tensor"),
        (dict(logp=torch.zeros(6), ref_logp=torch.zeros(6), mask=None, cu_seqlens=torch.tensor([0, 2, 5])),
         RuntimeError, r"`cu_seqlens` must end at the number of tokens N = 6"),
        (dict(logp=torch.zeros(6), ref_logp=torch.zeros(6), mask=None), RuntimeError, r"`logp` must be 2-D"),
    ],
)
def test_implicit_rewards_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _implicit(**kwargs)


# ------------------------------------------------------------------ OpenRLHF reward conventions


def test_token_rewards_asymmetric_clip_range_matches_openrlhf():
    scores, m, kl = reward_batch(16, 50, seed=167)
    got = fastrl.credit.token_rewards(scores, m, kl=kl, kl_coef=0.02, clip=(-0.5, 2.0))
    want = openrlhf_compute_reward(scores, 0.02, kl, m, (-0.5, 2.0))
    valid = m.bool()
    assert torch.equal(got[valid], want[valid]) and (got[~valid] == 0).all()
    assert (scores < -0.5).any() and (scores > 2.0).any()  # both ends of the range were reached
    assert torch.equal(got, ref.token_rewards(scores, m, kl=kl, kl_coef=0.02, clip=(-0.5, 2.0)))
    with pytest.raises(ValueError, match=r"`clip` as a range must be \(lo, hi\) with lo <= hi, got \(2.0, 1.0\)"):
        fastrl.credit.token_rewards(scores, m, clip=(2.0, 1.0))


# --------------------------------------------------------------------------- CUDA (GPU machines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_turn_ends_modes_and_segment_reduce_match_cpu():
    r, v, m, dones = turn_batch(24, 3000, seed=173)
    rp, cu, keep = pack(r, m)
    for mode in GAE_MODES:
        kw = dict(dones=dones, mode=mode, turn_gamma=0.6, turn_lam=0.7)
        got = fastrl.credit.gae(r.cuda(), v.cuda(), m.cuda(), 0.99, 0.95, **{**kw, "dones": dones.cuda()})
        for g, w in zip(got, fastrl.credit.gae(r, v, m, 0.99, 0.95, **kw)):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)
        a = fastrl.credit.gae(rp.cuda(), v[keep].cuda(), m[keep].cuda(), 0.99, 0.95, cu_seqlens=cu.cuda(),
                              dones=dones[keep].cuda(), mode=mode)[0]
        b = fastrl.credit.gae(rp, v[keep], m[keep], 0.99, 0.95, cu_seqlens=cu, dones=dones[keep], mode=mode)[0]
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    x, mask = segment_batch(40, 2500, 179, all_masked_rows=(2,))
    xp, cux, keepx = pack(x, mask)
    for reduce in REDUCTIONS:
        for args, kw in [((x, mask), {}), ((xp, mask[keepx]), dict(cu_seqlens=cux)), ((x, None), {})]:
            dev = [a.cuda() if a is not None else None for a in args]
            got = fastrl.credit.segment_reduce(*dev, reduce=reduce, **{k: t.cuda() for k, t in kw.items()})
            torch.testing.assert_close(got.cpu(), fastrl.credit.segment_reduce(*args, reduce=reduce, **kw),
                                       rtol=1e-6, atol=1e-6)
            assert torch.equal(got, fastrl.credit.segment_reduce(*dev, reduce=reduce,
                                                                 **{k: t.cuda() for k, t in kw.items()}))
        xg = x.cuda().requires_grad_(True)
        fastrl.credit.segment_reduce(xg, mask.cuda(), reduce=reduce).sum().backward()
        xc = x.clone().requires_grad_(True)
        fastrl.credit.segment_reduce(xc, mask, reduce=reduce).sum().backward()
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ whitening fused into GAE


@pytest.mark.parametrize("mode", GAE_MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_gae_fused_whitening_equals_masked_whiten(mode, packed):
    r, v, m, dones = turn_batch(16, 90, seed=181)
    kw = dict(mode=mode, dones=dones, turn_gamma=0.5)
    if packed:
        r, cu, keep = pack(r, m)
        v, m, dones = v[keep], m[keep], dones[keep]
        kw.update(cu_seqlens=cu, dones=dones)
    adv, ret = fastrl.credit.gae(r, v, m, 0.99, 0.95, **kw)
    wadv, wret = fastrl.credit.gae(r, v, m, 0.99, 0.95, whiten=True, **kw)
    assert torch.equal(wret, ret)  # returns are not whitened (verl computes them first)
    torch.testing.assert_close(wadv, fastrl.credit.masked_whiten(adv, m), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wadv, ref.gae(r, v, m, 0.99, 0.95, whiten=True, **kw)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wadv[m.bool()].double().mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gae_fused_whitening_matches_verl_and_is_deterministic():
    r, v, m = multiturn_batch(32, 300, seed=191, all_masked_rows=(1,))
    want_adv, want_ret = verl_core.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastrl.credit.gae(r, v, m, 0.99, 0.95, whiten=True)
        torch.set_num_threads(max(2, threads))
        many = fastrl.credit.gae(r, v, m, 0.99, 0.95, whiten=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    torch.testing.assert_close(one[0], want_adv, rtol=1e-6, atol=1e-6)
    assert torch.equal(one[1], want_ret)
    with pytest.raises(ValueError, match="at least 2 elements where `mask` is 1, got 1"):
        fastrl.credit.gae(r[:1], v[:1], torch.tensor([[1] + [0] * 299]), 0.9, 0.9, whiten=True)
    torch.library.opcheck(torch.ops.fastrl.gae.default, (r, v, m, None, 0.9, 0.8, None, "skip", 0.0, 1.0, True))


def test_bad_input_section_of_the_issue():
    """Issue 3's Bad input list, each case a clear error (the documented results are tested above:
    NaN/Inf propagate, an all-masked batch with unbiased whitening raises ValueError as verl)."""
    r, v = torch.zeros(2, 3), torch.zeros(2, 3)
    nan_mask = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(RuntimeError, match=r"`mask` must hold only 0 and 1, got nan at flat index 1"):
        fastrl.credit.gae(r, v, nan_mask, 0.9, 0.9)
    with pytest.raises(RuntimeError, match=r"`mask` must hold only 0 and 1, got nan"):
        fastrl.credit.discounted_returns(r, nan_mask, 0.9)
    with pytest.raises(RuntimeError, match=r"`dones` must hold only 0 and 1, got nan"):
        fastrl.credit.gae(r, v, torch.ones(2, 3), 0.9, 0.9, dones=nan_mask)
    with pytest.raises(ValueError, match="at least 2 elements where `mask` is 1, got 0"):
        fastrl.credit.gae(r, v, torch.zeros(2, 3), 0.9, 0.9, whiten=True)
    cu = torch.tensor([0, 4, 3, 6])
    with pytest.raises(RuntimeError, match="non-decreasing"):
        fastrl.credit.gae(torch.zeros(6), torch.zeros(6), torch.ones(6), 0.9, 0.9, cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        fastrl.credit.implicit_rewards(torch.zeros(6), torch.zeros(6), 0.1, cu_seqlens=cu)
    with pytest.raises(RuntimeError, match=r"`turn_gamma` must lie in \[0, 1\], got nan"):
        fastrl.credit.gae(r, v, torch.ones(2, 3), 0.9, 0.9, turn_gamma=float("nan"))


# ------------------------------------------------------------ discounted returns: turn ends (dones)


def test_returns_without_turn_ends_is_bitwise_the_plain_call():
    r, _, m, dones = turn_batch(10, 60, seed=201)
    for mode in MODES:
        plain = fastrl.credit.discounted_returns(r, m, 0.97, mode=mode)
        for d in (None, torch.zeros(10, 60, dtype=torch.bool), torch.zeros(10, 60)):
            assert torch.equal(fastrl.credit.discounted_returns(r, m, 0.97, mode=mode, dones=d, turn_gamma=0.3), plain)
        # turn_gamma = gamma makes a turn end an ordinary step
        assert torch.equal(fastrl.credit.discounted_returns(r, m, 0.97, mode=mode, dones=dones, turn_gamma=0.97), plain)
        # and the flags do change the result otherwise
        assert not torch.equal(fastrl.credit.discounted_returns(r, m, 0.97, mode=mode, dones=dones), plain)


def test_returns_turn_ends_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    ones = torch.ones(1, 4)
    d = torch.tensor([[0, 1, 0, 0]])
    for mode in MODES:  # all valid: the modes agree
        # hard end after t=1: [1 + 2, 2, 4 + 8, 8]
        assert fastrl.credit.discounted_returns(r, ones, 1.0, mode=mode, dones=d).tolist() == [[3.0, 2.0, 12.0, 8.0]]
        # turn-level discount 0.5 at t=1 only: G_1 = 2 + 0.5 * 12 = 8, G_0 = 1 + 8
        got = fastrl.credit.discounted_returns(r, ones, 1.0, mode=mode, dones=d, turn_gamma=0.5)
        assert got.tolist() == [[9.0, 8.0, 12.0, 8.0]]
    # t=1 is masked (an observation); its flag ends the turn at t=0
    m = torch.tensor([[1, 0, 1, 1]])
    assert fastrl.credit.discounted_returns(r, m, 1.0, mode="skip", dones=d).tolist() == [[1.0, 0.0, 12.0, 8.0]]
    got = fastrl.credit.discounted_returns(r, m, 1.0, mode="skip", dones=d, turn_gamma=0.5)
    assert got.tolist() == [[7.0, 0.0, 12.0, 8.0]]
    # reset: the masked span restarts the return anyway
    assert fastrl.credit.discounted_returns(r, m, 1.0, mode="reset", dones=d).tolist() == [[1.0, 0.0, 12.0, 8.0]]
    # cumsum: t=1 is a step (reward 0) and the turn end itself: G_1 = 0 + 0.5 * 12, G_0 = 1 + 6
    got = fastrl.credit.discounted_returns(r, m, 1.0, mode="cumsum", dones=d, turn_gamma=0.5)
    assert got.tolist() == [[7.0, 6.0, 12.0, 8.0]]
    # a flag on trailing padding ends the turn at the last valid token (skip): nothing after it there
    m2 = torch.tensor([[1, 1, 1, 0]])
    d2 = torch.tensor([[0, 0, 0, 1]])
    got = fastrl.credit.discounted_returns(r, m2, 0.5, mode="skip", dones=d2, turn_gamma=0.0)
    assert got.tolist() == fastrl.credit.discounted_returns(r, m2, 0.5, mode="skip").tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_returns_turn_ends_match_reference(dtype, mode):
    r, _, m, dones = turn_batch(9, 70, seed=203, dtype=dtype, mask_dtype=torch.float32)
    for d, tg in ((dones.to(torch.int32), 0.6), (dones, 0.0), (None, 0.6)):
        got = fastrl.credit.discounted_returns(r, m, 0.9, mode=mode, dones=d, turn_gamma=tg)
        want = ref.discounted_returns(r, m, 0.9, mode=mode, dones=d, turn_gamma=tg)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(got, want)  # the same operations in the same order


@pytest.mark.parametrize("mode", MODES)
def test_returns_hard_turn_ends_equal_separate_episodes(mode):
    """turn_gamma = 0 cuts a row into independent episodes: the same as each turn (up to and
    including its flagged position) as its own packed row, interior masked spans included."""
    r, _, m, dones = turn_batch(6, 50, seed=205, p_done=0.1)
    got = fastrl.credit.discounted_returns(r, m, 0.97, mode=mode, dones=dones)
    ends = dones.clone()
    ends[:, -1] = True
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), ends.flatten().nonzero().flatten() + 1])
    assert cu.numel() > 6 + 20  # many turns
    want = fastrl.credit.discounted_returns(r.flatten(), m.flatten(), 0.97, mode=mode, cu_seqlens=cu)
    assert torch.equal(got.flatten(), want)


@pytest.mark.parametrize("mode", MODES)
def test_returns_turn_ends_packed_equals_padded(mode):
    r, _, m, dones = turn_batch(11, 37, seed=207)
    rp, cu, keep = pack(r, m)
    got = fastrl.credit.discounted_returns(rp, m[keep], 0.99, mode=mode, cu_seqlens=cu, dones=dones[keep],
                                           turn_gamma=0.5)
    # packing drops each row's trailing padding, and with it the flags there (which end the last turn)
    want = fastrl.credit.discounted_returns(r, m, 0.99, mode=mode, dones=dones & keep, turn_gamma=0.5)
    assert torch.equal(got, want[keep])
    assert torch.equal(got, ref.discounted_returns(rp, m[keep], 0.99, mode=mode, cu_seqlens=cu, dones=dones[keep],
                                                   turn_gamma=0.5))


def test_returns_turn_ends_deterministic_across_thread_counts():
    r, _, m, dones = turn_batch(64, 2000, seed=209)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [fastrl.credit.discounted_returns(r, m, 0.99, mode=mode, dones=dones, turn_gamma=0.9) for mode in MODES]
        torch.set_num_threads(max(2, threads))
        many = [fastrl.credit.discounted_returns(r, m, 0.99, mode=mode, dones=dones, turn_gamma=0.9) for mode in MODES]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 5), T=st.integers(1, 30), seed=st.integers(0, 2**16), gamma=st.floats(0.0, 1.0),
       turn_gamma=st.floats(0.0, 1.0), mode=st.sampled_from(MODES), p_done=st.sampled_from([0.0, 0.2, 1.0]))
def test_hypothesis_returns_turn_ends(B, T, seed, gamma, turn_gamma, mode, p_done):
    r, _, m, dones = turn_batch(B, T, seed, mask_dtype=torch.bool, p_done=p_done)
    kw = dict(mode=mode, dones=dones, turn_gamma=turn_gamma)
    assert torch.equal(fastrl.credit.discounted_returns(r, m, gamma, **kw), ref.discounted_returns(r, m, gamma, **kw))


def test_opcheck_returns_turn_ends():
    r, _, m, dones = turn_batch(4, 9, seed=211, mask_dtype=torch.float32)
    rp, cu, keep = pack(r, m)
    op = torch.ops.fastrl.discounted_returns.default
    torch.library.opcheck(op, (r, m, None, 0.9, "skip", dones, 0.5))
    torch.library.opcheck(op, (rp, m[keep], cu, 0.9, "cumsum", dones[keep].float(), 0.0))
    torch.library.opcheck(op, (r, m, None, 0.9, "reset"))
    f = torch.compile(lambda r, m, d: fastrl.credit.discounted_returns(r, m, 0.9, dones=d, turn_gamma=0.5) * 2,
                      fullgraph=True, backend="eager")
    assert torch.equal(f(r, m, dones), 2 * fastrl.credit.discounted_returns(r, m, 0.9, dones=dones, turn_gamma=0.5))


def test_returns_turn_ends_reference_backend(monkeypatch):
    r, _, m, dones = turn_batch(5, 20, seed=213)
    want = fastrl.credit.discounted_returns(r, m, 0.9, dones=dones, turn_gamma=0.4)
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    assert torch.equal(fastrl.credit.discounted_returns(r, m, 0.9, dones=dones, turn_gamma=0.4), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dones=torch.zeros(2, 4)), r"`dones` has shape \[2, 4\] but `mask` has shape \[2, 3\]"),
        (dict(dones=torch.full((2, 3), 0.5)), r"`dones` must hold only 0 and 1, got 0.5 at flat index 0"),
        (dict(dones=torch.tensor([[0, 0, 0], [0, 0, -1]])), r"`dones` must hold only 0 and 1, got -1 at flat index 5"),
        (dict(dones=torch.zeros(2, 3, dtype=torch.bfloat16)), r"`dones` must be bool, uint8"),
        (dict(turn_gamma=1.5), r"`turn_gamma` must lie in \[0, 1\], got 1.5"),
        (dict(turn_gamma=float("nan")), r"`turn_gamma` must lie in \[0, 1\], got nan"),
    ],
)
def test_returns_turn_ends_bad_input(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        fastrl.credit.discounted_returns(torch.zeros(2, 3), torch.ones(2, 3), 0.9, **kwargs)


# ---------------------------------------------------------------- implicit rewards on CUDA (GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_implicit_rewards_bitwise_equal_cpu(dtype):
    # long rows (whole-row steps of thousands of tokens), short steps, all-masked row, no mask
    for B, T, p_end in ((24, 3000, 0.02), (7, 5000, 0.0), (16, 300, 0.3)):
        logp, ref_logp, m, ends = implicit_batch(B, T, seed=215 + T, dtype=dtype, p_end=p_end)
        lp, cu, keep = pack(logp, m)
        cases = [((logp, ref_logp), dict(mask=m)), ((logp, ref_logp), dict(mask=m, step_ends=ends)),
                 ((logp, ref_logp), dict(step_ends=ends)), ((logp, ref_logp), {}),
                 ((lp, ref_logp[keep]), dict(mask=m[keep], cu_seqlens=cu, step_ends=ends[keep])),
                 ((lp, ref_logp[keep]), dict(cu_seqlens=cu, step_ends=ends[keep]))]
        for args, kw in cases:
            want = fastrl.credit.implicit_rewards(*args, 0.05, **kw)
            dev_kw = {k: t.cuda() for k, t in kw.items()}
            got = fastrl.credit.implicit_rewards(*(a.cuda() for a in args), 0.05, **dev_kw)
            assert got.dtype == want.dtype and torch.equal(got.cpu(), want)
            assert torch.equal(got, fastrl.credit.implicit_rewards(*(a.cuda() for a in args), 0.05, **dev_kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_returns_turn_ends_match_cpu():
    r, _, m, dones = turn_batch(24, 3000, seed=217)
    rp, cu, keep = pack(r, m)
    for mode in MODES:
        for tg in (0.0, 0.6):
            want = fastrl.credit.discounted_returns(r, m, 0.99, mode=mode, dones=dones, turn_gamma=tg)
            got = fastrl.credit.discounted_returns(r.cuda(), m.cuda(), 0.99, mode=mode, dones=dones.cuda(),
                                                   turn_gamma=tg)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
            a = fastrl.credit.discounted_returns(rp.cuda(), m[keep].cuda(), 0.99, mode=mode, cu_seqlens=cu.cuda(),
                                                 dones=dones[keep].cuda(), turn_gamma=tg)
            b = fastrl.credit.discounted_returns(rp, m[keep], 0.99, mode=mode, cu_seqlens=cu, dones=dones[keep],
                                                 turn_gamma=tg)
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
        plain = fastrl.credit.discounted_returns(r.cuda(), m.cuda(), 0.99, mode=mode)
        assert torch.equal(fastrl.credit.discounted_returns(r.cuda(), m.cuda(), 0.99, mode=mode,
                                                            dones=torch.zeros_like(dones).cuda()), plain)


# ------------------------------------------------- fused whitening and masked statistics on CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_reference_runs_on_the_inputs_device():
    """The references (the benchmarks' PyTorch-loop baselines) create no tensor on another device."""
    r, v, m, dones = (t.to("meta") for t in turn_batch(3, 7, seed=401))
    for out in (*ref.gae(r, v, m, 0.9, 0.9, dones=dones, turn_gamma=0.5, mode="reset"),
                ref.discounted_returns(r, m, 0.9, dones=dones, turn_gamma=0.5),
                ref.token_rewards(torch.randn(3, device="meta"), m, kl=r, kl_coef=0.1)):
        assert out.device.type == "meta" and out.shape == r.shape


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_fused_whitening_matches_cpu_and_is_deterministic(packed):
    r, v, m, dones = turn_batch(24, 2500, seed=403)  # rows of several scan tiles
    kws = [dict(mode=mode, dones=dones, turn_gamma=0.5) for mode in GAE_MODES] + [dict()]
    for kw in kws:
        cpu_args = (r, v, m)
        if packed:
            rp, cu, keep = pack(r, m)
            cpu_args = (rp, v[keep], m[keep])
            kw = {**kw, "cu_seqlens": cu, **({"dones": kw["dones"][keep]} if "dones" in kw else {})}
        dev_args = [t.cuda() for t in cpu_args]
        dev_kw = {k: t.cuda() if torch.is_tensor(t) else t for k, t in kw.items()}
        adv, ret = fastrl.credit.gae(*dev_args, 0.99, 0.95, whiten=True, **dev_kw)
        plain_adv, plain_ret = fastrl.credit.gae(*dev_args, 0.99, 0.95, **dev_kw)
        assert torch.equal(ret, plain_ret)  # the returns are not whitened
        again = fastrl.credit.gae(*dev_args, 0.99, 0.95, whiten=True, **dev_kw)[0]
        assert torch.equal(adv, again)  # bitwise run to run
        # the same advantages whitened by the unfused CUDA op: only the statistics' fp64 rounding differs
        torch.testing.assert_close(adv, fastrl.credit.masked_whiten(plain_adv, dev_args[2]), rtol=1e-6, atol=1e-6)
        want = fastrl.credit.gae(*cpu_args, 0.99, 0.95, whiten=True, **kw)[0]
        torch.testing.assert_close(adv.cpu(), want, rtol=1e-5, atol=1e-5)  # CPU: sequential scan (rounding)
    for mode in MODES:
        kw = dict(mode=mode, dones=dones, turn_gamma=0.5)
        cpu_args = (r, m)
        if packed:
            rp, cu, keep = pack(r, m)
            cpu_args, kw = (rp, m[keep]), {**kw, "cu_seqlens": cu, "dones": dones[keep]}
        dev_args = [t.cuda() for t in cpu_args]
        dev_kw = {k: t.cuda() if torch.is_tensor(t) else t for k, t in kw.items()}
        adv, ret = fastrl.credit.discounted_returns(*dev_args, 0.99, whiten=True, **dev_kw)
        plain = fastrl.credit.discounted_returns(*dev_args, 0.99, **dev_kw)
        assert torch.equal(ret, plain)
        assert torch.equal(adv, fastrl.credit.discounted_returns(*dev_args, 0.99, whiten=True, **dev_kw)[0])
        valid = dev_args[1].bool()
        assert torch.equal(adv[~valid], torch.zeros_like(adv[~valid]))
        torch.testing.assert_close(adv, fastrl.credit.masked_whiten(plain, dev_args[1]) * valid, rtol=1e-6,
                                   atol=1e-6)
        want = fastrl.credit.discounted_returns(*cpu_args, 0.99, whiten=True, **kw)[0]
        torch.testing.assert_close(adv.cpu(), want, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.cuda
def test_cuda_fused_whitening_with_more_rows_than_blocks():
    """B > 65536 rows: blocks stride over rows; each row's moments do not depend on its block."""
    B, T = 70001, 3
    gen = torch.Generator().manual_seed(405)
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    m = (torch.rand(B, T, generator=gen) < 0.6).to(torch.int64)
    adv, ret = fastrl.credit.gae(r.cuda(), v.cuda(), m.cuda(), 0.99, 0.95, whiten=True)
    want_adv, want_ret = fastrl.credit.gae(r, v, m, 0.99, 0.95, whiten=True)
    torch.testing.assert_close(adv.cpu(), want_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.cpu(), want_ret, rtol=1e-5, atol=1e-5)
    adv, ret = fastrl.credit.discounted_returns(r.cuda(), m.cuda(), 0.99, whiten=True)
    torch.testing.assert_close(adv.cpu(), fastrl.credit.discounted_returns(r, m, 0.99, whiten=True)[0],
                               rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("n", [1, 4097, 1_500_001])  # one partial chunk; two; > 256 chunks (merge runs)
def test_cuda_masked_statistics_match_cpu(dtype, mask_dtype, n):
    gen = torch.Generator().manual_seed(407 + n)
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 50).to(dtype)
    m = (torch.rand(n, generator=gen) < 0.7).to(mask_dtype)
    m[0] = 1
    if n > 1:
        m[-1] = 1
    x[~m.bool()] = float("nan")  # never reaches the statistics
    xd, md = x.cuda(), m.cuda()
    got, want = torch.ops.fastrl.masked_moments(xd, md), torch.ops.fastrl.masked_moments(x, m)
    assert got[0].item() == want[0].item()  # the count is exact
    for g, w in zip(got[1:], want[1:]):  # the same fp64 sums in another order
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(got, torch.ops.fastrl.masked_moments(xd, md)))
    torch.testing.assert_close(fastrl.credit.masked_mean(xd, md).cpu(), fastrl.credit.masked_mean(x, m))
    for unbiased in ((True, False) if n > 1 else (False,)):
        torch.testing.assert_close(fastrl.credit.masked_var(xd, md, unbiased=unbiased).cpu(),
                                   fastrl.credit.masked_var(x, m, unbiased=unbiased))
        for shift_mean in (True, False):
            kw = dict(shift_mean=shift_mean, unbiased=unbiased)
            out = fastrl.credit.masked_whiten(xd, md, **kw)
            assert out.dtype == dtype and torch.equal(out, fastrl.credit.masked_whiten(xd, md, **kw))
            want = fastrl.credit.masked_whiten(x, m, **kw)
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            if dtype in (torch.float32, torch.float64):
                torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol, equal_nan=True)
            else:  # rounded once from fp64 values equal to ~1e-15: at most one ulp apart
                torch.testing.assert_close(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2, equal_nan=True)


@needs_cuda
@pytest.mark.cuda
def test_cuda_whitening_errors_and_host_syncs():
    x = torch.randn(4, 6, device="cuda")
    one = torch.zeros(4, 6, dtype=torch.int64, device="cuda")
    one[2, 3] = 1
    for mask, n in [(torch.zeros_like(one), 0), (one, 1)]:
        with pytest.raises(ValueError, match=f"at least 2 elements where `mask` is 1, got {n}"):
            fastrl.credit.gae(x, x, mask, 0.9, 0.9, whiten=True)
        with pytest.raises(ValueError, match=f"at least 2 elements where `mask` is 1, got {n}"):
            fastrl.credit.discounted_returns(x, mask, 0.9, whiten=True)
        with pytest.raises(ValueError, match=f"at least 2 elements where `mask` is 1, got {n}"):
            fastrl.credit.masked_whiten(x, mask)
        with pytest.raises(ValueError, match=f"got {n}"):
            fastrl.credit.masked_var(x, mask)
    # biased whitening of an empty mask: 0 mean, 0 variance (verl), x * 1e4
    torch.testing.assert_close(fastrl.credit.masked_whiten(x, torch.zeros_like(one), unbiased=False), x * 1e4)
    torch.testing.assert_close(fastrl.credit.masked_whiten(x.cpu(), one.cpu(), unbiased=False),
                               fastrl.credit.masked_whiten(x, one, unbiased=False).cpu())

    m = torch.ones_like(one)
    calls = {  # host syncs per call: the count check only (verl makes the same one)
        "gae": (lambda: fastrl.credit.gae(x, x, m, 0.9, 0.9), 0),
        "gae whiten": (lambda: fastrl.credit.gae(x, x, m, 0.9, 0.9, whiten=True), 1),
        "returns whiten": (lambda: fastrl.credit.discounted_returns(x, m, 0.9, whiten=True), 1),
        "masked_moments": (lambda: torch.ops.fastrl.masked_moments(x, m), 0),
        "masked_mean": (lambda: fastrl.credit.masked_mean(x, m), 0),
        "masked_whiten": (lambda: fastrl.credit.masked_whiten(x, m), 1),
        "masked_whiten biased": (lambda: fastrl.credit.masked_whiten(x, m, unbiased=False), 0),
    }
    import warnings
    for name, (fn, syncs) in calls.items():
        fn()  # warm up (lazy initializations)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = sum("synchroniz" in str(w.message) for w in caught)
        assert got == syncs, f"{name}: {got} host syncs, expected {syncs}"


@needs_cuda
@pytest.mark.cuda
def test_cuda_opcheck_whitening_ops():
    r, v, m = (t.cuda() for t in multiturn_batch(4, 9, seed=409, mask_dtype=torch.float32))
    m[0, :2] = 1
    ops = torch.ops.fastrl
    torch.library.opcheck(ops.gae.default, (r, v, m, None, 0.9, 0.8, None, "skip", 0.0, 1.0, True))
    torch.library.opcheck(ops.discounted_returns_whiten.default, (r, m, None, 0.9, "skip", None, 0.0))
    torch.library.opcheck(ops.masked_moments.default, (r, m))
    torch.library.opcheck(ops.masked_whiten.default, (r, m, True, True, 1e-8))
    torch.library.opcheck(ops.masked_whiten.default, (r.half(), m.bool(), False, False, 1e-6))


# ------------------------------------------------------------- whitening with given statistics

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_whiten_with_moments_is_masked_whiten_with_those_moments(dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 33, generator=gen) * 2 + 3).to(dtype)
    m = (torch.rand(6, 33, generator=gen) < 0.6).long()
    moments = torch.stack(torch.ops.fastrl.masked_moments(x, m))
    for shift_mean in (True, False):
        for unbiased in (True, False):
            got = torch.ops.fastrl.whiten_with_moments(x, moments, shift_mean, unbiased, 1e-8)
            want = fastrl.credit.masked_whiten(x, m, shift_mean=shift_mean, unbiased=unbiased)
            assert got.dtype == dtype and torch.equal(got, want)
    torch.library.opcheck(torch.ops.fastrl.whiten_with_moments, (x, moments, True, True, 1e-8))


def test_whiten_with_moments_bad_input():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"`moments` must be a float64 tensor of shape \[3\]"):
        torch.ops.fastrl.whiten_with_moments(x, torch.zeros(3), True, True, 1e-8)
    with pytest.raises(RuntimeError, match=r"`moments` must be a float64 tensor of shape \[3\]"):
        torch.ops.fastrl.whiten_with_moments(x, torch.zeros(2, dtype=torch.float64), True, True, 1e-8)
    one = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)  # a single masked element
    with pytest.raises(ValueError, match="at least 2 elements where `mask` is 1, got 1"):
        torch.ops.fastrl.whiten_with_moments(x, one, True, True, 1e-8)
    assert torch.isfinite(torch.ops.fastrl.whiten_with_moments(x, one, True, False, 1e-8)).all()
    with pytest.raises(RuntimeError, match="`eps` must be >= 0"):
        torch.ops.fastrl.whiten_with_moments(x, one, True, False, -1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_whiten_with_moments_is_masked_whiten():
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(64, 300, generator=gen) * 2 + 3).cuda()
    m = (torch.rand(64, 300, generator=gen) < 0.6).cuda()
    moments = torch.stack(torch.ops.fastrl.masked_moments(x, m))
    for shift_mean in (True, False):
        for unbiased in (True, False):
            got = torch.ops.fastrl.whiten_with_moments(x, moments, shift_mean, unbiased, 1e-8)
            assert torch.equal(got, fastrl.credit.masked_whiten(x, m, shift_mean=shift_mean, unbiased=unbiased))
    cpu = torch.ops.fastrl.whiten_with_moments(x.cpu(), moments.cpu(), False, False, 1e-8)  # got's flags
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- broadcast_to_tokens: packed layout


BROADCAST_DTYPES = [(torch.float32, torch.bool), (torch.float32, torch.int64), (torch.bfloat16, torch.float32),
                    (torch.float64, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.uint8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values_dtype, mask_dtype", BROADCAST_DTYPES)
def test_broadcast_packed_equals_padded(device, values_dtype, mask_dtype):
    """Packed [N] + cu_seqlens gives, token for token, the bits of the padded call (and of the trainers'
    `values.unsqueeze(-1) * mask`), empty and all-masked rows included."""
    _, _, m = multiturn_batch(9, 37, seed=301, all_masked_rows=(2,))
    m[4] = False  # -> an empty packed row (pack() keeps each row up to its last valid token)
    values = torch.randn(9, generator=torch.Generator().manual_seed(302)).to(values_dtype).to(device)
    mask = m.to(mask_dtype).to(device)
    padded = fastrl.credit.broadcast_to_tokens(values, mask)
    mp, cu, keep = pack(mask.cpu(), m)
    got = fastrl.credit.broadcast_to_tokens(values, mp.to(device), cu_seqlens=cu.to(device))
    assert (cu[5] - cu[4]).item() == 0 and got.dtype == padded.dtype and got.shape == mp.shape
    assert torch.equal(got, padded[keep.to(device)])
    assert torch.equal(got.cpu(), ref.broadcast_to_tokens(values.cpu(), mp, cu_seqlens=cu))
    assert (got.cpu()[~mp.bool()] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_packed_gradients_equal_padded(device):
    _, _, m = multiturn_batch(7, 23, seed=303, all_masked_rows=(1,), mask_dtype=torch.float32)
    values = torch.randn(7, generator=torch.Generator().manual_seed(304)).to(device)
    grad = torch.randn(7, 23, generator=torch.Generator().manual_seed(305)).to(device)
    mask = m.to(device)
    v1 = values.clone().requires_grad_()
    fastrl.credit.broadcast_to_tokens(v1, mask).backward(grad)
    mp, cu, keep = pack(m, m)
    v2 = values.clone().requires_grad_()
    fastrl.credit.broadcast_to_tokens(v2, mp.to(device), cu_seqlens=cu.to(device)).backward(grad[keep.to(device)])
    assert torch.equal(v1.grad, v2.grad)  # both a segment_reduce sum in fp64, token order
    want = (grad.double() * mask).sum(-1).float()  # d values[b] = sum_t grad[b, t] * mask[b, t]
    torch.testing.assert_close(v1.grad, want, rtol=1e-6, atol=1e-6)
    assert v1.grad[1] == 0  # an all-masked row gets no gradient


def test_broadcast_packed_gradcheck_opcheck_and_compile():
    gen = torch.Generator().manual_seed(306)
    values = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 7, 9])
    mask = (torch.rand(9, generator=gen) < 0.7).double()
    torch.autograd.gradcheck(lambda v: fastrl.credit.broadcast_to_tokens(v, mask, cu_seqlens=cu), (values,))
    torch.autograd.gradgradcheck(lambda v: fastrl.credit.broadcast_to_tokens(v, mask, cu_seqlens=cu), (values,))
    op = torch.ops.fastrl.broadcast_to_tokens.default
    torch.library.opcheck(op, (values.detach(), mask, cu))
    torch.library.opcheck(op, (values.detach().float().requires_grad_(), mask.bool(), cu))
    torch.library.opcheck(op, (values.detach().float().requires_grad_(), mask.view(1, 9).expand(4, 9).contiguous()))
    f = torch.compile(lambda v, m, c: fastrl.credit.broadcast_to_tokens(v, m, cu_seqlens=c) * 2, fullgraph=True,
                      backend="eager")
    assert torch.equal(f(values.detach(), mask, cu), ref.broadcast_to_tokens(values.detach(), mask, cu_seqlens=cu) * 2)


def test_broadcast_packed_reference_backend(monkeypatch):
    values, mask, cu = torch.randn(3), torch.tensor([1, 0, 1, 1, 1, 0]), torch.tensor([0, 2, 2, 6])
    want = fastrl.credit.broadcast_to_tokens(values, mask, cu_seqlens=cu)
    assert torch.equal(want, torch.stack([values[0], values[0] * 0, values[2], values[2], values[2], values[2] * 0]))
    monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    assert torch.equal(fastrl.credit.broadcast_to_tokens(values, mask, cu_seqlens=cu), want)


@pytest.mark.parametrize(
    "values, mask, cu, match",
    [
        (torch.randn(3), torch.ones(6), torch.tensor([0, 4, 3, 6]),
         r"non-decreasing, got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 3"),
        (torch.randn(3), torch.ones(6), torch.tensor([0, 2, 4, 5]),
         r"must end at the number of tokens N = 6 \(`mask` has 6\), got cu_seqlens\[-1\] = 5"),
        (torch.randn(3), torch.ones(6), torch.tensor([1, 2, 4, 6]), r"must start at 0, got cu_seqlens\[0\] = 1"),
        (torch.randn(3), torch.ones(6), torch.tensor([0, 2, 4, 6], dtype=torch.int32), r"`cu_seqlens` must be Long"),
        (torch.randn(3), torch.ones(6), torch.tensor([[0, 2, 4, 6]]), r"`cu_seqlens` must be 1-D"),
        (torch.randn(2), torch.ones(6), torch.tensor([0, 2, 4, 6]), r"`mask` has 3 packed rows but `values` has 2"),
        (torch.randn(3), torch.ones(3, 2), torch.tensor([0, 2, 4, 6]), r"`mask` must be 1-D"),
        (torch.randn(3, 1), torch.ones(6), torch.tensor([0, 2, 4, 6]), r"`values` must be 1-D"),
    ],
)
def test_broadcast_packed_bad_input(values, mask, cu, match):
    with pytest.raises(RuntimeError, match=match):
        fastrl.credit.broadcast_to_tokens(values, mask, cu_seqlens=cu)


# -------------------------------------------------- verl's masked statistics (torch_functional)


def stats_batch(seed, dtype, mask_dtype, B=12, T=40):
    """Values with NaN outside the mask (verl's masked_sum must drop them), an all-masked row."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, generator=gen, dtype=torch.float64) * 2 + 0.7).to(dtype)
    m = multiturn_batch(B, T, seed, all_masked_rows=(3,), mask_dtype=torch.bool)[2]
    m[0, :2] = True  # >= 2 valid tokens: verl's unbiased variance raises below that
    x[~m] = float("nan")
    return x, m.to(mask_dtype)


def stats_tol(dtype):
    # verl sums in the values' dtype (bf16: every partial sum rounded), fastrl in fp64
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 5e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
def test_verl_masked_statistics_dropins_match_verl(dtype, mask_dtype):
    x, m = stats_batch(307, dtype, mask_dtype)
    tol = stats_tol(dtype)

    def same(got, want):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)

    for axis in (None, -1, 0, (0, 1)):
        same(fverl.masked_sum(x, m, axis), verl_F.masked_sum(x, m, axis))
        same(fverl.masked_mean(x, m, axis=axis), verl_F.masked_mean(x, m, axis=axis))
    for unbiased in (True, False):
        same(fverl.masked_var(x, m, unbiased=unbiased), verl_F.masked_var(x, m, unbiased=unbiased))
    for shift_mean in (True, False):
        same(fverl.masked_whiten(x, m, shift_mean=shift_mean), verl_F.masked_whiten(x, m, shift_mean=shift_mean))
    assert fverl.masked_mean(x, m, axis=-1)[3] == 0  # the all-masked row: 0 / (0 + 1e-8)


def test_verl_masked_statistics_use_the_compiled_moments(monkeypatch):
    x, m = stats_batch(308, torch.float32, torch.bool)
    calls = []
    moments = fverl._credit._moments
    monkeypatch.setattr(fverl._credit, "_moments", lambda *a: calls.append(1) or moments(*a))
    fverl.masked_sum(x, m), fverl.masked_mean(x, m), fverl.masked_var(x, m), fverl.masked_whiten(x, m)
    assert len(calls) == 4
    fverl.masked_mean(x, m, axis=-1)  # an axis: torch's ops
    assert len(calls) == 4


def test_verl_masked_statistics_keep_verls_denominator():
    """verl divides by mask.sum() + 1e-8: with a float64 mask that is visible (1e-8 / n relative), and the
    drop-ins reproduce it; fastrl.credit's own statistics use n."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    m = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    for got, want in [(fverl.masked_mean(x, m), verl_F.masked_mean(x, m)),
                      (fverl.masked_var(x, m), verl_F.masked_var(x, m)),
                      (fverl.masked_var(x, m, unbiased=False), verl_F.masked_var(x, m, unbiased=False)),
                      (fverl.masked_whiten(x, m), verl_F.masked_whiten(x, m))]:
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)  # the 1e-8 would show at 3e-9
    assert fastrl.credit.masked_mean(x, m) == 7 / 3 != verl_F.masked_mean(x, m)


def test_verl_masked_statistics_errors_and_empty_masks_match_verl():
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]])
    none, one = torch.zeros(2, 3, dtype=torch.int64), torch.tensor([[0, 1, 0], [0, 0, 0]])
    for mask, message in [(none, "At least one element in the mask has to be 1."),
                          (one, "The sum of the mask is one, which can cause a division by zero.")]:
        for fn in (fverl.masked_var, fverl.masked_whiten, verl_F.masked_var, verl_F.masked_whiten):
            with pytest.raises(ValueError, match=re.escape(message)):
                fn(x, mask)
        with pytest.raises(ValueError, match=re.escape(message)):  # torch's path (a half mask) too
            fverl.masked_var(x, mask.half())
    assert fverl.masked_mean(x, none) == verl_F.masked_mean(x, none) == 0
    assert fverl.masked_sum(x, none) == 0
    assert fverl.masked_var(x, none, unbiased=False) == verl_F.masked_var(x, none, unbiased=False) == 0
    torch.testing.assert_close(fverl.masked_var(x, one, unbiased=False), verl_F.masked_var(x, one, unbiased=False))


def test_verl_masked_statistics_other_arguments_take_torchs_path():
    """A broadcast mask, integer values or a half mask: what the compiled op does not take goes through
    torch's ops, with verl's results and dtypes. A weighted float mask is not a 0/1 mask: the CPU op raises."""
    gen = torch.Generator().manual_seed(309)
    x = torch.randn(6, 10, generator=gen)
    weights = torch.rand(6, 10, generator=gen)
    row_mask = torch.tensor([[1], [0], [1], [1], [0], [1]])
    ints = torch.randint(-5, 5, (6, 10), generator=gen)
    half = (weights > 0.3).half()
    cases = [(x, row_mask), (ints, weights > 0.5), (x, half), (x, half.view(60)[:10])]
    with pytest.raises(RuntimeError, match=r"`mask` must hold only 0 and 1"):
        fverl.masked_mean(x, weights)
    for values, mask in cases:
        for got, want in [(fverl.masked_sum(values, mask), verl_F.masked_sum(values, mask)),
                          (fverl.masked_mean(values, mask), verl_F.masked_mean(values, mask)),
                          (fverl.masked_var(values.float(), mask), verl_F.masked_var(values.float(), mask)),
                          (fverl.masked_whiten(values.float(), mask, shift_mean=False),
                           verl_F.masked_whiten(values.float(), mask, shift_mean=False))]:
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_verl_masked_statistics_signatures_match_verl():
    import inspect

    for name in ("masked_sum", "masked_mean", "masked_var", "masked_whiten"):
        ours = inspect.signature(getattr(fverl, name)).parameters
        theirs = inspect.signature(getattr(verl_F, name)).parameters
        assert list(ours) == list(theirs), name
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()], name
        assert name in fverl.__all__


def test_dropin_docstring_examples_run():
    import doctest

    for fn in (fastrl.credit.broadcast_to_tokens, fverl.masked_sum, fverl.masked_mean, fverl.masked_var,
               fverl.masked_whiten):
        finder = doctest.DocTestFinder().find(fn, globs={"torch": torch, "fastrl": fastrl, **vars(fverl)})
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for t in finder:
            runner.run(t)
        assert runner.failures == 0 and runner.tries > 0, fn.__name__


# ------------------------------------------------------------------------ NaN / Inf and ranges


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_returns_nonfinite_rewards(mode, bad):
    """Documented: a NaN/Inf reward at a step position reaches every earlier output of its row that
    holds the carry (across masked spans, resets and turn ends); rewards at masked tokens are never read."""
    r, _, m, dones = turn_batch(4, 30, seed=311, mask_dtype=torch.bool)
    m[:] = True
    m[0, 12:15] = False  # an observation span before the bad reward
    m[1, 5:7] = False
    r[0, 20] = bad
    r[2, 25] = bad
    r[1, 6] = float("nan")  # masked: never read
    r[3, 9] = -float("inf")  # masked below
    m[3, 9] = False
    gamma = 0.9
    for kw in (dict(), dict(dones=dones, turn_gamma=0.5)):
        got = fastrl.credit.discounted_returns(r, m, gamma, mode=mode, **kw)
        torch.testing.assert_close(got, ref.discounted_returns(r, m, gamma, mode=mode, **kw), equal_nan=True)
        carry_at = m.clone() if mode != "cumsum" else torch.ones_like(m)  # positions that output the carry
        for b, t in [(0, 20), (2, 25)]:
            assert not torch.isfinite(got[b, :t + 1][carry_at[b, :t + 1]]).any(), (mode, b)
            assert (got[b, :t + 1][~carry_at[b, :t + 1]] == 0).all()  # skip/reset: masked tokens output 0
            assert torch.isfinite(got[b, t + 1:]).all()
        if bad == float("inf") and mode == "skip" and not kw:  # an Inf stays +Inf through a skipped span
            assert (got[0, :21][m[0, :21]] == float("inf")).all()
        if mode == "reset":  # the reset is 0 + 0 * carry: NaN below the span, for an Inf too
            assert got[0, :12].isnan().all()
        clean = r.clone()
        clean[1, 6] = clean[3, 9] = 0.0
        want = fastrl.credit.discounted_returns(clean, m, gamma, mode=mode, **kw)
        assert torch.equal(got[[1, 3]], want[[1, 3]]) and torch.isfinite(got[[1, 3]]).all()
    if mode == "skip" and bad != bad:  # verl's REINFORCE++: the same at valid tokens (its masked tokens: NaN * 0)
        clean = r.clone()
        clean[1, 6] = clean[3, 9] = 0.0  # verl multiplies masked rewards in (NaN * 0): not comparable there
        want = verl_core.compute_reinforce_plus_plus_outcome_advantage(clean, m.long(),
                                                                        config=types.SimpleNamespace(gamma=gamma))[1]
        got = fastrl.credit.discounted_returns(r, m, gamma)
        assert torch.equal(got[m].isnan(), want[m].isnan())
        torch.testing.assert_close(got[m], want[m], equal_nan=True)


def test_returns_gamma_out_of_range_raises():
    r, m = torch.zeros(2, 3), torch.ones(2, 3)
    for gamma in (1.5, -0.1, float("nan"), float("inf")):
        for kw in (dict(), dict(whiten=True), dict(mode="cumsum")):
            with pytest.raises(RuntimeError, match=rf"`gamma` must lie in \[0, 1\], got {gamma}"):
                fastrl.credit.discounted_returns(r, m, gamma, **kw)
        with pytest.raises(RuntimeError, match=r"`gamma` must lie in \[0, 1\]"):
            fastrl.credit.discounted_returns(r.flatten(), m.flatten(), gamma, cu_seqlens=torch.tensor([0, 3, 6]))
    for gamma in (0.0, 1.0):  # the ends of the range are fine
        fastrl.credit.discounted_returns(r, m, gamma)


def test_gae_reset_nonfinite_crosses_the_reset_like_the_cuda_scan():
    """mode="reset": the reset step is (0, 0) on both devices, 0 + 0 * carry, so a NaN after a masked span
    still reaches the positions before it (as the docstring says: the positions before it in the row)."""
    r, v = torch.randn(2, 10), torch.randn(2, 10)
    m = torch.ones(2, 10, dtype=torch.bool)
    m[:, 4:6] = False
    r[0, 8] = float("nan")
    adv, ret = fastrl.credit.gae(r, v, m, 0.9, 0.8, mode="reset")
    assert adv[0, :9].isnan().all() and torch.isfinite(adv[0, 9:]).all() and torch.isfinite(adv[1]).all()
    want = ref.gae(r, v, m, 0.9, 0.8, mode="reset")
    torch.testing.assert_close(adv, want[0], equal_nan=True)
    torch.testing.assert_close(ret, want[1], equal_nan=True)
    r[0, 8] = 0.0  # finite inputs: the reset gives +0 carries (unchanged bits)
    adv = fastrl.credit.gae(r, v, m, 0.9, 0.8, mode="reset")[0]
    assert (adv[:, 4:6] == 0).all() and not torch.signbit(adv[:, 4:6]).any()


@pytest.mark.parametrize("packed", [False, True])
def test_token_rewards_nonfinite(packed):
    """Documented: a NaN/Inf score or kl stays at its own token (never spreads); masked tokens are never read."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = torch.tensor([float("nan"), float("inf"), 2.0, float("nan")])
    kl = torch.full((4, 4), 0.5)
    kl[2, 1] = float("nan")
    kl[2, 3] = -float("inf")
    kl[0, 3] = kl[1, 2] = float("nan")  # masked
    kw = dict(kl=kl, kl_coef=0.1)
    if packed:
        mp, cu, keep = pack(mask, torch.ones(4, 4, dtype=torch.bool))  # every position kept, masked ones too
        got = fastrl.credit.token_rewards(scores, mp, kl=kl[keep], kl_coef=0.1, cu_seqlens=cu).view(4, 4)
    else:
        got = fastrl.credit.token_rewards(scores, mask, **kw)
    torch.testing.assert_close(got, ref.token_rewards(scores, mask, **kw), equal_nan=True)
    nan = torch.zeros(4, 4, dtype=torch.bool)
    nan[0, 2] = nan[2, 1] = True
    assert torch.equal(got.isnan(), nan)
    assert got[1, 1] == float("inf") and got[2, 3] == float("inf")  # +inf score; 0 - 0.1 * -inf
    assert (got[mask == 0] == 0).all() and (got[3] == 0).all()  # the all-masked row drops its NaN score
    clipped = fastrl.credit.token_rewards(scores, mask, clip=1.0)
    assert clipped[1, 1] == 1.0 and clipped[0, 2].isnan()  # clip clamps an Inf, keeps a NaN (torch.clamp)
    zero_coef = fastrl.credit.token_rewards(scores, mask, kl=kl, kl_coef=0.0)
    assert zero_coef[2, 1].isnan() and zero_coef[2, 3].isnan()  # 0 * NaN and 0 * Inf are NaN (OpenRLHF too)


@pytest.mark.parametrize("with_ends", [False, True])
def test_implicit_rewards_nonfinite(with_ends):
    """Documented: a NaN/Inf log-prob makes its own token's reward (or its step's sum) NaN/Inf, nothing else;
    masked tokens are never read."""
    logp, ref_logp, _, _ = implicit_batch(3, 12, seed=313)
    m = torch.ones(3, 12, dtype=torch.bool)
    m[:, 9:] = False
    ends = torch.zeros(3, 12, dtype=torch.bool)
    ends[:, 3] = ends[:, 7] = True  # steps [0, 3], [4, 7], [8, 8] (+ masked tail)
    logp[0, 5] = float("nan")
    logp[1, 1] = float("inf")
    ref_logp[1, 1] = float("inf")  # inf - inf
    logp[2, 6] = float("inf")
    logp[0, 10] = ref_logp[2, 11] = float("nan")  # masked
    kw = dict(mask=m, step_ends=ends if with_ends else None)
    got = fastrl.credit.implicit_rewards(logp, ref_logp, 0.1, **kw)
    torch.testing.assert_close(got, ref.implicit_rewards(logp, ref_logp, 0.1, **kw), equal_nan=True)
    at = {(0, 7), (1, 3), (2, 7)} if with_ends else {(0, 5), (1, 1), (2, 6)}  # the step's last token, or the token
    nonfinite = {tuple(i) for i in (~torch.isfinite(got)).nonzero().tolist()}
    assert nonfinite == at
    first, second, third = ((0, 7), (1, 3), (2, 7)) if with_ends else ((0, 5), (1, 1), (2, 6))
    assert got[first].isnan() and got[second].isnan() and got[third] == float("inf")  # inf - inf: NaN
    assert (got[:, 9:] == 0).all()
