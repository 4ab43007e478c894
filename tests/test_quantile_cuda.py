"""fastrl::quantile_mask, the exact masked quantile behind fastrl.sampling.quantile_mask
(csrc/cuda/quantile.cu: a radix select with no sort and no host sync; csrc/torch/quantile.cpp: the
same radix select on the host for the CPU op): bitwise vs torch.quantile on the same device on
random values with ties, zeros of both signs, infinities, tiny and huge values, NaN inside and
outside the mask, all unmasked, one element, every mask dtype, the "least key above" path for the
upper order statistic, n across 2^24 (slow), opcheck, bad input, determinism, torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastrl
from fastrl.sampling.groups import quantile_mask

CUDA_OK = torch.cuda.is_available() and fastrl._extension.cuda_built()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA build")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64]
QS = (0.0, 0.13, 0.5, 0.8, 0.9, 1.0)
NAN = float("nan")
op = torch.ops.fastrl.quantile_mask


def value_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def expected(x, m, q):
    """torch.quantile of the masked values on x's device (fp32 for half inputs); NaN if none."""
    v = x[m.bool()].to(value_dtype(x.dtype))
    if v.numel() == 0:
        return torch.tensor(NAN, dtype=v.dtype, device=x.device)
    return torch.quantile(v, q)


def assert_matches(x, m, q, keep, t):
    want = expected(x, m, q)
    assert t.shape == () and t.dtype == want.dtype and t.device == x.device
    assert torch.equal(t, want) or (torch.isnan(t) and torch.isnan(want)), (q, t.item(), want.item())
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert torch.equal(keep, (x.to(want.dtype) >= want) & m.bool())


def hard_values(gen, n, dtype):
    """Values over 60 decades with ties (rounded values: many 0.0 and -0.0) and infinities."""
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
    x = torch.where(torch.rand(n, generator=gen) < 0.3, x.round(), x)
    x[torch.rand(n, generator=gen) < 0.05] = float("inf")
    x[torch.rand(n, generator=gen) < 0.05] = -float("inf")
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_torch_quantile_on_hard_values(device, dtype):
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 50, 4000):
        x = hard_values(gen, n, dtype)
        m = torch.rand(n, generator=gen) < 0.7
        m[0] = True
        x[~m & (torch.rand(n, generator=gen) < 0.5)] = NAN  # unmasked NaN: ignored
        x, m = x.to(device), m.to(device)
        for q in QS:
            assert_matches(x, m, q, *op(x, m, q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_torch_quantile_on_ties_and_random_values(device, dtype):
    """Few distinct values (the upper order statistic is often the next distinct value), and
    continuous random values (bf16/fp16: ties by rounding), 2-D, with the public function."""
    gen = torch.Generator().manual_seed(11)
    for shape, levels in (((37, 29), 3), ((61, 17), 40), ((300, 51), None)):
        if levels is None:
            x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        else:
            x = (torch.randint(0, levels, shape, generator=gen).double() * 0.25 - 1.0).to(dtype)
        m = torch.rand(shape, generator=gen) < 0.6
        x, m = x.to(device), m.to(device)
        for q in QS + (0.25, 0.3, 0.77):
            assert_matches(x, m, q, *op(x, m, q))
            assert_matches(x, m, q, *quantile_mask(x, m, q))


@pytest.mark.parametrize("device", DEVICES)
def test_upper_order_statistic_past_the_copies(device):
    """sorted [1, 1, 2, 3]: p = 1.5 at q = 0.5, lo (1) is the last copy of its value, hi is the
    least value above it (2): t = 1.5; p = 0.5 at q = 1/6: both order statistics are 1."""
    x = torch.tensor([3.0, 9.0, 1.0, 2.0, -4.0, 1.0], device=device)
    m = torch.tensor([True, False, True, True, False, True], device=device)
    keep, t = op(x, m, 0.5)
    assert t.item() == 1.5 and keep.tolist() == [True, False, False, True, False, False]
    assert op(x, m, 1 / 6)[1].item() == 1.0
    assert op(x.double(), m, 1.0)[1].item() == 3.0 and op(x.double(), m, 0.0)[1].item() == 1.0
    # distinct keys that differ only in their last digit, and a negative / positive pair
    x = torch.tensor([1.0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item(), -0.5, 0.5], device=device)
    for q in QS + (1 / 3, 2 / 3):
        assert_matches(x, torch.ones(4, dtype=torch.bool, device=device), q, *op(x, torch.ones_like(x, dtype=torch.bool), q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_every_mask_dtype(device, mask_dtype):
    """Any nonzero mask value selects (2, -1, 0.5, NaN in a float mask: as mask.bool())."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 25, generator=gen).to(device)
    raw = torch.randint(-1, 3, (40, 25), generator=gen)
    m = raw.to(mask_dtype) if mask_dtype != torch.bool else raw != 0
    if mask_dtype.is_floating_point:
        m = torch.where(raw == 2, 0.5, m.double()).to(mask_dtype)
        m[0, 0] = NAN
    m = m.to(device)
    for q in (0.0, 0.4, 1.0):
        assert_matches(x, m, q, *op(x, m, q))
    mi = m.to(torch.int8)  # not an op mask dtype: the public function converts it
    assert_matches(x, mi, 0.4, *quantile_mask(x, mi, 0.4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_empty_and_single(device, dtype):
    x = torch.tensor([[1.0, NAN, 3.0], [0.5, -2.0, 7.0]], dtype=dtype, device=device)
    some = torch.tensor([[True, True, False], [True, False, False]], device=device)
    keep, t = op(x, some, 0.5)  # a masked NaN: t NaN, nothing kept
    assert torch.isnan(t) and t.dtype == value_dtype(dtype) and not keep.any()
    keep, t = op(x, ~some, 0.5)  # the NaN is not masked: 3, -2, 7 -> 3
    assert t.item() == 3.0 and keep.tolist() == [[False, False, True], [False, False, True]]
    keep, t = op(x, torch.zeros_like(some), 0.5)  # nothing masked
    assert torch.isnan(t) and not keep.any()
    keep, t = op(torch.empty(0, 4, dtype=dtype, device=device), torch.empty(0, 4, dtype=torch.bool, device=device), 0.3)
    assert torch.isnan(t) and keep.shape == (0, 4)
    one = torch.zeros_like(some)
    one[1, 2] = True
    for q in QS:
        keep, t = op(x, one, q)  # one value: every quantile is it
        assert t.item() == 7.0 and keep.sum().item() == 1 and keep[1, 2]
    z = torch.tensor([0.0, -0.0, -0.0, 0.0, -0.0], dtype=dtype, device=device)
    for q in QS:
        keep, t = op(z, torch.ones_like(z, dtype=torch.bool), q)
        assert t.item() == 0.0 and keep.all()


def test_fake_kernel_shapes_and_dtypes():
    for dtype in DTYPES:
        keep, t = quantile_mask(torch.empty(5, 8, device="meta", dtype=dtype), torch.empty(5, 8, device="meta"), 0.3)
        assert keep.shape == (5, 8) and keep.dtype == torch.bool and t.shape == () and t.dtype == value_dtype(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for mask_dtype in (torch.bool, torch.float32, torch.int64):
            x = torch.randn(33, 7, generator=gen).to(dtype).to(device)
            m = (torch.rand(33, 7, generator=gen) < 0.5).to(mask_dtype).to(device)
            torch.library.opcheck(op.default, (x, m, 0.35))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    x = torch.randn(3, 4, device=device)
    m = torch.ones(3, 4, dtype=torch.bool, device=device)
    for q in (-0.1, 1.5, NAN):
        with pytest.raises(ValueError, match=r"`q` must lie in \[0, 1\], got"):
            op(x, m, q)
    with pytest.raises(RuntimeError, match=r"`mask` has shape \[3, 5\] but `x` has shape \[3, 4\]"):
        op(x, torch.ones(3, 5, dtype=torch.bool, device=device), 0.5)
    with pytest.raises(RuntimeError, match="`x` must be a floating tensor .* got Long"):
        op(torch.ones(3, 4, dtype=torch.int64, device=device), m, 0.5)
    with pytest.raises(RuntimeError, match="`mask` must be bool, uint8, int32, int64, float32 or float64, got Short"):
        op(x, m.to(torch.int16), 0.5)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="`mask` is on cpu but `x` is on cuda"):
            op(x, m.cpu(), 0.5)


def test_cpu_deterministic_across_thread_counts():
    """The CPU op's histograms are summed per fixed chunk of 2^16 values, in chunk order."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(400_003, generator=gen)
    m = torch.rand(400_003, generator=gen) < 0.7
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, m, 0.8)
        torch.set_num_threads(max(2, threads))
        many = op(x, m, 0.8)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    assert_matches(x, m, 0.8, *many)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA build")
def test_cuda_entropy_shape_no_sync_deterministic_and_compiled():
    """TRL's case ([256 x 4096] entropies, 70% masked, many exact zeros): torch.quantile's bits,
    the same bits on every run, no host sync in the public function, and a compiled graph."""
    gen = torch.Generator().manual_seed(13)
    ent = torch.rand(256, 4096, generator=gen) * 4.0
    ent[torch.rand(256, 4096, generator=gen) < 0.2] = 0.0  # confident tokens: one shared key
    mask = torch.rand(256, 4096, generator=gen) < 0.7
    ent, mask = ent.cuda(), mask.cuda()
    for dtype in DTYPES:
        x = ent.to(dtype)
        for q in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
            keep, t = quantile_mask(x, mask, q)
            assert_matches(x, mask, q, keep, t)
            again = quantile_mask(x, mask, q)
            assert torch.equal(keep, again[0]) and torch.equal(t, again[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        quantile_mask(ent, mask, 0.8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    compiled = torch.compile(quantile_mask, backend="aot_eager", fullgraph=True)
    keep, t = compiled(ent, mask, 0.8)
    assert_matches(ent, mask, 0.8, keep, t)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the CUDA build")
def test_cuda_equals_cpu_order_statistics():
    """The kernels and the host radix select pick the same order statistics (t can differ only in
    torch.lerp's rounding on each device: compared where p is an integer, n - 1 = 2^14 and q dyadic)."""
    gen = torch.Generator().manual_seed(17)
    for dtype in DTYPES:
        x = hard_values(gen, 20_001, dtype)
        m = torch.zeros(20_001, dtype=torch.bool)
        m[torch.randperm(20_001, generator=gen)[: (1 << 14) + 1]] = True
        for k in (0, 1, 5461, 1 << 13, (1 << 14) - 1, 1 << 14):
            q = k / (1 << 14)
            got, want = op(x.cuda(), m.cuda(), q), op(x, m, q)
            assert torch.equal(got[0].cpu(), want[0])
            assert torch.equal(got[1].cpu(), want[1]) or (torch.isnan(got[1]).item() and torch.isnan(want[1]))


def big_case(device, dtype, n):
    """A permutation of 0..n-1 (as dtype: ties above 2^24 in fp32), all masked but the last 5 rows."""
    x = torch.randperm(n + 5, generator=torch.Generator().manual_seed(11)).to(dtype).to(device)
    m = torch.ones(n + 5, dtype=torch.bool, device=device)
    m[-5:] = False
    return x, m


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_across_torch_quantile_limit(device, dtype):
    """Up to 2^24 values: torch.quantile's bits (its rank arithmetic in fp32 for fp32 values);
    above: p = q (n - 1) in fp64, checked against the sorted values (torch.quantile refuses)."""
    limit = 1 << 24
    x, m = big_case(device, dtype, limit)
    for q in (0.3, 0.77):
        assert_matches(x, m, q, *op(x, m, q))
    x, m = big_case(device, dtype, limit + 3)
    with pytest.raises(RuntimeError):
        torch.quantile(x[m], 0.5)
    ordered = torch.sort(x[m]).values
    for q in (0.0, 0.3, 0.77, 1.0):
        keep, t = op(x, m, q)
        p = q * (limit + 2)
        lo, hi = int(p // 1), -int(-p // 1)
        frac = torch.tensor(p - lo, dtype=torch.float64).to(dtype).to(device)
        want = torch.lerp(ordered[lo], ordered[hi], frac)
        assert torch.equal(t, want), (q, t.item(), want.item())
        assert torch.equal(keep, (x >= want) & m)
