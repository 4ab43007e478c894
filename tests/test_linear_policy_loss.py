"""fastrl.losses.linear_policy_loss: hidden states -> policy loss without the [N, V] logits, against the
materialized compositions (fp64 reference; fastrl.logprobs on full logits + policy_loss), layouts,
masked tokens, memory (O(chunk x V), not O(N x V)), bad input.

No opcheck here: linear_policy_loss is a Python composition of the custom ops fastrl::linear_logprobs
and fastrl::policy_loss_rows, which tests/test_linear_logprobs.py and tests/test_losses.py opcheck."""
import importlib

import pytest
import torch

from fastrl.logprobs import logprobs
from fastrl.losses import linear_policy_loss, policy_loss
from fastrl.reference import losses as ref

fll = importlib.import_module("fastrl.linear_logprobs")


def make(B=4, T=11, H=12, V=53, *, seed=0, dtype=torch.float64, bias=True, per_row_adv=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.75).long()
    mask[1] = 0  # an empty row
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4 - 2  # log-probs near the model's ~ -4
    refl = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B if per_row_adv else (B, T), generator=g, dtype=torch.float64)
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), labels=labels, old_logp=cast(old),
                advantages=cast(adv), mask=mask, ref_logp=cast(refl), is_weights=cast(isw))


def run(fn, inp, **kw):
    """(loss, metrics, grad_hidden, grad_weight, grad_bias) of fn on leaf copies."""
    leaves = {k: inp[k].clone().requires_grad_(True) for k in ("hidden", "weight") if inp[k] is not None}
    b = inp["bias"].clone().requires_grad_(True) if inp["bias"] is not None else None
    extra = {k: inp[k] for k in ("ref_logp", "is_weights") if k not in kw}
    loss, metrics = fn(leaves["hidden"], leaves["weight"], inp["labels"], inp["old_logp"], inp["advantages"],
                       inp["mask"], bias=b, **extra, **kw)
    loss.backward()
    return loss.detach(), metrics, leaves["hidden"].grad, leaves["weight"].grad, None if b is None else b.grad


def materialized_fastrl(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                        with_entropy=None, **kw):
    """What a user writes today: full logits, then fastrl.logprobs and policy_loss."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    with_entropy = kw.get("entropy_coef", 0.0) != 0 if with_entropy is None else with_entropy
    lp, ent = logprobs(logits, torch.where(mask != 0, labels, -100), temperature=temperature, return_entropy=True)
    return policy_loss(lp, old_logp, advantages, mask, entropy=ent if with_entropy else None, **kw)


def assert_close_runs(got, want, rtol, atol, metric_tol=1e-5):
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=rtol, atol=atol)
    for g, w, name in zip(got[2:], want[2:], ("hidden", "weight", "bias")):
        if w is not None:
            torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=f"grad {name}")
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=metric_tol, atol=metric_tol, msg=k)


CASES = [("vanilla", "token-mean"), ("vanilla", "seq-mean-token-mean"), ("gspo", "seq-mean-token-mean"),
         ("cispo", "token-sum"), ("sapo", "grpo"), ("gpg", "seq-mean-token-sum-norm"), ("geo_mean", "token-mean"),
         ("vanilla", "dr_grpo"), ("clip_cov", "token-mean")]


@pytest.mark.parametrize("kind,agg", CASES)
def test_matches_fp64_materialized_reference(kind, agg):
    inp = make(seed=CASES.index((kind, agg)))
    kw = dict(kind=kind, agg=agg, kl_coef=0.1, kl_kind="k3", entropy_coef=0.02, temperature=0.8,
              dual_clip=3.0 if kind == "vanilla" else None)
    if kind == "clip_cov":
        kw.pop("dual_clip")
        kw.update(cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    got = run(linear_policy_loss, inp, **kw)
    want = run(ref.linear_policy_loss, inp, **kw) if kind != "clip_cov" else run(materialized_fastrl, inp, **kw)
    # the log-softmax is fp32 in fastrl (float64 inputs included): fp32-level agreement
    assert_close_runs(got, want, rtol=1e-4, atol=2e-6)
    assert got[2][inp["mask"] == 0].abs().max() == 0  # masked tokens: no gradient to their hidden states
    assert got[3].abs().sum() > 0


@pytest.mark.parametrize("kind", ["vanilla", "gspo", "sapo"])
def test_matches_fastrl_materialized_fp32(kind):
    inp = make(3, 16, 24, 301, seed=7, dtype=torch.float32, per_row_adv=True)
    kw = dict(kind=kind, agg="token-mean", kl_coef=0.05, kl_kind="low_var_kl", entropy_coef=0.01)
    got = run(linear_policy_loss, inp, chunk_size=5, **kw)
    want = run(materialized_fastrl, inp, **kw)
    assert got[0].dtype == torch.float32
    assert_close_runs(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_packed_equals_padded(agg):
    inp = make(4, 10, seed=19, dtype=torch.float32)
    m = inp["mask"].bool()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), m.sum(-1).cumsum(0)])
    packed = {k: (v[m] if v is not None and v.shape[:2] == m.shape else v) for k, v in inp.items()}
    packed["mask"] = torch.ones(int(m.sum()), dtype=torch.bool)
    kw = dict(agg=agg, kl_coef=0.1, entropy_coef=0.05)
    got = run(linear_policy_loss, packed, cu_seqlens=cu, **kw)
    want = run(linear_policy_loss, inp, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2][m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)


def test_masked_tokens_skip_the_matmul(monkeypatch):
    inp = make(3, 9, seed=23, dtype=torch.float32)
    rows = []
    real = fll._chunk_logits
    monkeypatch.setattr(fll, "_chunk_logits", lambda h, w, b, buf: rows.append(h.shape[0]) or real(h, w, b, buf))
    run(linear_policy_loss, inp, entropy_coef=0.01)
    n = int(inp["mask"].sum())
    assert sum(rows) == 2 * n  # forward + recomputing backward, valid rows only


def test_entropy_only_for_metrics_and_zero_coefficient():
    inp = make(seed=29, dtype=torch.float32)
    plain = run(linear_policy_loss, inp)
    with_h = run(linear_policy_loss, inp, with_entropy=True)
    assert "entropy_mean" not in plain[1] and "entropy_mean" in with_h[1]
    want = run(ref.linear_policy_loss, inp, with_entropy=True)
    torch.testing.assert_close(with_h[1]["entropy_mean"], want[1]["entropy_mean"], rtol=1e-5, atol=1e-6)
    for a, b in zip(plain[2:4], with_h[2:4]):  # the metrics-only entropy adds nothing to the gradients
        torch.testing.assert_close(a, b)


def test_half_precision_hidden():
    inp = make(3, 8, 16, 97, seed=31, dtype=torch.float32)
    want = run(linear_policy_loss, inp, kl_coef=0.1, entropy_coef=0.01)
    low = dict(inp, hidden=inp["hidden"].bfloat16(), weight=inp["weight"].bfloat16(), bias=inp["bias"].bfloat16())
    got = run(linear_policy_loss, low, kl_coef=0.1, entropy_coef=0.01)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=0.05, atol=0.02)
    torch.testing.assert_close(got[3].float(), want[3], rtol=0.1, atol=0.02)


def _memory_trace(fn):
    """(peak live bytes, largest single allocation) of fn() from the CPU profiler: each op's own
    allocations minus frees, and the frees outside any op, summed in time order (op granularity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = biggest = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        level += delta
        peak, biggest = max(peak, level), max(biggest, delta)
    return peak, biggest


def test_peak_memory_is_o_chunk_times_vocab_not_n_times_vocab(monkeypatch):
    from fastrl.bench.measure import cpu_peak_supported, peak_extra_bytes
    from fastrl import linear_logprobs_ops as fll  # the module (fastrl.linear_logprobs is the function)

    # N large enough that the [N, V] logits (64 MiB) dwarf the process's per-thread noise (a 16-core
    # machine's thread pools added ~4.5 MiB of resident memory to the fused call at N = 1024)
    N, V, H, chunk = 4096, 4096, 16, 32
    g = torch.Generator().manual_seed(37)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    old, adv = -torch.rand(N, generator=g) * 3 - 6, torch.randn(N, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    cu = torch.tensor([0, N // 2, N])

    def fused():
        loss, _ = linear_policy_loss(hidden, weight, labels, old, adv, mask, cu_seqlens=cu, entropy_coef=0.01,
                                     chunk_size=chunk)
        loss.backward()

    def materialized():
        loss, _ = materialized_fastrl(hidden, weight, labels, old, adv, mask, cu_seqlens=cu, entropy_coef=0.01)
        loss.backward()

    monkeypatch.setattr(fll, "CHUNK_BYTES", chunk * V * 4)  # 32-row matmul tiles (the default would be 256)
    nv, cv = N * V * 4, chunk * V * 4
    m_peak, m_biggest = _memory_trace(materialized)
    assert m_biggest >= nv and m_peak >= nv  # the trace does see the [N, V] logits of the materialized path
    peak, biggest = _memory_trace(fused)
    assert biggest <= max(cv, V * H * 4) and peak <= 2 * cv + 2 * V * H * 4 + 64 * N, (peak, biggest)
    if cpu_peak_supported():  # the process's peak resident memory agrees (page granularity, everything counted)
        assert peak_extra_bytes(fused, "cpu") < nv // 4 < peak_extra_bytes(materialized, "cpu")


@pytest.mark.parametrize("kw,match", [
    ({"entropy": torch.zeros(4, 11)}, "do not pass `entropy`"),
    ({"entropy_coef": 0.1, "with_entropy": False}, "needs the entropy"),
    ({"mask": torch.ones(4, 10)}, r"`mask` must have `labels`' shape \(4, 11\), got \(4, 10\)"),
    ({"weight": torch.randn(53, 7, dtype=torch.float64)}, r"`weight` must be \[V, H=12\]"),
    ({"labels": torch.zeros(4, 11)}, "`labels` must be an integer tensor"),
    ({"temperature": 0.0}, "`temperature` must be a finite number > 0"),
    ({"kind": "ppo"}, "`kind` must be one of"),
])
def test_bad_input(kw, match):
    inp = make(seed=41)
    args = [kw.pop(k, inp[k]) for k in ("hidden", "weight", "labels", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        linear_policy_loss(*args, **kw)
