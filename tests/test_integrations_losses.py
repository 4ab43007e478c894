"""Policy-loss drop-ins against the installed trainers: verl 0.9.1's core_algos functions and
trl 1.16.0's GRPOTrainer._compute_loss (run on a bare trainer object), loss and gradients."""
import itertools
from collections import defaultdict
from types import SimpleNamespace

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


def test_entropy_loss_matches_verl():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 50, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.7
    for agg in AGG_MODES:
        torch.testing.assert_close(fv.compute_entropy_loss(logits, mask, agg),
                                   core_algos.compute_entropy_loss(logits, mask, agg), rtol=1e-5, atol=1e-6)


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


# -------------------------------------------------------------------------------- TRL GRPOTrainer

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
import fastrl.integrations.trl as ft  # noqa: E402


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def bare_trainer(loss_type, per_token_logps, entropies, *, beta, level, delta, entropy_coef, ga, max_len):
    """A GRPOTrainer without __init__: just the attributes _compute_loss reads, and a model stub
    whose log-probs are our leaf tensor (so TRL's own loss code runs on it)."""
    t = object.__new__(trl_grpo.GRPOTrainer)
    t.loss_type, t.beta, t.importance_sampling_level = loss_type, beta, level
    t.epsilon_low, t.epsilon_high = 0.2, (4.0 if loss_type == "cispo" else 0.28)
    t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
    t.use_vllm, t.vllm_importance_sampling_correction = True, True
    t.max_completion_length = max_len
    t.current_gradient_accumulation_steps = ga
    t.aux_loss_enabled = False
    t._entropy_bonus_enabled = entropy_coef != 0.0
    t.entropy_coef, t.use_adaptive_entropy = entropy_coef, False
    t.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, steps_per_generation=2)
    t.accelerator = _Accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = SimpleNamespace(training=True)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (per_token_logps, entropies, None)
    return t


@pytest.mark.parametrize("loss_type,level", list(itertools.product(list(ft._TRL_LOSS_TYPES), ["token", "sequence"])))
@pytest.mark.parametrize("beta,delta,entropy_coef", [(0.0, None, 0.0), (0.04, 1.6, 0.01)])
def test_grpo_loss_matches_trl_compute_loss(loss_type, level, beta, delta, entropy_coef):
    g = torch.Generator().manual_seed(hash((loss_type, level)) % 997)
    B, T = 6, 21
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.4
    ref = logp + torch.randn(B, T, generator=g) * 1.5  # k3 values past verl's clamp: TRL has none
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[2] = 0
    ent = torch.rand(B, T, generator=g) * 2
    isr = torch.rand(B, T, generator=g) + 0.5
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "importance_sampling_ratio": isr,
              "num_items_in_batch": mask.sum() * 2}
    lp_trl, ent_trl = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    trainer = bare_trainer(loss_type, lp_trl, ent_trl, beta=beta, level=level, delta=delta,
                           entropy_coef=entropy_coef, ga=3, max_len=25)
    want = trainer._compute_loss(None, inputs)
    want.backward()
    lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    got, metrics = ft.grpo_loss(lp, old, adv, mask, loss_type=loss_type, epsilon_low=0.2,
                                epsilon_high=trainer.epsilon_high, delta=delta, importance_sampling_level=level,
                                beta=beta, ref_per_token_logps=ref, max_completion_length=25,
                                num_items_in_batch=inputs["num_items_in_batch"], gradient_accumulation_steps=3,
                                steps_per_generation=2, importance_sampling_ratio=isr, entropies=e,
                                entropy_coef=entropy_coef)
    got.backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=2e-5, atol=1e-8)
    if entropy_coef:
        torch.testing.assert_close(e.grad, ent_trl.grad, rtol=1e-5, atol=1e-9)
    if beta:
        assert float(metrics["kl"]) == pytest.approx(trainer._metrics["train"]["kl"][0], rel=1e-5)
    if loss_type not in ("cispo", "sapo") and level == "token":
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert float(metrics[key]) == pytest.approx(trainer._metrics["train"][key][0], abs=1e-7), key


def test_grpo_loss_bad_loss_type():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="`loss_type` must be one of grpo, bnpo"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="vespo")


# ------------------------------------------------------------------------------ clip_cov / kl_cov

def cov_config(**policy_loss):
    return config(policy_loss=verl_config.PolicyLossConfig(**policy_loss))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("ratio", [0.0002, 0.05])
def test_kl_cov_matches_verl(agg, ratio):
    logp, old, adv, mask, _ = batch(B=8, T=40, seed=21)
    cfg = cov_config(kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    got = loss_and_grad(fv.compute_policy_loss_kl_cov, logp, old, adv, mask, loss_agg_mode=agg, config=cfg)
    want = loss_and_grad(core_algos.compute_policy_loss_kl_cov, logp, old, adv, mask, loss_agg_mode=agg, config=cfg)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    assert float(got[2]["actor/ppo_kl"]) == pytest.approx(want[2]["actor/ppo_kl"], rel=1e-5)
    # the penalty changed something: not the plain -A * ratio loss
    plain = loss_and_grad(fv.compute_policy_loss_kl_cov, logp, old, adv, mask, loss_agg_mode=agg,
                          config=cov_config(kl_cov_ratio=ratio, ppo_kl_coef=0.0))
    assert not torch.equal(plain[1], got[1])


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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_patched_grpo_trainer_matches_trl(loss_type):
    g = torch.Generator().manual_seed(31)
    B, T = 5, 16
    logp = -torch.rand(B, T, generator=g) * 3
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.randn(B, generator=g), "old_per_token_logps": logp + 0.3 * torch.randn(B, T, generator=g),
              "ref_per_token_logps": logp + torch.randn(B, T, generator=g), "num_items_in_batch": mask.sum(),
              "importance_sampling_ratio": torch.rand(B, T, generator=g) + 0.5}
    ent = torch.rand(B, T, generator=g)
    results = []
    for patched in (False, True):
        lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        t = bare_trainer(loss_type, lp, e, beta=0.02, level="token", delta=None, entropy_coef=0.01, ga=2, max_len=T)
        try:
            if patched:
                ft.patch_grpo_trainer()
                ft.patch_grpo_trainer()  # idempotent
            loss = t._compute_loss(None, inputs)
        finally:
            ft.unpatch_grpo_trainer()
        loss.backward()
        results.append((loss.detach(), lp.grad, e.grad, t._metrics["train"]))
    (l0, g0, e0, m0), (l1, g1, e1, m1) = results
    assert trl_grpo.GRPOTrainer._compute_loss is not ft._fused_compute_loss
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=2e-5, atol=1e-8)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-9)
    for key in ("kl", "entropy", "policy_loss", "entropy_coef", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "cispo_clip_ratio"):
        if key in m0:
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
