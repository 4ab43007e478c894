"""fastrl.sampling.sample: token sampling with top-k / top-p / min-p and log-probs, vs the fp64 reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastrl
from fastrl import _extension
from fastrl.reference import token_sampling as ref
from fastrl.sampling.tokens import sample, sample_with_uniforms

CONFIGS = {
    "plain": {},
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "combo": dict(top_k=12, top_p=0.9, min_p=0.05, temperature=0.7),
}


def make(n, V, dtype=torch.float32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, V, generator=gen, dtype=torch.float64)).to(dtype), \
        torch.rand(n, generator=gen, dtype=torch.float64)


def check_against_reference(logits, u, **kw):
    """Kernel tokens equal the reference's inverse-CDF tokens, except where u lies within 1e-6 of a
    CDF boundary (fp32 exp / quantized masses vs exact fp64); log-probs match the fp64 reference."""
    tok, lp, raw = sample_with_uniforms(logits, u, **kw)
    assert tok.dtype == torch.int64 and lp.dtype == raw.dtype == torch.float32
    rtok, _, _ = ref.sample(logits, u, **kw)
    probs, rawp = ref.processed_probs(logits, **kw)
    cdf = probs.cumsum(-1)
    differ = tok != rtok
    if differ.any():
        rows = differ.nonzero().squeeze(-1)
        lo = torch.minimum(tok[rows], rtok[rows])
        boundary = cdf[rows, lo]
        assert torch.all((u[rows] - boundary).abs() < 1e-6), (rows, tok[rows], rtok[rows])
    assert torch.all(probs.gather(-1, tok[:, None]) > 0), "sampled a token outside the kept set"
    torch.testing.assert_close(lp.double(), probs.gather(-1, tok[:, None]).squeeze(-1).log(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(raw.double(), rawp.gather(-1, tok[:, None]).squeeze(-1).log(), rtol=1e-5, atol=2e-5)
    return tok, lp, raw


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("V", [1, 2, 7, 50, 1000, 5000])
def test_matches_fp64_reference(config, V):
    logits, u = make(64, V, seed=V)
    check_against_reference(logits, u, **CONFIGS[config])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_and_fp64_logits(dtype):
    logits, u = make(128, 300, dtype=dtype, seed=3)  # the reference sees the same bf16/fp16 values
    check_against_reference(logits, u, top_k=40, top_p=0.9, temperature=1.3)


def test_large_vocab_top_p_and_top_k():
    # Real vocab size: the CPU's streaming top-k filter cuts its buffer many times and the top-p
    # quickselect runs many rounds over ~100k candidates.
    logits, u = make(4, 152064, seed=11, scale=3.0)
    for kw in (dict(top_p=0.9), dict(top_k=50), dict(top_k=5000, top_p=0.5, min_p=1e-4)):
        check_against_reference(logits, u, **kw)


def chi_square_pvalue(counts, expected):
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((expected.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_empirical_distribution_chi_square(config):
    V, draws = 30, 60000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(7)) * 1.5
    kw = CONFIGS[config]
    probs, _ = ref.processed_probs(logits, **kw)
    tok, _, _ = sample(logits.expand(draws, V), generator=torch.Generator().manual_seed(1234), **kw)
    counts = torch.bincount(tok, minlength=V).double()
    kept = probs[0] > 0
    assert counts[~kept].sum() == 0, "drew a truncated token"
    if config != "plain":
        assert 1 < int(kept.sum()) < V  # the processor did truncate
    expected = draws * probs[0][kept]
    assert expected.min() > 5  # the chi-square approximation holds
    assert chi_square_pvalue(counts[kept], expected) > 1e-3


def test_chi_square_detects_a_wrong_distribution():
    # The goodness-of-fit test above can fail: the untruncated distribution is rejected.
    V, draws = 30, 60000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(7)) * 1.5
    tok, _, _ = sample(logits.expand(draws, V), generator=torch.Generator().manual_seed(1234), top_p=0.8)
    plain, _ = ref.processed_probs(logits)
    assert chi_square_pvalue(torch.bincount(tok, minlength=V).double(), draws * plain[0]) < 1e-6


def test_same_seed_same_tokens_and_thread_count():
    logits, _ = make(200, 4000, seed=5)
    kw = dict(top_k=100, top_p=0.9, min_p=0.01, temperature=0.8)
    a = sample(logits, generator=torch.Generator().manual_seed(42), **kw)
    b = sample(logits, generator=torch.Generator().manual_seed(42), **kw)
    c = sample(logits, generator=torch.Generator().manual_seed(43), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sample(logits, generator=torch.Generator().manual_seed(42), **kw)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(a, single):
        assert torch.equal(x, y)


def test_batch_invariance_and_layouts():
    logits, u = make(40, 700, seed=8)
    kw = dict(top_k=64, top_p=0.85)
    full = sample_with_uniforms(logits, u, **kw)
    for rows in (slice(0, 1), slice(7, 30)):
        for x, y in zip(sample_with_uniforms(logits[rows], u[rows], **kw), full):
            assert torch.equal(x, y[rows])
    wide = torch.cat([logits, torch.randn(40, 5)], 1)[:, :700]  # rows with a gap
    transposed = logits.t().contiguous().t()                    # last dim not contiguous
    batched = logits.view(4, 10, 700)
    for x in (wide, transposed):
        for a, b in zip(sample_with_uniforms(x, u, **kw), full):
            assert torch.equal(a, b)
    for a, b in zip(sample_with_uniforms(batched, u.view(4, 10), **kw), full):
        assert a.shape == (4, 10) and torch.equal(a.flatten(), b)


def test_per_row_parameters_equal_scalar_calls():
    logits, u = make(6, 500, seed=12)
    T = torch.tensor([0.5, 1.0, 1.7, 1.0, 0.9, 2.0])
    k = torch.tensor([1, 500, 10, 37, 3, 1000], dtype=torch.int32)
    p = torch.tensor([1.0, 0.5, 0.9, 0.3, 1.0, 0.99])
    mp = torch.tensor([0.0, 0.0, 0.2, 0.01, 0.5, 1e-3])
    tok, lp, raw = sample_with_uniforms(logits, u, temperature=T, top_k=k, top_p=p, min_p=mp)
    for r in range(6):
        one = sample_with_uniforms(logits[r:r + 1], u[r:r + 1], temperature=float(T[r]), top_k=int(k[r]),
                                   top_p=float(p[r]), min_p=float(mp[r]))
        assert (tok[r], lp[r], raw[r]) == tuple(x[0] for x in one)
    check_against_reference(logits, u, temperature=T, top_k=k, top_p=p, min_p=mp)


def test_disabled_processors_are_identity():
    logits, u = make(50, 257, seed=13)
    base = sample_with_uniforms(logits, u)
    for kw in (dict(top_k=257), dict(top_k=10**9), dict(top_p=1.0), dict(min_p=0.0)):
        for a, b in zip(sample_with_uniforms(logits, u, **kw), base):
            assert torch.equal(a, b)
    # with nothing truncated the processed and raw log-probs agree, and match fastrl.logprobs
    torch.testing.assert_close(base[1], base[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(base[2], fastrl.logprobs(logits, base[0]), rtol=1e-5, atol=1e-5)


def test_greedy_is_top_k_1_and_min_p_1():
    logits, u = make(30, 1000, seed=14)
    for kw in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-9)):
        tok, lp, raw = sample_with_uniforms(logits, u, temperature=0.3, **kw)
        assert torch.equal(tok, logits.argmax(-1))
        assert torch.all(lp == 0)
        torch.testing.assert_close(raw, fastrl.logprobs(logits, tok, temperature=0.3), rtol=1e-5, atol=1e-5)


def test_ties_at_the_boundary_are_all_kept():
    # top_k=2: the 2nd largest value 2.0 is shared by tokens 1, 2, 3: all three kept, token 4 never.
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 2.0 - 1e-3]])
    draws = 6000
    tok, lp, _ = sample(logits.expand(draws, 6), top_k=2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tok, minlength=6)
    assert torch.all(counts[:4] > 0) and counts[4:].sum() == 0
    probs, _ = ref.processed_probs(logits, top_k=2)
    assert int((probs > 0).sum()) == 4
    torch.testing.assert_close(lp.double(), probs[0, tok].log(), rtol=1e-5, atol=1e-6)
    # top_p: the mass reaches p inside a tie group (tokens 1..3 equal): the whole group is kept.
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0, -5.0]])
    tok, _, _ = sample(logits.expand(draws, 5), top_p=0.6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tok, minlength=5)
    assert torch.all(counts[:4] > 0) and counts[4] == 0
    # all-equal row: everything is a tie, nothing is truncated
    flat = torch.zeros(draws, 8)
    tok, lp, raw = sample(flat, top_k=3, top_p=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.all(torch.bincount(tok, minlength=8) > 0)
    torch.testing.assert_close(lp, raw)
    torch.testing.assert_close(lp, torch.full_like(lp, -2.0794415))


def test_neg_inf_logits_and_single_token():
    logits, u = make(64, 20, seed=15)
    logits[:, ::3] = float("-inf")
    logits[5, :] = float("-inf")
    logits[5, 11] = 0.5
    for kw in ({}, dict(top_k=15), dict(top_p=0.95), dict(min_p=0.02), dict(top_k=19, top_p=0.99)):
        tok, lp, raw = check_against_reference(logits, u, **kw)
        assert torch.all(tok % 3 != 0) and tok[5] == 11 and lp[5] == 0 and raw[5] == 0
        assert torch.all(torch.isfinite(lp)) and torch.all(torch.isfinite(raw))
    tok, lp, raw = sample(torch.randn(3, 1))
    assert torch.all(tok == 0) and torch.all(lp == 0) and torch.all(raw == 0)


def test_uniform_extremes_stay_in_the_kept_set():
    logits, _ = make(4, 100, seed=16)
    for value in (0.0, 1.0 - 2 ** -53, 1.0, -0.5, float("nan")):
        u = torch.full((4,), value, dtype=torch.float64)
        tok, lp, _ = sample_with_uniforms(logits, u, top_k=10)
        probs, _ = ref.processed_probs(logits, top_k=10)
        assert torch.all(probs.gather(-1, tok[:, None]) > 0)
    first = sample_with_uniforms(logits, torch.zeros(4, dtype=torch.float64), top_k=10)[0]
    kept = ref.processed_probs(logits, top_k=10)[0] > 0
    assert torch.equal(first, kept.int().argmax(-1))  # u = 0: the first kept token


def test_empty_batch():
    for shape in ((0, 10), (2, 0, 10)):
        tok, lp, raw = sample(torch.randn(shape), top_p=0.9)
        assert tok.shape == lp.shape == raw.shape == shape[:-1]
        assert tok.dtype == torch.int64 and lp.dtype == torch.float32


def test_reference_backend(monkeypatch):
    logits, u = make(16, 200, seed=17)
    kw = dict(top_k=20, top_p=0.9, temperature=0.9)
    kernel = sample_with_uniforms(logits, u, **kw)
    monkeypatch.setattr(_extension, "BACKEND", "reference")
    reference = sample_with_uniforms(logits, u, **kw)
    assert torch.equal(kernel[0], reference[0]) and reference[1].dtype == torch.float32
    torch.testing.assert_close(kernel[1:], reference[1:], rtol=1e-5, atol=2e-5)


def test_opcheck():
    logits, u = make(8, 64, seed=18)
    torch.library.opcheck(torch.ops.fastrl.sample_tokens.default,
                          (logits, u, 0.8, 10, 0.9, 0.01, None, None, None, None))
    rows = (torch.rand(8, dtype=torch.float64) + 0.5, torch.randint(1, 70, (8,)),
            torch.rand(8, dtype=torch.float64) * 0.9 + 0.1, torch.rand(8, dtype=torch.float64) * 0.1)
    torch.library.opcheck(torch.ops.fastrl.sample_tokens.default,
                          (logits.bfloat16(), u, 1.0, 64, 1.0, 0.0) + rows)


def test_torch_compile_has_no_graph_break():
    logits, u = make(4, 50, seed=19)
    compiled = torch.compile(lambda x, v: sample_with_uniforms(x, v, top_p=0.9)[1] * 2, fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(logits, u), sample_with_uniforms(logits, u, top_p=0.9)[1] * 2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), V=st.integers(1, 300), seed=st.integers(0, 2 ** 16),
       top_k=st.one_of(st.none(), st.integers(1, 320)), top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
       min_p=st.one_of(st.none(), st.floats(0.0, 1.0)), temperature=st.floats(0.2, 3.0),
       ties=st.booleans())
def test_hypothesis_against_reference(n, V, seed, top_k, top_p, min_p, temperature, ties):
    logits, u = make(n, V, seed=seed)
    if ties:  # few distinct values: ties at every boundary
        logits = logits.round()
    check_against_reference(logits, u, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


BAD_SCALARS = [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"), (dict(min_p="0.1"), "min_p"),
    (dict(top_p=torch.rand(3)), r"top_p.*shape"), (dict(top_k=torch.ones(4)), r"top_k.*integer dtype"),
    (dict(generator=1), "generator"),
]


@pytest.mark.parametrize("kw, match", BAD_SCALARS)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(4, 10), **kw)


@pytest.mark.parametrize("name, values, match", [
    ("temperature", [1.0, 0.5, 0.0, 1.0], r"`temperature` must be finite and > 0, got temperature\[2\] = 0"),
    ("top_k", [3, 0, 1, 2], r"`top_k` must be >= 1, got top_k\[1\] = 0"),
    ("top_p", [0.5, 0.9, 1.0, 1.5], r"`top_p` must be in \(0, 1\], got top_p\[3\] = 1.5"),
    ("min_p", [0.5, -0.1, 0.2, 0.0], r"`min_p` must be in \[0, 1\], got min_p\[1\] = -0.1"),
])
def test_bad_per_row_values(name, values, match):
    dtype = torch.int64 if name == "top_k" else torch.float64
    with pytest.raises(RuntimeError, match=match):
        sample(torch.randn(4, 10), **{name: torch.tensor(values, dtype=dtype)})


@pytest.mark.parametrize("value, row", [(float("nan"), 2), (float("inf"), 1), ("all-inf", 3)])
def test_unsampleable_rows(value, row):
    logits = torch.randn(5, 16)
    if value == "all-inf":
        logits[row] = float("-inf")
    else:
        logits[row, 4] = value
    before = logits.clone()
    with pytest.raises(RuntimeError, match=f"`logits` row {row} cannot be sampled"):
        sample(logits, top_p=0.9)
    torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)  # input unchanged


def test_overflow_to_inf_after_temperature_is_rejected():
    logits = torch.tensor([[1e38, 0.0]])
    with pytest.raises(RuntimeError, match="row 0 cannot be sampled"):
        sample(logits, temperature=0.01)


@pytest.mark.parametrize("logits, match", [
    (torch.randint(0, 5, (3, 4)), "floating"), (torch.tensor(1.0), r"\[\.\.\., V\]"),
    (torch.randn(3, 0), "vocabulary dimension"), ("x", "floating"),
])
def test_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        sample(logits)


def test_op_level_checks():
    logits, u = make(3, 10)
    with pytest.raises(RuntimeError, match="`uniforms` must be Double"):
        torch.ops.fastrl.sample_tokens(logits, u.float(), 1.0, 10, 1.0, 0.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="`uniforms` has 2 entries"):
        torch.ops.fastrl.sample_tokens(logits, u[:2], 1.0, 10, 1.0, 0.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="vocabulary dimension of size in"):
        torch.ops.fastrl.sample_tokens(torch.zeros(1, 1 << 20), u[:1], 1.0, 1, 1.0, 0.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="`top_k` must be >= 1"):
        torch.ops.fastrl.sample_tokens(logits, u, 1.0, 0, 1.0, 0.0, None, None, None, None)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.cuda_built()), reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [7, 1000, 152064])
def test_cuda_matches_cpu(dtype, V):
    logits, u = make(16, V, dtype=dtype, seed=20, scale=3.0)
    for kw in ({}, dict(top_k=50), dict(top_p=0.9), dict(top_k=200, top_p=0.8, min_p=1e-3, temperature=0.7)):
        cpu = sample_with_uniforms(logits, u, **kw)
        gpu = [t.cpu() for t in sample_with_uniforms(logits.cuda(), u.cuda(), **kw)]
        agree = (cpu[0] == gpu[0]).float().mean()
        assert agree >= 0.9  # equal unless expf rounds differently at a kept-set or CDF boundary
        check_against_reference(logits, u, **kw)
        same = cpu[0] == gpu[0]
        torch.testing.assert_close(gpu[1][same], cpu[1][same], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu[2][same], cpu[2][same], rtol=1e-5, atol=1e-5)
        again = sample_with_uniforms(logits.cuda(), u.cuda(), **kw)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(again, gpu))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.cuda_built()), reason="needs a CUDA build and GPU")
def test_cuda_bad_rows_give_minus_one():
    logits = torch.randn(3, 50, device="cuda")
    logits[1, 3] = float("nan")
    tok, lp, raw = sample(logits, top_p=torch.tensor([0.5, 0.9, 2.0], device="cuda", dtype=torch.float64))
    assert tok.tolist()[1:] == [-1, -1] and tok[0] >= 0 and torch.isnan(lp[1:]).all() and torch.isnan(raw[1:]).all()
