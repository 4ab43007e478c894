"""Group advantages: per-prompt statistics of outcome rewards -> per-sample advantages.

Samples belong to groups (one prompt's completions) through ``group_ids: int64[B]`` in any order and
any group sizes. One compiled call computes every group's statistics and every sample's advantage,
without a Python loop and without a host sync on CUDA.

    >>> import torch, fastrl
    >>> scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    >>> ids = fastrl.group_index(["a", "b", "a", "b", "a", "c"])      # tensor([0, 1, 0, 1, 0, 2])
    >>> fastrl.advantages.grpo(scores, ids)                             # (x - mean_g) / (std_g + 1e-6)

The general op is :func:`group_advantages`; the named estimators below pin its options to a
published method (and to the trainer that popularised it, where the trainers disagree).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from fastrl import _extension
from fastrl.reference import advantages as _ref

__all__ = [
    "GroupStats",
    "group_index",
    "group_advantages",
    "grpo",
    "dr_grpo",
    "rloo",
    "opo",
    "gpg",
    "reinforce_pp_baseline",
    "remax",
    "passk",
    "bnpo",
    "pref_grpo",
    "combine_rewards",
]

BASELINES = ("mean", "leave_one_out", "weighted_mean", "none")
SCALES = ("group_std", "batch_std", "none")


class GroupStats(NamedTuple):
    """Per-group statistics of the valid scores, each ``[G]``.

    ``std`` follows the call's ``unbiased`` flag (NaN for a singleton when unbiased, and for an
    empty group); ``zero_variance`` is ``max == min`` (True for singletons: no learning signal, what
    DAPO-style dynamic sampling filters out); empty groups report NaN and ``zero_variance=False``.
    """

    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    zero_variance: torch.Tensor


# --------------------------------------------------------------------------------------- group_index


def group_index(uids) -> torch.Tensor:
    """Dense int64 group ids in order of first appearance.

    ``uids`` is a numpy array of str/bytes/ints/objects (verl's ``index``), a list or tuple, or an
    integer tensor. Equal uids get equal ids; the first distinct uid gets 0, the next new one 1, ...
    Strings and ints are hashed in C++ (no sort); arbitrary Python objects go through a dict.
    A CUDA integer tensor is factorized on the device with ``torch.unique`` (one host sync).

    >>> fastrl.group_index(np.array(["q7", "q3", "q7"], dtype=object))
    tensor([0, 1, 0])
    """
    return _dense_ids(uids)[0]


def _dense_ids(uids) -> tuple[torch.Tensor, int]:
    """(ids, number of groups) of :func:`group_index`."""
    if isinstance(uids, torch.Tensor):
        if uids.dim() != 1:
            raise ValueError(f"fastrl.group_index: `uids` must be 1-D, got shape {tuple(uids.shape)}")
        if uids.is_floating_point() or uids.is_complex():
            raise ValueError(f"fastrl.group_index: `uids` must be an integer tensor, got {uids.dtype}")
        if uids.device.type == "cpu":
            ids, first = torch.ops.fastrl.dense_ids(uids.to(torch.int64))
            return ids, first.numel()
        uniq, inverse = torch.unique(uids, return_inverse=True)
        first = torch.full((uniq.numel(),), uids.numel(), dtype=torch.int64, device=uids.device)
        first.scatter_reduce_(0, inverse, torch.arange(uids.numel(), device=uids.device), "amin")
        rank = torch.empty_like(first)
        rank[first.argsort()] = torch.arange(first.numel(), device=first.device)
        return rank[inverse], uniq.numel()
    arr = uids if isinstance(uids, np.ndarray) else None
    if arr is None:
        if not isinstance(uids, (list, tuple)):
            raise TypeError(f"fastrl.group_index: `uids` must be a numpy array, list, tuple or integer tensor, got {type(uids).__name__}")
        return _dict_ids(uids)
    if arr.ndim != 1:
        raise ValueError(f"fastrl.group_index: `uids` must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "USiub":
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.int64, copy=False)
        rows = np.ascontiguousarray(arr).view(np.uint8).reshape(arr.shape[0], arr.dtype.itemsize)
        ids, first = torch.ops.fastrl.dense_ids(torch.from_numpy(rows))
        return ids, first.numel()
    if arr.dtype.kind == "f":
        raise ValueError("fastrl.group_index: float uids are ambiguous (1.0 vs 1.0000001); pass ints or strings")
    return _dict_ids(arr.tolist())


def _dict_ids(items: Sequence) -> tuple[torch.Tensor, int]:
    items = list(items)
    if _extension._C is not None:
        hashed = _extension._C.dense_ids_of_str(items)
        if hashed is not None:
            return hashed
    table: dict = {}
    ids = [table.setdefault(u, len(table)) for u in items]
    return torch.tensor(ids, dtype=torch.int64), len(table)


# ---------------------------------------------------------------------------------- group_advantages


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    baseline: str = "mean",
    scale: str = "group_std",
    unbiased: bool = True,
    eps: float = 1e-6,
    eps_on: str = "std",
    singleton: str = "passthrough",
    nan: str = "propagate",
    weights: torch.Tensor | None = None,
    num_groups: int | None = None,
    return_stats: bool = False,
):
    r"""Per-sample advantage ``A_i = (x_i - b_g) / s`` from per-group statistics, in one fused call.

    Args:
        scores: ``[B]`` outcome scores, any float dtype, CPU or CUDA.
        group_ids: ``int64[B]`` group of each sample, in ``[0, num_groups)``, any order, any sizes.
        baseline: ``"mean"`` (GRPO) ``b = mean_g x``; ``"leave_one_out"`` (RLOO)
            ``b = mean of the other members``, i.e. ``A = n/(n-1) (x - mean_g)``;
            ``"weighted_mean"`` (OPO) ``b = sum_g w x / sum_g w`` (needs ``weights``); ``"none"``.
        scale: ``"group_std"``, ``"batch_std"`` (std of every valid sample of the batch) or ``"none"``.
        unbiased: std with Bessel's correction (``torch.std``'s default) or the biased one.
        eps: added to the std (``eps_on="std"``: ``/(std + eps)``, verl and TRL) or to the variance
            (``eps_on="var"``: ``/sqrt(var + eps)``).
        singleton: rule for a group with one valid member. ``"passthrough"`` (verl): baseline 0 and
            group std 1, so ``A = x / (1 + eps)`` with group-std scaling and ``A = x`` otherwise;
            ``"zero"`` (TRL): ``A = 0``.
        nan: ``"propagate"``: a NaN score makes its group's statistics NaN (and its advantages);
            ``"ignore"`` (TRL: NaN means "not scored"): NaN samples are left out of every statistic
            and get ``A = 0``. ``inf`` scores always propagate.
        weights: ``[B]`` per-sample weights of ``baseline="weighted_mean"`` (e.g. response lengths).
        num_groups: number of groups G. Default ``group_ids.max() + 1`` (a host sync on CUDA:
            pass it to avoid that).
        return_stats: also return a :class:`GroupStats`.

    Zero-variance groups: statistics are fp64 two-pass sums, so a constant group has exactly zero
    variance and ``x - mean`` is exactly 0: its advantages are 0 (not rounding noise over eps).
    Out-of-range ids raise on the CPU; on CUDA (where checking would need a host sync) such
    samples are left out of every statistic and get a NaN advantage.

    Returns:
        ``float32[B]`` advantages, and a :class:`GroupStats` if ``return_stats``.

    Extra memory: O(G) accumulators (fp64), no [B, T] tensor.
    """
    if baseline not in BASELINES:
        raise ValueError(f"fastrl.group_advantages: `baseline` must be one of {BASELINES}, got {baseline!r}")
    if scale not in SCALES:
        raise ValueError(f"fastrl.group_advantages: `scale` must be one of {SCALES}, got {scale!r}")
    if eps_on not in ("std", "var"):
        raise ValueError(f"fastrl.group_advantages: `eps_on` must be 'std' or 'var', got {eps_on!r}")
    if singleton not in ("passthrough", "zero"):
        raise ValueError(f"fastrl.group_advantages: `singleton` must be 'passthrough' or 'zero', got {singleton!r}")
    if nan not in ("propagate", "ignore"):
        raise ValueError(f"fastrl.group_advantages: `nan` must be 'propagate' or 'ignore', got {nan!r}")
    if not isinstance(scores, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise TypeError("fastrl.group_advantages: `scores` and `group_ids` must be torch tensors")
    if group_ids.dtype != torch.int64:
        raise ValueError(f"fastrl.group_advantages: `group_ids` must be int64, got {group_ids.dtype}")
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    args = (scores, group_ids, weights, int(num_groups), baseline, scale, bool(unbiased), float(eps),
            eps_on == "var", singleton == "zero", nan == "ignore")
    if _extension.use_reference():
        out = _ref.group_advantages(
            scores, group_ids, num_groups=int(num_groups), weights=weights, baseline=baseline, scale=scale,
            unbiased=unbiased, eps=eps, eps_on_var=eps_on == "var", singleton_zero=singleton == "zero",
            ignore_nan=nan == "ignore")
    else:
        out = torch.ops.fastrl.group_advantages(*args)
    adv = out[0]
    if not return_stats:
        return adv
    count, mean, std, mn, mx = out[1:]
    return adv, GroupStats(count, mean, std, mn, mx, (mx == mn) & (count > 0))


def _group_advantages_fake(scores, group_ids, weights, num_groups, baseline, scale, unbiased, eps,
                           eps_on_var, singleton_zero, ignore_nan):
    f32 = dict(dtype=torch.float32, device=scores.device)
    g = (num_groups,)
    return (scores.new_empty(scores.shape, dtype=torch.float32), scores.new_empty(g, dtype=torch.int64),
            torch.empty(g, **f32), torch.empty(g, **f32), torch.empty(g, **f32), torch.empty(g, **f32))


def _dense_ids_fake(keys):
    n = torch.library.get_ctx().new_dynamic_size()
    return keys.new_empty((keys.shape[0],), dtype=torch.int64), keys.new_empty((n,), dtype=torch.int64)


if _extension._C is not None:
    torch.library.register_fake("fastrl::group_advantages")(_group_advantages_fake)
    torch.library.register_fake("fastrl::dense_ids")(_dense_ids_fake)


# -------------------------------------------------------------------------------- named estimators


def grpo(scores, group_ids, *, eps: float = 1e-6, num_groups: int | None = None):
    """GRPO (DeepSeekMath): ``A = (x - mean_g) / (std_g + eps)``, unbiased std, verl's singleton rule
    (``A = x / (1 + eps)``)."""
    return group_advantages(scores, group_ids, eps=eps, num_groups=num_groups)


def dr_grpo(scores, group_ids, *, num_groups: int | None = None):
    """Dr. GRPO (Liu et al. 2025): ``A = x - mean_g``, no std division (singleton: ``A = x``)."""
    return group_advantages(scores, group_ids, scale="none", num_groups=num_groups)


def rloo(scores, group_ids, *, num_groups: int | None = None):
    """RLOO (Ahmadian et al. 2024): ``A = x - mean of the other members = n/(n-1) (x - mean_g)``;
    singleton: ``A = x`` (verl)."""
    return group_advantages(scores, group_ids, baseline="leave_one_out", scale="none", num_groups=num_groups)


def opo(scores, group_ids, lengths, *, num_groups: int | None = None):
    """OPO (Hao et al. 2025): length-weighted baseline ``A = x - sum_g(len x) / sum_g(len)``;
    singleton: ``A = x`` (verl)."""
    return group_advantages(scores, group_ids, baseline="weighted_mean", scale="none", weights=lengths,
                            num_groups=num_groups)


def gpg(scores, group_ids, *, f_norm: float = 1.0, num_groups: int | None = None):
    """GPG (Chu et al. 2025): ``A = alpha (x - mean_g) / f_norm`` with ``alpha = B / max(1, #{x != 0})``
    (verl's batch-level correction); singleton: baseline 0."""
    adv = group_advantages(scores, group_ids, scale="none", num_groups=num_groups)
    alpha = scores.numel() / torch.count_nonzero(scores).clamp(min=1).to(torch.float32)
    return adv * alpha / f_norm


def reinforce_pp_baseline(scores, group_ids, *, num_groups: int | None = None):
    """REINFORCE++-baseline, group part: ``x - mean_g`` (singleton: ``x``). The trainer then whitens
    the token-level result over the batch (see ``fastrl.integrations.verl``)."""
    return group_advantages(scores, group_ids, scale="none", num_groups=num_groups)


def remax(scores, baseline_scores):
    """ReMax (Li et al. 2023): ``A = x - x_greedy`` with the greedy rollout's score as baseline."""
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"fastrl.advantages.remax: `baseline_scores` shape {tuple(baseline_scores.shape)} "
                         f"!= `scores` shape {tuple(scores.shape)}")
    return scores.float() - baseline_scores.float()


# ------------------------------------------------- estimators built on the group statistics
# pass@k, BNPO, Pref-GRPO and reward ensembles: vectorized torch on top of group_advantages'
# statistics (scatter_reduce amax/amin, sort, cummax); no Python loop over samples or groups, no
# floating-point atomics (sums come from the compiled op; max/min scatters are order-independent).


def _check_scores_ids(fn: str, scores, group_ids) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"fastrl.advantages.{fn}: `scores` must be a torch tensor, got {type(scores).__name__}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"fastrl.advantages.{fn}: `group_ids` must be a torch tensor, got {type(group_ids).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"fastrl.advantages.{fn}: `scores` must be 1-D [B], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"fastrl.advantages.{fn}: `scores` must be a float tensor, got {scores.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != scores.shape[0]:
        raise ValueError(f"fastrl.advantages.{fn}: `group_ids` must have shape [B]={tuple(scores.shape)}, "
                         f"got {tuple(group_ids.shape)}")
    if group_ids.dtype != torch.int64:
        raise ValueError(f"fastrl.advantages.{fn}: `group_ids` must be int64, got {group_ids.dtype}")
    if group_ids.device != scores.device:
        raise ValueError(f"fastrl.advantages.{fn}: `group_ids` is on {group_ids.device} but `scores` is on "
                         f"{scores.device}")


def _clamped_ids(group_ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids usable as an index into [G] tensors, in-range mask). Out-of-range ids raise on the CPU
    (inside group_advantages); on CUDA they are mapped to group 0 here and their result set to NaN,
    as group_advantages does, instead of a device-side assert."""
    ok = (group_ids >= 0) & (group_ids < num_groups)
    return torch.where(ok, group_ids, torch.zeros_like(group_ids)), ok


def passk(scores, group_ids, *, eps: float = 1e-6, norm_by_std: bool = True, num_groups: int | None = None):
    r"""Pass@k advantage (Chen et al. 2025, arXiv:2503.19595), verl 0.9.1's
    ``compute_grpo_passk_outcome_advantage``: only each group's best sample is reinforced.

    For each group ``g`` with ``n_g >= 2`` members::

        A_i = (r_max - r_second_max) / (std_g + eps)   if i is the group's best sample
        A_i = 0                                        otherwise

    (without ``/ (std_g + eps)`` when ``norm_by_std=False``; ``std_g`` is the unbiased std, as
    ``torch.std``). With ties for the maximum, ``r_max == r_second_max`` and every advantage of the
    group is 0, so which tied sample "wins" does not matter (the first index does). NaN scores rank
    above every number (as in ``torch.topk``): the group's best sample gets a NaN advantage.

    Args:
        scores: ``[B]`` outcome scores (any float dtype, CPU or CUDA).
        group_ids: ``int64[B]`` dense group ids, any order.
        eps: added to the std.
        norm_by_std: verl's ``norm_adv_by_std_in_grpo``.
        num_groups: number of groups (default ``group_ids.max() + 1``).

    Raises:
        ValueError: a group with fewer than 2 samples (named in the message). Host sync: this check
        reads one int back from the device (unavoidable: it decides whether to raise).

    Returns:
        ``float32[B]``.

    >>> fastrl.advantages.passk(torch.tensor([1., 0., 0., 3., 5., 5.]), torch.tensor([0, 0, 0, 1, 1, 1]))
    tensor([1.7320, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000])
    """
    _check_scores_ids("passk", scores, group_ids)
    B = scores.shape[0]
    dev = scores.device
    _, st = group_advantages(scores, group_ids, scale="none", num_groups=num_groups, return_stats=True)
    G = st.count.shape[0]
    small = st.count == 1
    first_small = int(torch.where(small.any(), small.int().argmax(), -1)) if G else -1  # host sync
    if first_small >= 0:
        raise ValueError(f"fastrl.advantages.passk: pass@k needs at least 2 samples per group; group "
                         f"{first_small} (of `group_ids`) has 1")
    gi, ok = _clamped_ids(group_ids, G)
    x = scores.double()
    pos = torch.arange(B, device=dev)
    ninf = torch.full((G,), float("-inf"), dtype=torch.float64, device=dev)
    mx = ninf.scatter_reduce(0, gi, torch.where(ok, x, float("-inf")), "amax")
    mxi = mx[gi]
    is_max = (x == mxi) | (torch.isnan(x) & torch.isnan(mxi))
    first = torch.full((G,), B, dtype=torch.int64, device=dev).scatter_reduce(
        0, gi, torch.where(is_max & ok, pos, B), "amin")
    winner = (pos == first[gi]) & ok
    second = ninf.scatter_reduce(0, gi, torch.where(winner | ~ok, float("-inf"), x), "amax")
    gap = mx - second
    if norm_by_std:
        gap = gap / (st.std.double() + eps)
    adv = torch.where(winner, gap[gi], torch.zeros_like(x))
    return torch.where(ok, adv, float("nan")).float()


def bnpo(scores, group_ids, *, min_value: float | None = 0.0, max_value: float | None = 1.0,
         num_groups: int | None = None):
    r"""BNPO, Beta Normalization Policy Optimization (Xiao et al. 2025), as the authors' code
    (``changyi7231/BNPO``, ``recipe/bnpo/src/bnpo_ray_trainer.py::compute_bnpo_outcome_advantage``)::

        r~_i  = (r_i - min_value) / (max_value - min_value)
        p_g   = mean_{i in g} r~_i            (p_g = 0 for a singleton group)
        mu    = mean_g p_g,  v = var_g p_g    (unbiased, over the groups present; G=1: mu=0, v=1)
        a     = (mu (1 - mu) / v - 1) mu,     b = (mu (1 - mu) / v - 1) (1 - mu)
        alpha = max(1, 1 + a/3),              beta = max(1, 1 + b/3)
        A_i   = (r~_i - p_g) * clamp(1 / BetaPDF(p_g; alpha, beta), 0, 1e6)

    The Beta pdf is ``exp(xlogy(alpha-1, p) + xlogy(beta-1, 1-p) + lgamma(alpha+beta) - lgamma(alpha)
    - lgamma(beta))`` (``torch.distributions.Beta``'s value, 0*log 0 = 0); a zero pdf gives 1e6.

    Edge cases (the authors' code is the reference; where it breaks we choose):

    * ``min_value``/``max_value`` default to the authors' fixed reward bounds 0 and 1 (binary
      rewards). Pass ``None`` for either to use the batch min / max instead (the seed catalog's
      reading); a constant batch then gives ``r~ = 0`` everywhere (all advantages 0) instead of 0/0.
    * ``v == 0`` with several groups (e.g. every group all-correct or all-wrong): the authors' code
      gives NaN (inf/inf or 0/0 in the moment fit); we use ``alpha = beta = 1`` (uniform prior,
      weight 1), the same as their single-group fallback, so ``A = r~ - p_g``.
    * Singletons keep the authors' rule ``p_g = 0`` (so ``A = w(0) * r~``) and count in ``mu``/``v``.
    * Group ids in ``[0, num_groups)`` with no sample are not groups (left out of ``mu``/``v``).
    * With fixed bounds a group mean outside ``[0, 1]`` raises ``ValueError`` (the authors
      assert); this check is one host sync. With batch bounds there is no check and no sync
      (beyond ``num_groups=None``'s).
    * NaN scores propagate into ``mu``/``v``, hence into every advantage (as in the authors' code).

    Returns ``float32[B]``.

    >>> fastrl.advantages.bnpo(torch.tensor([1., 0., 1., 1., 0., 0.]), torch.tensor([0, 0, 1, 1, 2, 2]))
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
    """
    _check_scores_ids("bnpo", scores, group_ids)
    for name, val in (("min_value", min_value), ("max_value", max_value)):
        if val is not None and not isinstance(val, (int, float)):
            raise ValueError(f"fastrl.advantages.bnpo: `{name}` must be a float or None, got {type(val).__name__}")
    if min_value is not None and max_value is not None and not max_value > min_value:
        raise ValueError(f"fastrl.advantages.bnpo: `max_value` ({max_value}) must be > `min_value` ({min_value})")
    x = scores.double()
    dev = x.device
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    lo = x.min() if min_value is None else torch.tensor(float(min_value), dtype=torch.float64, device=dev)
    hi = x.max() if max_value is None else torch.tensor(float(max_value), dtype=torch.float64, device=dev)
    span = hi - lo
    rt = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))
    _, st = group_advantages(rt, group_ids, scale="none", num_groups=num_groups, return_stats=True)
    G = st.count.shape[0]
    present = st.count > 0
    p = torch.where(st.count == 1, 0.0, st.mean.double())
    p = torch.where(present, p, 0.0)
    if min_value is not None and max_value is not None:
        if bool(((p < 0) | (p > 1)).any()):  # host sync (the authors' assert)
            raise ValueError("fastrl.advantages.bnpo: a group's mean normalized score is outside [0, 1]; set "
                             "`min_value`/`max_value` to the reward's bounds (or None for the batch min/max)")
    alpha, beta = _bnpo_beta(p, present)
    gi, ok = _clamped_ids(group_ids, G)
    logpdf = (torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p)
              + torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta))
    weight = torch.exp(-logpdf).clamp(0.0, 1e6)
    adv = (rt - p[gi]) * weight[gi]
    return torch.where(ok, adv, float("nan")).float()


def _bnpo_beta(p: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Method-of-moments (alpha, beta) over the present groups' means (0-d fp64 tensors)."""
    ng = present.sum().double()
    pm = torch.where(present, p, 0.0)
    mu = pm.sum() / ng.clamp(min=1)
    var = torch.where(present, (p - mu) ** 2, 0.0).sum() / (ng - 1).clamp(min=1)
    many = ng > 1
    mu = torch.where(many, mu, 0.0)
    var = torch.where(many, var, 1.0)
    k = mu * (1 - mu) / torch.where(var > 0, var, 1.0) - 1
    alpha = torch.clamp(1 + k * mu / 3, min=1.0)
    beta = torch.clamp(1 + k * (1 - mu) / 3, min=1.0)
    degenerate = var == 0  # the authors' code gives NaN here; uniform prior instead (see bnpo)
    one = torch.ones_like(alpha)
    return torch.where(degenerate, one, alpha), torch.where(degenerate, one, beta)


def pref_grpo(scores, group_ids, *, eps: float = 1e-6, num_groups: int | None = None):
    r"""Pref-GRPO (Wang et al. 2025): within-group pairwise win rate, then GRPO normalization::

        w_i = 1/(n_g - 1) * sum_{j in g, j != i} ([s_i > s_j] + 0.5 [s_i == s_j])   (singleton: 0.5)
        A_i = (w_i - mean_g w) / (std_g w + eps)                                      (singleton: 0)

    ``std_g`` unbiased (Pref-GRPO's ``tensor.std()``; its code uses ``eps=1e-8``). A group whose
    scores are all equal has ``w = 0.5`` everywhere and ``A = 0``.

    O(B log B): one stable sort by (group, score); ``#{j: s_j < s_i}`` and ``#{j: s_j == s_i}`` are
    offsets of each sample's run of equal scores inside its group's segment (cummax/cummin over the
    sorted order). No [B, B] or [n_g, n_g] tensor. NaN scores are not supported (not checked, that
    would need a sync): they rank above every number and tie with nothing.

    Args:
        scores: ``[B]`` float scores (rewards, or a judge's scores), CPU or CUDA.
        group_ids: ``int64[B]`` dense group ids, any order, any sizes.
        eps: added to the win rates' group std.
        num_groups: number of groups (default ``group_ids.max() + 1``, a host sync on CUDA).

    Returns ``float32[B]``.

    >>> fastrl.advantages.pref_grpo(torch.tensor([3., 1., 2., 2.]), torch.tensor([0, 0, 0, 0]))
    tensor([ 1.2247, -1.2247,  0.0000,  0.0000])
    """
    _check_scores_ids("pref_grpo", scores, group_ids)
    return group_advantages(_win_rates(scores, group_ids), group_ids, eps=eps, singleton="zero",
                            num_groups=num_groups)


def _win_rates(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """fp64[B] within-group win rates of :func:`pref_grpo`, via one (group, score) sort."""
    B = scores.shape[0]
    dev = scores.device
    if B == 0:
        return torch.empty(0, dtype=torch.float64, device=dev)
    o1 = torch.argsort(scores, stable=True)
    order = o1[torch.argsort(group_ids[o1], stable=True)]
    gs, xs = group_ids[order], scores[order]
    pos = torch.arange(B, device=dev)
    new_grp = torch.ones(B, dtype=torch.bool, device=dev)
    new_grp[1:] = gs[1:] != gs[:-1]
    new_run = new_grp.clone()
    new_run[1:] |= xs[1:] != xs[:-1]
    last_grp = torch.ones_like(new_grp)
    last_grp[:-1] = new_grp[1:]
    last_run = torch.ones_like(new_run)
    last_run[:-1] = new_run[1:]

    def start(flag):  # index of the nearest flagged position at or before each position
        return torch.cummax(torch.where(flag, pos, 0), 0).values

    def end(flag):  # index of the nearest flagged position at or after each position
        return torch.cummin(torch.where(flag, pos, B - 1).flip(0), 0).values.flip(0)

    g0, r0, g1, r1 = start(new_grp), start(new_run), end(last_grp), end(last_run)
    n = (g1 - g0 + 1).double()
    wins = (r0 - g0).double() + 0.5 * (r1 - r0).double()
    w_sorted = torch.where(n > 1, wins / (n - 1).clamp(min=1), 0.5)
    w = torch.empty(B, dtype=torch.float64, device=dev)
    w[order] = w_sorted
    return w


COMBINE_REDUCES = ("weighted_sum", "mean", "min", "mean_minus_std")


def combine_rewards(rewards, *, weights=None, reduce: str = "weighted_sum", lam: float = 1.0):
    r"""Combine ``K`` reward columns into one reward per sample, NaN-aware (NaN: "this reward
    function did not score this sample", TRL's ``None``).

    * ``"weighted_sum"``: TRL 1.16.0 GRPOTrainer's rule, bitwise:
      ``(rewards * weights).nansum(dim=1)`` in fp32, and NaN for a row that is all NaN (unscorable).
      ``weights`` default to ones.
    * ensemble reductions over each row's non-NaN columns (NaN when there is none):
      ``"mean"``; ``"min"`` (worst-case, WCO); ``"mean_minus_std"``: ``mean - lam * std`` (uncertainty
      -weighted, UWO) with the unbiased std over the valid columns; with one valid column the std is
      taken as 0 (not NaN), so the result is that column. Computed in fp64. ``weights`` must be None.

    Args:
        rewards: ``[B, K]`` float tensor, CPU or CUDA.
        weights: ``[K]`` (tensor, list or tuple), ``"weighted_sum"`` only.
        reduce: one of ``COMBINE_REDUCES``.
        lam: the std multiplier of ``"mean_minus_std"``.

    Returns ``float32[B]``.

    >>> r = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.5, 2.0]])
    >>> fastrl.advantages.combine_rewards(r, weights=[1.0, 0.5])
    tensor([1.0000,    nan, 1.5000])
    >>> fastrl.advantages.combine_rewards(r, reduce="min")
    tensor([1.0000,    nan, 0.5000])
    """
    if reduce not in COMBINE_REDUCES:
        raise ValueError(f"fastrl.advantages.combine_rewards: `reduce` must be one of {COMBINE_REDUCES}, got {reduce!r}")
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"fastrl.advantages.combine_rewards: `rewards` must be a torch tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"fastrl.advantages.combine_rewards: `rewards` must be 2-D [B, K], got shape "
                         f"{tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"fastrl.advantages.combine_rewards: `rewards` must be a float tensor, got {rewards.dtype}")
    if not isinstance(lam, (int, float)):
        raise ValueError(f"fastrl.advantages.combine_rewards: `lam` must be a float, got {type(lam).__name__}")
    K = rewards.shape[1]
    nan_mask = torch.isnan(rewards)
    unscorable = nan_mask.all(dim=1)
    if reduce == "weighted_sum":
        if weights is None:
            w = torch.ones(K, dtype=torch.float32, device=rewards.device)
        else:
            w = torch.as_tensor(weights, dtype=torch.float32).to(rewards.device)
            if w.dim() != 1 or w.shape[0] != K:
                raise ValueError(f"fastrl.advantages.combine_rewards: `weights` must have shape [K]=({K},), got "
                                 f"{tuple(w.shape)}")
        out = (rewards.float() * w.unsqueeze(0)).nansum(dim=1)
        return torch.where(unscorable, float("nan"), out)
    if weights is not None:
        raise ValueError(f"fastrl.advantages.combine_rewards: `weights` only applies to reduce='weighted_sum', "
                         f"got reduce={reduce!r}")
    valid = ~nan_mask
    x = rewards.double()
    if reduce == "min":
        out = torch.where(valid, x, float("inf")).amin(dim=1) if K else x.new_zeros(rewards.shape[0])
    else:
        cnt = valid.sum(dim=1).double()
        mean = torch.where(valid, x, 0.0).sum(dim=1) / cnt.clamp(min=1)
        out = mean
        if reduce == "mean_minus_std":
            dev2 = torch.where(valid, (x - mean.unsqueeze(1)) ** 2, 0.0).sum(dim=1)
            std = torch.where(cnt > 1, torch.sqrt(dev2 / (cnt - 1).clamp(min=1)), 0.0)
            out = mean - float(lam) * std
    return torch.where(unscorable, float("nan"), out).float()
