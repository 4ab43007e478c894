"""fastrl.integrations.trl.grpo_loss / patch_grpo_trainer against trl 1.16.0's own
GRPOTrainer._compute_loss, run on a bare trainer object (no model): loss, gradients (log-probs and
entropies) and the logged metrics, for every loss_type (vespo included) with the off-policy mask,
the high-entropy mask, the bias-corrected KL, the vLLM ratio, empty rows; and the entropy quantile
over 2 gloo ranks against TRL's gathered one."""
import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

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

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class _DistAccelerator(_Accelerator):
    """accelerate's gather / padding on torch.distributed (for the 2-rank test)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.num_processes = dist, dist.get_world_size()

    def gather(self, x):
        x = x.reshape(-1)  # accelerate gathers 0-dim tensors as [1]
        parts = [torch.empty_like(x) for _ in range(self.num_processes)]
        self.dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def reduce(self, x, reduction="sum"):
        x = x.clone()
        self.dist.all_reduce(x)
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        size = torch.tensor([x.shape[0]])
        self.dist.all_reduce(size, op=self.dist.ReduceOp.MAX)
        return torch.cat([x, x.new_full((int(size) - x.shape[0],), pad_index)])


CONFIG = dict(beta=0.0, importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, delta=None,
              entropy_coef=0.0, use_bias_correction_kl=False, off_policy_mask_threshold=None,
              top_entropy_quantile=1.0, use_vllm=True, max_completion_length=25, ga=3,
              vespo=(2.0, 3.0, 3.0, 2.0))


def bare_trainer(loss_type, per_token_logps, entropies, accelerator=None, training=True, **overrides):
    """A GRPOTrainer without __init__: the attributes _compute_loss reads, and a model stub whose
    log-probs / entropies are our leaf tensors (so TRL's own loss code runs on them)."""
    c = dict(CONFIG, **overrides)
    t = object.__new__(trl_grpo.GRPOTrainer)
    t.loss_type, t.beta, t.importance_sampling_level = loss_type, c["beta"], c["importance_sampling_level"]
    t.epsilon_low = c["epsilon_low"]
    t.epsilon_high = c["epsilon_high"]
    t.top_entropy_quantile, t.off_policy_mask_threshold = c["top_entropy_quantile"], c["off_policy_mask_threshold"]
    t.use_vllm, t.vllm_importance_sampling_correction = c["use_vllm"], True
    t.max_completion_length = c["max_completion_length"]
    t.current_gradient_accumulation_steps = c["ga"]
    aux_loss = c.get("aux_loss")
    t.aux_loss_enabled, t.router_aux_loss_coef = aux_loss is not None, 0.3
    t.use_adaptive_entropy = c.get("adaptive", False)
    t._entropy_bonus_enabled = c["entropy_coef"] != 0.0 or t.use_adaptive_entropy
    t.entropy_coef, t._last_world_entropy, t._entropy_window_stats = c["entropy_coef"], float("inf"), None
    kp, lp_, kn, ln = c["vespo"]
    t.args = SimpleNamespace(delta=c["delta"], use_bias_correction_kl=c["use_bias_correction_kl"],
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, steps_per_generation=2,
                             vespo_k_pos=kp, vespo_lambda_pos=lp_, vespo_k_neg=kn, vespo_lambda_neg=ln,
                             entropy_target=1.6, entropy_coef_delta=0.004, entropy_coef_min=0.0,
                             entropy_coef_max=0.02)
    t.accelerator = accelerator or _Accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = SimpleNamespace(training=training)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (per_token_logps, entropies,
                                                            aux_loss if k.get("compute_aux_loss") else None)
    return t


def make_inputs(seed, B=6, T=21, per_token_adv=False, isr_shape="token", spread=0.4, nan_sampling=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * spread
    ref = logp + torch.randn(B, T, generator=g) * 1.5  # k3 values past verl's clamp: TRL has none
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[2] = 0  # an empty row
    ent = torch.rand(B, T, generator=g) * 2
    isr = torch.rand(B, T if isr_shape == "token" else 1, generator=g) + 0.5
    if isr_shape == "token":
        isr = torch.where(mask.bool(), isr, 1.0)  # TRL's ratio is exp(0) on padding
    sampling = old + torch.randn(B, T, generator=g) * 0.3
    if nan_sampling:
        sampling[0, :4] = float("nan")  # tokens vLLM could not score
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "importance_sampling_ratio": isr,
              "sampling_per_token_logps": sampling, "num_items_in_batch": mask.sum() * 2}
    return logp, ent, inputs


def trl_loss(loss_type, logp, ent, inputs, **cfg):
    """(loss, d loss / d logp, d loss / d entropies, logged metrics) of TRL's own _compute_loss."""
    lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    t = bare_trainer(loss_type, lp, e, **cfg)
    loss = t._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), lp.grad, e.grad, t._metrics["train" if cfg.get("training", True) else "eval"]


def ours(loss_type, logp, ent, inputs, **cfg):
    c = dict(CONFIG, **cfg)
    lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    use_is = c["use_vllm"] or loss_type == "vespo"
    kp, lp_, kn, ln = c["vespo"]
    loss, metrics = ft.grpo_loss(
        lp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"], loss_type=loss_type,
        epsilon_low=c["epsilon_low"], epsilon_high=c["epsilon_high"],
        delta=c["delta"], importance_sampling_level=c["importance_sampling_level"], beta=c["beta"],
        ref_per_token_logps=inputs["ref_per_token_logps"], use_bias_correction_kl=c["use_bias_correction_kl"],
        vespo_k_pos=kp, vespo_lambda_pos=lp_, vespo_k_neg=kn, vespo_lambda_neg=ln,
        off_policy_mask_threshold=c["off_policy_mask_threshold"],
        sampling_per_token_logps=inputs["sampling_per_token_logps"], top_entropy_quantile=c["top_entropy_quantile"],
        max_completion_length=c["max_completion_length"], num_items_in_batch=inputs["num_items_in_batch"],
        gradient_accumulation_steps=c["ga"], steps_per_generation=2, training=cfg.get("training", True),
        importance_sampling_ratio=inputs["importance_sampling_ratio"] if use_is else None, entropies=e,
        entropy_coef=c["entropy_coef"])
    loss.backward()
    return loss.detach(), lp.grad, e.grad, metrics


def assert_matches(got, want, loss_type, level, cfg):
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-8)
    if cfg.get("entropy_coef"):
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-9)
    else:
        assert want[2] is None and got[2] is None
    m, logged = got[3], want[3]
    keys = ["kl"] if cfg.get("beta") else []
    if loss_type == "vespo":
        keys.append("vespo/phi_seq_mean")
    elif loss_type == "cispo" and level == "token":
        keys.append("cispo_clip_ratio")
    elif loss_type != "sapo" and level == "token":
        keys += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    for key in keys + ["entropy"]:
        assert float(m[key]) == pytest.approx(logged[key][0], rel=1e-5, abs=1e-7), key


CONFIGS = {
    "plain": dict(),
    "kl_delta_bonus": dict(beta=0.04, delta=1.6, entropy_coef=0.01),
    "bias_kl": dict(beta=0.04, use_bias_correction_kl=True),
    "off_policy": dict(off_policy_mask_threshold=0.05, entropy_coef=0.01),
    "top_entropy": dict(top_entropy_quantile=0.4, entropy_coef=0.01, beta=0.02),
    "everything": dict(beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05,
                       top_entropy_quantile=0.3, entropy_coef=0.01, delta=1.6),
}


@pytest.mark.parametrize("loss_type,level", list(itertools.product(list(ft._TRL_LOSS_TYPES), ["token", "sequence"])))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grpo_loss_matches_trl_compute_loss(loss_type, level, name):
    cfg = dict(CONFIGS[name], importance_sampling_level=level)
    logp, ent, inputs = make_inputs(hash((loss_type, level, name)) % 997)
    got, want = ours(loss_type, logp, ent, inputs, **cfg), trl_loss(loss_type, logp, ent, inputs, **cfg)
    assert_matches(got, want, loss_type, level, cfg)


@pytest.mark.parametrize("loss_type", ["vespo", "grpo", "dapo"])
@pytest.mark.parametrize("variant", ["per_token_adv", "seq_isr", "nan_sampling", "eval", "no_vllm", "wide_ratios",
                                     "float64"])
def test_grpo_loss_variants_match_trl(loss_type, variant):
    cfg = dict(beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05, top_entropy_quantile=0.5,
               entropy_coef=0.01)
    kw = dict(per_token_adv=variant == "per_token_adv", isr_shape="seq" if variant == "seq_isr" else "token",
              nan_sampling=variant == "nan_sampling", spread=3.0 if variant == "wide_ratios" else 0.4)
    if variant == "eval":
        cfg["training"] = False
    if variant == "no_vllm":
        cfg["use_vllm"] = False
    logp, ent, inputs = make_inputs(17, **kw)
    if variant == "float64":
        logp, ent = logp.double(), ent.double()
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    if variant == "no_vllm" and loss_type != "vespo":
        del inputs["importance_sampling_ratio"]  # TRL never reads it then
    if variant == "no_vllm":
        del inputs["sampling_per_token_logps"]  # the off-policy mask falls back to old_per_token_logps
        inputs["sampling_per_token_logps"] = None
    want_inputs = {k: v for k, v in inputs.items() if v is not None}
    want = trl_loss(loss_type, logp, ent, want_inputs, **cfg)
    if "importance_sampling_ratio" not in inputs:
        inputs["importance_sampling_ratio"] = None
    got = ours(loss_type, logp, ent, inputs, **cfg)
    assert_matches(got, want, loss_type, "token", cfg)
    if variant == "wide_ratios" and loss_type == "vespo":
        assert float(got[3]["vespo/phi_seq_mean"]) < 0.5  # far off-policy rows are down-weighted


# TRL caps CISPO's weight at epsilon_high itself: GRPOConfig's default (epsilon_high=None -> epsilon,
# 0.2: GRPOTrainer.__init__) caps it below 1; 0.28, 1.0 and 4.0 at, around and far above the ratios.
@pytest.mark.parametrize("epsilon_high", [0.2, 0.28, 1.0, 4.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", ["plain", "kl_delta_bonus", "everything"])
def test_cispo_matches_trl_for_every_cap(epsilon_high, level, name):
    cfg = dict(CONFIGS[name], importance_sampling_level=level, epsilon_high=epsilon_high)
    logp, ent, inputs = make_inputs(61, spread=1.0)  # 3 of 6 advantages > 0
    got, want = ours("cispo", logp, ent, inputs, **cfg), trl_loss("cispo", logp, ent, inputs, **cfg)
    assert_matches(got, want, "cispo", level, cfg)
    if level == "token":  # the cap clips: TRL's logged fraction of r > epsilon_high with A > 0
        assert want[3]["cispo_clip_ratio"][0] > (0.1 if epsilon_high < 4.0 else 0.0)
    if epsilon_high != 4.0:  # and changes the loss
        cap4 = ours("cispo", logp, ent, inputs, **dict(cfg, epsilon_high=4.0))
        assert not torch.allclose(got[1], cap4[1])


def test_cispo_default_cap_is_trl_config_default():
    """The premise of the test above: a default GRPOConfig leaves epsilon_high None, GRPOTrainer then
    caps CISPO at epsilon (0.2)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(trl_grpo.GRPOConfig)}
    assert defaults["epsilon_high"] is None and defaults["epsilon"] == 0.2


@pytest.mark.parametrize("epsilon_high", [0.0, -0.1, float("inf"), float("nan")])
def test_cispo_bad_epsilon_high(epsilon_high):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"loss_type='cispo' needs a finite `epsilon_high` > 0 \(the cap of the "
                                         rf"importance ratio\), got {epsilon_high}"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="cispo", epsilon_high=epsilon_high,
                     num_items_in_batch=torch.tensor(2))


def test_masks_really_act():
    """Each configuration changes the loss (the tests above would pass on a no-op otherwise)."""
    logp, ent, inputs = make_inputs(5)
    base = ours("grpo", logp, ent, inputs, beta=0.04)
    for cfg in (dict(off_policy_mask_threshold=0.0), dict(top_entropy_quantile=0.3),
                dict(use_bias_correction_kl=True)):
        other = ours("grpo", logp, ent, inputs, beta=0.04, **cfg)
        assert not torch.allclose(other[1], base[1]), cfg
    # the high-entropy mask keeps ~30% of the valid tokens
    lp = logp.clone().requires_grad_(True)
    g = ft.grpo_loss(lp, None, inputs["advantages"], inputs["completion_mask"],  # on-policy: nothing clipped
                     loss_type="bnpo", top_entropy_quantile=0.3, entropies=ent)[0]
    g.backward()
    n = int(inputs["completion_mask"].sum())
    assert int((lp.grad != 0).sum()) == pytest.approx(0.3 * n, abs=2)


def test_vespo_phi_is_trl_gamma_weight():
    logp, ent, inputs = make_inputs(23, spread=1.0)
    mask = inputs["completion_mask"]
    adv = inputs["advantages"]
    isr = inputs["importance_sampling_ratio"]
    for kw in (dict(), dict(k_pos=0.5, lambda_pos=0.0, k_neg=1.0, lambda_neg=7.0)):
        want = trl_grpo.GRPOTrainer.get_gamma_weights(adv[:, None], logp - inputs["old_per_token_logps"], mask, isr,
                                                      **kw)
        args = [kw.get(k, d) for k, d in (("k_pos", 2.0), ("lambda_pos", 3.0), ("k_neg", 3.0), ("lambda_neg", 2.0))]
        got = ft._vespo_phi(adv[:, None], logp, inputs["old_per_token_logps"], mask != 0, isr, *args)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-30)
        assert (got > 0).any() and (got < 1).any()


def test_empty_batch_and_all_masked():
    logp, ent, inputs = make_inputs(3)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = torch.tensor(0)
    for loss_type in ("vespo", "grpo", "bnpo"):
        cfg = dict(beta=0.04, use_bias_correction_kl=True, top_entropy_quantile=0.2, off_policy_mask_threshold=0.1,
                   entropy_coef=0.01)
        got = ours(loss_type, logp, ent, inputs, **cfg)
        want = trl_loss(loss_type, logp, ent, inputs, **cfg)
        assert float(got[0]) == 0.0 and torch.all(got[1] == 0) and torch.all(got[2] == 0)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_masked_nan_is_never_read():
    logp, ent, inputs = make_inputs(13)
    pad = inputs["completion_mask"] == 0
    dirty = {k: (v.masked_fill(pad, float("nan")) if k in ("old_per_token_logps", "ref_per_token_logps",
                                                            "sampling_per_token_logps") else v)
             for k, v in inputs.items()}
    cfg = dict(beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05, top_entropy_quantile=0.5,
               entropy_coef=0.01)
    for loss_type in ("grpo", "vespo", "luspo"):
        clean = ours(loss_type, logp, ent, inputs, **cfg)
        got = ours(loss_type, logp.masked_fill(pad, float("nan")), ent.masked_fill(pad, float("nan")), dirty, **cfg)
        for a, b in zip(got[:3], clean[:3]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_bad_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="`loss_type` must be one of grpo, bnpo.*vespo; got 'ppo'"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="ppo")
    with pytest.raises(ValueError, match="`top_entropy_quantile` must be in \\(0, 1\\], got 0.0"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="grpo", top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="needs `entropies`"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="grpo", top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="needs `num_items_in_batch`"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="vespo")
    with pytest.raises(ValueError, match="needs `ref_per_token_logps`"):
        ft.grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2), loss_type="grpo", beta=0.1)


# ------------------------------------------------------------------------------ patched GRPOTrainer

@pytest.mark.parametrize("loss_type,name", [("grpo", "kl_delta_bonus"), ("dapo", "kl_delta_bonus"),
                                            ("cispo", "kl_delta_bonus"), ("sapo", "kl_delta_bonus"),
                                            ("vespo", "everything"), ("grpo", "everything"), ("luspo", "top_entropy"),
                                            ("bnpo", "off_policy"), ("dr_grpo", "bias_kl")])
def test_patched_grpo_trainer_matches_trl(loss_type, name, monkeypatch):
    logp, ent, inputs = make_inputs(31, B=5, T=16)
    cfg = dict(CONFIGS[name], max_completion_length=16, ga=2)
    results = []
    calls = []
    fused = ft.grpo_loss
    monkeypatch.setattr(ft, "grpo_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    for patched in (False, True):
        lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        t = bare_trainer(loss_type, lp, e, **cfg)
        try:
            if patched:
                ft.patch_grpo_trainer()
                ft.patch_grpo_trainer()  # idempotent
            loss = t._compute_loss(None, inputs)
        finally:
            ft.unpatch_grpo_trainer()
        loss.backward()
        results.append((loss.detach(), lp.grad, e.grad, t._metrics["train"]))
    assert len(calls) == 1  # the patched run took the fused path, not TRL's fallback
    (l0, g0, e0, m0), (l1, g1, e1, m1) = results
    assert trl_grpo.GRPOTrainer._compute_loss is not ft._fused_compute_loss
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=2e-5, atol=1e-8)
    if e0 is not None:
        torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-9)
    for key in ("kl", "entropy", "policy_loss", "entropy_coef", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "cispo_clip_ratio", "vespo/phi_seq_mean"):
        if key in m0:
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("loss_type", ["grpo", "vespo"])
def test_patched_trainer_adaptive_entropy_and_aux_loss_match_trl(loss_type):
    """Four micro-batches, two optimizer steps (accumulation 2): TRL's adaptive entropy controller
    state, the router aux loss, the losses, gradients and logged metrics, step by step."""
    batches = [make_inputs(60 + i, B=4, T=12) for i in range(4)]
    cfg = dict(adaptive=True, entropy_coef=0.01, top_entropy_quantile=0.5, ga=2, max_completion_length=12,
               aux_loss=torch.tensor(0.7))
    runs = []
    for patched in (False, True):
        t = bare_trainer(loss_type, None, None, **cfg)
        out = []
        try:
            if patched:
                ft.patch_grpo_trainer()
            for i, (logp, ent, inputs) in enumerate(batches):
                lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
                t._get_per_token_logps_and_entropies = lambda *a, lp=lp, e=e, **k: (lp, e, cfg["aux_loss"])
                t.accelerator.sync_gradients = i % 2 == 1
                loss = t._compute_loss(None, inputs)
                loss.backward()
                out.append((loss.detach(), lp.grad, torch.zeros_like(e) if e.grad is None else e.grad,
                            t.entropy_coef, t._last_world_entropy))
        finally:
            ft.unpatch_grpo_trainer()
        runs.append((out, t._metrics["train"]))
    (want, want_m), (got, got_m) = runs
    # the controller moved both ways and its bonus acted (the test can fail): coef 0.01 -> 0.014 (world
    # entropy <= target) -> 0.010 (above), and the second window applies the bonus
    assert [w[3] for w in want] == pytest.approx([0.01, 0.014, 0.014, 0.010])
    assert torch.all(want[0][2] == 0) and want[2][2].abs().sum() > 0
    for g, w in zip(got, want):
        for a, b in zip(g[:3], w[:3]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-8)
        assert g[3] == pytest.approx(w[3]) and g[4] == pytest.approx(w[4])
    assert set(got_m) >= {"aux_loss", "entropy_coef", "policy_loss"}
    for key, values in want_m.items():
        if key in got_m:
            assert got_m[key] == pytest.approx(values, rel=1e-5, abs=1e-7), key


# ----------------------------------------------------------------- entropy quantile over 2 gloo ranks

def _dp_worker(rank, world_size, init_method, shards, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        logp, ent, inputs = shards[rank]
        cfg = dict(top_entropy_quantile=0.35, entropy_coef=0.01, beta=0.04, use_bias_correction_kl=True)
        out = {}
        for loss_type in ("grpo", "vespo"):
            want = trl_loss(loss_type, logp, ent, inputs, accelerator=_DistAccelerator(), **cfg)[:3]
            kw = dict(loss_type=loss_type, epsilon_high=0.28, beta=0.04, use_bias_correction_kl=True,
                      ref_per_token_logps=inputs["ref_per_token_logps"], top_entropy_quantile=0.35,
                      entropy_coef=0.01, max_completion_length=25, num_items_in_batch=inputs["num_items_in_batch"],
                      num_processes=2, gradient_accumulation_steps=3, steps_per_generation=2,
                      importance_sampling_ratio=inputs["importance_sampling_ratio"])
            args = (inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"])
            lp, e = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
            loss, _ = ft.grpo_loss(lp, *args, entropies=e, process_group=dist.group.WORLD, **kw)
            loss.backward()
            local = ft.grpo_loss(logp, *args, entropies=ent, **kw)[0]  # this rank's tokens only
            out[loss_type] = (want, (loss.detach(), lp.grad, e.grad), local)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_entropy_quantile_over_ranks_matches_trl(tmp_path):
    import torch.multiprocessing as mp

    shards = [make_inputs(41, B=4, T=19), make_inputs(42, B=4, T=19)]  # TRL gathers equal batch sizes
    shards[1][2]["completion_mask"][0, :] = 0
    mp.start_processes(_dp_worker, args=(2, f"file://{tmp_path}/init", shards, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    differs = []
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for loss_type, (want, got, local) in out.items():
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-8)
            differs.append(not torch.allclose(local, got[0]))
    assert any(differs)  # the gathered threshold is not each rank's own
