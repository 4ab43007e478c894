"""Vocab-parallel log-probs (fastrl.logprobs_ops.vocab_parallel_logprobs) over 2 and 3 gloo ranks.

Each rank holds a slice of the vocabulary of the same full logits; its log-probs / entropy and the
gradient of its shard must equal fastrl.logprobs on the full logits (sliced the same way), and the fp64
reference: one or K labels per position, out-of-place or in-place backward, uneven and empty shards.
The ranks run in child processes (tests/_dist.py).
"""
import math

import pytest
import torch

from fastrl.logprobs import logprobs, vocab_parallel_logprobs
from fastrl.reference import logprobs as ref
from _dist import run_ranks


def _case(name, gen, lead, sizes, *, dtype=torch.float32, starts=None, temperature=1.0, ignore_index=-100,
          return_entropy=True, grad_lp=True, grad_ent=True, reference=False, transposed=False, topk=0,
          inplace=False):
    """A full [*lead, V] logits tensor with labels on every shard (and ignored ones), its split and the
    grad_outputs to back-propagate (the same on every rank). ``topk``: K labels per position."""
    vocab = sum(sizes)
    logits = (torch.randn(*lead, vocab, generator=gen) * 3).to(dtype)
    label_shape = lead + ((topk,) if topk else ())
    labels = torch.randint(0, vocab, label_shape, generator=gen)
    flat = labels.view(-1)
    flat[0] = ignore_index
    ends = torch.tensor(sizes).cumsum(0).tolist()
    for i, end in enumerate(ends):  # a label on the first and the last element of each (non-empty) shard
        if sizes[i]:
            flat[(1 + 2 * i) % flat.numel()] = end - 1
            flat[(2 + 2 * i) % flat.numel()] = end - sizes[i]
    if starts is None:
        starts = [end - size for end, size in zip(ends, sizes)]
    return dict(name=name, logits=logits, labels=labels, sizes=sizes, starts=starts, temperature=temperature,
                ignore_index=ignore_index, return_entropy=return_entropy, explicit_starts=False,
                g_lp=torch.randn(label_shape, generator=gen) if grad_lp else None,
                g_ent=torch.randn(lead, generator=gen) if (grad_ent and return_entropy) else None,
                reference=reference, transposed=transposed, inplace=inplace)


def _cases(world_size):
    gen = torch.Generator().manual_seed(1234 + world_size)
    sizes = [7, 13] if world_size == 2 else [5, 9, 4]  # uneven shards
    equal = [11] * world_size
    cases = [
        _case("fp32", gen, (3, 5), sizes, temperature=0.7),
        _case("fp32_equal_no_entropy", gen, (9,), equal, return_entropy=False),
        _case("bf16", gen, (2, 6), sizes, dtype=torch.bfloat16, temperature=1.3),
        _case("fp16", gen, (7,), equal, dtype=torch.float16),
        _case("entropy_grad_only", gen, (6,), sizes, grad_lp=False),
        _case("logprob_grad_only", gen, (6,), sizes, grad_ent=False, temperature=2.0),
        _case("reference_backend", gen, (5,), sizes, temperature=0.9, reference=True),
        # the shard is a transposed view (stride along the vocabulary != 1)
        _case("transposed_shard", gen, (6,), sizes, temperature=1.1, transposed=True),
        # K labels per position (top-K candidates), some ignored, some on each shard
        _case("topk", gen, (3, 4), sizes, topk=3, temperature=0.8),
        _case("topk_bf16_logprob_grad_only", gen, (5,), sizes, dtype=torch.bfloat16, topk=2, grad_ent=False),
        _case("topk_reference_backend", gen, (5,), sizes, topk=4, reference=True),
        # the gradient written into the shard's own storage
        _case("inplace", gen, (4, 3), sizes, temperature=0.9, inplace=True),
        _case("inplace_topk_fp16", gen, (6,), sizes, dtype=torch.float16, topk=2, inplace=True),
        _case("inplace_transposed", gen, (6,), sizes, transposed=True, inplace=True),
        # an empty shard (V_r = 0) contributes nothing
        _case("empty_shard", gen, (5,), [15, 0] if world_size == 2 else [5, 0, 13]),
    ]
    # an ignore_index that is also a valid local index of every shard: only that global id is ignored,
    # not the label 3 positions into the last shard
    c = _case("ignore_index_in_range", gen, (4, 3), sizes, ignore_index=3)
    c["labels"].view(-1)[7] = sum(sizes[:-1]) + 3
    cases.append(c)
    # a layout that is not rank order: the last rank holds the first slice (vocab_start_index given)
    c = _case("explicit_starts", gen, (8,), sizes)
    order = [world_size - 1] + list(range(world_size - 1))  # order[k]: the rank holding the k-th slice
    starts = [0] * world_size
    pos = 0
    for rank in order:
        starts[rank] = pos
        pos += sizes[rank]
    c.update(starts=starts, explicit_starts=True)
    cases.append(c)
    # explicit starts with an empty shard that starts where a lower rank's non-empty shard does
    c = _case("explicit_starts_empty_shard", gen, (5,), [20, 0] if world_size == 2 else [9, 0, 9])
    c.update(starts=[0, 0] if world_size == 2 else [0, 0, 9], explicit_starts=True)
    cases.append(c)
    # -inf logits: row 0 has nothing but -inf on rank 0's shard, row 1 is all -inf (NaN result, like
    # fastrl.logprobs), row 2 has its label on a -inf logit (log-prob -inf)
    c = _case("neg_inf", gen, (4,), sizes)
    c["logits"][0, :sizes[0]] = -math.inf
    c["logits"][1] = -math.inf
    c["logits"][2, sizes[0]] = -math.inf
    c["labels"][:3] = torch.tensor([sizes[0] + 1, 0, sizes[0]])
    c["g_ent"] = None  # the entropy gradient of a row with -inf logits is NaN-free only for the log-prob
    cases.append(c)
    return cases


def _shard(case, rank):
    start, size = case["starts"][rank], case["sizes"][rank]
    return case["logits"][..., start:start + size]


def _backward(case, lp, ent):
    """Back-propagate the case's grad_outputs (the same on every rank; none through non-finite log-probs)."""
    loss = 0
    if case["g_lp"] is not None:
        loss = loss + (torch.where(lp.isfinite(), lp, 0) * case["g_lp"]).sum()
    if case["g_ent"] is not None:
        loss = loss + (ent * case["g_ent"]).sum()
    loss.backward()


def _run_case(case, rank, group):
    import fastrl._extension as ext

    if case["transposed"]:
        leaf = _shard(case, rank).t().contiguous().requires_grad_(True)
        shard = leaf.t()
    else:
        leaf = shard = _shard(case, rank).clone().requires_grad_(True)
    if case["inplace"]:
        shard = shard * 1.0  # a non-leaf activation (the LM head's output): its storage gets overwritten
    saved_backend = ext.BACKEND
    ext.BACKEND = "reference" if case["reference"] else saved_backend
    try:
        out = vocab_parallel_logprobs(
            shard, case["labels"], process_group=group, temperature=case["temperature"],
            vocab_start_index=case["starts"][rank] if case["explicit_starts"] else None,
            return_entropy=case["return_entropy"], ignore_index=case["ignore_index"],
            inplace_backward=case["inplace"])
        lp, ent = out if case["return_entropy"] else (out, None)
        _backward(case, lp, ent)
    finally:
        ext.BACKEND = saved_backend
    grad = leaf.grad.t() if case["transposed"] else leaf.grad
    # in place: a unit-stride shard now holds its own gradient (a transposed one was copied first, untouched)
    overwritten = torch.equal(shard.detach(), grad) if case["inplace"] else None
    return dict(lp=lp.detach(), ent=None if ent is None else ent.detach(), grad=grad, overwritten=overwritten)


def _errors(rank, world_size, group, gen):
    """Bad inputs, each raised on every rank (so no rank hangs in a collective)."""
    sizes = [6] * world_size
    logits = torch.randn(4, 6, generator=gen)
    labels = torch.tensor([0, 5, 6 * world_size - 1, -100])
    errors = {}

    def record(key, fn):
        try:
            fn()
            errors[key] = None
        except (ValueError, RuntimeError) as e:
            errors[key] = f"{type(e).__name__}: {e}"

    gap = sum(sizes[:rank]) + (1 if rank == world_size - 1 else 0)
    record("gap", lambda: vocab_parallel_logprobs(logits, labels, process_group=group, vocab_start_index=gap))
    record("overlap", lambda: vocab_parallel_logprobs(logits, labels, process_group=group, vocab_start_index=0))
    record("some_ranks", lambda: vocab_parallel_logprobs(logits, labels, process_group=group,
                                                         vocab_start_index=0 if rank == 0 else None))
    high = labels.clone()
    high[2] = 6 * world_size  # the global V: out of range, although < V on no shard's local scale
    record("label_high", lambda: vocab_parallel_logprobs(logits, high, process_group=group))
    low = labels.clone()
    low[1] = -1
    record("label_low", lambda: vocab_parallel_logprobs(logits, low, process_group=group))
    record("temperature", lambda: vocab_parallel_logprobs(logits, labels, process_group=group, temperature=0.0))
    record("topk_high", lambda: vocab_parallel_logprobs(logits, torch.stack([labels, high], 1), process_group=group))
    record("float_labels", lambda: vocab_parallel_logprobs(logits, labels.float(), process_group=group))
    record("shape", lambda: vocab_parallel_logprobs(logits, labels[:3], process_group=group))
    # and still fine after all of that (no rank left behind in a collective)
    record("ok", lambda: vocab_parallel_logprobs(logits, labels, process_group=group))
    return errors


def _worker(rank, world_size, init_method, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        group = dist.group.WORLD
        cases = _cases(world_size)
        results = {c["name"]: _run_case(c, rank, group) for c in cases}
        torch.set_num_threads(2)  # the same bits with more threads
        results["fp32_2threads"] = _run_case(cases[0], rank, group)
        torch.set_num_threads(1)
        empty = torch.randn(0, 3, requires_grad=True)  # N = 0
        lp, ent = vocab_parallel_logprobs(empty, torch.zeros(0, dtype=torch.long), process_group=group,
                                          return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        results["empty"] = (lp.shape, ent.shape, empty.grad.shape)
        results["errors"] = _errors(rank, world_size, group, torch.Generator().manual_seed(7))
        # what a CUDA caller gets for shards that do not tile [0, V) (the flag stays on the device there)
        from fastrl.logprobs import _VocabParallel
        results["invalid_layout"] = _VocabParallel.apply(
            torch.randn(3, 4), torch.tensor([0, 5, -100]), torch.zeros(3, dtype=torch.bool), torch.tensor(4 * rank),
            torch.tensor(False), 1.0, -100, True, group, False)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world_size, tmp_path):
    run_ranks(_worker, (world_size, f"file://{tmp_path}/init", str(tmp_path)), world_size)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def _full(case):
    """fastrl.logprobs on the full logits and its gradient, plus the fp64 reference."""
    full = case["logits"].clone().requires_grad_(True)
    lp, ent = logprobs(full, case["labels"], temperature=case["temperature"], return_entropy=True,
                       ignore_index=case["ignore_index"])
    _backward(case, lp, ent)
    ref_lp, ref_ent, _ = ref.logprobs(case["logits"], case["labels"], temperature=case["temperature"],
                                      ignore_index=case["ignore_index"])
    return lp.detach(), ent.detach(), full.grad, ref_lp, ref_ent


def _check(world_size, results):
    for case in _cases(world_size):
        name = case["name"]
        lp, ent, grad, ref_lp, ref_ent = _full(case)
        grad_tol = dict(rtol=1e-5, atol=1e-5) if case["logits"].dtype == torch.float32 else {}
        for rank, res in enumerate(results):
            got = res[name]
            # replicated: every rank has the same bits
            assert torch.equal(got["lp"].nan_to_num(), results[0][name]["lp"].nan_to_num()), name
            torch.testing.assert_close(got["lp"], lp, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
            finite = ref_lp.isfinite()
            torch.testing.assert_close(got["lp"][finite].double(), ref_lp[finite], rtol=0, atol=5e-5, msg=name)
            if case["return_entropy"]:
                assert torch.equal(got["ent"].nan_to_num(), results[0][name]["ent"].nan_to_num()), name
                torch.testing.assert_close(got["ent"], ent, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
                finite = ref_ent.isfinite()
                torch.testing.assert_close(got["ent"][finite].double(), ref_ent[finite], rtol=0, atol=5e-5, msg=name)
            else:
                assert got["ent"] is None
            assert got["overwritten"] in ((None,) if not case["inplace"] else (not case["transposed"],)), name
            want_grad = _shard(dict(case, logits=grad), rank)
            assert got["grad"].dtype == case["logits"].dtype and got["grad"].shape == want_grad.shape
            torch.testing.assert_close(got["grad"], want_grad, **grad_tol, equal_nan=True, msg=name)
        # ignored positions get exactly no log-prob gradient on any shard
        if case["g_ent"] is None:
            ignored = case["labels"] == case["ignore_index"]
            ignored = ignored.all(-1) if ignored.dim() > case["logits"].dim() - 1 else ignored
            for res in results:
                assert torch.equal(res[name]["grad"][ignored], torch.zeros_like(res[name]["grad"][ignored])), name
    v = 6 * world_size
    for res in results:
        for key in ("lp", "ent", "grad"):
            assert torch.equal(res["fp32_2threads"][key], res["fp32"][key])
        assert res["empty"] == ((0,), (0,), (0, 3))
        e = res["errors"]
        assert "tile [0, V) without gaps or overlaps" in e["gap"] and e["gap"].startswith("ValueError")
        assert "tile [0, V)" in e["overlap"]
        assert "given on every rank or on none, got it on ranks [0]" in e["some_ranks"]
        assert f"[0, V={v})" in e["label_high"] and f"labels[2] = {v}" in e["label_high"]
        assert "labels[1] = -1" in e["label_low"]
        assert "`temperature` must be a finite number > 0, got 0.0" in e["temperature"]
        assert f"labels[5] = {v}" in e["topk_high"]  # position in the flattened [4, 2] labels
        assert "must be an integer tensor, got dtype torch.float32" in e["float_labels"]
        assert "`labels` must have shape" in e["shape"]
        assert e["ok"] is None
        lp, ent = res["invalid_layout"]
        assert lp[:2].isnan().all() and lp[2] == 0 and ent.isnan().all()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_equals_full_logits(world_size, tmp_path):
    _check(world_size, _spawn(world_size, tmp_path))


def test_needs_initialized_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="torch.distributed must be initialized"):
        vocab_parallel_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), process_group=None)


@pytest.mark.parametrize("entropy", [False, True])
def test_reference_backward_matches_op_and_autograd(entropy):
    """The fp64 backward reference (used by FASTRL_BACKEND=reference) against the compiled
    fastrl::logprobs_backward and against autograd through the fp64 log-softmax, including a g_lse
    term and lse / entropy given from outside (as the vocab-parallel backward passes them)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 37, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 37, (6,), generator=gen)
    labels[2] = -100
    g_lp, g_ent, g_lse = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3))
    x = logits.clone().requires_grad_(True)
    lp, ent, lse = ref.logprobs(x, labels, temperature=0.8)
    ((lp * g_lp).sum() + (lse * g_lse).sum() + ((ent * g_ent).sum() if entropy else 0)).backward()
    got = ref.logprobs_backward(logits, labels, lse.detach(), ent.detach(), g_lp, g_ent if entropy else None, g_lse,
                                temperature=0.8)
    torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)
    f32 = logits.float()
    op = torch.ops.fastrl.logprobs_backward(f32, labels, lse.float(), ent.float(), g_lp.float(),
                                            g_ent.float() if entropy else None, g_lse.float(), 0.8, -100)
    torch.testing.assert_close(op.double(), got, rtol=1e-4, atol=1e-5)
