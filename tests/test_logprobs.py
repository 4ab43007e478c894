"""fastrl.logprobs: log p(label), entropy and logsumexp from logits, forward and backward."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fastrl
from fastrl.reference import logprobs as ref
from _isa import ISAS, assert_same_bits, run_capped
from _optional import optional_module

TRL_UTILS = optional_module("trl.trainer.utils")
VERL_TF = optional_module("verl.utils.torch_functional")
import fastrl.integrations.trl as ftrl  # noqa: E402
import fastrl.integrations.verl as fverl  # noqa: E402


def make(shape, V, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, shape, generator=gen)
    if ignore_frac:
        labels = torch.where(torch.rand(shape, generator=gen) < ignore_frac, torch.full_like(labels, -100), labels)
    return logits, labels


def run_all(logits, labels, **kw):
    return fastrl.logprobs(logits, labels, return_entropy=True, return_lse=True, **kw)


@pytest.mark.parametrize("V", [1, 2, 7, 16, 17, 1000, 1024, 1025, 5000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_fp64_reference(V, temperature):
    logits, labels = make((3, 5), V, seed=V, ignore_frac=0.2)
    lp, ent, lse = run_all(logits, labels, temperature=temperature)
    rlp, rent, rlse = ref.logprobs(logits, labels, temperature=temperature)
    assert lp.dtype == ent.dtype == lse.dtype == torch.float32 and lp.shape == labels.shape
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-6, atol=1e-5)
    assert torch.all(lp[labels == -100] == 0)


def test_return_forms_and_module_alias():
    logits, labels = make((4,), 33)
    lp = fastrl.logprobs(logits, labels)
    assert isinstance(lp, torch.Tensor)
    lp2, lse = fastrl.logprobs(logits, labels, return_lse=True)
    lp3, ent = fastrl.logprobs(logits, labels, return_entropy=True)
    assert torch.equal(lp, lp2) and torch.equal(lp, lp3) and lse.shape == ent.shape == (4,)
    assert fastrl.logprobs_ops.logprobs is fastrl.logprobs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_exact_in_fp32(dtype):
    logits, labels = make((6, 3), 3000, dtype=dtype, seed=3)
    lp, ent, lse = run_all(logits, labels, temperature=0.9)
    rlp, rent, rlse = ref.logprobs(logits, labels, temperature=0.9)  # fp64 of the same bf16/fp16 values
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-6, atol=1e-5)


def test_noncontiguous_and_strided_rows():
    logits, labels = make((4, 6), 300, seed=5)
    sliced = logits[:, :-1, :]             # rows with a gap (verl's logits[:, :-1])
    transposed = logits.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous
    for x in (sliced, transposed):
        y = labels[:, : x.shape[1]]
        torch.testing.assert_close(run_all(x, y), run_all(x.contiguous(), y), rtol=0, atol=0)


def reference_grads(logits, labels, weights, temperature):
    x = logits.detach().double().requires_grad_(True)
    lp, ent, lse = ref.logprobs(x, labels, temperature=temperature)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum() + (lse * weights[2]).sum()).backward()
    return x.grad


@pytest.mark.parametrize("which", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_backward_matches_reference(which, temperature):
    logits, labels = make((5, 2), 1100, seed=11, ignore_frac=0.3)
    gen = torch.Generator().manual_seed(12)
    weights = [torch.randn(labels.shape, generator=gen, dtype=torch.float64) * w for w in which]
    x = logits.clone().requires_grad_(True)
    lp, ent, lse = run_all(x, labels, temperature=temperature)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum() + (lse * weights[2]).sum()).backward()
    want = reference_grads(logits, labels, weights, temperature)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-4, atol=1e-6)
    assert torch.all(x.grad[labels == -100] == 0) or which != (1, 0, 0)


def test_backward_of_logprob_alone_and_ignored_rows():
    logits, labels = make((8,), 50, seed=2, ignore_frac=0.5)
    x = logits.clone().requires_grad_(True)
    fastrl.logprobs(x, labels).sum().backward()
    ignored = labels == -100
    assert ignored.any() and (~ignored).any()
    assert torch.all(x.grad[ignored] == 0)
    p = torch.softmax(logits.double(), -1)
    want = torch.nn.functional.one_hot(labels.clamp(min=0), 50).double() - p
    torch.testing.assert_close(x.grad[~ignored].double(), want[~ignored], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_low_precision(dtype):
    logits, labels = make((4,), 700, dtype=dtype, seed=4)
    x = logits.clone().requires_grad_(True)
    lp, ent = fastrl.logprobs(x, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.dtype == dtype
    want = reference_grads(logits, labels, [torch.ones(4), torch.ones(4), torch.zeros(4)], 1.0)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-2, atol=1e-3 if dtype == torch.float16 else 4e-3)


def test_gradcheck_fp64_inputs():
    # The kernel computes in fp32 (also for float64 logits), so finite differences use a larger step
    # and tolerance than gradcheck's fp64 defaults; test_backward_matches_reference is the tight check.
    logits, labels = make((3,), 6, dtype=torch.float64, seed=9, scale=1.0)
    labels[1] = -100
    x = logits.requires_grad_(True)
    for fn in (lambda t: fastrl.logprobs(t, labels, temperature=0.8).double(),
               lambda t: fastrl.logprobs(t, labels, temperature=0.8, return_entropy=True)[1].double(),
               lambda t: tuple(o.double() for o in run_all(t, labels, temperature=1.3))):
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_opcheck():
    logits, labels = make((6,), 40, seed=1, ignore_frac=0.3)
    for entropy in (True, False):
        torch.library.opcheck(torch.ops.fastrl.logprobs.default, (logits, labels, 0.9, -100, entropy))
    lp, ent, lse = torch.ops.fastrl.logprobs(logits, labels, 0.9, -100, True)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.fastrl.logprobs_backward.default,
                          (logits, labels, lse, ent, g, g, None, 0.9, -100))


def test_torch_compile_has_no_graph_break():
    logits, labels = make((3,), 20)
    compiled = torch.compile(lambda a, b: fastrl.logprobs(a, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits, labels), fastrl.logprobs(logits, labels) * 2)


def test_batch_invariance_and_thread_count():
    logits, labels = make((64,), 4099, seed=21, ignore_frac=0.1)
    full = run_all(logits, labels, temperature=0.8)
    for rows in (slice(0, 1), slice(5, 6), slice(10, 37)):
        part = run_all(logits[rows], labels[rows], temperature=0.8)
        for a, b in zip(part, full):
            assert torch.equal(a, b[rows])
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(run_all(logits[shuffled], labels[shuffled], temperature=0.8), full):
        assert torch.equal(a, b[shuffled])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_all(logits, labels, temperature=0.8)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(single, full):
        assert torch.equal(a, b)


NAN, INF = float("nan"), float("inf")


def special_rows(V, dtype, seed):
    """Random rows of each special kind of fastrl.logprobs' docstring table, and a label per row
    (on a finite logit where there is one)."""
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(7, V, generator=gen)
    pos = torch.randint(1, V, (7,), generator=gen)
    x[0, torch.rand(V, generator=gen) < 0.3] = -INF  # finite and -inf: an ordinary row
    x[0, pos[0]], x[0, 0] = 0.5, -INF
    x[1, pos[1]] = INF  # one +inf
    x[2, 1:] = torch.where(torch.rand(V - 1, generator=gen) < 0.5, INF, -INF)  # +inf and -inf
    x[3, pos[3]] = NAN  # one NaN among finite logits
    x[4] = NAN  # only NaN
    x[5] = torch.where(torch.rand(V, generator=gen) < 0.5, NAN, -INF)  # NaN and -inf
    x[6] = -INF  # only -inf
    labels = torch.where(x[:, 0] > -INF, 0, pos)
    labels[0] = pos[0]
    return x.to(dtype), labels


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("V, dtype", [(40, torch.float32), (3000, torch.float32), (40, torch.bfloat16),
                                      (1500, torch.float16)])
def test_special_values(V, dtype, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    logits, labels = special_rows(V, dtype, seed=V)
    x = logits.clone().requires_grad_(True)
    lp, ent, lse = run_all(x, labels, temperature=0.8)
    # the docstring's table, row by row: (log-prob, entropy, lse) finite / NaN / -inf
    assert torch.isfinite(torch.stack([lp[0], ent[0], lse[0]])).all()
    assert lp[1:].isnan().all() and ent[1:].isnan().all()
    assert lse[1:6].isnan().all() and lse[6] == -INF
    # what the fp64 reference says of the same rows (ordinary rows to fp32 accuracy)
    rlp, rent, rlse = ref.logprobs(logits, labels, temperature=0.8)
    for got, want in ((lp, rlp), (ent, rent), (lse, rlse)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, equal_nan=True)
    # gradients: NaN in every element of a special row (ignored label included), finite otherwise
    lp_ignored = fastrl.logprobs(x, torch.full_like(labels, -100), temperature=0.8)
    assert torch.equal(lp_ignored, torch.zeros(7))
    (lp.sum() + ent.sum() + lse.sum() + lp_ignored.sum()).backward()
    assert torch.isfinite(x.grad[0]).all() and x.grad[1:].isnan().all()
    grad_ignored, = torch.autograd.grad(fastrl.logprobs(x, torch.full_like(labels, -100)).sum(), x)
    assert torch.equal(grad_ignored[0], torch.zeros(V, dtype=dtype)) and grad_ignored[1:].isnan().all()
    # a label on a -inf logit of an ordinary row: log-prob -inf, gradient 1 there
    y = labels.clone()
    y[0] = 0
    x.grad = None
    lp = fastrl.logprobs(x, y, temperature=0.8)
    assert lp[0] == -INF
    lp[0].backward()
    assert x.grad[0, 0] == 1 / 0.8 and torch.isfinite(x.grad[0]).all()


def test_nan_in_the_first_merged_state_is_not_skipped():
    # merging two probability-0 partial states (max -inf) must keep a NaN of either
    x = torch.tensor([[NAN, 1.0, 2.0], [NAN, NAN, NAN]])
    lp, ent, lse = run_all(x, torch.tensor([1, 1]))
    assert lp.isnan().all() and ent.isnan().all() and lse.isnan().all()


def test_trivial_sizes():
    lp, ent, lse = run_all(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    assert torch.equal(lp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4))
    empty = run_all(torch.randn(0, 10), torch.zeros(0, dtype=torch.long))
    assert all(t.shape == (0,) for t in empty)
    x = torch.randn(2, 0, 10, requires_grad=True)
    fastrl.logprobs(x, torch.zeros(2, 0, dtype=torch.long)).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "logits, labels, kw, exc, match",
    [
        (torch.randn(3, 5), torch.tensor([0, 5, 1]), {}, RuntimeError, r"labels\[1\] = 5"),
        (torch.randn(3, 5), torch.tensor([0, 1, -1]), {}, RuntimeError, r"labels\[2\] = -1"),
        (torch.randn(3, 5), torch.zeros(4, dtype=torch.long), {}, ValueError, "`labels` must have shape"),
        (torch.randn(3, 5), torch.zeros(3), {}, RuntimeError, "`labels` must be Long"),
        (torch.randint(0, 3, (3, 5)), torch.zeros(3, dtype=torch.long), {}, RuntimeError, "`logits` must be a floating"),
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": 0.0}, RuntimeError, "`temperature`"),
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": -1.0}, RuntimeError, "`temperature`"),
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), {"temperature": float("inf")}, RuntimeError, "`temperature`"),
        (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}, ValueError, "vocabulary dimension"),
        (torch.tensor(1.0), torch.tensor(0), {}, ValueError, "`logits` must be a tensor of shape"),
    ],
)
def test_bad_input(logits, labels, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastrl.logprobs(logits, labels, **kw)


def test_bad_label_position_is_flattened_and_first():
    logits = torch.randn(2, 3, 8)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 0] = 8
    labels[1, 2] = 99
    with pytest.raises(RuntimeError, match=r"labels\[3\] = 8"):
        fastrl.logprobs(logits, labels)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_device_mismatch_is_refused_before_dispatch(backend, monkeypatch):
    # CPU logits with meta labels would dispatch to the fake (meta) kernel and return uninitialised
    # CPU memory; the C++ device check is never reached then
    if backend == "reference":
        monkeypatch.setattr(fastrl._extension, "BACKEND", "reference")
    logits, labels = make((2, 3), 11)
    with pytest.raises(ValueError, match="`labels` is on meta but `logits` is on cpu"):
        fastrl.logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="`labels` is on cpu but `logits` is on meta"):
        fastrl.logprobs(logits.to("meta"), labels, return_entropy=True)
    with pytest.raises(ValueError, match="`labels` is on meta but `logits` is on cpu"):
        fastrl.logprobs(logits.requires_grad_(True), labels.to("meta")[..., None], inplace_backward=True)
    if backend == "compiled":  # both on meta: the fake kernel gives the shapes
        lp, ent, lse = run_all(logits.to("meta"), labels.to("meta"))
        assert lp.device.type == "meta" and lp.shape == ent.shape == lse.shape == (2, 3)


def test_narrow_integer_labels_are_widened():
    logits, labels = make((5,), 30)
    assert torch.equal(fastrl.logprobs(logits, labels.int()), fastrl.logprobs(logits, labels))


def test_reference_backend_runs_without_the_extension_ops():
    code = ("import torch, fastrl; x = torch.randn(3, 9); y = torch.tensor([1, 2, -100]);"
            "print(fastrl.logprobs(x, y, return_entropy=True)[1].dtype)")
    env = {"FASTRL_BACKEND": "reference", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"


# ------------------------------------------------------------------------------------ drop-ins


def err64(got, truth):
    return (got.double() - truth).abs().max().item()


def test_trl_selective_log_softmax_fp32():
    logits, labels = make((3, 7), 500, seed=31)
    for T in (1.0, 0.7):
        torch.testing.assert_close(ftrl.selective_log_softmax(logits, labels, T),
                                   TRL_UTILS.selective_log_softmax(logits, labels, T), rtol=1e-5, atol=1e-5)
    topk = torch.randint(0, 500, (3, 7, 4))
    got = ftrl.selective_log_softmax(logits, topk, 0.9)
    torch.testing.assert_close(got, TRL_UTILS.selective_log_softmax(logits, topk, 0.9), rtol=1e-5, atol=1e-5)
    mask = torch.rand(3, 7) < 0.5
    got = ftrl.selective_log_softmax(logits, labels, row_mask=mask)
    torch.testing.assert_close(got, TRL_UTILS.selective_log_softmax(logits, labels, row_mask=mask))
    with pytest.raises(ValueError, match="temperature must be positive"):
        ftrl.selective_log_softmax(logits, labels, 0.0)


def test_trl_entropy_fp32_and_gradient():
    logits, _ = make((2, 9), 300, seed=32)
    torch.testing.assert_close(ftrl.entropy_from_logits(logits, chunk_size=4),
                               TRL_UTILS.entropy_from_logits(logits, chunk_size=4), rtol=1e-5, atol=1e-5)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ftrl.entropy_from_logits(a).sum().backward()
    TRL_UTILS.entropy_from_logits(b).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_verl_fp32_and_gradient():
    logits, labels = make((2, 9), 300, seed=33)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = fverl.logprobs_from_logits(a, labels), VERL_TF.logprobs_from_logits(b, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fverl.entropy_from_logits(logits), VERL_TF.entropy_from_logits(logits),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="`labels` must lie in"):
        fverl.logprobs_from_logits(logits, torch.full((2, 9), -100))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-4, atol=1e-6)),
                                        (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))])
def test_verl_entropy_gradient(dtype, tol):
    # verl differentiates its entropy through softmax / logsumexp; ours is the kernel's entropy backward
    logits, _ = make((3, 7), 900, dtype=dtype, seed=35)
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(36)).to(dtype)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = fverl.entropy_from_logits(a), VERL_TF.entropy_from_logits(b)
    assert got.dtype == want.dtype == dtype
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert a.grad.dtype == b.grad.dtype == dtype
    x = logits.double().requires_grad_(True)  # the fp64 gradient of the entropy of the same logits
    (ref.logprobs(x, torch.zeros(3, 7, dtype=torch.long))[1] * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), x.grad, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(a.grad, b.grad, **tol)
    else:  # verl's bf16 softmax / logsumexp chain is off by up to ~40% on small entries: ours is closer
        assert err64(a.grad, x.grad) < err64(b.grad, x.grad)


def test_dropins_bf16_at_least_as_accurate_as_trainers():
    logits, labels = make((4, 64), 4000, dtype=torch.bfloat16, seed=34)
    truth_lp, truth_ent, _ = ref.logprobs(logits, labels)
    ours = [ftrl.selective_log_softmax(logits, labels), fverl.logprobs_from_logits(logits, labels)]
    theirs = [TRL_UTILS.selective_log_softmax(logits, labels), VERL_TF.logprobs_from_logits(logits, labels)]
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype == torch.bfloat16 and o.shape == t.shape
        assert err64(o, truth_lp) <= err64(t, truth_lp)
    for o, t in ((ftrl.entropy_from_logits(logits), TRL_UTILS.entropy_from_logits(logits)),
                 (fverl.entropy_from_logits(logits), VERL_TF.entropy_from_logits(logits))):
        assert o.dtype == t.dtype == torch.bfloat16
        assert err64(o, truth_ent) <= err64(t, truth_ent)
    # the fp32 result itself is fp32-accurate
    assert err64(fastrl.logprobs(logits, labels), truth_lp) < 1e-4 * max(1.0, truth_lp.abs().max().item())


def test_backends_lists_the_ops():
    report = fastrl.backends()
    assert report["logprobs"]["cpu"] == "available" and report["logprobs_backward"]["cpu"] == "available"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    logits, labels = make((9, 5), 33001, dtype=dtype, seed=41, ignore_frac=0.2)
    cpu = run_all(logits, labels, temperature=0.8)
    x = logits.cuda().requires_grad_(True)
    gpu = run_all(x, labels.cuda(), temperature=0.8)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=2e-5)
    again = run_all(logits.cuda(), labels.cuda(), temperature=0.8)
    assert all(torch.equal(a, b) for a, b in zip(again, gpu))
    (gpu[0].sum() + gpu[1].sum()).backward()
    xc = logits.clone().requires_grad_(True)
    lp, ent, _ = run_all(xc, labels, temperature=0.8)
    (lp.sum() + ent.sum()).backward()
    torch.testing.assert_close(x.grad.cpu().float(), xc.grad.float(), rtol=1e-3, atol=1e-5 if dtype == torch.float32 else 2e-3)
    bad = labels.cuda().clone()
    bad[3] = 33001
    assert math.isnan(fastrl.logprobs(logits.cuda(), bad)[3].item())


# ------------------------------------------------------------------------- CPU ISA dispatch

_ISA_SCRIPT = r"""
import sys, torch, fastrl
out = []
for logits, labels, T in torch.load(sys.argv[1]):
    x = logits.clone().requires_grad_(True)
    lp, ent, lse = fastrl.logprobs(x, labels, temperature=T, return_entropy=True, return_lse=True)
    (lp.sum() + 0.5 * ent.sum() + 0.25 * lse.sum()).backward()
    out.append((lp.detach(), ent.detach(), lse.detach(), x.grad))
torch.save(out, sys.argv[2])
"""


def _isa_cases():
    cases = []
    for V, dtype, T in ((1, torch.float32, 1.0), (17, torch.float32, 0.7), (1025, torch.float32, 1.0),
                        (5000, torch.bfloat16, 0.9), (3000, torch.float16, 1.3), (333, torch.float64, 1.0)):
        logits, labels = make((6,), V, dtype=dtype, seed=V, ignore_frac=0.2)
        cases.append((logits, labels, T))
    special = torch.randn(4, 40)
    special[0, 3], special[1, 7], special[2, :10] = float("nan"), float("inf"), float("-inf")
    cases.append((special, torch.tensor([0, 1, 12, -100]), 1.0))
    return cases


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_paths_match_reference_and_each_other(isa, tmp_path):
    # The paths run the same IEEE operations per lane (no FMA), so they agree bitwise with the
    # default (widest) path.
    cases = _isa_cases()
    got = run_capped(isa, _ISA_SCRIPT, cases, tmp_path)
    for (logits, labels, T), (lp, ent, lse, grad) in zip(cases, got):
        x = logits.clone().requires_grad_(True)
        want = run_all(x, labels, temperature=T)
        (want[0].sum() + 0.5 * want[1].sum() + 0.25 * want[2].sum()).backward()
        for a, b in zip((lp, ent, lse, grad), (*want, x.grad)):
            assert_same_bits(a, b)
        finite = ~torch.isnan(logits).any(-1) & ~torch.isinf(logits).any(-1)
        rlp, rent, rlse = ref.logprobs(logits[finite], labels[finite], temperature=T)
        torch.testing.assert_close(lp[finite].double(), rlp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent[finite].double(), rent, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(lse[finite].double(), rlse, rtol=1e-6, atol=1e-5)


def test_cpu_isa_rejects_unknown_value():
    code = "import torch, fastrl; fastrl.logprobs(torch.randn(2, 5), torch.tensor([0, 1]))"
    env = dict(os.environ, FASTRL_CPU_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTRL_CPU_ISA must be baseline, avx2 or avx512" in out.stderr


# ------------------------------------------------------------------------ top-k labels, in place


@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_labels_forward_backward(K, dtype):
    logits, _ = make((4, 3), 700, dtype=dtype, seed=50 + K)
    gen = torch.Generator().manual_seed(K)
    labels = torch.randint(0, 700, (4, 3, K), generator=gen)
    labels[0, 0, 0] = -100
    if K > 1:
        labels[1, 1, 1] = labels[1, 1, 0]  # duplicate labels: their one-hot terms add up
    x = logits.clone().requires_grad_(True)
    lp, ent = fastrl.logprobs(x, labels, temperature=0.8, return_entropy=True)
    assert lp.shape == labels.shape and ent.shape == (4, 3)
    rlp, rent, _ = ref.logprobs(logits, labels, temperature=0.8)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    g = torch.randn(labels.shape, generator=gen)
    ((lp * g).sum() + ent.sum()).backward()
    xr = logits.detach().double().requires_grad_(True)
    rlp, rent, _ = ref.logprobs(xr, labels, temperature=0.8)
    ((rlp * g.double()).sum() + rent.sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    # K = 1 in a trailing dimension is the same op as one label per position, bitwise
    if K == 1:
        single = fastrl.logprobs(logits, labels[..., 0], temperature=0.8)
        assert torch.equal(single, fastrl.logprobs(logits, labels, temperature=0.8)[..., 0])


def test_topk_matches_trl_gather_and_opcheck():
    logits, _ = make((2, 5), 300, seed=51)
    index = torch.randint(0, 300, (2, 5, 4))
    torch.testing.assert_close(fastrl.logprobs(logits, index, temperature=0.9),
                               TRL_UTILS.selective_log_softmax(logits, index, 0.9), rtol=1e-5, atol=1e-5)
    flat, flat_idx = logits.view(10, 300), index.view(10, 4)
    torch.library.opcheck(torch.ops.fastrl.logprobs.default, (flat, flat_idx, 0.9, -100, True))
    lp, ent, lse = torch.ops.fastrl.logprobs(flat, flat_idx, 0.9, -100, True)
    torch.library.opcheck(torch.ops.fastrl.logprobs_backward.default,
                          (flat, flat_idx, lse, ent, torch.randn(10, 4), torch.randn(10), None, 0.9, -100))
    with pytest.raises(RuntimeError, match=r"labels\[6\] = 300"):
        bad = index.clone()
        bad[0, 1, 2] = 300
        fastrl.logprobs(logits, bad)
    with pytest.raises(ValueError, match=r"\(2, 5, 'K'\)"):
        fastrl.logprobs(logits, torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="`grad_logprobs` must have the shape of `labels`"):
        torch.ops.fastrl.logprobs_backward(flat, flat_idx, lse, ent, torch.randn(10), None, None, 0.9, -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("topk", [False, True])
def test_inplace_backward_equals_out_of_place_and_overwrites_logits(dtype, topk):
    logits, labels = make((3, 4), 1500, dtype=dtype, seed=60, ignore_frac=0.2)
    if topk:
        labels = torch.stack([labels, labels.clamp(min=0).flip(0)], -1)
    w = torch.randn(labels.shape, generator=torch.Generator().manual_seed(61))
    a = logits.clone().requires_grad_(True)
    lp, ent = fastrl.logprobs(a, labels, temperature=0.7, return_entropy=True)
    ((lp * w).sum() + 0.5 * ent.sum()).backward()
    b = logits.clone().requires_grad_(True)
    hidden = b * 1.0  # a non-leaf [..., V] activation, as the LM head's output
    lp2, ent2 = fastrl.logprobs(hidden, labels, temperature=0.7, return_entropy=True, inplace_backward=True)
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
    ((lp2 * w).sum() + 0.5 * ent2.sum()).backward()
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(hidden.detach(), b.grad)  # the logits' storage now holds their gradient


def test_inplace_backward_guarded_and_strided():
    logits, labels = make((4, 6), 200, seed=62)
    # another node saved the same logits: the in-place write is detected, not silently corrupting
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    squares = (y * y).sum()  # saves y, and runs its backward after the log-prob's
    lp = fastrl.logprobs(y, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squares).backward()
    # rows with a gap (verl's logits[:, :-1]): same gradient as the out-of-place path
    base = logits.clone().requires_grad_(True)
    fastrl.logprobs(base[:, :-1] * 1.0, labels[:, :-1], inplace_backward=True).sum().backward()
    ref_x = logits.clone().requires_grad_(True)
    fastrl.logprobs(ref_x[:, :-1], labels[:, :-1]).sum().backward()
    assert torch.equal(base.grad, ref_x.grad)
    # the op itself refuses logits it cannot overwrite
    flat = logits.view(24, 200)
    lp, _, lse = torch.ops.fastrl.logprobs(flat, labels.view(24), 1.0, -100, False)
    with pytest.raises(RuntimeError, match="unit stride along the vocabulary"):
        torch.ops.fastrl.logprobs_backward_(flat.t().contiguous().t(), labels.view(24), lse, None, torch.ones(24),
                                            None, None, 1.0, -100)


def test_inplace_opcheck():
    logits, labels = make((6,), 40, seed=63)
    lp, ent, lse = torch.ops.fastrl.logprobs(logits, labels, 1.0, -100, True)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.fastrl.logprobs_backward_.default,
                          (logits.clone(), labels, lse, ent, g, g, None, 1.0, -100))
    out = logits.clone()
    torch.ops.fastrl.logprobs_backward_(out, labels, lse, ent, g, g, None, 1.0, -100)
    assert torch.equal(out, torch.ops.fastrl.logprobs_backward(logits, labels, lse, ent, g, g, None, 1.0, -100))


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_int64_indexing_past_2_31_elements(dtype):
    # [N, V] with N * V just over 2^31 elements (bf16: 4 GiB, the CI case; fp32: 8 GiB, slow), where
    # int32 offsets r * V + j overflow. V is odd, so row r0 straddles element 2^31; rows r0 and
    # r0 + 1 are fresh random rows, checked against the fp64 reference of those rows alone
    # (forward log-prob, entropy, lse, and the in-place backward: no second [N, V] buffer). The
    # bulk repeats one random block (cheap to fill) and two of its rows are checked too.
    V = (1 << 17) - 1
    r0 = (1 << 31) // V
    N = r0 + 2
    assert r0 * V < (1 << 31) < (r0 + 1) * V
    gen = torch.Generator().manual_seed(70)
    block = (3 * torch.randn(256, V, generator=gen)).to(dtype)
    logits = torch.empty(N, V, dtype=dtype)
    bulk = r0 // 256 * 256
    logits[:bulk].view(-1, 256, V).copy_(block)  # broadcast over the blocks
    logits[bulk:r0] = block[:r0 - bulk]
    logits[r0:] = (3 * torch.randn(2, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[r0 - 1] = -100
    rows = torch.tensor([0, r0 - 1, r0, r0 + 1])
    checked = logits[rows].clone()  # the backward overwrites the logits
    x = logits.requires_grad_(True)
    lp, ent, lse = run_all(x, labels, temperature=0.9, inplace_backward=True)
    rlp, rent, rlse = ref.logprobs(checked, labels[rows], temperature=0.9)
    torch.testing.assert_close(lp[rows].detach().double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent[rows].detach().double(), rent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse[rows].detach().double(), rlse, rtol=1e-6, atol=1e-5)
    w = torch.randn(N, generator=gen)
    grad, = torch.autograd.grad((lp * w).sum() + (ent * w.flip(0)).sum(), x)
    assert grad.data_ptr() == logits.data_ptr()  # in place: the logits' own storage
    want = reference_grads(checked, labels[rows], [w[rows].double(), w.flip(0)[rows].double(), 0 * w[rows].double()],
                           0.9)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
    torch.testing.assert_close(grad[rows].double(), want, **tol)
