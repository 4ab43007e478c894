"""Best-of-N benchmarks: fastrl.sampling.groups vs plain PyTorch and verl 0.9.1's bootstrap_metric.

* best_of_n: B = 65,536 scores in 4,096 shuffled groups of 16 (scores rounded to 0.1, so ties are
  common) vs the sort/scatter a user writes in PyTorch (two stable argsorts, rank within group,
  scatter into [G, k]); same output bitwise (ties by lower index, -1 padding).
* best_worst_at_k: best@k and worst@k for k in {1, 2, 4, 8, 16} on 512 groups of 16 vs verl's
  validation metric: ``bootstrap_metric(vals, k, [np.max, np.min])`` per prompt and k (default
  n_bootstrap=1000, seed 42), as ``process_validation_metrics`` calls it. The statistics differ
  by design: verl's mean is a Monte-Carlo estimate of E[max of k draws *with* replacement];
  fastrl returns the exact *without*-replacement expectation. The output check therefore compares
  verl's means with fastrl's exact with-replacement values (best_at_k(..., replacement=True))
  within 5 standard errors (the statistic's exact std / sqrt(1000)); the timed fastrl call computes the exact
  without-replacement estimator (the same cost: one sort, weights per k).
* maj_at_k: maj@k for k in {1, 2, 4, 8, 16} on 512 groups of 16 samples with 6 distinct answers
  (two of them correct) vs the exact vote-count DP in Python (exact integers, a loop over groups
  and ks: what ``fastrl.sampling.maj_at_k`` ran before the compiled op; now
  ``fastrl.reference.selection.maj_at_k_dp``). Same statistic: outputs agree to 1e-12. Runs on
  the context's device (the CUDA op since the follow-up; the Python DP reads the inputs back).
* all_pairs_max_pairs: every preference pair (margin 0) of 4,096 shuffled groups of 16 into a
  fixed [G * 120] buffer (select_pairs(mode="all_pairs", max_pairs=...): compiled, no host sync)
  vs the vectorized PyTorch candidate-list path a user would write (fastrl's all_pairs before the
  compiled op, now its FASTRL_BACKEND=reference path: a sum_g n_g^2 candidate list, two host
  syncs), padded to the same shape; same pairs, same order.
* quantile_mask: TRL's top-entropy mask on [256 x 4096] entropies, 70% of tokens masked, q = 0.8:
  fastrl (exact; on a GPU a radix select over the masked keys, no sort, no host sync; on the CPU
  kthvalue) vs torch.quantile over the gathered masked tokens (what TRL's get_high_entropy_mask runs).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from fastrl.bench import Case, Skip, try_import
from fastrl.reference import selection as ref
from fastrl.sampling.groups import _all_pairs, best_at_k, best_of_n, maj_at_k, quantile_mask, select_pairs, worst_at_k

KS = [1, 2, 4, 8, 16]


def shuffled_groups(prompts: int, n: int, device, seed: int = 0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(prompts).repeat_interleave(n)
    perm = torch.randperm(prompts * n, generator=gen)
    scores = (torch.rand(prompts * n, generator=gen) * 10).round() / 10
    return SimpleNamespace(scores=scores[perm].to(device), ids=ids[perm].to(device), G=prompts)


def eager_best_of_n(x: torch.Tensor, ids: torch.Tensor, G: int, k: int) -> torch.Tensor:
    """Sort by (group, -score, index), rank within group, scatter the first k of each group."""
    o = torch.argsort(x, descending=True, stable=True)
    o = o[torch.argsort(ids[o], stable=True)]
    g = ids[o]
    counts = torch.bincount(ids, minlength=G)
    rank = torch.arange(x.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[g]
    keep = rank < k
    out = torch.full((G, k), -1, dtype=torch.int64, device=x.device)
    out[g[keep], rank[keep]] = o[keep]
    return out


def verl_best_worst(metric_utils, data) -> torch.Tensor:
    """[G, len(KS), 2 (best, worst), 2 (mean, std)] from verl's bootstrap, one prompt at a time."""
    out = np.empty((data.G, len(KS), 2, 2))
    for g, vals in enumerate(data.per_group):
        for j, k in enumerate(KS):
            (bm, bs), (wm, ws) = metric_utils.bootstrap_metric(vals, k, [np.max, np.min])
            out[g, j] = [[bm, bs], [wm, ws]]
    return torch.from_numpy(out)


def cases(ctx) -> list[Case]:
    dev = ctx.device
    quick = ctx.quick
    P, n = (256, 16) if quick else (4096, 16)
    setup = lambda: shuffled_groups(P, n, dev)
    shape = f"B={P * n} scores, {P} shuffled groups of {n}, ties"
    out = [
        Case(
            name=f"best_of_n_k{k}", shape=f"{shape}, k={k}", setup=setup,
            bytes_moved=P * n * (4 + 8) + P * k * 8,
            impls={"fastrl": lambda a, k=k: best_of_n(a.scores, a.ids, k, num_groups=a.G),
                   "torch-sort-scatter": lambda a, k=k: eager_best_of_n(a.scores, a.ids, a.G, k)},
            target={"torch-sort-scatter": 10}, rtol=0, atol=0,
        )
        for k in (1, 4)
    ]

    metric_utils = try_import("verl.trainer.ppo.metric_utils")
    Pk = 16 if quick else 512
    state = {}

    def setup_k():
        a = shuffled_groups(Pk, 16, dev, seed=1)
        order = torch.argsort(a.ids.cpu(), stable=True)
        a.per_group = a.scores.cpu()[order].double().view(Pk, 16).tolist()
        state["inputs"] = a
        return a

    def with_replacement(x, a):
        return torch.stack([best_at_k(x, a.ids, KS, replacement=True, num_groups=a.G),
                            worst_at_k(x, a.ids, KS, replacement=True, num_groups=a.G)], 2).cpu()

    def check(fast, verl):
        # scores are >= 0, so max(x)^2 = max(x^2): the exact variance of one bootstrap draw's
        # statistic is E[m(x^2)] - E[m(x)]^2 (verl's own std estimate is 0 when a rare outcome was
        # never drawn, which would make a 5-SE test fail spuriously)
        a = state["inputs"]
        exact = with_replacement(a.scores.double(), a)
        var = (with_replacement(a.scores.double() ** 2, a) - exact ** 2).clamp(min=0)
        se = var.sqrt() / np.sqrt(1000)
        err = (verl[..., 0] - exact).abs()
        bad = err > 5 * se + 1e-12
        if bool(bad.any()):
            return f"{int(bad.sum())} bootstrap means off the with-replacement expectation by > 5 SE (max {float(err.max()):.3g})"
        if fast.shape != exact.shape:
            return f"shape {tuple(fast.shape)} != {tuple(exact.shape)}"
        return None

    out.append(Case(
        name="best_worst_at_k", shape=f"{Pk} groups of 16, k in {KS}, best and worst", setup=setup_k,
        impls={"fastrl": lambda a: torch.stack([best_at_k(a.scores, a.ids, KS, num_groups=a.G),
                                                worst_at_k(a.scores, a.ids, KS, num_groups=a.G)], 2),
               "verl-bootstrap": (metric_utils if isinstance(metric_utils, Skip)
                                  else lambda a: verl_best_worst(metric_utils, a))},
        target={"verl-bootstrap": 1000}, check=check,
        note="fastrl: exact E[max/min of k draws] without replacement; verl: 1000 bootstrap draws "
             "with replacement per prompt and k (its statistic is checked against fastrl's exact "
             "with-replacement value, within 5 standard errors). verl takes 16-21 s per call here (2-core EPYC).",
    ))

    Pm = 16 if quick else 512

    def setup_maj():
        gen = torch.Generator().manual_seed(2)
        ids = torch.arange(Pm).repeat_interleave(16)[torch.randperm(Pm * 16, generator=gen)]
        answers = torch.randint(0, 6, (Pm * 16,), generator=gen)
        return SimpleNamespace(answers=answers.to(dev), correct=(answers < 2).to(dev), ids=ids.to(dev), G=Pm)

    out.append(Case(
        name="maj_at_k", shape=f"{Pm} groups of 16, 6 answers, k in {KS}", setup=setup_maj,
        impls={"fastrl": lambda a: maj_at_k(a.answers, a.correct, a.ids, KS, num_groups=a.G),
               "python-exact-dp": lambda a: ref.maj_at_k_dp(a.answers, a.correct, a.ids, KS, num_groups=a.G)},
        rtol=1e-12, atol=1e-12,
        note="python-exact-dp: the previous fastrl.sampling.maj_at_k (exact-integer DP, a Python loop over "
             "groups); fastrl: the compiled op (fp64 DP, parallel over groups, all ks in one pass).",
    ))

    cap = P * n * (n - 1) // 2  # the most pairs groups of n can have: nothing is dropped

    def padded_all_pairs(a):
        c, r = _all_pairs(a.scores.double(), a.ids, a.G, 0.0)
        out = torch.full((2, cap), -1, dtype=torch.int64, device=c.device)
        out[0, :c.numel()], out[1, :r.numel()] = c, r
        return out

    out.append(Case(
        name="all_pairs_max_pairs", shape=f"{shape}, margin 0, max_pairs={cap}", setup=setup,
        impls={"fastrl": lambda a: torch.stack(select_pairs(a.scores, a.ids, mode="all_pairs", num_groups=a.G,
                                                            max_pairs=cap)),
               "torch-candidates": padded_all_pairs},
        rtol=0, atol=0,
        note="fastrl: compiled count / scan / write, fixed-shape output, no host sync; torch-candidates: "
             "vectorized candidate list (2 host syncs), padded to the same shape.",
    ))

    R, T = (16, 512) if quick else (256, 4096)

    def setup_q():
        gen = torch.Generator().manual_seed(3)
        ent = torch.rand(R, T, generator=gen) * 3
        mask = torch.rand(R, T, generator=gen) < 0.7
        return SimpleNamespace(ent=ent.to(dev), mask=mask.to(dev))

    def torch_quantile_mask(a):
        t = torch.quantile(a.ent[a.mask].float(), 0.8)
        return (a.ent >= t) & a.mask

    out.append(Case(
        name="quantile_mask", shape=f"entropies [{R} x {T}], 70% masked, q=0.8", setup=setup_q,
        bytes_moved=R * T * (4 + 1 + 1),
        impls={"fastrl": lambda a: quantile_mask(a.ent, a.mask, 0.8)[0], "torch-quantile": torch_quantile_mask},
        rtol=0, atol=0,
        note="fastrl: exact, no 2^24 limit; on a GPU a radix select over the masked keys, no sort, no host sync "
             "(torch-quantile gathers the masked tokens: a sync); on the CPU torch.kthvalue.",
    ))
    return out
