"""fastrl.losses.policy_loss: compiled kernels vs the fp64 reference (loss, metrics, gradients),
layouts, edge cases, bad input, opcheck, gradcheck, determinism, host syncs, DP normalization."""
import itertools

import pytest
import torch

from _dist import run_ranks
from _isa import ISAS, assert_same_bits, run_capped
from fastrl import losses
from fastrl.reference import losses as ref

KINDS = ["vanilla", "gpg", "cispo", "gspo", "sapo", "geo_mean"]
AGGS = list(losses.AGGS)


def make_inputs(B, T, *, seed, dtype=torch.float64, empty_rows=(), per_row_adv=False, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread  # ratios well outside the clip range
    refl = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7
    adv = torch.randn(B, generator=g, dtype=torch.float64) if per_row_adv else torch.randn(
        B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    for b in empty_rows:
        mask[b] = 0
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(logp=cast(logp), old_logp=cast(old), advantages=cast(adv), mask=mask, ref_logp=cast(refl),
                entropy=cast(ent), is_weights=cast(isw))


def run(fn, inp, **kw):
    """(loss, metrics, grad_logp, grad_entropy) of fn on leaf copies of the inputs."""
    lp = inp["logp"].clone().requires_grad_(True)
    ent = inp["entropy"].clone().requires_grad_(True) if kw.get("entropy", True) is not None else None
    args = {k: v for k, v in inp.items() if k not in ("logp", "old_logp", "advantages", "mask", "entropy")}
    for k in ("ref_logp", "is_weights"):
        if kw.get(k, True) is None:
            args.pop(k)
    kw = {k: v for k, v in kw.items() if k not in ("ref_logp", "is_weights", "entropy")}
    loss, metrics = fn(lp, inp["old_logp"], inp["advantages"], inp["mask"], entropy=ent, **args, **kw)
    loss.backward()
    return loss.detach(), metrics, lp.grad, None if ent is None else ent.grad


def assert_matches(inp, rtol=1e-10, atol=1e-12, **kw):
    got = run(losses.policy_loss, inp, **kw)
    want = run(ref.policy_loss, inp, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[2], want[2], rtol=rtol, atol=atol)
    if got[3] is not None:
        torch.testing.assert_close(got[3], want[3], rtol=rtol, atol=atol)
    assert set(got[1]) == set(want[1])
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-5, atol=1e-6, msg=k)
    return got


# ------------------------------------------------------------------------------ kinds x aggs (fp64)

@pytest.mark.parametrize("kind,agg", list(itertools.product(KINDS, AGGS)))
def test_kind_agg_matches_reference(kind, agg):
    inp = make_inputs(6, 23, seed=hash((kind, agg)) % 1000, empty_rows=(2,))
    assert_matches(inp, kind=kind, agg=agg, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0 if kind == "vanilla" else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kl_kind", ["k1", "abs", "k2", "k3", "k3_unclamped"])
def test_kl_kinds(kind, kl_kind):
    inp = make_inputs(4, 31, seed=7, spread=1.5)
    inp["ref_logp"] = inp["logp"] + torch.randn_like(inp["logp"]) * 15  # reaches the k3 clamps
    assert_matches(inp, kind=kind, kl_coef=0.3, kl_kind=kl_kind, is_weights=None)


@pytest.mark.parametrize("kind", ["vanilla", "cispo", "sapo"])
@pytest.mark.parametrize("clamp", [None, 20.0, 0.3])
def test_sequence_level_ratio_trl(kind, clamp):
    inp = make_inputs(5, 19, seed=11, empty_rows=(4,))
    assert_matches(inp, kind=kind, ratio_level="sequence", log_ratio_clamp=clamp, agg="grpo")


@pytest.mark.parametrize("delta", [None, 1.5])
@pytest.mark.parametrize("clamp", [None, 0.2])
def test_vanilla_delta_and_log_clamp(delta, clamp):
    inp = make_inputs(5, 40, seed=3, spread=1.0)
    assert_matches(inp, kind="vanilla", delta=delta, log_ratio_clamp=clamp, dual_clip=2.0, clip_low=0.1,
                   clip_high=0.28)


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_advantages_equal_broadcast(kind):
    inp = make_inputs(5, 17, seed=5, per_row_adv=True)
    got = run(losses.policy_loss, inp, kind=kind, kl_coef=0.1)
    wide = dict(inp, advantages=inp["advantages"][:, None].expand(5, 17).contiguous())
    want = run(losses.policy_loss, wide, kind=kind, kl_coef=0.1)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    assert_matches(inp, kind=kind, kl_coef=0.1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "grpo"])
def test_packed_equals_padded(kind, agg):
    inp = make_inputs(4, 12, seed=9, empty_rows=(1,))
    m = inp["mask"].bool()
    # the packed rows are the valid tokens of each row (an empty row stays an empty row)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), m.sum(-1).cumsum(0)])
    packed = {k: (v[m] if v.shape == m.shape else v) for k, v in inp.items()}
    packed["mask"] = torch.ones(int(m.sum()), dtype=torch.bool)
    got = run(losses.policy_loss, packed, kind=kind, agg=agg, cu_seqlens=cu, kl_coef=0.1, entropy_coef=0.1)
    want = run(losses.policy_loss, inp, kind=kind, agg=agg, kl_coef=0.1, entropy_coef=0.1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[2], want[2][m], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[3], want[3][m], rtol=1e-12, atol=1e-14)
    assert_matches(packed, kind=kind, agg=agg, cu_seqlens=cu, kl_coef=0.1, entropy_coef=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["vanilla", "gspo", "geo_mean"])
def test_low_precision_inputs(dtype, kind):
    inp = make_inputs(4, 50, seed=13, dtype=dtype)
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    got = run(losses.policy_loss, inp, kind=kind, kl_coef=0.1, entropy_coef=0.01)
    want = run(ref.policy_loss, exact, kind=kind, kl_coef=0.1, entropy_coef=0.01)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[2].double(), want[2], rtol=tol, atol=tol)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32,
                                        torch.float64])
def test_mask_dtypes(mask_dtype):
    inp = make_inputs(3, 9, seed=17)
    want = run(losses.policy_loss, inp, kl_coef=0.1)
    got = run(losses.policy_loss, dict(inp, mask=inp["mask"].to(mask_dtype)), kl_coef=0.1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


# ------------------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("agg", AGGS)
def test_no_valid_token_gives_zero_loss_and_gradient(kind, agg):
    inp = make_inputs(3, 8, seed=19, empty_rows=(0, 1, 2))
    loss, metrics, g, ge = run(losses.policy_loss, inp, kind=kind, agg=agg, kl_coef=0.1, entropy_coef=0.1)
    assert loss.item() == 0.0 and torch.all(g == 0) and torch.all(ge == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_zero_rows_and_zero_length():
    for B, T in ((0, 5), (3, 0)):
        inp = make_inputs(B, T, seed=1)
        loss, metrics, g, _ = run(losses.policy_loss, inp)
        assert loss.item() == 0.0 and g.shape == (B, T)


def test_nan_in_masked_tokens_is_ignored_and_valid_nan_stays_in_its_row():
    inp = make_inputs(3, 10, seed=23)
    inp["mask"][:, -1] = 0
    inp["logp"][:, -1] = float("nan")
    inp["advantages"][:, -1] = float("inf")
    loss, _, g, _ = run(losses.policy_loss, inp, kl_coef=0.1)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    inp["mask"][0, -1] = 1
    loss, _, g, _ = run(losses.policy_loss, inp, agg="seq-mean-token-mean")
    assert torch.isnan(loss) and torch.isfinite(g[1:]).all()


def test_metrics_are_device_tensors_with_expected_values():
    inp = make_inputs(4, 30, seed=29)
    _, m, _, _ = run(losses.policy_loss, inp, kind="vanilla", dual_clip=3.0, kl_coef=0.1)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())
    valid = inp["mask"].bool()
    r = torch.exp(torch.clamp(inp["logp"] - inp["old_logp"], -20, 20))[valid]
    torch.testing.assert_close(m["ratio_min"].double(), r.min(), rtol=1e-6, atol=0)
    torch.testing.assert_close(m["ratio_max"].double(), r.max(), rtol=1e-6, atol=0)
    assert 0 < m["clipfrac"] < 1 and m["num_tokens"] == valid.sum()


# ------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,match", [
    (dict(kind="ppo"), "`kind` must be one of 'vanilla', 'gpg', 'reinforce', 'cispo', 'gspo', 'sapo', 'geo_mean', "
                       "'clip_cov', 'kl_cov'; got 'ppo'"),
    (dict(agg="mean"), "`agg` must be one of token-mean"),
    (dict(kl_kind="k4", kl_coef=0.1), "`kl_kind` must be one of 'k1'"),
    (dict(ratio_level="seq"), "`ratio_level` must be 'token' or 'sequence'"),
    (dict(clip_low=0.0), r"`clip_low` must lie in \(0, 1\]"),
    (dict(clip_low=1.5), r"`clip_low` must lie in \(0, 1\]"),
    (dict(clip_high=-0.1), "`clip_high` must be > 0"),
    (dict(dual_clip=1.0), "`dual_clip` must be > 1"),
    (dict(delta=0.5), "`delta` must be > 1"),
    (dict(tau_neg=0.0), "`tau_pos` and `tau_neg` must be > 0"),
    (dict(log_ratio_clamp=-1.0), "`log_ratio_clamp` must be > 0"),
])
def test_bad_parameters(kw, match):
    inp = make_inputs(2, 5, seed=31)
    with pytest.raises(ValueError, match=match):
        losses.policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], ref_logp=inp["ref_logp"],
                           **kw)


def test_unknown_kind_message_lists_every_kind():
    """Both the public function and the op name every kind policy_loss accepts (and each of them runs)."""
    inp = make_inputs(2, 5, seed=31)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
    listing = ", ".join(repr(k) for k in losses.KINDS)
    assert set(losses.KINDS) == set(KINDS) | {"reinforce", "clip_cov", "kl_cov"}
    with pytest.raises(ValueError) as py_err:
        losses.policy_loss(*args, kind="ppo")
    with pytest.raises(ValueError) as op_err:
        torch.ops.fastrl.policy_loss_rows(*_op_args(inp, {8: "ppo"}))
    for err in (py_err, op_err):
        assert f"must be one of {listing}; got 'ppo'" in str(err.value)
    for kind in losses.KINDS:
        assert torch.isfinite(losses.policy_loss(*args, kind=kind, cov_ratio=0.5)[0])
    with pytest.raises(ValueError, match="kind 'clip_cov' is computed by fastrl.losses.policy_loss"):
        torch.ops.fastrl.policy_loss_rows(*_op_args(inp, {8: "clip_cov"}))
    # the op takes 'reinforce' as the alias of 'gpg' it is in the Python API
    gpg, reinforce = (torch.ops.fastrl.policy_loss_rows(*_op_args(inp, {8: k}))[0] for k in ("gpg", "reinforce"))
    assert torch.equal(gpg, reinforce)


# CISPO clamps a stop-gradient weight: any range [1 - clip_low, 1 + clip_high] with a positive cap
# (TRL: [0, epsilon_high], epsilon_high = 0.2 by default; verl: clip_ratio_low >= 1 for no lower clip).
CISPO_RANGES = [(1.0, -0.8), (1.0, -0.72), (1.0, 0.0), (1.0, 3.0), (10.0, 0.28), (0.0, 0.5), (0.5, -0.3)]


@pytest.mark.parametrize("clip_low,clip_high", CISPO_RANGES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_any_clip_range_with_positive_cap(clip_low, clip_high, level):
    inp = make_inputs(5, 37, seed=113, empty_rows=(3,), spread=1.0)
    kw = dict(kind="cispo", clip_low=clip_low, clip_high=clip_high, ratio_level=level, kl_coef=0.1,
              entropy_coef=0.02, agg="seq-mean-token-mean")
    got = assert_matches(inp, **kw)
    r = torch.exp(torch.clamp(inp["logp"] - inp["old_logp"], -20, 20))[inp["mask"].bool()]
    if level == "token":  # the cap acts: clipped tokens counted, the metric TRL logs as cispo_clip_ratio
        lo, hi = 1 - clip_low, 1 + clip_high
        assert float(got[1]["clipfrac"]) == pytest.approx(float(((r < lo) | (r > hi)).double().mean()), rel=1e-6)
        assert float(got[1]["clipfrac"]) > 0
    # the fp32 lane pass of the CPU kernel (token level) and the fp32 row path (sequence level)
    low = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}
    f32, want = run(losses.policy_loss, low, **kw), run(ref.policy_loss, exact, **kw)
    for a, b in ((f32[0], want[0]), (f32[2], want[2]), (f32[3], want[3])):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(clip_high=-1.0), r"kind='cispo' needs a finite `clip_high` with 1 \+ clip_high > 0 .* got -1"),
    (dict(clip_high=float("inf")), r"kind='cispo' needs a finite `clip_high`"),
    (dict(clip_low=0.5, clip_high=-0.6), r"kind='cispo' needs a finite `clip_low` with 1 - clip_low <= 1 \+ "
                                         r"clip_high .* got clip_low=0.5 and clip_high=-0.6"),
    (dict(clip_low=float("nan")), r"kind='cispo' needs a finite `clip_low`"),
])
def test_cispo_bad_clip_range(kw, match):
    inp = make_inputs(2, 5, seed=31)
    with pytest.raises(ValueError, match=match):
        losses.policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], kind="cispo", **kw)
    if "clip_high" in kw and kw["clip_high"] < 0:  # the other kinds keep their (0, 1] / > 0 ranges
        with pytest.raises(ValueError, match="`clip_high` must be > 0"):
            losses.policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], **kw)


def test_bad_shapes_and_values():
    inp = make_inputs(2, 5, seed=37)
    lp, old, adv, mask = inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"]
    with pytest.raises(RuntimeError, match=r"`old_logp` has shape \[2, 4\] but `logp` has shape \[2, 5\]"):
        losses.policy_loss(lp, old[:, :4], adv, mask)
    with pytest.raises(RuntimeError, match=r"`advantages` must have `logp`'s shape \[2, 5\] .* or \[2\]"):
        losses.policy_loss(lp, old, adv[:, :3], mask)
    with pytest.raises(RuntimeError, match=r"`entropy` has shape \[5\]"):
        losses.policy_loss(lp, old, adv, mask, entropy=lp[0])
    with pytest.raises(RuntimeError, match="`mask` must be bool, uint8"):
        losses.policy_loss(lp, old, adv, mask.to(torch.int16))
    with pytest.raises(ValueError, match=r"`mask` must hold only 0 and 1, got 2(\.0)? at flat index 3"):
        losses.policy_loss(lp, old, adv, mask.index_put((torch.tensor(0), torch.tensor(3)), torch.tensor(2)))
    with pytest.raises(RuntimeError, match="`logp` must be a floating tensor"):
        losses.policy_loss(mask, old, adv, mask)
    cu = torch.tensor([0, 3, 2, 10])
    with pytest.raises(RuntimeError, match=r"`cu_seqlens` must be non-decreasing, got cu_seqlens\[1\] = 3 > "
                                           r"cu_seqlens\[2\] = 2"):
        losses.policy_loss(lp.flatten(), old.flatten(), adv.flatten(), mask.flatten(), cu_seqlens=cu)
    with pytest.raises(ValueError, match="needs `max_length`"):
        losses.policy_loss(lp.flatten(), old.flatten(), adv.flatten(), mask.flatten(),
                           cu_seqlens=torch.tensor([0, 4, 10]), agg="dr_grpo")


# ---------------------------------------------------------------------- opcheck, gradcheck, meta

def _op_args(inp, over):
    args = [inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], inp["ref_logp"], inp["entropy"],
            inp["is_weights"], None, "vanilla", "token", 0.2, 0.28, 3.0, 20.0, None, 1.0, 1.05, 0.1, "k3", 0.01,
            "seq-mean-token-mean", 7.0, 2.0, None, None, None]
    for i, v in over.items():
        args[i] = v
    return args


@pytest.mark.parametrize("kind,level,agg", [("vanilla", "token", "seq-mean-token-mean"), ("gspo", "token", "grpo"),
                                            ("geo_mean", "token", "token-mean"), ("sapo", "sequence", "dr_grpo")])
def test_opcheck(kind, level, agg):
    inp = make_inputs(3, 7, seed=41, dtype=torch.float32)
    inp["logp"].requires_grad_(True)
    inp["entropy"].requires_grad_(True)
    over = {8: kind, 9: level, 20: agg}
    torch.library.opcheck(torch.ops.fastrl.policy_loss_rows.default, _op_args(inp, over))
    counts = torch.tensor([30.0, float("nan"), 5.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastrl.policy_loss_rows.default, _op_args(inp, {**over, 24: 4.0, 25: counts}))
    plain = {k: v.detach() for k, v in inp.items()}
    _, _, rows, dlogp, dlogp_aux = torch.ops.fastrl.policy_loss_rows(*_op_args(plain, over))
    grad = torch.tensor(0.7)
    for entropy_dtype in (torch.float32, torch.float64, None):
        torch.library.opcheck(torch.ops.fastrl.policy_loss_rows_backward.default,
                              [grad, rows, dlogp, dlogp_aux, plain["mask"], None, 2.0, 0.01, torch.bfloat16,
                               entropy_dtype])


# cispo (sg of the clipped ratio) and verl's gspo (sg of the sequence ratio) differentiate a
# stop-gradient form on purpose: their gradients are not the finite differences of their values
# (test_kind_agg_matches_reference checks them against autograd through the trainers' expressions).
@pytest.mark.parametrize("kind", ["vanilla", "gpg", "sapo", "geo_mean"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck(kind, level):
    inp = make_inputs(3, 6, seed=43, empty_rows=(1,))
    lp = inp["logp"].clone().requires_grad_(True)
    ent = inp["entropy"].clone().requires_grad_(True)

    def f(lp, ent):
        return losses.policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"], kind=kind, ratio_level=level,
                                  ref_logp=inp["ref_logp"], kl_coef=0.2, entropy=ent, entropy_coef=0.05,
                                  is_weights=inp["is_weights"], agg="seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(f, (lp, ent))


def test_meta_device_runs_without_host_sync():
    """Every step of forward and backward runs on meta tensors (fake kernels): a host sync (.item(),
    .tolist(), a data-dependent branch) would raise there."""
    inp = make_inputs(4, 16, seed=47, dtype=torch.float32)
    meta = {k: v.to("meta") for k, v in inp.items()}
    for kind in KINDS:
        lp = meta["logp"].clone().requires_grad_(True)
        ent = meta["entropy"].clone().requires_grad_(True)
        loss, metrics = losses.policy_loss(lp, meta["old_logp"], meta["advantages"], meta["mask"], kind=kind,
                                           ref_logp=meta["ref_logp"], kl_coef=0.1, entropy=ent, entropy_coef=0.01,
                                           is_weights=meta["is_weights"], agg="seq-mean-token-mean")
        loss.backward()
        assert loss.device.type == "meta" and lp.grad.shape == lp.shape and ent.grad.shape == ent.shape
        assert all(v.device.type == "meta" for v in metrics.values())
    packed, cu = _packed(inp)
    for layout, cu_seqlens in ((meta, None), ({k: v.to("meta") for k, v in packed.items()}, cu.to("meta"))):
        for kind in ("clip_cov", "kl_cov"):  # the token selection: static shapes, no host sync
            lp = layout["logp"].clone().requires_grad_(True)
            loss, metrics = losses.policy_loss(lp, layout["old_logp"], layout["advantages"], layout["mask"], kind=kind,
                                               cov_ratio=0.1, is_weights=layout["is_weights"], cu_seqlens=cu_seqlens)
            loss.backward()
            assert loss.device.type == "meta" and lp.grad.shape == lp.shape


def test_no_item_calls_on_cpu(monkeypatch):
    inp = make_inputs(4, 16, seed=53, dtype=torch.float32)
    packed, cu = _packed(inp)

    def boom(*a, **k):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    monkeypatch.setattr(torch.Tensor, "__int__", boom)
    monkeypatch.setattr(torch.Tensor, "__float__", boom)
    run(losses.policy_loss, inp, kl_coef=0.1, entropy_coef=0.1, agg="seq-mean-token-sum")
    run(losses.policy_loss, inp, kind="clip_cov", cov_ratio=0.1, kl_coef=0.1)
    run(losses.policy_loss, inp, kind="kl_cov", cov_ratio=0.1, ref_logp=None, is_weights=None)
    run(losses.policy_loss, inp, kind="kl_cov", cov_ratio=0.1, ref_logp=None)  # weighted penalty: a second pass
    run(losses.policy_loss, packed, kind="clip_cov", cov_ratio=0.1, cu_seqlens=cu)
    run(losses.policy_loss, packed, kind="kl_cov", cov_ratio=0.1, ref_logp=None, cu_seqlens=cu)


def test_cov_kinds_bad_input():
    inp = make_inputs(2, 5, seed=71)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
    with pytest.raises(ValueError, match="`cov_ratio` must be > 0"):
        losses.policy_loss(*args, kind="kl_cov", cov_ratio=0.0)
    with pytest.raises(ValueError, match="kind='kl_cov' uses the KL term"):
        losses.policy_loss(*args, kind="kl_cov", ref_logp=inp["ref_logp"], kl_coef=0.1)
    flat = [a.flatten() for a in args]
    cu = torch.tensor([0, 4, 10])
    for kind in ("clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match=r"`logp` must be 1-D \[N\] \(packed, with `cu_seqlens`\), got shape "
                                             r"\(2, 5\)"):
            losses.policy_loss(*args, kind=kind, cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"`advantages` must have `logp`'s shape \(10,\) \(per token\) or "
                                             r"\[2\] \(per sequence\), got \(3,\)"):
            losses.policy_loss(*flat[:2], flat[2][:3], flat[3], kind=kind, cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"`mask` must have `logp`'s shape \(10,\), got \(9,\)"):
            losses.policy_loss(*flat[:3], flat[3][:9], kind=kind, cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"`cu_seqlens` must be int64 \[B \+ 1\] row offsets, got torch.int32"):
            losses.policy_loss(*flat, kind=kind, cu_seqlens=cu.int())
        for bad, why in ((torch.tensor([0, 3, 2, 10]), "be non-decreasing"),  # the op's checks
                         (torch.tensor([0, 4, 9]), "end at the number of tokens N = 10"),
                         (torch.tensor([0]), "end at the number of tokens N = 10"),
                         (torch.tensor([2, 4, 10]), "start at 0")):
            with pytest.raises(RuntimeError, match=f"`cu_seqlens` must {why}"):
                losses.policy_loss(*flat[:2], torch.randn(len(bad) - 1, dtype=flat[0].dtype), flat[3], kind=kind,
                                   cu_seqlens=bad)


def _packed(inp, valid_only=True):
    """The packed form of padded inputs: each row's valid tokens (or every token, masks kept), its cu_seqlens."""
    m = inp["mask"].bool()
    keep = m if valid_only else torch.ones_like(m)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(-1).cumsum(0)])
    packed = {k: (v[keep] if v.shape == m.shape else v) for k, v in inp.items()}
    return packed, cu


COV_KW = {"clip_cov": dict(kind="clip_cov", cov_ratio=0.02, kl_coef=0.1),
          "kl_cov": dict(kind="kl_cov", cov_ratio=0.02, ppo_kl_coef=0.7, ref_logp=None)}


@pytest.mark.parametrize("kind", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("with_is,per_row", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_cov_kinds_packed_equal_padded(kind, with_is, per_row, agg):
    """Packed rows (only the valid tokens, or every token with its mask) select the same tokens as
    their padded rows for the same seed: same loss, gradients and metrics."""
    inp = make_inputs(7, 40, seed=131, empty_rows=(2,), per_row_adv=per_row)
    m = inp["mask"].bool()
    kw = dict(COV_KW[kind], agg=agg, entropy_coef=0.05, seed=5, max_length=40)
    if not with_is:
        kw["is_weights"] = None
    want = run(losses.policy_loss, inp, **kw)
    sel_kw = dict(kind=kind, clip_low=0.2, clip_high=0.2, cov_ratio=kw["cov_ratio"], clip_cov_lb=1.0, clip_cov_ub=5.0,
                  seed=5)
    sel = losses._cov_selection(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], None, **sel_kw)[0]
    k = max(int(0.02 * int(m.sum())), 1)
    assert int(sel.sum()) == k  # enough candidates: the draw (clip_cov) / the top-k (kl_cov) decides
    for valid_only in (True, False):
        packed, cu = _packed(inp, valid_only)
        got = run(losses.policy_loss, packed, cu_seqlens=cu, **kw)
        keep = m if valid_only else torch.ones_like(m)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[2], want[2][keep], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[3], want[3][keep], rtol=1e-12, atol=1e-14)
        assert set(got[1]) == set(want[1])
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-6, atol=1e-7, msg=name)
        packed_sel = losses._cov_selection(packed["logp"], packed["old_logp"], packed["advantages"], packed["mask"],
                                           cu, **sel_kw)[0]
        assert torch.equal(packed_sel, sel[keep])
    if kind == "clip_cov":  # the seed picks the subset: another seed, other tokens (same count)
        other = losses._cov_selection(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], None,
                                      **dict(sel_kw, seed=6))[0]
        assert int(other.sum()) == k and not torch.equal(other, sel)


def assert_same_bits_across_thread_counts(inp, **kw):
    """policy_loss's loss, metrics and gradients are bitwise the same on 1, 2 and 3 threads."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(losses.policy_loss, inp, **kw))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[2], results[0][2])
        assert all(torch.equal(r[1][k], results[0][1][k]) for k in r[1])


def test_deterministic_across_thread_counts():
    assert_same_bits_across_thread_counts(make_inputs(64, 700, seed=59, dtype=torch.float32), kind="gspo",
                                          kl_coef=0.1, entropy_coef=0.1)


def test_num_tokens_and_scale_overrides():
    inp = make_inputs(4, 10, seed=61)
    base = run(losses.policy_loss, inp, kl_coef=0.1)
    n = inp["mask"].sum()
    for num_tokens in (2 * n, int(2 * n)):  # a 0-dim tensor (no host sync) or a Python number
        got = run(losses.policy_loss, inp, kl_coef=0.1, num_tokens=num_tokens, scale=4.0)
        torch.testing.assert_close(got[0], base[0] * 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[2], base[2] * 2, rtol=1e-12, atol=0)
    for num_seqs in (torch.tensor(9), 9.0):  # alone, and with a tensor num_tokens
        for num_tokens in (None, torch.tensor(31.0), 31):
            kw = dict(agg="seq-mean-token-sum", kl_coef=0.1, num_seqs=num_seqs, num_tokens=num_tokens, scale=3.0)
            assert_matches(inp, **kw)
            assert_matches(inp, **dict(kw, agg="token-mean"))


def test_op_count_of_one_forward_and_backward():
    """One policy_loss forward + backward is one fused op each way (plus a view of the metrics and
    autograd's own bookkeeping): on a GPU every extra op is a launch and ~10 us of host time.
    Measured (torch 2.13, the bench case's arguments): forward = policy_loss_rows, unbind (the metrics);
    backward = ones_like (autograd's seed), policy_loss_rows_backward, 2 detach (the leaves' .grad).
    Before the fused finish: 97 ops forward, 27 backward."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    inp = make_inputs(4, 16, seed=79, dtype=torch.float32)
    lp, ent = inp["logp"].clone().requires_grad_(True), inp["entropy"].clone().requires_grad_(True)
    mask = inp["mask"].bool()
    views = {"aten.detach", "aten.unbind"}
    with Count() as fwd:
        loss, _ = losses.policy_loss(lp, inp["old_logp"], inp["advantages"], mask, dual_clip=3.0,
                                     ref_logp=inp["ref_logp"], kl_coef=0.001, entropy=ent, entropy_coef=0.01)
    with Count() as bwd:
        loss.backward()
    assert {k: v for k, v in fwd.ops.items() if k not in views} == {"fastrl.policy_loss_rows": 1}, fwd.ops
    assert {k: v for k, v in bwd.ops.items() if k not in views} == {
        "aten.ones_like": 1, "fastrl.policy_loss_rows_backward": 1}, bwd.ops
    assert sum(fwd.ops.values()) <= 2 and sum(bwd.ops.values()) <= 4, (fwd.ops, bwd.ops)


def test_gradients_come_back_in_the_inputs_dtypes():
    inp = make_inputs(3, 12, seed=83, dtype=torch.float32)
    lp = inp["logp"].to(torch.bfloat16).requires_grad_(True)
    ent = inp["entropy"].double().requires_grad_(True)  # promotes the accumulation to float64
    loss, _ = losses.policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"], entropy=ent, entropy_coef=0.1,
                                 ref_logp=inp["ref_logp"], kl_coef=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16 and ent.grad.dtype == torch.float64
    want = run(ref.policy_loss, {k: (v.double() if v.is_floating_point() else v) for k, v in
                                 dict(inp, logp=lp.detach(), entropy=ent.detach()).items()},
               entropy_coef=0.1, kl_coef=0.1, is_weights=None)
    torch.testing.assert_close(lp.grad.double(), want[2], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ent.grad, want[3], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------- CUDA: same as the CPU op

CUDA_CASES = [dict(kind="vanilla", dual_clip=3.0, agg="token-mean"),
              dict(kind="vanilla", delta=1.5, log_ratio_clamp=None, agg="grpo", kl_kind="k3_unclamped"),
              dict(kind="gspo", agg="seq-mean-token-mean"), dict(kind="geo_mean", agg="token-mean"),
              dict(kind="sapo", ratio_level="sequence", agg="dr_grpo", max_length=40),
              dict(kind="cispo", agg="seq-mean-token-sum-norm", max_length=40), dict(kind="gpg", agg="luspo"),
              dict(kind="vanilla", agg="token-sum", scale=3.0, num_tokens=torch.tensor(500), num_seqs=7)]


def _to(inp, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_matches_cpu(dtype, packed):
    """Loss, every metric and both gradients of the CUDA op (one-kernel forward, one-pass backward)
    against the CPU op: equal up to fp64 summation order, bitwise run to run."""
    inp = make_inputs(6, 37, seed=89, dtype=dtype, empty_rows=(2,), spread=1.0)
    cu = None
    if packed:
        inp = {k: (v.flatten() if v.dim() == 2 else v) for k, v in inp.items()}
        cu = torch.arange(7) * 37
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for kw in CUDA_CASES:
        kw = dict(kw, kl_coef=0.1, entropy_coef=0.05, max_length=kw.get("max_length", 40))
        want = run(losses.policy_loss, inp, cu_seqlens=cu, **kw)
        dev_kw = _to(dict(kw, cu_seqlens=cu), "cuda")
        got = run(losses.policy_loss, _to(inp, "cuda"), **dev_kw)
        again = run(losses.policy_loss, _to(inp, "cuda"), **dev_kw)
        for a, b, c in ((got[0], want[0], again[0]), (got[2], want[2], again[2]), (got[3], want[3], again[3])):
            assert a.device.type == "cuda" and a.dtype == b.dtype
            torch.testing.assert_close(a.cpu(), b, **tol, msg=str(kw))
            assert torch.equal(a, c), kw
        assert set(got[1]) == set(want[1])
        for k in want[1]:
            assert got[1][k].device.type == "cuda"
            torch.testing.assert_close(got[1][k].cpu(), want[1][k], rtol=1e-5, atol=1e-6, msg=f"{k} {kw}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_edge_cases_and_no_host_sync():
    # 300 / 20,000 rows: > one finish block, and many blocks racing for the last ticket
    for B, T, empty in ((3, 8, (0, 1, 2)), (0, 5, ()), (3, 0, ()), (300, 9, (4,)), (20_000, 3, (7,))):
        inp = make_inputs(B, T, seed=97, dtype=torch.float32, empty_rows=empty)
        want = run(losses.policy_loss, inp, kind="vanilla", agg="seq-mean-token-mean", kl_coef=0.1)
        dev = _to(inp, "cuda")  # the host-to-device copies sync; the op must not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = run(losses.policy_loss, dev, kind="vanilla", agg="seq-mean-token-mean", kl_coef=0.1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-7)
        for k in want[1]:
            torch.testing.assert_close(got[1][k].cpu(), want[1][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_opcheck_and_kernel_count():
    from torch.profiler import ProfilerActivity, profile

    inp = _to(make_inputs(3, 7, seed=41, dtype=torch.float32), "cuda")
    inp["logp"].requires_grad_(True)
    inp["entropy"].requires_grad_(True)
    counts = torch.tensor([30.0, float("nan"), 5.0], dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.fastrl.policy_loss_rows.default, _op_args(inp, {24: 4.0, 25: counts}))
    plain = {k: v.detach() for k, v in inp.items()}
    _, _, rows, dlogp, dlogp_aux = torch.ops.fastrl.policy_loss_rows(*_op_args(plain, {}))
    torch.library.opcheck(torch.ops.fastrl.policy_loss_rows_backward.default,
                          [torch.tensor(0.7, device="cuda"), rows, dlogp, dlogp_aux, plain["mask"], None, 2.0, 0.01,
                           torch.float32, torch.float32])
    lp, ent = inp["logp"].detach().requires_grad_(True), inp["entropy"].detach().requires_grad_(True)
    args = (lp, inp["old_logp"], inp["advantages"], inp["mask"].bool())
    kw = dict(dual_clip=3.0, ref_logp=inp["ref_logp"], kl_coef=0.001, entropy=ent, entropy_coef=0.01)
    losses.policy_loss(*args, **kw)[0].backward()
    lp.grad = ent.grad = None  # else the profiled backward adds into them (two more kernels)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        losses.policy_loss(*args, **kw)[0].backward()
        torch.cuda.synchronize()
    events = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = [n for n in events if "memset" in n.lower()]
    kernels = [n for n in events if "memset" not in n.lower()]
    # one forward kernel (after a 4-byte memset of its ticket counter), the autograd seed (ones_like)
    # and the one-pass backward (the unfused wrapper ran ~100 small ops)
    assert sum("loss_kernel" in n for n in kernels) == 1, kernels
    assert sum("rows_grad_kernel" in n for n in kernels) == 1, kernels
    assert len(kernels) <= 3 and len(memsets) <= 1, events



# ---------------------------------------------------------------- DP normalization (2 gloo ranks)

# (kind, agg, layout) for every aggregation mode: vanilla (the row weights), geo_mean (its rows-mean
# policy term over the global row count) and vanilla packed (counts from cu_seqlens)
DP_CASES = [(kind, agg, layout) for agg in AGGS for kind, layout in (("vanilla", "padded"), ("geo_mean", "padded"),
                                                                      ("vanilla", "packed"))]


def _dp_run(inp, kind, agg, layout, **kw):
    if layout == "packed":  # every row of length T, masks kept
        B, T = inp["mask"].shape
        inp = {k: v.flatten() for k, v in inp.items()}
        kw.update(cu_seqlens=torch.arange(B + 1) * T, max_length=T)
    return run(losses.policy_loss, inp, kind=kind, agg=agg, kl_coef=0.1, entropy_coef=0.1, **kw)


def _dp_worker(rank, world_size, init_method, shards, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        out = {case: _dp_run(shards[rank], *case, process_group=dist.group.WORLD) for case in DP_CASES}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_dp_normalization_equals_single_process(tmp_path):
    full = make_inputs(7, 20, seed=67, empty_rows=(5,))
    shards = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]  # uneven shards
    run_ranks(_dp_worker, (2, f"file://{tmp_path}/init", shards, str(tmp_path)), 2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in DP_CASES:
        loss, _, g, ge = _dp_run(full, *case)
        local = _dp_run(shards[0], *case)[0]  # without the group: rank 0's own normalization
        r0, r1 = got[0][case], got[1][case]
        # each rank's loss is world_size x its share: their mean is the single-process loss, and
        # DDP's gradient average gives the single-process gradient
        torch.testing.assert_close((r0[0] + r1[0]) / 2, loss, rtol=1e-12, atol=1e-14, msg=str(case))
        torch.testing.assert_close(torch.cat([r0[2], r1[2]]) / 2, g.view(-1, *r0[2].shape[1:]), rtol=1e-12,
                                   atol=1e-14, msg=str(case))
        torch.testing.assert_close(torch.cat([r0[3], r1[3]]) / 2, ge.view(-1, *r0[3].shape[1:]), rtol=1e-12,
                                   atol=1e-14, msg=str(case))
        if case[1] != "token-sum":  # the group's counts changed rank 0's loss (token-sum has none)
            assert not torch.allclose(2 * local, r0[0]), case


# ------------------------------------------------------------------------- hypothesis: shapes, masks

from hypothesis import assume, given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(B=st.integers(0, 6), T=st.integers(0, 20), seed=st.integers(0, 10_000), kind=st.sampled_from(KINDS),
       agg=st.sampled_from(AGGS), level=st.sampled_from(["token", "sequence"]), per_row=st.booleans(),
       empty=st.integers(0, 3), packed=st.booleans())
def test_random_shapes_match_reference(B, T, seed, kind, agg, level, per_row, empty, packed):
    assume(B > 0 or not packed)  # the padded reference of 0 packed rows has no graph to differentiate
    inp = make_inputs(B, T, seed=seed, per_row_adv=per_row, empty_rows=range(min(empty, B)))
    kw = dict(kind=kind, agg=agg, ratio_level=level, kl_coef=0.1, entropy_coef=0.05, max_length=T + 3)
    if packed:  # every row of length T, masks kept (masked tokens inside packed rows)
        inp = {k: (v.flatten() if v.dim() == 2 else v) for k, v in inp.items()}
        assert_matches(inp, cu_seqlens=torch.arange(B + 1) * T, **kw)
    else:
        assert_matches(inp, **kw)


# ----------------------------------------------------------------------------- CPU ISA paths
_ISA_SCRIPT = r"""
import sys, torch, fastrl
out = []
for inp, kw in torch.load(sys.argv[1]):
    lp = inp["logp"].clone().requires_grad_(True)
    ent = inp["entropy"].clone().requires_grad_(True)
    loss, metrics = fastrl.policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"], entropy=ent,
                                       ref_logp=inp["ref_logp"], **kw)
    loss.backward()
    out.append((loss.detach(), lp.grad, ent.grad, metrics))
torch.save(out, sys.argv[2])
"""


def _isa_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for kw in (dict(kind="vanilla", dual_clip=3.0, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01),
                   dict(kind="vanilla", kl_coef=0.1, kl_kind="k3_unclamped", log_ratio_clamp=None, delta=1.5),
                   dict(kind="sapo", kl_coef=0.1, kl_kind="k2"), dict(kind="cispo", kl_coef=0.1),
                   dict(kind="gspo", kl_coef=0.1), dict(kind="geo_mean"), dict(kind="gpg", ratio_level="sequence")):
            # 300 tokens per row: whole blocks of exps and a tail; a large spread reaches the clamps
            cases.append((make_inputs(3, 300, seed=71, dtype=dtype, empty_rows=(1,), spread=8.0), kw))
    special = make_inputs(2, 40, seed=73, dtype=torch.float32)
    special["old_logp"][0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 95.0, -95.0, 88.5])
    cases.append((special, dict(kind="vanilla", kl_coef=0.1, kl_kind="k3_unclamped", log_ratio_clamp=None)))
    return cases


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_paths_give_the_same_bits(isa, tmp_path):
    # The block exps run on SIMD lanes for the widest ISA (cpu/simd.h) and the token math is compiled
    # per ISA; every path runs the same IEEE operations, so the results agree bitwise.
    cases = _isa_cases()
    got = run_capped(isa, _ISA_SCRIPT, cases, tmp_path)
    for (inp, kw), (loss, g_lp, g_ent, metrics) in zip(cases, got):
        want = run(losses.policy_loss, inp, is_weights=None, **kw)
        for a, b in ((loss, want[0]), (g_lp, want[2]), (g_ent, want[3])):
            assert_same_bits(a, b)
        for k in metrics:
            assert_same_bits(metrics[k], want[1][k])


# ------------------------------------------------------------ the fp32 lane pass (cpu/losses.cpp)
# fp32 / bf16 / fp16 inputs with a token-level ratio of kinds vanilla, gpg, cispo run the CPU token
# pass in SIMD lanes (per-lane fp64 partial sums). These cover each option it compiles separately.

LANE_KINDS = [dict(kind="vanilla"), dict(kind="vanilla", dual_clip=3.0), dict(kind="vanilla", dual_clip=2.0, delta=1.5),
              dict(kind="vanilla", log_ratio_clamp=None), dict(kind="gpg"), dict(kind="gpg", log_ratio_clamp=None),
              dict(kind="cispo"), dict(kind="cispo", log_ratio_clamp=0.3)]


@pytest.mark.parametrize("kw", LANE_KINDS)
@pytest.mark.parametrize("kl_kind", [None, "k1", "abs", "k2", "k3", "k3_unclamped"])
@pytest.mark.parametrize("weights,per_row", [(False, False), (True, False), (False, True)])
def test_fp32_lane_pass_matches_reference(kw, kl_kind, weights, per_row):
    # 2 rows x 301 tokens: whole blocks, a padded tail; spread 2: both clip regions, the dual clip
    inp = make_inputs(3, 301, seed=97, dtype=torch.float32, empty_rows=(1,), per_row_adv=per_row, spread=2.0)
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    args = dict(kw, kl_coef=0.1 if kl_kind else 0.0, kl_kind=kl_kind or "k3", entropy_coef=0.03,
                ref_logp=None if kl_kind is None else True, is_weights=None if not weights else True)
    got = run(losses.policy_loss, inp, **args)
    want = run(ref.policy_loss, exact, **args)
    for a, b in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)
    assert set(got[1]) == set(want[1])
    for k in got[1]:
        torch.testing.assert_close(got[1][k].double(), want[1][k].double(), rtol=2e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_lane_pass_packed_equals_padded_and_ignores_masked_garbage(dtype):
    inp = make_inputs(4, 77, seed=99, dtype=dtype, empty_rows=(2,), spread=1.0)
    kw = dict(kind="vanilla", dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    want = run(losses.policy_loss, inp, **kw)
    m = inp["mask"].bool()
    dirty = {k: (v.masked_fill(~m, float("nan")) if v.is_floating_point() and v.shape == m.shape else v)
             for k, v in inp.items()}
    got = run(losses.policy_loss, dirty, **kw)
    for a, b in ((got[0], want[0]), (got[2], want[2]), (got[3], want[3])):
        assert torch.equal(a, b)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), m.sum(-1).cumsum(0)])
    packed = {k: (v[m] if v.shape == m.shape else v) for k, v in inp.items()}
    packed["mask"] = torch.ones(int(m.sum()), dtype=torch.bool)
    got = run(losses.policy_loss, packed, cu_seqlens=cu, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], want[2][m], rtol=0, atol=0)


def test_fp32_lane_pass_deterministic_across_thread_counts():
    assert_same_bits_across_thread_counts(make_inputs(64, 700, seed=101, dtype=torch.float32), kind="vanilla",
                                          dual_clip=3.0, kl_coef=0.1, entropy_coef=0.1)


def test_fp32_lane_pass_reports_bad_mask_values():
    inp = make_inputs(2, 300, seed=103, dtype=torch.float32)
    mask = inp["mask"].clone()
    mask[1, 290] = 2  # in the padded tail block of the second row
    with pytest.raises(ValueError, match=r"`mask` must hold only 0 and 1, got 2 at flat index 590"):
        losses.policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], mask)
