"""fastrl.losses.rollout_is_weights: truncated / masked importance-sampling weights for rollout-trainer
mismatch, against verl 0.9.1's rollout_corr_helper (weights and every metric), the fp64 reference,
as ``is_weights`` of policy_loss, edge cases, bad input, no host syncs."""
import pytest
import torch

from fastrl.losses import policy_loss, rollout_is_weights
from fastrl.reference import losses as ref

rc = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")


def make(B=7, T=29, *, seed=0, dtype=torch.float32, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    roll = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    roll[0, :3] = logp[0, :3] - 30.0  # log-ratios past verl's +-20 safety bound
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[2] = False  # an empty row
    mask[3, 1:] = False  # a single-token row
    return logp.to(dtype), roll.to(dtype), mask


def verl_weights(logp, roll, mask, level, spec, normalize):
    w, m = rc.compute_rollout_correction_weights(logp - roll, mask.to(logp.dtype), rollout_is=level,
                                                 rollout_is_threshold=spec, rollout_is_batch_normalize=normalize)
    return w, m


def ours_args(spec):
    """verl's threshold spec -> (mode, threshold, threshold_lower)."""
    if isinstance(spec, str):
        lo, hi = (float(v) for v in spec.split("_"))
        return dict(mode="mask", threshold=hi, threshold_lower=lo)
    return dict(mode="truncate", threshold=spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("spec", [2.0, 1.2, "0.5_2.0", "0.8_1.5"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_verl_weights_and_metrics(level, spec, normalize, dtype):
    # small spread at the sequence level: its sums of T log-ratios must leave some rows inside the bounds
    logp, roll, mask = make(seed=len(str(spec)) + 2 * normalize, dtype=dtype, spread=0.3 if level == "token" else 0.05)
    want_w, want_m = verl_weights(logp, roll, mask, level, spec, normalize)
    w, m = rollout_is_weights(logp, roll, mask, level=level, batch_normalize=normalize, **ours_args(spec))
    assert w.dtype == dtype and not w.requires_grad
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w, want_w, **tol)
    assert set(m) == set(want_m)
    for k, v in want_m.items():
        assert m[k].dim() == 0 and m[k].dtype == torch.float32
        torch.testing.assert_close(m[k], torch.tensor(v, dtype=torch.float32), rtol=2e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode,lower", [("truncate", None), ("truncate", 0.7), ("mask", None), ("mask", 0.6)])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_fp64_reference(level, mode, lower, normalize):
    logp, roll, mask = make(6, 17, seed=5, dtype=torch.float64, spread=0.2)
    kw = dict(level=level, mode=mode, threshold=1.4, threshold_lower=lower, batch_normalize=normalize)
    w, _ = rollout_is_weights(logp, roll, mask, **kw)
    # rtol: with batch_normalize verl (and we) divide by count + 1e-8, the reference by count (>= 1)
    torch.testing.assert_close(w, ref.rollout_is_weights(logp, roll, mask, **kw), rtol=1e-7, atol=1e-14)
    assert torch.all(w[~mask] == 0)


def test_geometric_mask_keeps_what_verl_seq_mean_k1_rejection_keeps():
    logp, roll, mask = make(12, 23, seed=3, spread=0.4)
    lo, hi = 0.8, 1.25
    w, _ = rollout_is_weights(logp, roll, mask, level="geometric", mode="mask", threshold=hi, threshold_lower=lo)
    keep, _ = rc.compute_rollout_rejection_mask(logp - roll, mask.float(), rollout_rs="seq_mean_k1",
                                                rollout_rs_threshold=f"{1 / hi}_{1 / lo}")
    assert 0 < int((w > 0).sum()) < int(mask.sum())  # both outcomes occur
    assert torch.equal((w > 0), keep.bool() & mask)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_as_is_weights_of_policy_loss_equals_verl(level):
    logp, roll, mask = make(5, 21, seed=9)
    old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    w, _ = rollout_is_weights(old, roll, mask, level=level, threshold=1.5)
    verl_w, _ = verl_weights(old, roll, mask, level, 1.5, False)
    cfg = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False,
                                  ppo_mini_batch_size=4, rollout_n=1)
    lp1, lp2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    want, _ = core_algos.compute_policy_loss_vanilla(old, lp1, adv, mask, "token-mean", cfg, rollout_is_weights=verl_w)
    got, _ = policy_loss(lp2, old, adv, mask, kind="vanilla", dual_clip=cfg.clip_ratio_c, is_weights=w)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp2.grad, lp1.grad, rtol=1e-5, atol=1e-8)


def test_masked_nan_is_ignored_and_no_valid_token_gives_zeros():
    logp, roll, mask = make(4, 9, seed=11)
    logp[~mask] = float("nan")
    w, m = rollout_is_weights(logp, roll, mask, level="sequence", threshold=3.0)
    assert torch.isfinite(w).all() and all(torch.isfinite(v) for v in m.values())
    w, m = rollout_is_weights(logp, roll, mask, level="sequence", mode="mask", threshold=1.001, threshold_lower=1.0)
    assert torch.equal(w, torch.zeros_like(w)) and float(m["rollout_is_eff_sample_size"]) == 0  # verl: 1 / 0
    empty = torch.zeros_like(mask)
    for level in ("token", "sequence", "geometric"):
        w, m = rollout_is_weights(logp, roll, empty, level=level, mode="mask", threshold=3.0, batch_normalize=True)
        assert torch.equal(w, torch.zeros_like(w))
        assert all(torch.isfinite(v) for v in m.values())
        assert float(m["rollout_is_mean"]) == 0 and float(m["rollout_is_eff_sample_size"]) == 0
    w, m = rollout_is_weights(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool))
    assert w.shape == (0, 5) and all(torch.isfinite(v) for v in m.values())


def test_no_host_sync(monkeypatch):
    logp, roll, mask = make(4, 9, seed=13)
    meta = [t.to("meta") for t in (logp, roll, mask)]
    for level in ("token", "sequence", "geometric"):
        w, m = rollout_is_weights(*meta, level=level, mode="mask", batch_normalize=True)
        assert w.device.type == "meta" and all(v.device.type == "meta" for v in m.values())

    def boom(*a, **k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for level in ("token", "sequence", "geometric"):
        rollout_is_weights(logp, roll, mask, level=level, batch_normalize=True)


def test_inputs_unchanged_and_detached():
    logp, roll, mask = make(4, 8, seed=17)
    lp = logp.clone().requires_grad_(True)
    before = (lp.detach().clone(), roll.clone(), mask.clone())
    w, _ = rollout_is_weights(lp, roll, mask, level="token")
    assert not w.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, (lp.detach(), roll, mask)))


@pytest.mark.parametrize("args,kw,match", [
    ((torch.zeros(3), torch.zeros(3), torch.ones(3)), {}, r"`logp` must be \[B, T\]"),
    ((torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), {}, r"`rollout_logp` must have `logp`'s shape"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), {}, r"`mask` must have `logp`'s shape \(2, 3\)"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3)), {}, "`logp` must be floating"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"level": "seq"}, "token, sequence, geometric"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"mode": "clip"}, "truncate, mask; got 'clip'"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"threshold": 0.0}, "`threshold` must be"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"threshold": float("inf")}, "`threshold` must"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"threshold": 2.0, "threshold_lower": 3.0},
     r"`threshold_lower` must be a number in \(0, threshold=2.0\], got 3.0"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), {"threshold_lower": -1.0}, "`threshold_lower`"),
    ((torch.zeros(2, 3), [0.0], torch.ones(2, 3)), {}, "`rollout_logp` must be a tensor, got list"),
])
def test_bad_input(args, kw, match):
    with pytest.raises(ValueError, match=match):
        rollout_is_weights(*args, **kw)
