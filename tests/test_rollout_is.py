"""fastrl.losses.rollout_is_weights / rollout_rejection_mask: truncated / masked importance-sampling
weights and rejection sampling for rollout-trainer mismatch, against verl 0.9.1's rollout_corr_helper
(weights, masks and every metric), the fp64 references, as ``is_weights`` of policy_loss, the batch
normalization over 2 gloo ranks, edge cases, bad input, no host syncs."""
import itertools

import pytest
import torch

from fastrl.losses import RS_OPTIONS, policy_loss, rollout_is_weights, rollout_rejection_mask
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


# --------------------------------------------------------------------------- rejection sampling

def rs_spec(opt, kind):
    """A threshold spec of each form verl accepts, tight enough that both outcomes occur."""
    if opt.endswith("k1"):
        return {"seq_sum": "0.4_1.8", "token": "0.6_1.5", "seq_mean": "0.93_1.06"}[opt.rsplit("_", 1)[0]] \
            if kind == "pair" else {"seq_sum": "2.2", "token": "1.4", "seq_mean": "1.05"}[opt.rsplit("_", 1)[0]]
    return {"token_k2": 0.02, "token_k3": 0.02, "seq_sum_k2": 0.15, "seq_sum_k3": 0.3, "seq_mean_k2": 0.012,
            "seq_mean_k3": 0.015, "seq_max_k2": 0.05, "seq_max_k3": 0.05}[opt]


def assert_metrics_match(m, want):
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].dim() == 0 and m[k].dtype == torch.float32
        torch.testing.assert_close(m[k], torch.tensor(v, dtype=torch.float32), rtol=2e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt,kind", [(o, k) for o in RS_OPTIONS for k in (["pair", "upper"] if o.endswith("k1")
                                                                          else ["upper"])])
def test_rejection_matches_verl(opt, kind, dtype):
    logp, roll, mask = make(9, 31, seed=RS_OPTIONS.index(opt), dtype=dtype, spread=0.15)
    spec = rs_spec(opt, kind)
    want_mask, want_m = rc.compute_rollout_rejection_mask(logp - roll, mask.to(dtype), rollout_rs=opt,
                                                          rollout_rs_threshold=spec)
    got, m = rollout_rejection_mask(logp, roll, mask.to(dtype), rs=opt, threshold=spec)
    assert got.dtype == dtype and torch.equal(got, want_mask)
    kept = int(got.sum())
    assert 0 < kept < int(mask.sum()), "both outcomes must occur"
    assert_metrics_match(m, want_m)
    # the fp64 loop reference and the other mask dtypes
    lower, upper = (tuple(float(v) for v in spec.split("_")) if isinstance(spec, str) and "_" in spec
                    else (1 / float(spec) if opt.endswith("k1") else None, float(spec)))
    ref_keep = ref.rollout_rejection_mask(logp, roll, mask, options=[opt], bounds={opt: (lower, upper)})
    assert torch.equal(got != 0, ref_keep)
    for mdtype in (torch.bool, torch.int64):
        other, _ = rollout_rejection_mask(logp, roll, mask.to(mdtype), rs=opt, threshold=spec)
        assert other.dtype == mdtype and torch.equal(other != 0, ref_keep)


@pytest.mark.parametrize("rs,spec", [
    ("token_k1,seq_mean_k3,seq_max_k2", "0.6_1.5,0.006,0.05"),
    ("seq_sum_k1, seq_sum_k2,seq_sum_k1", "2.2,0.15"),  # a repeat is dropped, as verl
    ("token_k2,seq_mean_k1", "1.04"),  # one spec shared: k2's upper bound, k1's 1/upper_upper
])
def test_chained_options_match_verl(rs, spec):
    logp, roll, mask = make(8, 27, seed=4, spread=0.15)
    want = rc.compute_rollout_rejection_mask(logp - roll, mask.float(), rollout_rs=rs, rollout_rs_threshold=spec)
    got = rollout_rejection_mask(logp, roll, mask.float(), rs=rs, threshold=spec)
    assert torch.equal(got[0], want[0])
    assert_metrics_match(got[1], want[1])
    assert 0 < int(got[0].sum()) < int(mask.sum())
    # the list forms of the same options and thresholds
    opts = list(dict.fromkeys(o.strip() for o in rs.split(",")))
    parts = [tuple(float(v) for v in p.split("_")) if "_" in p else float(p) for p in spec.split(",")]
    again = rollout_rejection_mask(logp, roll, mask, rs=opts, threshold=parts if len(parts) > 1 else parts[0])
    assert torch.equal(again[0], got[0] != 0)


def test_rejection_edges():
    logp, roll, mask = make(5, 13, seed=8)
    logp[~mask] = float("nan")  # never read
    got, m = rollout_rejection_mask(logp, roll, mask, rs="seq_max_k3,token_k1", threshold="0.5,0.5_2.0")
    assert not (got & ~mask).any() and all(torch.isfinite(v) for v in m.values())
    want, want_m = rc.compute_rollout_rejection_mask((logp - roll).nan_to_num(0.0), mask.float(),
                                                     rollout_rs="seq_max_k3,token_k1",
                                                     rollout_rs_threshold="0.5,0.5_2.0")
    assert torch.equal(got, want.bool())
    empty = torch.zeros_like(mask)
    got, m = rollout_rejection_mask(logp, roll, empty, rs="seq_mean_k1", threshold=1.5)  # verl raises here
    assert not got.any() and all(float(v) == 0 for v in m.values())
    got, m = rollout_rejection_mask(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), rs="token_k2",
                                    threshold=1.0)
    assert got.shape == (0, 4) and m == {}


def test_rejection_no_host_sync(monkeypatch):
    logp, roll, mask = make(4, 9, seed=13)
    meta = [t.to("meta") for t in (logp, roll, mask)]
    out, m = rollout_rejection_mask(*meta, rs=",".join(RS_OPTIONS), threshold=2.0)
    assert out.device.type == "meta" and all(v.device.type == "meta" for v in m.values())

    def boom(*a, **k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    rollout_rejection_mask(logp, roll, mask, rs=",".join(RS_OPTIONS), threshold=2.0)


@pytest.mark.parametrize("kw,match", [
    (dict(rs="token_k4", threshold=1.0), r"`rs` must name options among token_k1, .*; got 'token_k4'"),
    (dict(rs="seq_max_k1", threshold=1.0), "`rs` must name options"),
    (dict(rs="", threshold=1.0), "`rs` must name options"),
    (dict(rs="token_k1"), "`threshold` is required"),
    (dict(rs="token_k2", threshold="0.5_2.0"), "single upper bound"),
    (dict(rs="token_k1", threshold="2.0_0.5"), r"lower <= upper \(.*\), got '2.0_0.5'"),
    (dict(rs="token_k1", threshold=-1.0), "positive finite bounds"),
    (dict(rs="seq_mean_k1", threshold=0.5), "a k1 upper bound alone must be >= 1"),  # verl: lower 2 > upper
    (dict(rs="token_k1", threshold="abc"), "positive finite bounds"),
    (dict(rs="token_k1,token_k2", threshold="1.5,0.1,0.2"), r"one spec or one per option \(2\), got 3"),
])
def test_rejection_bad_input(kw, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        rollout_rejection_mask(x, x, torch.ones(2, 3), **kw)
    with pytest.raises(ValueError, match="fastrl: rollout_rejection_mask `mask` must have"):
        rollout_rejection_mask(x, x, torch.ones(3, 2), rs="token_k1", threshold=2.0)


# ------------------------------------------------------- batch normalization over 2 gloo ranks

def _dp_worker(rank, world_size, init_method, shards, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        logp, roll, mask = shards[rank]
        out = {}
        for level, spec in itertools.product(["token", "sequence"], [1.5, "0.5_2.0"]):
            # verl takes the distributed mean whenever torch.distributed is initialized
            want, _ = verl_weights(logp, roll, mask, level, spec, True)
            got, m = rollout_is_weights(logp, roll, mask, level=level, batch_normalize=True,
                                        process_group=dist.group.WORLD, **ours_args(spec))
            out[(level, str(spec))] = (got, want, m["rollout_is_batch_norm_factor"])
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_batch_normalize_over_ranks_matches_verl_and_one_process(tmp_path):
    import torch.multiprocessing as mp

    logp, roll, mask = make(9, 23, seed=19, spread=0.05)
    shards = [(logp[:4], roll[:4], mask[:4]), (logp[4:], roll[4:], mask[4:])]  # uneven shards, an empty row in 0
    mp.start_processes(_dp_worker, args=(2, f"file://{tmp_path}/init", shards, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for level, spec in itertools.product(["token", "sequence"], [1.5, "0.5_2.0"]):
        key = (level, str(spec))
        for r in range(2):
            torch.testing.assert_close(got[r][key][0], got[r][key][1], rtol=1e-6, atol=1e-7)  # == verl on the rank
        assert float(got[0][key][2]) == float(got[1][key][2]) != 1.0  # one global factor
        single, m = rollout_is_weights(logp, roll, mask, level=level, batch_normalize=True, **ours_args(spec))
        torch.testing.assert_close(torch.cat([got[0][key][0], got[1][key][0]]), single, rtol=1e-6, atol=1e-7)
        local, _ = rollout_is_weights(*shards[0], level=level, batch_normalize=True, **ours_args(spec))
        assert not torch.allclose(local, got[0][key][0])  # the group mean is not rank 0's own
