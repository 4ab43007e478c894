"""fastrl.linear_logprobs: log p(label) and entropy of hidden @ weight.T without the [N, V] logits."""
import importlib
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fastrl.linear_logprobs import linear_logprobs

fll = importlib.import_module("fastrl.linear_logprobs")  # the module, even if `fastrl` re-exports the function
from fastrl.reference.logprobs import linear_logprobs as ref


def make(N, V, H, dtype=torch.float32, seed=0, ignore_frac=0.2, bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels = torch.where(torch.rand(N, generator=gen) < ignore_frac, torch.full_like(labels, -100), labels)
    return hidden, weight, b, labels


def ref_with_grads(hidden, weight, bias, labels, g_lp, g_ent, temperature):
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    b = bias.detach().double().requires_grad_(True) if bias is not None else None
    lp, ent = ref(leaves[0], leaves[1], labels, bias=b, temperature=temperature)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp, ent, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("N, V, H, chunk", [(1, 1, 1, None), (9, 37, 13, 4), (40, 257, 33, 7), (16, 1000, 64, None)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_match_fp64_reference(N, V, H, chunk, bias, temperature):
    hidden, weight, b, labels = make(N, V, H, seed=N + V, bias=bias)
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    lb = b.clone().requires_grad_(True) if bias else None
    lp, ent = linear_logprobs(leaves[0], leaves[1], labels, bias=lb, temperature=temperature, return_entropy=True,
                              chunk_size=chunk)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    rlp, rent, gh, gw, gb = ref_with_grads(hidden, weight, b, labels, g_lp, g_ent, temperature)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(leaves[0].grad.double(), gh, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(leaves[1].grad.double(), gw, rtol=1e-4, atol=2e-5)
    if bias:
        torch.testing.assert_close(lb.grad.double(), gb, rtol=1e-4, atol=2e-5)
    ignored = labels == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(leaves[0].grad[ignored] == 0)


def test_chunk_size_and_leading_dims_do_not_change_a_bit():
    hidden, weight, _, labels = make(24, 300, 20, seed=3)
    whole = linear_logprobs(hidden, weight, labels, return_entropy=True)
    for chunk in (1, 5, 24, 100, 1000):
        for a, b in zip(linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk), whole):
            assert torch.equal(a, b), chunk
    lp3 = linear_logprobs(hidden.view(4, 6, 20), weight, labels.view(4, 6))
    assert lp3.shape == (4, 6)
    assert torch.equal(lp3.view(-1), whole[0])


def _grads(hidden, weight, bias, labels, g, **kw):
    """Outputs and gradients of sum(g[0] * log-prob + g[1] * entropy)."""
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    b = bias.clone().requires_grad_(True) if bias is not None else None
    lp, ent = linear_logprobs(leaves[0], leaves[1], labels, bias=b, return_entropy=True, **kw)
    ((lp * g[0]).sum() + (ent * g[1]).sum()).backward()
    return lp.detach(), ent.detach(), leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_batch_invariance_bitwise(dtype, monkeypatch):
    """A row's log-prob, entropy and grad_hidden are bitwise the same alone, inside batches of other
    sizes (below, at and past a matmul tile: 16 rows here), at any position, next to ignored rows, and
    for any chunk size; grad_weight / grad_bias (sums over the batch) do not depend on the chunk size."""
    hidden, weight, b, labels = make(300, 600, 24, dtype=dtype, seed=12, bias=True, ignore_frac=0.3)
    labels[7] = 5  # the probed row is labelled
    g = torch.randn(2, 300, generator=torch.Generator().manual_seed(11))
    monkeypatch.setattr(fll, "CHUNK_BYTES", 16 * 600 * hidden.element_size())  # 16-row tiles: many, and a tail
    assert fll._row_tile(600, hidden.element_size()) == 16
    alone = _grads(hidden[7:8], weight, b, labels[7:8], g[:, 7:8])
    for lo, hi, chunk in ((0, 300, None), (7, 300, 1), (3, 20, 5), (0, 17, 64), (5, 40, 33), (7, 9, None)):
        got = _grads(hidden[lo:hi], weight, b, labels[lo:hi], g[:, lo:hi], chunk_size=chunk)
        for k in range(3):  # log-prob, entropy, grad_hidden of row 7
            assert torch.equal(got[k][7 - lo], alone[k][0]), (lo, hi, chunk, k)
    whole = _grads(hidden, weight, b, labels, g)
    for chunk in (1, 17, 100):
        for want, got in zip(whole, _grads(hidden, weight, b, labels, g, chunk_size=chunk)):
            assert torch.equal(got, want), chunk


def test_logprob_only_gradient_and_memory_budget(monkeypatch):
    # A tiny budget forces 16-row tiles and chunks: the same numbers (up to BLAS rounding) as one tile.
    hidden, weight, _, labels = make(40, 80, 10, seed=4)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs(h1, w1, labels).sum().backward()
    assert fll._row_tile(80, 4) == 256 and fll._chunk_rows(300, 80, 4) == 512
    assert fll._chunk_rows(0, 80, 4) == fll.CHUNK_BYTES // (80 * 4 * 256) * 256  # whole tiles within the budget
    assert fll._row_tile(152064, 4) == 96 and fll._chunk_rows(0, 152064, 4) == 96  # Qwen's V: 96 x V x 4 <= 64 MiB
    monkeypatch.setattr(fll, "CHUNK_BYTES", 1)
    assert fll._row_tile(80, 4) == 16 and fll._chunk_rows(0, 80, 4) == 16
    assert fll._chunk_rows(3, 80, 4) == 16 and fll._chunk_rows(17, 80, 4) == 32
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs(h2, w2, labels).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_ignored_rows_never_reach_the_matmul(monkeypatch):
    hidden, weight, _, labels = make(10, 50, 8, seed=5, ignore_frac=0.0)
    labels[[1, 4, 5]] = -100
    kept = hidden[labels != -100]
    seen = []
    real = fll._tile_logits
    monkeypatch.setattr(fll, "_tile_logits", lambda x, w, b, out: seen.append(x.clone()) or real(x, w, b, out))
    x = hidden.clone().requires_grad_(True)
    linear_logprobs(x, weight, labels).sum().backward()
    assert len(seen) == 2  # forward and backward: one padded tile each, the 7 labelled rows then zeros
    for tile in seen:
        assert tile.shape == (256, 8) and torch.equal(tile[:7], kept) and not tile[7:].any()
    monkeypatch.setattr(fll, "_tile_logits", real)
    all_ignored = torch.full((10,), -100)
    assert torch.equal(linear_logprobs(hidden, weight, all_ignored), torch.zeros(10))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_inputs(dtype, tol):
    hidden, weight, b, labels = make(20, 500, 48, dtype=dtype, seed=6, bias=True)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    lp, ent = linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True, chunk_size=8)
    assert lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert all(t.grad.dtype == dtype for t in leaves)
    rlp, rent, gh, gw, gb = ref_with_grads(hidden, weight, b, labels, torch.ones(20), torch.ones(20), 1.0)
    # the logits chunk is computed in the input dtype (as the LM head would): half-precision error
    torch.testing.assert_close(lp.double(), rlp, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(ent.double(), rent, rtol=tol, atol=tol * 4)
    for got, want in zip(leaves, (gh, gw, gb)):
        torch.testing.assert_close(got.grad.double(), want, rtol=tol * 2, atol=tol)


def test_gradcheck_fp64():
    # float64 inputs: matmul in fp64, softmax part in fp32 -> finite differences with a larger step.
    hidden, weight, b, labels = make(4, 7, 3, dtype=torch.float64, seed=7, bias=True, ignore_frac=0.0)
    labels[2] = -100
    args = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    fn = lambda h, w, bb: tuple(o.double() for o in linear_logprobs(h, w, labels, bias=bb, temperature=0.9,  # noqa: E731
                                                                     return_entropy=True))
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=1e-2)


def test_opcheck():
    hidden, weight, b, labels = make(6, 30, 5, seed=8, bias=True)
    for bias in (None, b):
        for ent in (True, False):
            torch.library.opcheck(torch.ops.fastrl.linear_logprobs.default,
                                  (hidden, weight, bias, labels, 0.8, -100, ent, 4))
    lp, ent, lse = torch.ops.fastrl.linear_logprobs(hidden, weight, b, labels, 0.8, -100, True, 4)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.fastrl.linear_logprobs_backward.default,
                          (hidden, weight, b, labels, lse, ent, g, g, 0.8, -100, 4))


def test_torch_compile_no_graph_break():
    hidden, weight, _, labels = make(5, 20, 4, seed=9)
    fn = torch.compile(lambda h, w, y: linear_logprobs(h, w, y) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(hidden, weight, labels), linear_logprobs(hidden, weight, labels) * 2)


def test_thread_count_determinism():
    hidden, weight, _, labels = make(64, 700, 32, seed=10)
    full = linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=16)
    finally:
        torch.set_num_threads(before)
    # the softmax part is bitwise thread-invariant; the chunk matmul is BLAS's (close, maybe not bitwise)
    for a, b in zip(single, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1])), {}, RuntimeError, r"labels\[1\] = 5"),
        ((torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long)), {}, ValueError, r"\[V, H=4\]"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)), {}, ValueError, "`labels` must have"),
        ((torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)), {},
         ValueError, "`weight` must have `hidden`'s dtype"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3)), {}, ValueError, "integer tensor"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), {"temperature": 0.0},
         ValueError, "`temperature`"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), {"bias": torch.randn(4)},
         ValueError, r"`bias` must be \[V=5\]"),
        ((torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=torch.long)), {}, ValueError, "V >= 1"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), {"chunk_size": 0},
         ValueError, "`chunk_size`"),
        ((torch.randn(3, 4).int(), torch.randn(5, 4).int(), torch.zeros(3, dtype=torch.long)), {},
         ValueError, "`hidden` must be float32"),
    ],
)
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        linear_logprobs(*args, **kw)


@pytest.mark.parametrize("arg", ["labels", "weight", "bias"])
def test_device_mismatch(arg, monkeypatch):
    # meta stands for another device on a CPU-only machine: without the check, the dispatcher would
    # run the fake kernel for CPU hidden states and return uninitialised memory
    hidden, weight, bias, labels = make(4, 9, 5, bias=True)
    args = dict(labels=labels, weight=weight, bias=bias)
    args[arg] = args[arg].to("meta")
    for backend in ("compiled", "reference"):
        monkeypatch.setattr(fll._extension, "BACKEND", backend)
        with pytest.raises(ValueError, match=f"`{arg}` is on meta but `hidden` is on cpu"):
            linear_logprobs(hidden, args["weight"], args["labels"], bias=args["bias"])
        with pytest.raises(ValueError, match=f"`{arg}` is on cpu but `hidden` is on meta"):
            linear_logprobs(hidden.to("meta"), *(t.to("meta") if n != arg else t.cpu()
                                                 for n, t in (("weight", weight), ("labels", labels))),
                            bias=bias.to("meta") if arg != "bias" else bias)


def test_empty_rows():
    lp, ent = linear_logprobs(torch.randn(0, 4), torch.randn(5, 4), torch.zeros(0, dtype=torch.long),
                              return_entropy=True)
    assert lp.shape == ent.shape == (0,)


def test_dispatch_picks_triton_for_cuda_only(monkeypatch):
    pytest.importorskip("triton")
    fake = lambda dev, dtype=torch.float32: SimpleNamespace(device=torch.device(dev), dtype=dtype)  # noqa: E731
    assert fll._use_triton(fake("cuda")) and fll._use_triton(fake("cuda", torch.bfloat16))
    assert not fll._use_triton(fake("cpu")) and not fll._use_triton(fake("cuda", torch.float64))
    monkeypatch.setenv("FASTRL_LINEAR_LOGPROBS", "chunked")
    assert not fll._use_triton(fake("cuda"))


def test_reference_backend():
    code = ("import torch; from fastrl.linear_logprobs import linear_logprobs; h = torch.randn(3, 4);"
            "print(linear_logprobs(h, torch.randn(6, 4), torch.tensor([1, -100, 5]), return_entropy=True)[1].tolist()[1])")
    env = dict(os.environ, FASTRL_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0"


# ----------------------------------------------------------------------------- Triton, interpreted

_TRITON_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch, triton
    from triton.runtime.interpreter import InterpretedFunction
    import fastrl.triton.linear_logprobs as tk
    from fastrl.reference.logprobs import linear_logprobs as ref

    assert isinstance(tk._forward_kernel, InterpretedFunction), type(tk._forward_kernel)
    defaults, fused, max_splits = dict(tk.TILES), dict(tk.FUSED_TILES), tk.MAX_SPLITS
    results = []
    import importlib
    fll = importlib.import_module("fastrl.linear_logprobs")
    budget_default = fll.CHUNK_BYTES
    for N, V, H, dtype, bias, T, chunk, splits, tiles, *budget in json.loads(sys.argv[1]):
        dtype = getattr(torch, dtype)
        fll.CHUNK_BYTES = budget[0] if budget else budget_default  # the default backward's block budget
        tk.TILES.update(defaults if tiles is None else {key: tk.Tiles(*tiles) for key in defaults if key[0] == dtype})
        tk.FUSED_TILES = fused if tiles is None else {}
        tk.MAX_SPLITS = splits or max_splits
        gen = torch.Generator().manual_seed(N * V + H)
        h = torch.randn(N, H, generator=gen).to(dtype)
        w = (3 * torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype)
        b = torch.randn(V, generator=gen).to(dtype) if bias else None
        y = torch.randint(0, V, (N,), generator=gen)
        y[torch.rand(N, generator=gen) < 0.25] = -100
        g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
        lp, ent, lse = tk.linear_logprobs_forward(h, w, b, y, T, -100, True)
        lp_only, _, lse_only = tk.linear_logprobs_forward(h, w, b, y, T, -100, False)
        gh, gw, gb = tk.linear_logprobs_backward(h, w, b, y, lse, ent, g_lp, g_ent, T, -100, chunk)
        fgh, fgw, fgb = tk.linear_logprobs_backward_fused(h, w, b, y, lse, ent, g_lp, g_ent, T, -100)
        leaves = [t.double().requires_grad_(True) for t in (h, w)]
        bl = b.double().requires_grad_(True) if bias else None
        rlp, rent = ref(leaves[0], leaves[1], y, bias=bl, temperature=T)
        ((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum()).backward()
        err = lambda a, r: float((a.double() - r).abs().max() / (1 + r.abs().max()))
        kept = y != -100
        rlse = torch.logsumexp((leaves[0] @ leaves[1].T + (bl if bias else 0)).detach() / T, -1)
        res = {"lp": err(lp, rlp.detach()), "ent": err(ent, rent.detach()), "lse": err(lse[kept], rlse[kept]),
               "gh": err(gh, leaves[0].grad), "gw": err(gw, leaves[1].grad),
               "fgh": err(fgh, leaves[0].grad), "fgw": err(fgw, leaves[1].grad),
               "ignored_zero": bool((lp[~kept] == 0).all() and (ent[~kept] == 0).all() and (gh[~kept] == 0).all()
                                    and (fgh[~kept] == 0).all()),
               "entropy_off_same": bool(torch.equal(lp_only, lp) and torch.equal(lse_only, lse)),
               "splits": tk._config(V, dtype).splits,
               "grad_dtype": sorted({str(t.dtype) for t in (gw, fgw, fgh)})}
        if bias:
            res["gb"], res["fgb"] = err(gb, bl.grad), err(fgb, bl.grad)
        results.append(res)
    # every row ignored: all programs exit at once, the outputs stay 0
    lp, ent, lse = tk.linear_logprobs_forward(h, w, b, torch.full_like(y, -100), 1.0, -100, True)
    results.append({"all_ignored_zero": bool((lp == 0).all() and (ent == 0).all() and (lse == 0).all())})
    print(json.dumps(results))
""")

_SMALL_TILES = [16, 16, 16, 16, 4, 2]  # BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_H, num_warps, num_stages: many vocab tiles


@pytest.mark.triton
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    # Default tiles: V and H not multiples of the blocks, rows not a multiple of BLOCK_M, chunks of 8 / 16 rows;
    # H = 70: two hidden blocks in the fused backward, the second a tail. Small 16 x 16 x 16 tiles to split the
    # vocabulary: 3 splits of 5 tiles over V = 203 (the last split ends in a partial tile and two tiles wholly
    # past V), 13 splits of one tile (bf16), 2 splits of exactly 2 tiles (V = 64). Default (chunked) and fully
    # fused backward, both vs fp64; a quarter of the rows ignored. Two cases with a small block budget: the
    # default backward in several row and vocab blocks.
    cases = [(37, 101, 45, "float32", True, 0.8, 16, None, None), (5, 64, 32, "float32", False, 1.0, 0, None, None),
             (33, 70, 19, "bfloat16", True, 1.0, 8, None, None), (20, 130, 40, "float16", False, 1.3, 0, None, None),
             (40, 150, 70, "float32", True, 0.9, 0, None, None),
             (21, 203, 37, "float32", True, 1.1, 0, 3, _SMALL_TILES),
             (9, 200, 20, "bfloat16", False, 0.7, 0, None, _SMALL_TILES),
             (16, 64, 16, "float32", False, 1.0, 5, 2, _SMALL_TILES),
             # the default backward in (row, vocab) blocks: a 512-element budget with 16 x 16 tiles gives
             # 16 x 32 blocks, 3 row blocks x 4 vocab blocks (fp32), 3 x 3 with the fp32 accumulators of bf16
             (37, 101, 45, "float32", True, 0.8, 0, None, _SMALL_TILES, 2048),
             (33, 70, 19, "bfloat16", True, 1.0, 0, None, _SMALL_TILES, 1024)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *results, last = json.loads(out.stdout.strip().splitlines()[-1])
    assert [res["splits"] for res in results] == [1, 1, 1, 2, 2, 3, 13, 2, 7, 5]
    assert last == {"all_ignored_zero": True}
    for (N, V, H, dtype, bias, T, chunk, *_), res in zip(cases, results):
        tol = 1e-5 if dtype == "float32" else 2e-2
        assert res["ignored_zero"] and res["entropy_off_same"] and res["grad_dtype"] == [f"torch.{dtype}"]
        for key in ("lp", "ent", "lse", "gh", "gw", "fgh", "fgw") + (("gb", "fgb") if bias else ()):
            assert res[key] < tol, (dtype, key, res)


def test_fp32_precision_setting_is_checked():
    pytest.importorskip("triton")
    env = dict(os.environ, FASTRL_LINEAR_LOGPROBS_FP32="tf32")
    out = subprocess.run([sys.executable, "-c", "import fastrl.triton.linear_logprobs"], env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "FASTRL_LINEAR_LOGPROBS_FP32 must be 'ieee' or 'tf32x3', got 'tf32'" in out.stderr


def test_split_config_depends_on_vocab_and_dtype_only():
    tk = pytest.importorskip("fastrl.triton.linear_logprobs")
    cfg = tk._config(65536, torch.float32)
    assert cfg.span % cfg.tiles.BLOCK_N == 0 and cfg.splits * cfg.span >= 65536 > (cfg.splits - 1) * cfg.span
    assert cfg.splits == tk.MAX_SPLITS == 128  # one row tile fills 128 SMs
    for vocab in (1, 127, 128, 129, 5000, 152064, 262144):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            c = tk._config(vocab, dtype)
            assert 1 <= c.splits <= tk.MAX_SPLITS and c.span % c.tiles.BLOCK_N == 0
            assert (c.splits - 1) * c.span < vocab <= c.splits * c.span  # no empty split


_TRITON_INVARIANCE_SCRIPT = textwrap.dedent(r"""
    import json
    import torch
    import fastrl.triton.linear_logprobs as tk

    out = {}
    defaults = dict(tk.TILES)
    for dtype, small in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        # small: 16 x 16 x 16 tiles, 3 vocab splits of 2 tiles (the last one partial)
        tk.TILES.update({key: tk.Tiles(16, 16, 16, 16, 4, 2) for key in defaults} if small else defaults)
        tk.MAX_SPLITS = 3 if small else 128
        gen = torch.Generator().manual_seed(3)
        N, V, H = 70, 90, 40  # V, H and N not multiples of the blocks
        h = torch.randn(N, H, generator=gen).to(dtype)
        w = (3 * torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype)
        b = torch.randn(V, generator=gen).to(dtype)
        y = torch.randint(0, V, (N,), generator=gen)
        y[torch.rand(N, generator=gen) < 0.3] = -100
        probe = [i for i in (5, 40, 69) if y[i] != -100] + [int((y != -100).nonzero()[-1])]
        g = torch.randn(2, N, generator=gen)

        def run(lo, hi):  # (log-prob, entropy, lse[, fused grad_hidden]) of rows lo..hi-1
            lp, ent, lse = tk.linear_logprobs_forward(h[lo:hi], w, b, y[lo:hi], 0.9, -100, True)
            if small:  # the splits are the forward's; the fused backward (slow interpreted) has none
                return lp, ent, lse
            gh = tk.linear_logprobs_backward_fused(h[lo:hi], w, b, y[lo:hi], lse, ent, g[0, lo:hi], g[1, lo:hi],
                                                   0.9, -100)[0]
            return lp, ent, lse, gh

        whole = run(0, N)
        same = True
        for i in probe:  # row i alone, in a short batch at another position, and in the whole batch
            for lo in (i, max(0, i - 3)):
                part = run(lo, i + 1)
                same &= all(bool(torch.equal(p[i - lo], q[i])) for p, q in zip(part, whole))
        out[str(dtype) + (" split" if small else "")] = same
    tk.TILES.update(defaults)
    tk.MAX_SPLITS = 128
    # dispatch: FASTRL_LINEAR_LOGPROBS_BACKWARD=fused routes the op's backward to the fused kernels
    import importlib, os
    fll = importlib.import_module("fastrl.linear_logprobs")  # the module (`fastrl.linear_logprobs` is the function)
    fll._use_triton = lambda hidden: True  # as for CUDA tensors
    lp, ent, lse = torch.ops.fastrl.linear_logprobs(h, w, b, y, 0.9, -100, True, 0)
    fused = tk.linear_logprobs_backward_fused(h, w, b, y, lse, ent, g[0], g[1], 0.9, -100)
    chunked = tk.linear_logprobs_backward(h, w, b, y, lse, ent, g[0], g[1], 0.9, -100, 0)
    out["distinct"] = not all(bool(torch.equal(p, q)) for p, q in zip(fused, chunked))  # else the check is void
    for mode, want in (("fused", fused), ("chunked", chunked)):
        os.environ["FASTRL_LINEAR_LOGPROBS_BACKWARD"] = mode
        got = torch.ops.fastrl.linear_logprobs_backward(h, w, b, y, lse, ent, g[0], g[1], 0.9, -100, 0)
        out[mode] = all(bool(torch.equal(p, q)) for p, q in zip(got, want))
    print(json.dumps(out))
""")


@pytest.mark.triton
def test_triton_batch_invariance_under_interpreter():
    """Tiles and vocab splits fixed by (V, dtype), splits merged in a fixed order: a row's log-prob,
    entropy, lse and (fused backward) grad_hidden are bitwise the same alone and inside any batch."""
    pytest.importorskip("triton")
    # The interpreter's tl.dot is numpy's matmul: OpenBLAS's Haswell/Zen sgemm sums in an order that
    # depends on the row count (fp32 rows differ alone and in a batch), its Sandybridge one does not.
    # The property under test is the kernel's (fixed tiles and splits), so the host BLAS is pinned.
    env = dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_CORETYPE="Sandybridge")
    out = subprocess.run([sys.executable, "-c", _TRITON_INVARIANCE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch.float32": True, "torch.bfloat16": True,
                                                               "torch.float32 split": True, "distinct": True,
                                                               "fused": True, "chunked": True}


# ------------------------------------------------------------------------------------- CUDA (Triton)

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@_cuda
@pytest.mark.parametrize("N, V, H, dtype, bias", [(300, 5000, 96, torch.float32, True),
                                                  (77, 70000, 128, torch.float32, False),  # 110 splits of 5 tiles
                                                  (200, 3001, 256, torch.bfloat16, True),
                                                  (130, 4099, 72, torch.float16, False)])
def test_cuda_matches_cpu_and_fp64(N, V, H, dtype, bias):
    pytest.importorskip("triton")
    hidden, weight, b, labels = make(N, V, H, dtype=dtype, seed=N, bias=bias, ignore_frac=0.2)
    g = torch.randn(2, N, generator=torch.Generator().manual_seed(2))
    cpu = _grads(hidden, weight, b, labels, g, chunk_size=64)
    cuda = _grads(*(t.cuda() if t is not None else None for t in (hidden, weight, b, labels)), g.cuda())
    ref = ref_with_grads(hidden, weight, b, labels, g[0], g[1], 1.0)
    tol = 2e-5 if dtype == torch.float32 else 3e-2  # half: the CPU path's logits are rounded to the dtype
    for k, (want, got_cpu, got_cuda) in enumerate(zip(ref, cpu, cuda)):
        if want is None:
            continue
        scale = 1 + want.abs().max()
        assert (got_cuda.cpu().double() - want).abs().max() / scale < tol, k
        assert (got_cuda.cpu().double() - got_cpu.double()).abs().max() / scale < tol, k
    assert torch.all(cuda[0].cpu()[labels == -100] == 0) and torch.all(cuda[2].cpu()[labels == -100] == 0)


@pytest.mark.cuda
@_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batch_invariance_bitwise(dtype):
    """Vocab splits merged in a fixed order: a row's log-prob, entropy and lse are bitwise the same alone,
    in batches of other sizes and positions (across row tiles), and next to ignored rows."""
    pytest.importorskip("triton")
    hidden, weight, b, labels = (t.cuda() for t in make(300, 9000, 136, dtype=dtype, seed=3, bias=True,
                                                         ignore_frac=0.3))
    labels[[5, 150, 299]] = torch.tensor([1, 8999, 4000], device="cuda")
    whole = torch.ops.fastrl.linear_logprobs(hidden, weight, b, labels, 0.9, -100, True, 0)
    for i in (5, 150, 299):
        for lo, hi in ((i, i + 1), (max(0, i - 140), min(300, i + 3)), (i, 300)):
            part = torch.ops.fastrl.linear_logprobs(hidden[lo:hi], weight, b, labels[lo:hi], 0.9, -100, True, 0)
            for p, q in zip(part, whole):
                assert torch.equal(p[i - lo], q[i]), (i, lo, hi)
