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
