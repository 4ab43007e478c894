"""Best-of-N over groups: segmented top-k, preference pairs, group filters, a quantile mask, exact
pass@k / best@k / worst@k / maj@k estimators and per-group resampling.

Samples belong to groups (one prompt's completions) through ``group_ids: int64[B]`` in any order
and any group sizes, as in :func:`fastrl.group_advantages`: ids lie in ``[0, num_groups)``;
``num_groups`` defaults to ``group_ids.max() + 1`` (a host sync on CUDA: pass it to avoid that).
Per-group outputs have one row per group id, in id order; an id with no sample is an empty group.

    >>> import torch
    >>> from fastrl.sampling.groups import best_of_n, pass_at_k
    >>> scores = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7])
    >>> ids = torch.tensor([0, 0, 1, 1, 0])
    >>> best_of_n(scores, ids, k=2)                    # per group: best two sample indices
    tensor([[1, 4],
            [2, 3]])
    >>> pass_at_k(scores > 0.6, ids, [1, 2])           # group 0: 2 of 3 correct; group 1: none
    tensor([[0.6667, 1.0000],
            [0.0000, 0.0000]], dtype=torch.float64)

:func:`best_of_n`, :func:`best_at_k` / :func:`worst_at_k`, :func:`maj_at_k` (an exact dynamic
program over vote counts) and :func:`select_pairs` ``"all_pairs"`` are compiled ops (C++ on the
CPU, CUDA kernels on the GPU); :func:`quantile_mask` is a CUDA radix select on a GPU (no sort, no host sync).
The others are vectorized PyTorch (no Python loop over groups or samples). On CUDA, :func:`best_of_n`, :func:`best_at_k`, :func:`worst_at_k`, :func:`maj_at_k`,
:func:`pass_at_k`, :func:`filter_groups`, :func:`quantile_mask` and :func:`select_pairs`
(``"best_worst"``, ``"best_random"``, ``"all_pairs"`` with ``max_pairs``) never sync with the host
when ``num_groups`` is given; there, a sample whose group id lies outside
``[0, num_groups)`` is ignored (raising would need a sync), where the CPU raises. The remaining
host syncs are listed in each docstring.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastrl import _extension
from fastrl.advantages import group_advantages
from fastrl.reference import selection as _ref

__all__ = [
    "best_of_n",
    "select_pairs",
    "filter_groups",
    "quantile_mask",
    "pass_at_k",
    "best_at_k",
    "worst_at_k",
    "maj_at_k",
    "resample",
]

PAIR_MODES = ("best_worst", "best_random", "all_pairs")
_CPU_SELECT = "kthvalue"  # quantile_mask's order statistics on the CPU ("sort": the device path, for tests)
RESAMPLE_METHODS = ("multinomial", "systematic")


# ------------------------------------------------------------------------------------- validation


def _tensor(fn: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastrl.sampling.{fn}: `{name}` must be a torch tensor, got {type(t).__name__}")
    return t


def _like(fn: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Checks that ``t`` has the shape and device of ``ref``."""
    if t.shape != ref.shape:
        raise ValueError(f"fastrl.sampling.{fn}: `{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"fastrl.sampling.{fn}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")


def _grouped(fn: str, name: str, x, group_ids, num_groups, *, floating: bool = True) -> int:
    """Checks a per-sample ``x[B]`` and its ``group_ids[B]``; returns the number of groups."""
    x, group_ids = _tensor(fn, name, x), _tensor(fn, "group_ids", group_ids)
    if x.dim() != 1:
        raise ValueError(f"fastrl.sampling.{fn}: `{name}` must be 1-D [B], got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"fastrl.sampling.{fn}: `{name}` must be a float tensor, got {x.dtype}")
    if group_ids.dtype != torch.int64:
        raise ValueError(f"fastrl.sampling.{fn}: `group_ids` must be int64, got {group_ids.dtype}")
    _like(fn, "group_ids", group_ids, name, x)
    if num_groups is None:
        return int(group_ids.max()) + 1 if group_ids.numel() else 0
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 0:
        raise ValueError(f"fastrl.sampling.{fn}: `num_groups` must be an int >= 0, got {num_groups!r}")
    return num_groups


def _check_id_range(fn: str, group_ids: torch.Tensor, G: int, *, on_device: bool = False) -> None:
    """Raises for an id outside [0, G). On a device only with ``on_device`` (a host sync, for the
    paths that sync anyway); the sync-free device paths ignore such samples instead."""
    if (on_device or group_ids.device.type == "cpu") and group_ids.numel() and bool(((group_ids < 0) | (group_ids >= G)).any()):
        bad = int(((group_ids < 0) | (group_ids >= G)).int().argmax())
        raise ValueError(f"fastrl.sampling.{fn}: `group_ids` must lie in [0, num_groups={G}), got "
                         f"group_ids[{bad}] = {int(group_ids[bad])}")


def _ks(fn: str, k) -> tuple[list[int], bool]:
    """(list of k, whether a single int was given)."""
    single = isinstance(k, int) and not isinstance(k, bool)
    ks = [k] if single else list(k) if isinstance(k, (list, tuple)) else None
    if not ks or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ks):
        raise ValueError(f"fastrl.sampling.{fn}: `k` must be an int >= 1 or a non-empty list of them, got {k!r}")
    return ks, single


# ------------------------------------------------------------------------------------- best_of_n


def best_of_n(scores: torch.Tensor, group_ids: torch.Tensor, k: int = 1, *, largest: bool = True,
              num_groups: int | None = None) -> torch.Tensor:
    r"""The ``k`` best samples of every group: ``int64[G, k]`` sample indices, best first.

    Row ``g`` lists group ``g``'s members by decreasing score (increasing with ``largest=False``),
    equal scores by increasing sample index. NaN scores are never selected; ``+-inf`` are ordinary
    values. A group with fewer than ``k`` non-NaN members (including an empty group, or ``k``
    larger than every group) is padded with ``-1``: a documented result, not an error.

    No sort of the batch. CPU: each thread walks a chunk of the samples into its own bounded
    top-k list per group, then the lists are merged per group; a list entry packs the score's order
    and the sample index into one integer, so an offer has no branch (extra memory
    ``threads * G * cap * 8`` bytes, 16 for fp64 scores; ``cap`` = k rounded up to 1, 2, 4, 8 or 16;
    capped at 64 MiB by using fewer threads). CUDA, float32/16 scores: the output is zeroed,
    each sample pushes its key down its group's ``k`` slots (in the output) with 64-bit
    ``atomicMax`` -- a slot keeps the larger key and passes the smaller on, which leaves the sorted
    top k whatever the order of the atomics --, then one pass decodes the keys; no workspace.
    float64 scores (keys of 96 bits): the same cascade twice, score keys into a ``G x k`` cut
    (``8 G k`` bytes of workspace), then sample indices into the slots where each score ties, so
    ties still go to the lower index. The result is bitwise the
    same on both and for any thread count. Out-of-range ids raise on the
    CPU; on CUDA (no host sync) such samples are ignored.

    Args:
        scores: ``[B]`` float scores (any float dtype), CPU or CUDA.
        group_ids: ``int64[B]``, any order.
        k: number of samples per group, ``>= 1``.
        largest: best = highest score (``False``: lowest, the "worst of N").
        num_groups: ``G`` (default ``group_ids.max() + 1``).

    >>> best_of_n(torch.tensor([1., 3., float("nan"), 3.]), torch.tensor([0, 0, 1, 0]), k=2)
    tensor([[ 1,  3],
            [-1, -1]])
    """
    G = _grouped("best_of_n", "scores", scores, group_ids, num_groups)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"fastrl.sampling.best_of_n: `k` must be an int >= 1, got {k!r}")
    if _extension.use_reference():
        return _ref.best_of_n(scores, group_ids, k, largest=largest, num_groups=G)
    return torch.ops.fastrl.best_of_n(scores, group_ids, G, k, bool(largest))


if _extension._C is not None:
    @torch.library.register_fake("fastrl::best_of_n")
    def _best_of_n_fake(scores, group_ids, num_groups, k, largest):
        return group_ids.new_empty((num_groups, k))

    @torch.library.register_fake("fastrl::expected_best_of_k")
    def _expected_best_of_k_fake(scores, group_ids, num_groups, ks, replacement, largest):
        return scores.new_empty((num_groups, len(ks)), dtype=torch.float64)

    @torch.library.register_fake("fastrl::all_pairs")
    def _all_pairs_fake(scores, group_ids, num_groups, margin, max_pairs):
        return group_ids.new_empty((max_pairs,)), group_ids.new_empty((max_pairs,))

    @torch.library.register_fake("fastrl::maj_at_k")
    def _maj_at_k_fake(answer_ids, correct, group_ids, num_groups, ks):
        return answer_ids.new_empty((num_groups, len(ks)), dtype=torch.float64)


# ------------------------------------------------------------------------- padded group layout


def _group_counts(group_ids: torch.Tensor, G: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``int64[G]``: per group, the number of samples (or the sum of the int ``weights``); samples
    with an id outside ``[0, G)`` count nowhere. No host sync (``torch.bincount`` has one on CUDA)."""
    valid = (group_ids >= 0) & (group_ids < G)
    w = valid.long() if weights is None else weights.long() * valid
    counts = torch.zeros(G, dtype=torch.int64, device=group_ids.device)
    return counts.index_add_(0, torch.where(valid, group_ids, 0), w) if G else counts


class _Layout:
    """Groups laid out as rows of a padded ``[G, m]`` matrix (``m`` = largest group).

    ``order``: sample indices sorted by (group, key) — by group then sample index when no key;
    ``row``/``col``: where each sorted sample sits; ``count[G]``; ``valid[G, m]``: a real member.
    Building it costs two stable sorts (one without a key) and one host sync (``m``, unless given).
    """

    def __init__(self, group_ids: torch.Tensor, G: int, key: torch.Tensor | None = None, m: int | None = None):
        dev = group_ids.device
        order = torch.arange(group_ids.numel(), device=dev)
        if key is not None:
            order = torch.argsort(key, stable=True)
        order = order[torch.argsort(group_ids[order], stable=True)]
        self.order = order
        self.row = group_ids[order]
        self.count = _group_counts(group_ids, G)
        start = torch.cumsum(self.count, 0) - self.count
        self.col = torch.arange(order.numel(), device=dev) - start[self.row]
        self.m = m if m is not None else int(self.count.max()) if G and order.numel() else 0
        self.G = G
        self.valid = torch.arange(self.m, device=dev) < self.count[:, None]

    def pad(self, values: torch.Tensor, fill) -> torch.Tensor:
        """``[G, m]`` matrix of ``values[order]`` (per sample, original order), ``fill`` elsewhere."""
        out = torch.full((self.G, self.m), fill, dtype=values.dtype, device=values.device)
        out[self.row, self.col] = values[self.order]
        return out


# ------------------------------------------------------------------------------------ pairs


def select_pairs(scores: torch.Tensor, group_ids: torch.Tensor, *, mode: str = "best_worst",
                 margin: float = 0.0, generator: torch.Generator | None = None,
                 num_groups: int | None = None, max_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(chosen, rejected) sample-index pairs within groups, for online DPO / preference data.

    A pair ``(c, r)`` always satisfies ``scores[c] - scores[r] > margin`` (strictly; NaN scores
    never pair). Modes:

    * ``"best_worst"``: per group, its best sample vs its worst (ties: lower index, as
      :func:`best_of_n`). Returns ``[G]`` and ``[G]``; ``-1`` in both where the group has no pair.
    * ``"best_random"``: its best sample vs a uniformly random member ``r`` with
      ``s_best - s_r > margin`` (drawn with ``generator``: the eligible member with the largest of
      ``B`` fresh uniform keys). ``[G]`` each, ``-1`` where none.
    * ``"all_pairs"``: every ordered pair ``(c, r)`` of a group with ``s_c - s_r > margin``, ordered
      by group, then ``c``, then ``r``. ``[P]`` each.
    * ``"all_pairs"`` with ``max_pairs=M`` (the sync-free form, for a trainer with a fixed pair
      budget per step, e.g. a static-shape DPO batch or CUDA graphs): the same pairs in the same
      order, in fixed-shape ``[M]`` outputs: the first ``min(P, M)`` slots hold pairs, ``-1`` fills
      the rest in both, so ``valid = chosen >= 0`` is a prefix mask and ``valid.sum()`` the number
      kept. Past ``M`` pairs are dropped (the later groups' first: order is by group id). A group of
      ``n`` samples has at most ``n (n - 1) / 2`` pairs, so ``M = G n (n - 1) / 2`` for groups of
      ``n`` never drops one. A compiled op: CPU, groups in parallel (count, prefix sum, write);
      CUDA, a radix sort of the group ids, one thread per group counts (``O(n_g^2)``), a scan
      places, one thread per group writes; out-of-range ids ignored there, raised on the CPU.

    ``+-inf`` scores are ordinary values: ``+inf`` beats every finite score and ``-inf`` by more
    than any finite margin; two equal infinities never pair (their difference is NaN). An empty batch
    (``B = 0``) gives ``[G]`` of ``-1`` for ``"best_worst"`` / ``"best_random"`` (``[0]`` when
    ``num_groups`` is not given), ``[0]`` for ``"all_pairs"`` and ``[max_pairs]`` of ``-1`` with
    ``max_pairs``.

    Host syncs: none for ``"best_worst"`` and ``"best_random"`` (two :func:`best_of_n` calls, then
    elementwise ops), nor for ``"all_pairs"`` with ``max_pairs``. ``"all_pairs"`` without it has
    two, because its output size depends on the data: the most pairs the groups can have
    (``sum_g n_g (n_g - 1) / 2``, to size the buffer of the same compiled op) and the number kept.

    >>> s, ids = torch.tensor([1., 3., 2., 5., 5.]), torch.tensor([0, 0, 0, 1, 1])
    >>> select_pairs(s, ids)
    (tensor([ 1, -1]), tensor([ 0, -1]))
    >>> select_pairs(s, ids, mode="all_pairs")
    (tensor([1, 1, 2]), tensor([0, 2, 0]))
    >>> select_pairs(s, ids, mode="all_pairs", max_pairs=5, num_groups=2)
    (tensor([ 1,  1,  2, -1, -1]), tensor([ 0,  2,  0, -1, -1]))
    """
    G = _grouped("select_pairs", "scores", scores, group_ids, num_groups)
    if mode not in PAIR_MODES:
        raise ValueError(f"fastrl.sampling.select_pairs: `mode` must be one of {PAIR_MODES}, got {mode!r}")
    if not isinstance(margin, (int, float)) or not margin >= 0:
        raise ValueError(f"fastrl.sampling.select_pairs: `margin` must be a float >= 0, got {margin!r}")
    if max_pairs is not None:
        if mode != "all_pairs":
            raise ValueError("fastrl.sampling.select_pairs: `max_pairs` applies to mode='all_pairs' only, "
                             f"got mode={mode!r}")
        if not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 0:
            raise ValueError(f"fastrl.sampling.select_pairs: `max_pairs` must be an int >= 0, got {max_pairs!r}")
        _check_id_range("select_pairs", group_ids, G)
        if _extension.use_reference():
            c, r = _all_pairs(scores.double(), group_ids, G, float(margin))
            out = torch.full((2, max_pairs), -1, dtype=torch.int64, device=scores.device)
            kept = min(max_pairs, c.numel())
            out[0, :kept], out[1, :kept] = c[:kept], r[:kept]
            return out[0], out[1]
        return torch.ops.fastrl.all_pairs(scores, group_ids, G, float(margin), max_pairs)
    x = scores.double()
    if mode == "all_pairs" and _extension.use_reference():
        return _all_pairs(x, group_ids, G, float(margin))
    if mode == "all_pairs":  # the compiled op sized by the most pairs the groups can have
        _check_id_range("select_pairs", group_ids, G)
        count = _group_counts(group_ids, G)
        cap = int((count * (count - 1) // 2).sum())  # host sync: the buffer size
        c, r = torch.ops.fastrl.all_pairs(scores, group_ids, G, float(margin), cap)
        kept = int((c >= 0).sum())  # host sync: the number of pairs
        return c[:kept], r[:kept]
    if x.numel() == 0:
        none = torch.full((G,), -1, dtype=torch.int64, device=x.device)
        return none, none.clone()
    best = best_of_n(scores, group_ids, 1, num_groups=G)[:, 0]
    best_val = x[best.clamp(min=0)]
    if mode == "best_worst":
        other = best_of_n(scores, group_ids, 1, largest=False, num_groups=G)[:, 0]
        ok = (best >= 0) & (best_val - x[other.clamp(min=0)] > margin)
    else:
        # (best_of_n raised on the CPU for an out-of-range id; on a device such samples are ignored)
        valid = (group_ids >= 0) & (group_ids < G)
        g = torch.where(valid, group_ids, 0)
        eligible = valid & (best[g] >= 0) & (best_val[g] - x > margin)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        other = best_of_n(torch.where(eligible, u, float("nan")), group_ids, 1, num_groups=G)[:, 0]
        ok = other >= 0
    minus = torch.full_like(best, -1)
    return torch.where(ok, best, minus), torch.where(ok, other, minus)


def _all_pairs(x: torch.Tensor, group_ids: torch.Tensor, G: int, margin: float):
    dev = x.device
    _check_id_range("select_pairs", group_ids, G)
    valid = (group_ids >= 0) & (group_ids < G)
    gid = torch.where(valid, group_ids, G)  # a sentinel group G for out-of-range ids: no candidates
    order = torch.argsort(gid, stable=True)
    row = gid[order]
    count = _group_counts(gid, G + 1)
    start = torch.cumsum(count, 0) - count
    n = torch.where(row < G, count[row], 0)  # per sorted sample: its number of candidates
    total = int(n.sum())  # host sync: the size of the candidate list
    c_pos = torch.repeat_interleave(torch.arange(order.numel(), device=dev), n, output_size=total)
    first = torch.cumsum(n, 0) - n  # where each sorted sample's candidate run starts
    r_pos = start[row[c_pos]] + torch.arange(total, device=dev) - first[c_pos]
    c, r = order[c_pos], order[r_pos]
    keep = x[c] - x[r] > margin
    return c[keep], r[keep]  # host sync: the number of pairs


# ------------------------------------------------------------------------------------- filters


def filter_groups(scores: torch.Tensor, group_ids: torch.Tensor, *, min_std: float = 0.0,
                  unbiased: bool = False, keep_singletons: bool = True, min_mean: float | None = None,
                  max_mean: float | None = None, num_groups: int | None = None):
    r"""Keep masks of DAPO's dynamic sampling: drop groups whose scores do not vary.

    A group is kept when ``std_g > min_std``, or it has a single member and ``keep_singletons``
    (DAPO's rule in verl's recipe: ``np.std(vals) > 0 or len(vals) == 1``; ``np.std`` is the biased
    std, hence ``unbiased=False``). Optional pass-rate bounds keep only groups with
    ``min_mean <= mean_g <= max_mean``. Empty groups and groups with a NaN score are dropped.
    Statistics are :func:`fastrl.group_advantages`' fp64 two-pass ones: a constant group has std
    exactly 0. No host sync (beyond ``num_groups=None``).

    A group holding a ``+-inf`` score has an undefined (NaN) std, as ``np.std`` gives, so it is
    dropped, unless it is a singleton kept by ``keep_singletons`` (its mean ``+-inf`` then meets
    ``min_mean`` / ``max_mean`` as any mean). An empty batch (``B = 0``) keeps nothing: ``keep_samples``
    is empty and ``keep_groups`` all False.

    Returns:
        ``(keep_samples: bool[B], keep_groups: bool[G])``; ``keep_samples = keep_groups[group_ids]``.

    >>> filter_groups(torch.tensor([1., 1., 0., 1., 5.]), torch.tensor([0, 0, 1, 1, 2]))
    (tensor([False, False,  True,  True,  True]), tensor([False,  True,  True]))
    """
    G = _grouped("filter_groups", "scores", scores, group_ids, num_groups)
    for name, val in (("min_std", min_std), ("min_mean", min_mean), ("max_mean", max_mean)):
        if val is not None and (not isinstance(val, (int, float)) or val != val):
            raise ValueError(f"fastrl.sampling.filter_groups: `{name}` must be a float, got {val!r}")
    if min_std < 0:
        raise ValueError(f"fastrl.sampling.filter_groups: `min_std` must be >= 0, got {min_std}")
    _, st = group_advantages(scores, group_ids, scale="none", unbiased=unbiased, num_groups=G,
                             return_stats=True)
    finite_mean = ~torch.isnan(st.mean)
    keep = (st.std > min_std) | ((st.count == 1) & keep_singletons & finite_mean)
    if min_mean is not None:
        keep &= st.mean >= min_mean
    if max_mean is not None:
        keep &= st.mean <= max_mean
    ok = (group_ids >= 0) & (group_ids < G)
    return keep[group_ids.clamp(0, max(G - 1, 0))] & ok if G else ok, keep


def quantile_mask(x: torch.Tensor, mask: torch.Tensor, q: float):
    r"""Tokens at or above the ``q``-quantile of all masked tokens: ``(x >= t) & mask``.

    ``t = torch.quantile(x[mask], q)`` exactly (linear interpolation between the order statistics
    ``floor(p)`` and ``ceil(p)``, ``p = q (n - 1)``, computed as torch does), without torch.quantile's
    2^24 element limit (above it ``p`` is computed in fp64). This is TRL's ``get_high_entropy_mask``
    (single process) for ``x = entropies``: half-precision inputs are compared in fp32 as TRL does.
    A NaN among the masked values makes ``t`` NaN (as torch.quantile) and the mask all False;
    no masked token (a zero-element ``x`` included: the mask then has ``x``'s empty shape): ``t`` is
    NaN and the mask all False (TRL's empty case).

    On a GPU (the compiled op ``fastrl::quantile_mask``): no sort and no host sync. A radix select
    over the order-preserving integer keys of the masked values finds the order statistic
    ``floor(p)``: per 8-bit digit (4 passes for fp32 and half inputs, 8 for fp64) a grid of blocks
    histograms the candidates' digit (shared-memory histograms, warp-aggregated integer atomics) and
    one block picks the digit holding the rank; ``ceil(p)`` is the same value or, when ``floor(p)``
    is the last copy of its value, the least value above it (one more pass). Exact and bitwise
    deterministic (integer counts only); extra memory: a fixed 16.6 KiB workspace. On the CPU,
    where a sync costs nothing, :func:`torch.kthvalue` over the gathered masked values. Without the
    CUDA build (or with ``FASTRL_BACKEND=reference``) a GPU runs one sort of the values with the
    unmasked ones set to ``+inf`` (NaN sorts last), also without a host sync.

    Args:
        x: any shape, float.  mask: same shape, bool or 0/1.  q: in ``[0, 1]``.

    Returns:
        ``(bool mask of x's shape, t: 0-d tensor)`` (``t`` fp32 for half inputs, else ``x``'s dtype).

    >>> quantile_mask(torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 0.2]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), 0.5)
    (tensor([[False,  True,  True],
            [ True, False, False]]), tensor(0.5000))
    """
    x, mask = _tensor("quantile_mask", "x", x), _tensor("quantile_mask", "mask", mask)
    if not x.is_floating_point():
        raise ValueError(f"fastrl.sampling.quantile_mask: `x` must be a float tensor, got {x.dtype}")
    _like("quantile_mask", "mask", mask, "x", x)
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 <= q <= 1.0:
        raise ValueError(f"fastrl.sampling.quantile_mask: `q` must be a float in [0, 1], got {q!r}")
    if not _extension.use_reference() and (
            (x.device.type == "cuda" and _extension.cuda_built()) or (x.device.type == "meta" and _extension._C is not None)):
        return torch.ops.fastrl.quantile_mask(x, mask if mask.dtype in _OP_MASK_DTYPES else mask.bool(), float(q))
    m = mask.bool().reshape(-1)
    xv = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = xv.reshape(-1)
    n = m.sum()
    # torch.quantile's rank arithmetic: p = q (n - 1) in the values' dtype up to 2^24 values, in
    # fp64 above (our extension); clamped so that n = 0 (result NaN below) still indexes safely
    p_small = torch.tensor(q, dtype=xv.dtype, device=x.device) * (n - 1).clamp(min=0).to(xv.dtype)
    p_big = torch.tensor(q, dtype=torch.float64, device=x.device) * (n - 1).clamp(min=0).double()
    small = n <= (1 << 24)
    pos = torch.where(small, p_small.double(), p_big)
    frac = torch.where(small, p_small - p_small.floor(), (p_big - p_big.floor()).to(xv.dtype))
    lo, hi = pos.floor().long(), pos.ceil().long()
    if flat.device.type == "cpu" and _CPU_SELECT == "kthvalue":  # faster there; syncs are free
        vals = flat[m]
        lo_i, hi_i = (int(lo), int(hi)) if vals.numel() else (0, 0)
        vals = vals if vals.numel() else flat.new_zeros(1)
        v_lo = torch.kthvalue(vals, lo_i + 1).values
        v_hi = v_lo if hi_i == lo_i else torch.kthvalue(vals, hi_i + 1).values
    else:
        ordered = torch.sort(torch.where(m, flat, float("inf"))).values if flat.numel() else flat.new_zeros(1)
        v_lo, v_hi = ordered[torch.stack([lo, hi]).clamp(0, ordered.numel() - 1)]
    t = torch.lerp(v_lo, v_hi, frac)
    t = torch.where((n == 0) | (m & torch.isnan(flat)).any(), float("nan"), t)
    return (xv >= t) & mask.bool(), t


_OP_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)

if _extension._C is not None:
    @torch.library.register_fake("fastrl::quantile_mask")
    def _quantile_mask_fake(x, mask, q):
        return x.new_empty(x.shape, dtype=torch.bool), x.new_empty((), dtype=torch.float64 if x.dtype == torch.float64
                                                                    else torch.float32)


# ---------------------------------------------------------------------------------- estimators


def pass_at_k(correct: torch.Tensor, group_ids: torch.Tensor, k, *, num_groups: int | None = None):
    r"""Unbiased pass@k per group (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``.

    ``n``: the group's size, ``c``: its number of correct samples. Computed in fp64 as the product
    ``C(n-c, k)/C(n, k) = prod_{i<k} (n - c - i) / (n - i)`` (every factor in [0, 1]: no huge
    binomials, no cancellation). ``k > n`` is undefined: NaN (an empty group is NaN for every k;
    an empty batch, ``B = 0``, gives ``G`` rows of NaN with ``num_groups=G``, none without it).

    Args:
        correct: ``[B]`` bool, or numbers (nonzero = correct).
        group_ids: ``int64[B]``, any order.
        k: an int or a list of ints ``>= 1``, all computed in one call.

    Returns:
        ``float64[G]`` for an int ``k``, ``float64[G, len(k)]`` for a list. No host sync.

    >>> pass_at_k(torch.tensor([True, False, False, True]), torch.tensor([0, 0, 0, 1]), [1, 2])
    tensor([[0.3333, 0.6667],
            [1.0000,    nan]], dtype=torch.float64)
    """
    G = _grouped("pass_at_k", "correct", correct, group_ids, num_groups, floating=False)
    ks, single = _ks("pass_at_k", k)
    _check_id_range("pass_at_k", group_ids, G)
    dev = correct.device
    n = _group_counts(group_ids, G)
    c = _group_counts(group_ids, G, weights=correct != 0)
    i = torch.arange(max(ks), device=dev)
    num = (n - c)[:, None] - i
    den = n[:, None] - i
    factor = torch.where(num > 0, num.double() / den.clamp(min=1).double(), 0.0)
    miss = torch.cumprod(factor, 1)[:, [v - 1 for v in ks]]
    kt = torch.tensor(ks, device=dev)
    out = torch.where(kt <= n[:, None], 1.0 - miss, float("nan"))
    return out[:, 0] if single else out


def best_at_k(scores: torch.Tensor, group_ids: torch.Tensor, k, *, replacement: bool = False,
              num_groups: int | None = None):
    r"""Exact expected maximum of ``k`` draws from each group: best@k without bootstrapping.

    With the group's scores sorted ``x_(1) <= ... <= x_(n)``::

        without replacement (default):  E[max] = sum_i C(i-1, k-1) / C(n, k) * x_(i)
        with replacement:               E[max] = sum_i ((i/n)^k - ((i-1)/n)^k) * x_(i)

    The first is the mean of ``max`` over all ``C(n, k)`` k-subsets; its weights are computed
    stably in fp64 by the recurrence ``w_n = k/n``, ``w_i = w_{i+1} (i - k + 1) / i`` (factors in
    [0, 1]: no binomial is formed). ``k > n`` is undefined there: NaN. The second is the limit of verl's
    ``bootstrap_metric(vals, k, [np.max])`` mean as its ``n_bootstrap`` grows: verl draws
    ``n_bootstrap`` k-tuples *with* replacement and averages their max, an unbiased Monte-Carlo
    estimate of this value (standard error ``std / sqrt(n_bootstrap)``); any ``k`` is valid.
    Ties do not matter (order statistics). A NaN score makes its group NaN. ``+-inf`` scores enter
    the expectation as values: the result is ``+inf`` (``-inf``) when the max of the k draws is
    ``+inf`` (``-inf``) with positive probability, and NaN, an undefined expectation, when both
    are: ``[inf, -inf, 1]`` gives ``[nan, inf, inf]`` for k = 1, 2, 3 (k = 1 averages ``+inf``
    and ``-inf``), and NaN for every k with replacement (all draws may be the ``-inf``). An empty
    group is NaN; an empty batch (``B = 0``) gives ``G`` rows of NaN with ``num_groups=G``, none
    without it.

    Args:
        scores: ``[B]`` float scores.  group_ids: ``int64[B]``.  k: int or list of ints ``>= 1``.

    A compiled op. CPU: a counting sort of the values by group, then per group, in parallel, a
    sort and the weighted sums (O(B log n) time, O(B) extra memory). CUDA: two cub radix sorts
    (by value, then stably by group id), then one thread per group sums its segment best first
    (~24 B per sample of workspace); no host sync, out-of-range group ids ignored. Both give the
    same bits without replacement (the weights avoid libm; with replacement ``pow`` may differ in
    the last bit).

    Returns:
        ``float64[G]`` (int ``k``) or ``float64[G, len(k)]``.

    >>> best_at_k(torch.tensor([1., 2., 3.]), torch.tensor([0, 0, 0]), [1, 2, 3])
    tensor([[2.0000, 2.6667, 3.0000]], dtype=torch.float64)
    """
    return _expected_max("best_at_k", scores, group_ids, k, replacement, num_groups, 1.0)


def _expected_max(fn: str, scores, group_ids, k, replacement: bool, num_groups, sign: float):
    """``sign * best_at_k(sign * scores)``, with ``fn`` named in error messages: the compiled op,
    or the vectorized PyTorch path under ``FASTRL_BACKEND=reference``."""
    G = _grouped(fn, "scores", scores, group_ids, num_groups)
    ks, single = _ks(fn, k)
    _check_id_range(fn, group_ids, G, on_device=_extension.use_reference())
    if not _extension.use_reference():
        out = torch.ops.fastrl.expected_best_of_k(scores, group_ids, G, ks, bool(replacement), sign > 0)
        return out[:, 0] if single else out
    return _expected_max_torch(scores, group_ids, ks, single, replacement, G, sign)


def _expected_max_torch(scores, group_ids, ks: list[int], single: bool, replacement: bool, G: int,
                        sign: float):
    """The vectorized PyTorch path of :func:`_expected_max` over the padded layout (host syncs:
    the largest group size)."""
    x = scores.double() * sign
    lay = _Layout(group_ids, G, key=x)
    vals = lay.pad(x, 0.0)  # ascending within each row; NaN last
    n = lay.count[:, None].double()
    i = torch.arange(1, lay.m + 1, device=x.device, dtype=torch.float64)
    cols = []
    for kk in ks:  # len(k) iterations, each over the whole batch
        if replacement:
            w = (i / n) ** kk - ((i - 1) / n) ** kk
        else:
            factor = torch.where(i < n, ((i - kk + 1) / i).clamp(min=0.0), torch.where(i == n, kk / n, 1.0))
            w = torch.cumprod(factor.flip(1), 1).flip(1)
        w = torch.where(lay.valid, w, 0.0)
        est = torch.where(w > 0, w * vals, 0.0).sum(1)
        if not replacement:
            est = torch.where(lay.count >= kk, est, float("nan"))
        cols.append(torch.where(lay.count > 0, est, float("nan")))
    out = torch.stack(cols, 1) * sign if G else x.new_zeros((0, len(ks)))
    return out[:, 0] if single else out


def worst_at_k(scores: torch.Tensor, group_ids: torch.Tensor, k, *, replacement: bool = False,
               num_groups: int | None = None):
    r"""Exact expected minimum of ``k`` draws from each group: ``-best_at_k(-scores)``, i.e.
    ``sum_i C(n-i, k-1)/C(n, k) x_(i)`` without replacement. Same arguments, outputs and relation
    to verl's bootstrap (its ``np.min`` column) as :func:`best_at_k`; infinities as there with
    ``+inf`` and ``-inf`` swapped (``[inf, -inf, 1]`` gives ``[nan, -inf, -inf]``).

    >>> worst_at_k(torch.tensor([1., 2., 3.]), torch.tensor([0, 0, 0]), 2)
    tensor([1.3333], dtype=torch.float64)
    """
    return _expected_max("worst_at_k", scores, group_ids, k, replacement, num_groups, -1.0)


def maj_at_k(answer_ids: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor, k, *,
             num_groups: int | None = None):
    r"""Exact expected correctness of a majority vote over a uniformly random k-subset of each
    group (drawn without replacement), for every ``k`` in a list.

    A k-subset votes for the answer id drawn most often; when several answers tie for the most
    votes, one of them is picked uniformly at random (so a tie counts the fraction of tied answers
    that are correct). ``correct`` must agree within an answer id (it is the answer's correctness).
    The expectation over all ``C(n, k)`` subsets is computed by a dynamic program over the group's
    distinct answers (multivariate hypergeometric counts), per vote count ``t`` of the winner::

        maj@k = sum_{t=1..k} sum_{a + b >= 1} P(a correct and b wrong answers get exactly t votes,
                                                every other answer fewer) * a / (a + b)

    exactly (no sampling). ``k > n``: NaN.

    Args:
        answer_ids: ``int64[B]`` answer of each sample (equal ids = equal answers).
        correct: ``[B]`` bool or numbers (nonzero = correct).
        group_ids: ``int64[B]``.  k: int or list of ints ``>= 1``.

    Returns:
        ``float64[G]`` (int ``k``) or ``float64[G, len(k)]``, on the inputs' device. A compiled op:
        per group one DP pass gives every ``k`` of the list, O(A k^3) for A distinct answers and
        the largest k, positive terms only (fp64, ~1e-15 relative). ``k`` up to 1000 where a group
        has more than 1000 samples. CPU: groups in parallel (a counting sort gathers them).
        CUDA: two radix sorts (by answer, then by group), one warp per group sharing the DP
        states, no host sync, bitwise the CPU result; workspace
        ``8 (kc + 1) (5 B + 6 G)`` bytes (+ ~40 B), ``kc = min(max k, B, 1000)``.

    Raises:
        ValueError: an answer id with both correct and wrong samples in a group, or a group of
        more than 1000 samples with a ``k`` above 1000 (CPU; on CUDA, where raising would need a
        host sync, such a group's row is NaN and an out-of-range group id is ignored).

    >>> maj_at_k(torch.tensor([7, 7, 3]), torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]), [1, 3])
    tensor([[0.6667, 1.0000]], dtype=torch.float64)
    """
    G = _grouped("maj_at_k", "answer_ids", answer_ids, group_ids, num_groups, floating=False)
    _grouped("maj_at_k", "correct", correct, group_ids, G, floating=False)
    if answer_ids.dtype != torch.int64:
        raise ValueError(f"fastrl.sampling.maj_at_k: `answer_ids` must be int64, got {answer_ids.dtype}")
    ks, single = _ks("maj_at_k", k)
    _like("maj_at_k", "correct", correct, "answer_ids", answer_ids)
    if _extension.use_reference():
        g = group_ids.cpu()
        _check_id_range("maj_at_k", g, G)
        out = _ref.maj_at_k_dp(answer_ids.cpu(), (correct != 0).cpu(), g, ks, num_groups=G).to(answer_ids.device)
    else:
        _check_id_range("maj_at_k", group_ids, G)  # (CPU only: the CUDA op ignores such samples)
        out = torch.ops.fastrl.maj_at_k(answer_ids, correct != 0, group_ids, G, ks)
    return out[:, 0] if single else out


# ---------------------------------------------------------------------------------- resampling


def resample(weights: torch.Tensor, group_ids: torch.Tensor, n: int, *, method: str = "multinomial",
             generator: torch.Generator | None = None, num_groups: int | None = None) -> torch.Tensor:
    r"""Draw ``n`` sample indices per group with probability ``w_i / sum_g w`` (with replacement).

    * ``"multinomial"``: ``n`` independent categorical draws per group.
    * ``"systematic"``: one uniform ``u_g``; the draws are the members whose cumulative-weight
      interval holds ``(u_g + j) / n``, ``j < n`` (lower variance: a member of probability ``p`` is
      drawn ``floor(n p)`` or ``ceil(n p)`` times). Zero-weight members are never drawn.

    Members are taken in sample-index order; the same ``generator`` state gives the same draws.

    Args:
        weights: ``[B]`` float, finite, ``>= 0``, with a positive sum in every non-empty group.
        group_ids: ``int64[B]``.  n: draws per group, ``>= 1``.

    Returns:
        ``int64[G, n]`` sample indices (``-1`` rows for groups with no sample: all ``G`` rows for an
        empty batch, ``B = 0``, and ``[0, n]`` then without ``num_groups``).

    Host syncs on a GPU: one, before any draw, that reads together the input checks (group ids in
    range, weights finite and ``>= 0``, no all-zero group: raising on bad data needs its flag on
    the host) and the largest group size ``m`` (the draws run over a padded ``[G, m]`` weight
    matrix whose shape the host must know); a bad input costs more syncs to name the culprit.
    ``torch.multinomial`` / ``searchsorted`` themselves do not sync. A sync-free form would need
    a per-group (segmented) scan kernel and unchecked inputs: not implemented (this op runs once
    per batch, off the per-token hot path).

    Raises:
        ValueError: negative / NaN / inf weights, or a group whose weights are all zero.

    >>> resample(torch.tensor([0., 1., 3., 1.]), torch.tensor([0, 0, 0, 1]), 4, method="systematic",
    ...          generator=torch.Generator().manual_seed(0))
    tensor([[1, 2, 2, 2],
            [3, 3, 3, 3]])
    """
    G = _grouped("resample", "weights", weights, group_ids, num_groups)
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"fastrl.sampling.resample: `method` must be one of {RESAMPLE_METHODS}, got {method!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"fastrl.sampling.resample: `n` must be an int >= 1, got {n!r}")
    w = weights.double()
    count = _group_counts(group_ids, G)
    dead = (count > 0) & (_group_counts(group_ids, G, weights=w > 0) == 0)
    # every check and the padded width in one host sync
    widest = count.amax() if G else count.new_zeros(())
    bad_id, bad_w, any_dead, m = torch.stack([
        ((group_ids < 0) | (group_ids >= G)).any().long(), (~torch.isfinite(w) | (w < 0)).any().long(),
        dead.any().long(), widest]).tolist()
    if bad_id:
        _check_id_range("resample", group_ids, G, on_device=True)  # raises, naming the first bad id
    if bad_w:
        raise ValueError("fastrl.sampling.resample: `weights` must be finite and >= 0 (got a negative, NaN or inf weight)")
    if any_dead:
        raise ValueError(f"fastrl.sampling.resample: every weight of group {int(dead.int().argmax())} is zero; "
                         "each non-empty group needs a positive weight")
    lay = _Layout(group_ids, G, m=m)
    W = lay.pad(w, 0.0)
    empty = lay.count == 0
    member = lay.pad(torch.arange(w.numel(), device=w.device), -1)
    if lay.m == 0:
        return torch.full((G, n), -1, dtype=torch.int64, device=w.device)
    W[:, 0] = torch.where(empty, 1.0, W[:, 0])  # any valid row for empty groups (output -1 below)
    if method == "multinomial":
        cols = torch.multinomial(W, n, replacement=True, generator=generator)
    else:
        u = torch.rand((G, 1), generator=generator, dtype=torch.float64, device=w.device)
        points = (u + torch.arange(n, device=w.device, dtype=torch.float64)) / n * W.sum(1, keepdim=True)
        cdf = torch.cumsum(W, 1)
        last = torch.where(W > 0, torch.arange(lay.m, device=w.device), 0).amax(1, keepdim=True)
        cols = torch.minimum(torch.searchsorted(cdf, points, right=True), last)
    out = member.gather(1, cols)
    return torch.where(empty[:, None], -1, out)
