"""Brute-force references of the best-of-N family (fastrl.sampling.groups): the spec the fast
implementations are tested against. Python loops over groups and subsets, exact rationals
(fractions.Fraction) where an estimator is a closed form: slow on purpose, small inputs only.
"""
from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction
from math import comb

import torch


def _members(group_ids: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Sample indices of every group, in index order; raises for an id outside [0, num_groups)."""
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for i, g in enumerate(group_ids.tolist()):
        if not 0 <= g < num_groups:
            raise ValueError(f"fastrl: `group_ids` must lie in [0, num_groups={num_groups}), got "
                             f"group_ids[{i}] = {g}")
        groups[g].append(i)
    return groups


def best_of_n(scores: torch.Tensor, group_ids: torch.Tensor, k: int, *, largest: bool = True,
              num_groups: int) -> torch.Tensor:
    """int64[G, k]: each group's non-NaN members sorted by (score desc/asc, index), -1 padded."""
    x = scores.double().tolist()
    out = torch.full((num_groups, k), -1, dtype=torch.int64)
    for g, members in enumerate(_members(group_ids.cpu(), num_groups)):
        ok = [i for i in members if x[i] == x[i]]
        ok.sort(key=lambda i: (-x[i] if largest else x[i], i))
        out[g, : min(k, len(ok))] = torch.tensor(ok[:k], dtype=torch.int64)
    return out.to(scores.device)


def all_pairs(scores: torch.Tensor, group_ids: torch.Tensor, margin: float, num_groups: int):
    """Every (c, r) of a group with s_c - s_r > margin, ordered by (group, c, r)."""
    x = scores.double().tolist()
    pairs = [(c, r) for members in _members(group_ids.cpu(), num_groups)
             for c in members for r in members if x[c] - x[r] > margin]
    return [c for c, _ in pairs], [r for _, r in pairs]


def pass_at_k(correct: torch.Tensor, group_ids: torch.Tensor, k: int, *, num_groups: int) -> torch.Tensor:
    """float64[G]: the fraction of k-subsets holding a correct sample, by enumerating them all."""
    c = (correct != 0).tolist()
    out = []
    for members in _members(group_ids.cpu(), num_groups):
        subsets = list(itertools.combinations(members, k))
        hits = sum(any(c[i] for i in s) for s in subsets)
        out.append(float(Fraction(hits, len(subsets))) if subsets else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def best_at_k(scores: torch.Tensor, group_ids: torch.Tensor, k: int, *, num_groups: int,
              largest: bool = True) -> torch.Tensor:
    """float64[G]: the exact mean over all k-subsets of their max (min), as a rational."""
    x = [Fraction(v) for v in scores.double().tolist()]
    pick = max if largest else min
    out = []
    for members in _members(group_ids.cpu(), num_groups):
        subsets = list(itertools.combinations(members, k))
        out.append(float(sum(pick(x[i] for i in s) for s in subsets) / len(subsets)) if subsets
                   else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def best_at_k_with_replacement(scores: torch.Tensor, group_ids: torch.Tensor, k: int, *,
                               num_groups: int) -> torch.Tensor:
    """float64[G]: the exact mean over all n^k ordered k-tuples (with replacement) of their max."""
    x = [Fraction(v) for v in scores.double().tolist()]
    out = []
    for members in _members(group_ids.cpu(), num_groups):
        tuples = list(itertools.product(members, repeat=k))
        out.append(float(sum(max(x[i] for i in t) for t in tuples) / len(tuples)) if tuples
                   else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def maj_at_k(answer_ids: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor, k: int, *,
             num_groups: int) -> torch.Tensor:
    """float64[G]: mean over all k-subsets of the majority vote's correctness, ties split evenly
    among the tied answers (uniform tie-break)."""
    a = answer_ids.tolist()
    c = (correct != 0).tolist()
    out = []
    for members in _members(group_ids.cpu(), num_groups):
        ok = {a[i]: c[i] for i in members}
        subsets = list(itertools.combinations(members, k))
        total = Fraction(0)
        for s in subsets:
            votes = Counter(a[i] for i in s)
            top = max(votes.values())
            tied = [ans for ans, v in votes.items() if v == top]
            total += Fraction(sum(ok[ans] for ans in tied), len(tied))
        out.append(float(total / len(subsets)) if subsets else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def maj_at_k_dp(answer_ids: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor, ks: list[int], *,
                num_groups: int) -> torch.Tensor:
    """float64[G, len(ks)]: maj@k by the vote-count dynamic program in exact integers (Python big
    ints, one division per value), a Python loop over groups: what ``FASTRL_BACKEND=reference``
    runs, and the baseline of the compiled op's benchmark. Polynomial, unlike :func:`maj_at_k`."""
    a, c = answer_ids.tolist(), (correct != 0).tolist()
    out = torch.full((num_groups, len(ks)), float("nan"), dtype=torch.float64)
    for g, members in enumerate(_members(group_ids.cpu(), num_groups)):
        classes: dict[int, list] = {}
        for i in members:
            size_ok = classes.setdefault(a[i], [0, c[i]])
            if size_ok[1] != c[i]:
                raise ValueError(f"fastrl: `correct` must be the same for every sample with the same answer id "
                                 f"within a group; answer id {a[i]} has both in group {g}")
            size_ok[0] += 1
        answers = [(m, ok) for _, (m, ok) in sorted(classes.items())]
        for j, k in enumerate(ks):
            out[g, j] = _maj_expectation(answers, k)
    return out


def _maj_expectation(answers: list[tuple[int, bool]], k: int) -> float:
    """Exact E[majority correct] of a k-subset of a group whose answers have the given
    (size, correct) classes; uniform tie-break."""
    n = sum(m for m, _ in answers)
    if k > n:
        return float("nan")
    total = Fraction(0)
    for t in range(1, k + 1):
        # dp[(s, a, b)]: number of ways (product of C(m, count)) to draw s samples from the answers
        # seen so far with every count <= t, a correct and b wrong answers at exactly t.
        dp: dict[tuple[int, int, int], int] = {(0, 0, 0): 1}
        for m, ok in answers:
            nxt: dict[tuple[int, int, int], int] = {}
            for (s, na, nb), ways in dp.items():
                for cnt in range(0, min(m, t, k - s) + 1):
                    key = (s + cnt, na + (cnt == t and ok), nb + (cnt == t and not ok))
                    nxt[key] = nxt.get(key, 0) + ways * comb(m, cnt)
            dp = nxt
        total += sum(Fraction(ways * na, na + nb) for (s, na, nb), ways in dp.items() if s == k and na)
    return float(total / comb(n, k))


def resample_probabilities(weights: torch.Tensor, group_ids: torch.Tensor, *, num_groups: int) -> torch.Tensor:
    """float64[B]: each sample's probability w_i / sum_g w within its group (what resample draws)."""
    w = weights.double().tolist()
    p = [0.0] * len(w)
    for members in _members(group_ids.cpu(), num_groups):
        total = sum(w[i] for i in members)
        for i in members:
            p[i] = w[i] / total
    return torch.tensor(p, dtype=torch.float64)
