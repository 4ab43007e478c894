"""Policy-loss drop-ins against verl 0.9.1's core_algos functions, loss and gradients (TRL's
GRPOTrainer loss: tests/test_trl_loss_grpo.py)."""
import itertools

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")
import fastrl.integrations.verl as fv  # noqa: E402
from fastrl import losses as fastrl_losses  # noqa: E402

VERL = dict(core_algos.POLICY_LOSS_REGISTRY)  # verl's originals, before any install()
VERL_FNS = {name: getattr(core_algos, f"compute_policy_loss_{name}") for name in fv.POLICY_LOSSES}
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(autouse=True)
def _never_leave_installed():
    yield
    fv.uninstall()


def config(**kw):
    c = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False,
                                ppo_mini_batch_size=4, rollout_n=1, **kw)
    return c


def batch(B=6, T=33, seed=0, dtype=torch.float32, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False  # an empty row
    isw = torch.rand(B, T, generator=g) + 0.5
    return [t.to(dtype) for t in (logp, old, adv)] + [mask, isw.to(dtype)]


def loss_and_grad(fn, logp, *args, **kw):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(args[0], lp, *args[1:], **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


PLAIN = [n for n in fv.POLICY_LOSSES if n not in ("clip_cov", "kl_cov")]  # those two: tests below


@pytest.mark.parametrize("name,agg,with_is", list(itertools.product(PLAIN, AGG_MODES, [False, True])))
def test_policy_losses_match_verl(name, agg, with_is):
    logp, old, adv, mask, isw = batch(seed=len(name) * 7 + AGG_MODES.index(agg))
    cfg = config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    kw = dict(loss_agg_mode=agg, config=cfg, rollout_is_weights=isw if with_is else None)
    got = loss_and_grad(fv.POLICY_LOSSES[name], logp, old, adv, mask, **kw)
    want = loss_and_grad(VERL_FNS[name], logp, old, adv, mask, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    assert set(got[2]) == set(want[2])
    for k, v in want[2].items():
        assert float(got[2][k]) == pytest.approx(v, rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo", "gpg"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_global_batch_info_matches_verl(name, agg):
    logp, old, adv, mask, _ = batch(seed=5)
    cfg = config()
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=11,
                                 loss_scale_factor=100)
    got = loss_and_grad(fv.POLICY_LOSSES[name], logp, old, adv, mask, loss_agg_mode=agg, config=cfg)
    want = loss_and_grad(VERL_FNS[name], logp, old, adv, mask, loss_agg_mode=agg, config=cfg)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-9)


# verl's CISPO clamps the weight to [1 - clip_ratio_low, 1 + clip_ratio_high] with torch.clamp: a
# clip_ratio_low >= 1 means no lower clip, a negative clip_ratio_high a cap below 1.
@pytest.mark.parametrize("low,high", [(10.0, 0.28), (1.0, -0.5), (0.2, 3.0), (0.5, -0.3)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_cispo_clip_ranges_match_verl(low, high, agg):
    logp, old, adv, mask, isw = batch(seed=13, spread=1.0)
    kw = dict(loss_agg_mode=agg, config=config(clip_ratio_low=low, clip_ratio_high=high), rollout_is_weights=isw)
    got = loss_and_grad(fv.compute_policy_loss_cispo, logp, old, adv, mask, **kw)
    want = loss_and_grad(core_algos.compute_policy_loss_cispo, logp, old, adv, mask, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    for k, v in want[2].items():
        assert float(got[2][k]) == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert want[2]["actor/pg_clipfrac"] > 0.05


def test_vanilla_dual_clip_and_wide_ratios():
    logp, old, adv, mask, _ = batch(seed=9, spread=3.0)  # ratios far past the dual clip
    cfg = config(clip_ratio_c=2.0)
    got = loss_and_grad(fv.compute_policy_loss_vanilla, logp, old, adv, mask, config=cfg)
    want = loss_and_grad(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, config=cfg)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    assert float(got[2]["actor/pg_clipfrac_lower"]) > 0
    with pytest.raises(AssertionError, match="clip_ratio_c"):
        fv.compute_policy_loss_vanilla(old, logp, adv, mask, config=config(clip_ratio_c=1.0))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_matches_verl(agg):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, generator=g)
    mask = (torch.rand(5, 9, generator=g) < 0.6).float()
    mask[2] = 0
    for kw in ({}, dict(dp_size=4, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=50)):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        got = fv.agg_loss(a, mask, agg, **kw)
        want = core_algos.agg_loss(b, mask, agg, **kw)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fv.agg_loss(x, mask, "mean")
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        fv.agg_loss(x, mask, "token-mean", dp_size=2)


def test_empty_batch_is_zero_where_verl_is_nan():
    logp, old, adv, mask, _ = batch(seed=1)
    mask[:] = False
    got = loss_and_grad(fv.compute_policy_loss_vanilla, logp, old, adv, mask, config=config())
    want = loss_and_grad(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, config=config())
    assert got[0].item() == 0.0 and torch.all(got[1] == 0) and torch.isnan(want[0])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_entropy_loss_and_gradient_match_verl(agg):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 7, 50, generator=g) * 3  # peaked and flat rows: gradients of both signs
    mask = torch.rand(4, 7, generator=g) < 0.7
    mask[1] = False  # an empty row
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = fv.compute_entropy_loss(a, mask, agg), core_algos.compute_entropy_loss(b, mask, agg)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(a.grad[~mask] == 0) and a.grad[mask].abs().min() > 0  # masked tokens: none


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_matches_verl(agg):
    g = torch.Generator().manual_seed(6)
    vpreds, returns, values = (torch.randn(4, 12, generator=g) for _ in range(3))
    mask = (torch.rand(4, 12, generator=g) < 0.7).float()
    a = vpreds.clone().requires_grad_(True)
    b = vpreds.clone().requires_grad_(True)
    got = fv.compute_value_loss(a, returns, values, mask, 0.3, agg)
    want = core_algos.compute_value_loss(b, returns, values, mask, 0.3, agg)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    assert float(got[1]) == pytest.approx(float(want[1]), abs=1e-6) and 0 < float(got[1]) < 1


def test_install_registers_policy_losses():
    fv.install()
    for name, fn in fv.POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
    assert core_algos.get_policy_loss_fn("dro") is VERL["dro"]  # others untouched
    fv.uninstall()
    for name in fv.POLICY_LOSSES:
        assert core_algos.get_policy_loss_fn(name) is VERL[name]


# ------------------------------------------------------------------------------ clip_cov / kl_cov

def cov_config(**policy_loss):
    return config(policy_loss=verl_config.PolicyLossConfig(**policy_loss))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("ratio", [0.0002, 0.05])
@pytest.mark.parametrize("with_is", [False, True])
def test_kl_cov_matches_verl(agg, ratio, with_is):
    logp, old, adv, mask, isw = batch(B=8, T=40, seed=21)
    cfg = cov_config(kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    kw = dict(loss_agg_mode=agg, config=cfg, rollout_is_weights=isw if with_is else None)
    got = loss_and_grad(fv.compute_policy_loss_kl_cov, logp, old, adv, mask, **kw)
    want = loss_and_grad(core_algos.compute_policy_loss_kl_cov, logp, old, adv, mask, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    assert float(got[2]["actor/ppo_kl"]) == pytest.approx(want[2]["actor/ppo_kl"], rel=1e-5)
    # the penalty changed something: not the plain -A * ratio loss
    plain = loss_and_grad(fv.compute_policy_loss_kl_cov, logp, old, adv, mask,
                          **dict(kw, config=cov_config(kl_cov_ratio=ratio, ppo_kl_coef=0.0)))
    assert not torch.equal(plain[1], got[1])


def test_kl_cov_with_is_weights_options():
    """The weighted penalty's second pass follows the first one's aggregation: global counts, scale,
    the entropy bonus of the caller kept, float64."""
    logp, old, adv, mask, isw = batch(B=5, T=17, seed=23, dtype=torch.float64)
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(kind="kl_cov", cov_ratio=0.1, ppo_kl_coef=0.5, agg="seq-mean-token-mean", num_seqs=9, scale=3.0)

    def run(weights, entropy_coef):
        lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        loss, m = fastrl_losses.policy_loss(lp, old, adv, mask, is_weights=weights, entropy=e,
                                            entropy_coef=entropy_coef, **kw)
        loss.backward()
        return loss.detach(), lp.grad, e.grad, m

    ones = run(torch.ones_like(logp), 0.1)
    none = run(None, 0.1)  # all-ones weights == the unweighted (single pass) path
    for a, b in zip(ones[:3], none[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert float(ones[3]["entropy_mean"]) == pytest.approx(float(none[3]["entropy_mean"]))
    lp = logp.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: fastrl_losses.policy_loss(x, old, adv, mask, is_weights=isw, **kw)[0], (lp,))


def _cov_inputs(seed):
    # covariances of order 1: a few tokens inside verl's default (1, 5) window
    logp, old, adv, mask, isw = batch(B=8, T=40, seed=seed, spread=0.05)
    return logp * 2, old * 2, adv * 2, mask, isw


@pytest.mark.parametrize("with_is", [False, True])
def test_clip_cov_matches_verl_when_every_candidate_is_dropped(with_is):
    logp, old, adv, mask, isw = _cov_inputs(25)
    cfg = cov_config(clip_cov_ratio=0.5)  # k >= number of candidates: no random choice
    kw = dict(config=cfg, rollout_is_weights=isw if with_is else None)
    got = loss_and_grad(fv.compute_policy_loss_clip_cov, logp, old, adv, mask, **kw)
    want = loss_and_grad(core_algos.compute_policy_loss_clip_cov, logp, old, adv, mask, **kw)
    assert want[2]["actor/pg_clipfrac"] > 0
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    for k, v in want[2].items():
        assert float(got[2][k]) == pytest.approx(v, rel=1e-5), k


def test_clip_cov_random_draw_is_seeded_and_sized_like_verl():
    logp, old, adv, mask, _ = _cov_inputs(27)
    cfg = cov_config(clip_cov_ratio=0.01)
    k = max(int(0.01 * int(mask.sum())), 1)
    a = loss_and_grad(fv.compute_policy_loss_clip_cov, logp, old, adv, mask, config=cfg)
    b = loss_and_grad(fv.compute_policy_loss_clip_cov, logp, old, adv, mask, config=cfg)
    c = loss_and_grad(fv.compute_policy_loss_clip_cov, logp, old, adv, mask, config=cfg, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = loss_and_grad(core_algos.compute_policy_loss_clip_cov, logp, old, adv, mask, config=cfg)
    assert float(a[2]["actor/pg_clipfrac"]) == pytest.approx(want[2]["actor/pg_clipfrac"], rel=1e-6)
    assert float(a[2]["actor/pg_clipfrac"]) * int(mask.sum()) == pytest.approx(k)
    # dropped tokens lose their gradient (compared with the same loss without dropping); a
    # different seed drops others
    plain = loss_and_grad(lambda o, lp, *r, **kw: fastrl_losses.policy_loss(lp, o, *r, log_ratio_clamp=None),
                          logp, old, adv, mask)
    dropped = lambda r: (r[1] == 0) & (plain[1] != 0)  # noqa: E731
    assert int(dropped(a).sum()) == k and not torch.equal(dropped(a), dropped(c))
