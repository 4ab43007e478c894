"""Fused policy / KL / entropy losses of RL post-training: one compiled pass forward, one backward.

:func:`policy_loss` computes, for every valid token (``mask == 1``), the policy-gradient loss of
the chosen ``kind`` (verl 0.9.1 / trl 1.16.0 semantics), the KL penalty against a reference policy
and the entropy bonus, sums them per row in fp64 together with every metric, and aggregates the
rows into the scalar loss and the metrics with the chosen ``agg`` mode in one small reduction, all
in one op call (on CUDA one kernel: a block per row; the last block to retire runs the finish).
The backward is closed form: the forward pass also writes each token's derivatives (one fp32 per
token, two with a KL term: fp64 for fp64 inputs) and the backward (one op call, one kernel)
scales them by the rows' weights times the loss's incoming gradient in one streaming pass, writing
``d loss / d logp`` and ``d loss / d entropy`` in the inputs' dtypes. No host syncs: metrics are
device tensors.

Layouts: padded ``[B, T]`` with ``mask``, or packed ``[N]`` with ``cu_seqlens: int64[B+1]``.
Advantages per token (``logp``'s shape) or per sequence (``[B]``, broadcast inside the kernel).

:func:`linear_policy_loss` goes from hidden states straight to the loss (log-probs and entropy by
:func:`fastrl.linear_logprobs`, never the ``[N, V]`` logits); :func:`rollout_is_weights` computes
verl's truncated / masked importance-sampling weights for rollout-trainer mismatch, to pass as
``is_weights``, and :func:`rollout_rejection_mask` verl's rejection sampling (the ``mask`` to pass).
"""
from __future__ import annotations

import math

import torch

from fastrl import _extension
from fastrl.linear_logprobs import _check as _check_linear, linear_logprobs
from fastrl.reference import losses as _ref

__all__ = ["policy_loss", "linear_policy_loss", "rollout_is_weights", "rollout_rejection_mask"]

KINDS = _ref.KINDS + ("clip_cov", "kl_cov")
_KIND_NAMES = ", ".join(map(repr, KINDS))  # as the op's message (csrc/torch/losses.cpp parse_kind) lists them
AGGS = _ref.AGGS
KL_KINDS = _ref.KL_KINDS
RATIO_LEVELS = _ref.RATIO_LEVELS

_NUM_STATS = 17  # columns of the per-row statistics (csrc/include/fastrl/losses.h RowStat)
# The entries of the op's metrics vector (csrc/include/fastrl/losses.h Metric), in order.
_METRICS = ("policy_loss", "clipfrac", "clipfrac_lower", "clip_low_frac", "clip_high_frac", "approx_kl", "ratio_mean",
            "ratio_min", "ratio_max", "num_tokens")
_KL_METRICS, _ENTROPY_METRICS = ("kl_mean", "kl_loss"), ("entropy_mean", "entropy_loss")
_NEEDS_LENGTH = ("seq-mean-token-sum-norm", "dr_grpo")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                kind: str = "vanilla", clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                agg: str = "token-mean", ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                kl_kind: str = "k3", entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                is_weights: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                ratio_level: str = "token", log_ratio_clamp: float | None = 20.0, delta: float | None = None,
                tau_pos: float = 1.0, tau_neg: float = 1.05, max_length: int | None = None,
                num_tokens=None, num_seqs=None, scale: float = 1.0, process_group=None,
                cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
                ppo_kl_coef: float = 0.1, seed: int = 0):
    """Policy loss + ``kl_coef`` * KL - ``entropy_coef`` * entropy, aggregated, in one fused pass.

    Per valid token t of row b, with ``x = logp - old_logp`` and ``A`` the advantage::

        r     = exp(clamp(x, -c, c))              token ratio, c = log_ratio_clamp (None: no clamp)
              = exp(clamp(mean_b x, -c, c))       ratio_level="sequence" (TRL GSPO: gradient through the mean)
        pg    = max(-A r', -A clamp(r, 1-clip_low, 1+clip_high))          "vanilla" (PPO clip),
                r' = min(r, delta) (TRL's two-sided clip); where A < 0 and dual_clip: min(pg, -A dual_clip)
              = -A logp                                                    "gpg" / "reinforce"
              = -sg(clamp(r, 1-clip_low, 1+clip_high)) A logp              "cispo"
              = vanilla with r = exp(min(mean_b x, 10)) * exp(logp - sg(logp))   "gspo" (verl's stop-gradient form)
              = -(sigmoid(tau (r - 1)) 4 / tau) A, tau = tau_pos if A > 0 else tau_neg   "sapo"
        pg   *= is_weights (rollout-correction importance weights, no gradient)
        aux   = kl_coef * KL(logp, ref_logp) - entropy_coef * entropy

    ``clip_low`` lies in (0, 1] and ``clip_high`` > 0, except for ``"cispo"``, which clamps a
    stop-gradient weight and takes any range with ``1 + clip_high > 0`` and ``1 - clip_low <= 1 +
    clip_high``, as verl's and TRL's ``torch.clamp`` (TRL caps the weight at ``epsilon_high``, 0.2 by
    default: ``clip_low=1, clip_high=epsilon_high - 1``; verl's ``clip_ratio_low >= 1``: no lower clip).

    ``"clip_cov"`` / ``"kl_cov"`` (verl's covariance-based variants, PPO loss with the unclamped
    ratio): with ``cov_t = (A_t - mean A) (logp_t - mean logp)`` over the valid tokens and
    ``k = max(1, floor(cov_ratio * N))``, ``"kl_cov"`` adds ``ppo_kl_coef * |x_t|`` to the
    unclipped ``-A r`` at the k tokens of largest covariance; ``"clip_cov"`` takes the PPO clip loss
    and drops (zero loss and gradient) up to k tokens drawn uniformly among the valid ones with
    ``clip_cov_lb < cov < clip_cov_ub`` that the clip did not already clip. Unlike verl (an
    unseeded CPU ``randperm`` and host copies) the draw is a uniform subset keyed by a hash of
    (``seed``, the token's index among the valid tokens) on the device: deterministic, no host sync,
    the same tokens on every device and in both layouts; when there are at most k candidates every
    candidate is dropped, as in verl. ``clipfrac`` is then the dropped fraction (verl's ``pg_clipfrac``).
    Both kinds select over the whole local batch, padded or packed.

    ``"geo_mean"`` (GMPO) is per row: ``-mean_b(A) * exp(mean_b(xm)) * w_b`` with ``xm`` the
    sign(A)-clipped log-ratio clamped to ``[-clip_low, clip_high]`` and ``w_b`` the geometric mean
    of ``is_weights``, averaged over the rows (verl's ``torch.mean``) whatever ``agg`` is.

    KL estimators (``kl_kind``): verl's ``"k1"``/``"kl"``, ``"abs"``, ``"k2"``/``"mse"``,
    ``"k3"``/``"low_var_kl"`` (clamped as verl), and ``"k3_unclamped"`` (TRL's ``exp(ref - logp) -
    (ref - logp) - 1``).

    The loss is ``scale * sum_b w_b * sum_{t valid} (pg + aux)`` with the row weights of ``agg``
    (``N``: valid tokens, ``S``: rows with a valid token, ``B``: rows, ``L``: ``max_length``)::

        "token-mean" / "bnpo"     1 / N                  "token-sum"        1
        "seq-mean-token-sum"      1 / S                  "seq-mean-token-sum-norm"  1 / (S L)
        "seq-mean-token-mean"     1 / (S n_b)            "grpo" (TRL)       1 / (B max(n_b, 1))
        "dr_grpo" (TRL)           1 / (B L)              "luspo" (TRL)      1 / B

    (TRL's ``dapo``/``cispo`` normalizer is ``"token-sum"`` divided by the caller's count.) A count
    of 0 gives weight 0: **a batch with no valid token has loss 0 and zero gradient** (verl's
    ``agg_loss`` returns NaN there). ``num_tokens``/``num_seqs`` override ``N``/``S`` (verl's
    ``batch_num_tokens``/``global_batch_size``; Python numbers or 0-dim tensors, no sync).
    ``process_group``: ``N``, ``S``, ``B`` are summed over the group's ranks (one all-reduce of 3
    numbers) and ``scale`` is multiplied by the world size (verl's ``dp_size`` factor), so the
    average over ranks of the loss, and DDP's averaged gradient, equal the single-process ones.

    Args:
        logp: ``[B, T]`` (or packed ``[N]``) log-probs of the current policy, floating; gets a gradient.
        old_logp: same shape, behaviour-policy log-probs (no gradient).
        advantages: ``logp``'s shape, or ``[B]`` per sequence (no gradient).
        mask: ``logp``'s shape, 0/1 (bool, uint8, int32, int64, float32, float64).
        ref_logp, entropy, is_weights: optional, ``logp``'s shape; ``entropy`` gets a gradient.
        cu_seqlens: ``int64[B+1]`` row offsets of the packed layout.
        max_length: ``L`` above (default ``T``; required for those modes with ``cu_seqlens``).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor (float64 for float64 inputs, else float32);
        ``metrics`` a dict of detached 0-dim float32 device tensors (views of the op's one metrics
        vector, computed in the loss's reduction), token-averaged over the local
        valid tokens (0 when there is none): ``policy_loss`` (the aggregated policy term),
        ``clipfrac`` (verl's ``pg_clipfrac`` of the kind), ``clipfrac_lower`` (dual-clip active;
        geo_mean: clipped with A < 0), ``clip_low_frac`` / ``clip_high_frac`` (TRL's
        ``r < 1 - clip_low, A < 0`` / ``r > 1 + clip_high, A > 0``), ``approx_kl`` (mean of
        ``-x``, clamped as the kind clamps it), ``ratio_mean``/``ratio_min``/``ratio_max``,
        ``num_tokens``, and with ``ref_logp`` ``kl_mean``/``kl_loss``, with ``entropy``
        ``entropy_mean``/``entropy_loss`` (aggregated by ``agg``, unscaled by the coefficients).

    NaN/Inf: masked tokens are never read. A NaN or Inf in a valid token's log-prob or advantage
    propagates into the loss and its row's gradients (as in the trainers), never into other rows.

    Extra memory: ``[B, 17]`` fp64 statistics, and saved for the backward the per-token derivatives
    (``logp``'s shape in float32 -- float64 for float64 inputs --, a second one with ``ref_logp``).

    >>> lp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    >>> loss, m = fastrl.losses.policy_loss(lp, lp.detach() - 0.1, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]))
    >>> loss
    tensor(-1.1052, grad_fn=<_PolicyLossRowsBackward>)
    """
    if kind not in KINDS:
        raise ValueError(f"fastrl: policy_loss `kind` must be one of {_KIND_NAMES}; got {kind!r}")
    kind = "gpg" if kind == "reinforce" else kind
    if kind in ("clip_cov", "kl_cov"):
        return _cov_loss(logp, old_logp, advantages, mask, kind=kind, clip_low=clip_low, clip_high=clip_high,
                         agg=agg, ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy,
                         entropy_coef=entropy_coef, is_weights=is_weights, cu_seqlens=cu_seqlens,
                         max_length=max_length, num_tokens=num_tokens, num_seqs=num_seqs, scale=scale,
                         process_group=process_group, cov_ratio=cov_ratio, clip_cov_lb=clip_cov_lb,
                         clip_cov_ub=clip_cov_ub, ppo_kl_coef=ppo_kl_coef, seed=seed)
    if agg not in AGGS:
        raise ValueError(f"fastrl: policy_loss `agg` must be one of {', '.join(AGGS)}; got {agg!r}")
    if cu_seqlens is not None and max_length is None and agg in _NEEDS_LENGTH:
        raise ValueError(f"fastrl: policy_loss agg={agg!r} with `cu_seqlens` needs `max_length` (the padded "
                         "length the trainer normalizes by)")
    if not scale == scale:
        raise ValueError(f"fastrl: policy_loss `scale` must be a number, got {scale}")
    counts = None
    if process_group is not None:
        counts, scale = _global_counts(mask, cu_seqlens, scale, process_group)
    kw = dict(kind=kind, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, ref_logp=ref_logp,
              kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy, entropy_coef=entropy_coef, is_weights=is_weights,
              cu_seqlens=cu_seqlens, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp, delta=delta,
              tau_pos=tau_pos, tau_neg=tau_neg)
    if _extension.use_reference():
        return _ref.policy_loss(logp, old_logp, advantages, mask, max_length=max_length,
                                num_tokens=counts[0] if num_tokens is None and counts is not None else num_tokens,
                                num_seqs=counts[1] if num_seqs is None and counts is not None else num_seqs,
                                scale=scale, num_rows=None if counts is None else counts[2], **kw)
    num_tokens, num_seqs, counts = _count_args(num_tokens, num_seqs, counts, logp.device)
    # One op: the rows' statistics and each token's derivatives, then the loss and every metric in
    # one small reduction; its backward is one streaming pass (no per-call glue ops: on a GPU each
    # would cost a launch).
    loss, metrics, _, _, _ = _PolicyLossRows.apply(
        logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens, kind, ratio_level,
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        None if log_ratio_clamp is None else float(log_ratio_clamp), None if delta is None else float(delta),
        float(tau_pos), float(tau_neg), float(kl_coef), kl_kind, float(entropy_coef), agg,
        float(max_length if max_length is not None else logp.shape[-1]), float(scale), num_tokens, num_seqs, counts)
    return loss, _metrics(metrics, ref_logp is not None, entropy is not None)


def _cov_loss(logp, old_logp, advantages, mask, *, kind, clip_low, clip_high, cov_ratio, clip_cov_lb, clip_cov_ub,
              ppo_kl_coef, seed, is_weights, ref_logp, kl_coef, kl_kind, **kw):
    """clip_cov / kl_cov: the token selection with static-shape device ops (a sort, no host sync),
    then the fused kernel. kl_cov's extra ``ppo_kl_coef * |x|`` at the selected tokens is the kernel's
    "abs" KL term against ``where(selected, old_logp, logp)`` (0 with zero gradient elsewhere). With
    ``is_weights`` verl weights that penalty too (``(-A r + c |x|) * w``): the kernel weights only its
    policy term, so the weighted penalty ``c * w * |x|`` goes through a second fused pass, as the
    entropy slot (a per-token term aggregated with the same row weights, differentiated by autograd)."""
    if not cov_ratio > 0:
        raise ValueError(f"fastrl: policy_loss `cov_ratio` must be > 0, got {cov_ratio}")
    if kind == "kl_cov" and (ref_logp is not None and kl_coef != 0.0):
        raise ValueError("fastrl: policy_loss kind='kl_cov' uses the KL term for its covariance penalty; "
                         "pass ref_logp=None (add a reference KL with a second call)")
    valid = mask != 0
    selected, count = _cov_selection(logp, old_logp, advantages, mask, kw["cu_seqlens"], kind=kind, clip_low=clip_low,
                                     clip_high=clip_high, cov_ratio=cov_ratio, clip_cov_lb=clip_cov_lb,
                                     clip_cov_ub=clip_cov_ub, seed=seed)
    base = dict(clip_low=1.0, clip_high=1e30) if kind == "kl_cov" else dict(clip_low=clip_low, clip_high=clip_high)
    if kind == "kl_cov" and is_weights is None:
        ref = torch.where(selected, old_logp.to(logp.dtype), logp.detach())
        loss, m = policy_loss(logp, old_logp, advantages, mask, kind="vanilla", log_ratio_clamp=None, ref_logp=ref,
                              kl_coef=ppo_kl_coef, kl_kind="abs", **base, **kw)
        for key_ in ("kl_mean", "kl_loss"):
            m.pop(key_)
    elif kind == "kl_cov":
        loss, m = policy_loss(logp, old_logp, advantages, mask, kind="vanilla", log_ratio_clamp=None,
                              is_weights=is_weights, **base, **kw)
        penalty = torch.where(selected, (logp - old_logp).abs() * is_weights, 0.0).to(logp.dtype)
        extra, _ = policy_loss(logp.detach(), old_logp, advantages.new_zeros(logp.shape[:1]), mask, kind="gpg",
                               **dict(kw, entropy=-penalty, entropy_coef=ppo_kl_coef))
        loss = loss + extra
    if kind == "kl_cov":
        m["approx_kl_abs"] = (torch.where(valid, (logp.detach() - old_logp).abs().double(), 0.0).sum()
                              / count).float()
    else:
        corr = (~selected).to(logp.dtype)
        weights = corr if is_weights is None else corr * is_weights
        loss, m = policy_loss(logp, old_logp, advantages, mask, kind="vanilla", log_ratio_clamp=None,
                              is_weights=weights, ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind, **base, **kw)
        m["clipfrac"] = (selected.sum().double() / count).float()
    return loss, m


def _cov_selection(logp, old_logp, advantages, mask, cu_seqlens, *, kind, clip_low, clip_high, cov_ratio,
                   clip_cov_lb, clip_cov_ub, seed):
    """(bool mask of the tokens clip_cov drops / kl_cov penalizes, logp's shape; max(N, 1) as float64).
    Layout-free: the per-token values and an order over the valid tokens only (positions are
    row-major in both layouts), so packed rows select exactly what their padded rows select."""
    _check_cov_layout(logp, old_logp, advantages, mask, cu_seqlens)
    valid = mask != 0
    with torch.no_grad():
        adv = _per_token(advantages, logp, cu_seqlens)
        n = valid.sum()
        count = n.clamp(min=1).to(torch.float64)
        adv_c = adv.double() - torch.where(valid, adv.double(), 0.0).sum() / count
        lp_c = logp.detach().double() - torch.where(valid, logp.detach().double(), 0.0).sum() / count
        cov = (adv_c * lp_c).to(logp.dtype if logp.dtype == torch.float64 else torch.float32)
        k = torch.floor(n.double() * cov_ratio).clamp(min=1)  # verl: max(1, int(N * ratio))
        if kind == "kl_cov":
            key = torch.where(valid, -cov, float("inf"))  # ascending = largest covariance first
            eligible = torch.isfinite(key)
        else:
            ratio = torch.exp(logp.detach() - old_logp)  # verl's clip test, in the inputs' dtype
            l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
            eligible = valid & (l2 <= l1) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
            key = torch.where(eligible, _token_hash(valid, seed), torch.iinfo(torch.int64).max)
        order = torch.sort(key.flatten(), stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return (rank.view(logp.shape) < k) & eligible, count


def _check_cov_layout(logp, old_logp, advantages, mask, cu_seqlens):
    """The layout checks the selection needs before the op repeats them (cu_seqlens' values: the op's)."""
    name = "fastrl: policy_loss kind='clip_cov'/'kl_cov'"
    want = "1-D [N] (packed, with `cu_seqlens`)" if cu_seqlens is not None else "2-D [B, T] (padded)"
    if logp.dim() != (1 if cu_seqlens is not None else 2):
        raise ValueError(f"{name} `logp` must be {want}, got shape {tuple(logp.shape)}")
    for arg, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} `{arg}` must have `logp`'s shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int64 or not len(cu_seqlens)):
        raise ValueError(f"{name} `cu_seqlens` must be int64 [B + 1] row offsets, got {cu_seqlens.dtype} of shape "
                         f"{tuple(cu_seqlens.shape)}")
    rows = logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if advantages.shape != logp.shape and tuple(advantages.shape) != (rows,):
        raise ValueError(f"{name} `advantages` must have `logp`'s shape {tuple(logp.shape)} (per token) or "
                         f"[{rows}] (per sequence), got {tuple(advantages.shape)}")


def _per_token(advantages, logp, cu_seqlens):
    """Advantages per token: as given, or a row's value on each of its tokens."""
    if advantages.shape == logp.shape:
        return advantages
    if cu_seqlens is None:
        return advantages[:, None].expand_as(logp)
    if not len(advantages):  # no rows but tokens: bad cu_seqlens, which the op reports
        return advantages.new_zeros(logp.shape)
    return advantages[_token_rows(cu_seqlens, logp.shape[0]).clamp(max=len(advantages) - 1)]


def _token_rows(cu_seqlens, n):
    """int64 [n]: the row of each packed token (a searchsorted, no host sync)."""
    return torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=cu_seqlens.device), right=True)


_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant, with no int64 overflow."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _mix32(x):
    """A 32-bit integer hash (the "lowbias32" mixer: xorshift-multiply rounds) of int64 tensors or ints."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _token_hash(valid, seed):
    """int64 keys in [0, 2^62), valid's shape: a hash of (seed, the token's index among the valid
    tokens in row-major order). Independent uniform keys: sorting them draws a uniform subset,
    the same on every device and for the padded and packed forms of a batch."""
    ordinal = torch.cumsum(valid.flatten().to(torch.int64), 0).view(valid.shape) - 1
    seed = int(seed) & ((1 << 64) - 1)
    # salts: mixed seed halves (Python ints), so that no (seed, ordinal) pair hashes to a fixed point
    salt_lo, salt_hi = _mix32((seed & _M32) ^ 0x9E3779B9), _mix32((seed >> 32) ^ 0x85EBCA6B)
    h = _mix32(_mix32((ordinal & _M32) ^ salt_lo) ^ (ordinal >> 32) ^ salt_hi)
    return (h << 30) | (_mix32(h ^ salt_lo) >> 2)


def _global_counts(mask, cu_seqlens, scale, process_group):
    """float64 [3] (N, S, B) summed over the group (one all-reduce), and scale * world size."""
    import torch.distributed as dist

    valid = mask != 0
    if cu_seqlens is None:
        per_row = valid.sum(-1)
    else:
        per_row = torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.int64, device=mask.device)
        per_row.index_add_(0, _token_rows(cu_seqlens, mask.shape[0]), valid.to(torch.int64))
    counts = torch.stack([per_row.sum().double(), (per_row > 0).sum().double(),
                          torch.tensor(float(per_row.shape[0]), dtype=torch.float64, device=mask.device)])
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    return counts, scale * dist.get_world_size(process_group)


def _count_args(num_tokens, num_seqs, counts, device):
    """The op's count arguments (num_tokens, num_seqs, counts): Python numbers as floats (no tensor per
    call); 0-dim tensors (no host sync) go into the float64 [3] ``counts`` (N, S, B; NaN: not given)
    with a process group's all-reduced counts."""
    given = [v for v in (num_tokens, num_seqs) if isinstance(v, torch.Tensor)]
    if not given:
        return (None if num_tokens is None else float(num_tokens), None if num_seqs is None else float(num_seqs),
                counts)
    if counts is None:
        counts = torch.full((3,), float("nan"), dtype=torch.float64, device=device)
    entries = [v.to(device=device, dtype=torch.float64).reshape(()) if isinstance(v, torch.Tensor) else counts[i]
               for i, v in enumerate((num_tokens, num_seqs))]
    counts = torch.stack(entries + [counts[2]])
    return (None if num_tokens is None or isinstance(num_tokens, torch.Tensor) else float(num_tokens),
            None if num_seqs is None or isinstance(num_seqs, torch.Tensor) else float(num_seqs), counts)


def _metrics(values, has_kl, has_entropy):
    """The op's float32 metrics vector as a dict of 0-dim views (one unbind)."""
    values = values.unbind()
    m = dict(zip(_METRICS, values))
    if has_kl:
        m.update(zip(_KL_METRICS, values[10:12]))
    if has_entropy:
        m.update(zip(_ENTROPY_METRICS, values[12:14]))
    return m


# ------------------------------------------------------------------------- hidden states -> loss
def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logp: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_size: int | None = None,
                       with_entropy: bool | None = None, **policy_kwargs):
    """:func:`policy_loss` of the log-probs of ``hidden @ weight.T (+ bias)``, without the ``[N, V]`` logits.

    With ``z = (hidden @ weight.T + bias) / temperature`` per valid token (never stored whole)::

        logp    = z[label] - logsumexp(z)                     (fastrl.linear_logprobs)
        entropy = logsumexp(z) - sum_j softmax(z)_j z_j       (only when needed, see with_entropy)
        loss, metrics = policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **policy_kwargs)

    Gradients flow to ``hidden``, ``weight`` and ``bias`` through both ``logp`` and ``entropy``
    (the chain rule of the two compiled backwards). Tokens with ``mask == 0`` get the label
    ``ignore_index`` before the matmul: they are never multiplied by ``weight`` and get zero gradient.
    A valid token whose label is ``ignore_index`` has log-prob 0 and entropy 0.

    Memory: the forward computes ``chunk_size`` rows of logits at a time and keeps only O(N) per
    token (log-prob, entropy, logsumexp, the policy kernel's per-token derivatives); the backward
    recomputes each chunk's logits. Peak extra memory O(chunk_size x V + V x H), not O(N x V)
    (see :func:`fastrl.linear_logprobs` for the chunk size and the bf16/fp16 buffers). This is a
    Python composition of the custom ops ``fastrl::linear_logprobs`` and ``fastrl::policy_loss_rows``
    (each opchecked on its own), not a custom op itself.

    Args:
        hidden: ``[B, T, H]`` (padded, with ``mask [B, T]``) or ``[N, H]`` (packed, pass ``cu_seqlens``).
        weight: ``[V, H]`` the LM head; ``bias``: optional ``[V]``. Same dtype as ``hidden``.
        labels: integer, ``hidden.shape[:-1]``: the sampled tokens.
        old_logp, advantages, mask: as in :func:`policy_loss` (``labels``' shape; advantages also ``[B]``).
        temperature: the sampling temperature the log-probs are taken at (logits / T).
        chunk_size: rows per logits chunk (default: :data:`fastrl.linear_logprobs.CHUNK_BYTES` of logits).
        with_entropy: compute the entropy (needed for ``entropy_coef != 0``; with a zero coefficient
            it only adds the ``entropy_mean`` / ``entropy_loss`` metrics). Default: ``entropy_coef != 0``.
        **policy_kwargs: any keyword argument of :func:`policy_loss` except ``entropy`` (``kind``,
            ``agg``, ``ref_logp``, ``kl_coef``, ``entropy_coef``, ``is_weights``, ``cu_seqlens``, ...).

    Returns:
        ``(loss, metrics)`` as :func:`policy_loss`; the log-probs are float32 (fp32 softmax), so the loss
        is float32.

    >>> hidden, weight = torch.randn(2, 5, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> labels, mask = torch.randint(0, 100, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    >>> old = torch.randn(2, 5) - 5
    >>> loss, m = fastrl.losses.linear_policy_loss(hidden, weight, labels, old, torch.tensor([1.0, -1.0]), mask,
    ...                                           entropy_coef=0.01)
    >>> loss.backward(); hidden.grad.shape, weight.grad.shape
    (torch.Size([2, 5, 16]), torch.Size([100, 16]))
    """
    if "entropy" in policy_kwargs:
        raise ValueError("fastrl: linear_policy_loss computes the entropy from `hidden` itself; do not pass "
                         "`entropy` (use `entropy_coef`, or `with_entropy=True` for the metrics only)")
    _check_linear(hidden, weight, labels, bias, temperature)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(labels.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"fastrl: linear_policy_loss `mask` must have `labels`' shape {tuple(labels.shape)}, "
                         f"got {got}")
    entropy_coef = policy_kwargs.get("entropy_coef", 0.0)
    if with_entropy is None:
        with_entropy = entropy_coef != 0
    elif not with_entropy and entropy_coef != 0:
        raise ValueError(f"fastrl: linear_policy_loss entropy_coef={entropy_coef} needs the entropy; "
                         "got with_entropy=False")
    labels = torch.where(mask != 0, labels, ignore_index)  # masked tokens skip the matmul
    out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=with_entropy,
                          ignore_index=ignore_index, chunk_size=chunk_size)
    logp, entropy = out if with_entropy else (out, None)
    if entropy is not None and entropy_coef == 0:
        entropy = entropy.detach()  # metrics only: no entropy term in the backward
    return policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **policy_kwargs)


# --------------------------------------------------------------- rollout-correction IS weights
IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
_IS_LOG_BOUND = 20.0  # verl's SAFETY_BOUND: log-ratios are clamped to +-20 before exp
_EPS = 1e-8           # verl_F.masked_mean's denominator guard, kept for metric parity


def rollout_is_weights(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *, level: str = "token",
                       mode: str = "truncate", threshold: float = 2.0, threshold_lower: float | None = None,
                       batch_normalize: bool = False, process_group=None):
    """Importance-sampling weights ``pi_train / pi_rollout`` for rollout/trainer mismatch (verl 0.9.1).

    verl's ``compute_rollout_correction_weights`` (``trainer/ppo/rollout_corr_helper.py``), vectorized
    with no host sync. With ``x = logp - rollout_logp`` on the valid tokens (``mask != 0``)::

        level="token"      raw_t = exp(clamp(x_t, -20, 20))
        level="sequence"   raw_t = exp(clamp(sum_b x, -20, 20))            (product of the token ratios)
        level="geometric"  raw_t = exp(clamp(mean_b x, -20, 20))           (geometric mean, not in verl 0.9.1)
        mode="truncate"    w = min(raw, threshold)     (TIS; also max(., threshold_lower) when given)
        mode="mask"        w = raw if threshold_lower <= raw <= threshold else 0   (MIS / IcePop;
                           threshold_lower defaults to 1 / threshold)
        batch_normalize    w /= mean w   (over valid tokens for "token", over the non-empty rows'
                           token-mean for the sequence levels; skipped when the mean is <= 1e-8)
        process_group      the batch mean is over every rank of the group: one all-reduce of
                           (sum, count), verl's distributed_masked_mean (no 1e-8 in the denominator)

    ``w`` is 0 on masked tokens. verl's ``rollout_is_threshold="lo_hi"`` string is ``mode="mask",
    threshold=hi, threshold_lower=lo``; a number is ``mode="truncate", threshold=number``.
    ``level="geometric", mode="mask"`` keeps a sequence exactly when verl's rejection option
    ``rollout_rs="seq_mean_k1"`` with ``rollout_rs_threshold=f"{1/hi}_{1/lo}"`` keeps it.

    Args:
        logp: ``[B, T]`` the trainer's log-probs (verl's ``old_log_prob``); read without gradient.
        rollout_logp: ``[B, T]`` the rollout engine's log-probs.
        mask: ``[B, T]`` 0/1 valid tokens.
        threshold: upper bound > 0; ``threshold_lower``: lower bound in ``(0, threshold]``.
        process_group: with ``batch_normalize``, the data-parallel group the mean spans (verl takes
            the default group whenever ``torch.distributed`` is initialized: pass
            ``torch.distributed.group.WORLD`` to match it there). Two ranks give the weights of one
            process holding both batches.

    Returns:
        ``(weights, metrics)``: ``weights`` ``[B, T]`` detached, in the promoted floating dtype of
        ``logp`` / ``rollout_logp``; ``metrics`` verl's keys (``rollout_is_mean``, ``_max``, ``_min``,
        ``_ratio_fraction_high``/``_low``, ``_std``, ``_eff_sample_size``, ``_seq_mean``/``_std``/``_max``/
        ``_min``/``_max_deviation``/``_fraction_high``/``_fraction_low``, ``rollout_is_oob_ratio`` for
        ``"mask"``, ``rollout_is_batch_norm_factor`` with ``batch_normalize``) as 0-dim device tensors,
        computed before the batch normalization, as verl does. With no valid token (verl raises) the
        weights are 0 and the token statistics 0; when every weight is 0 (``"mask"`` rejecting all)
        ``rollout_is_eff_sample_size`` is 0 (verl divides by zero there).

    >>> lp = torch.tensor([[-1.0, -2.0, -0.5]]); mask = torch.tensor([[1, 1, 0]])
    >>> w, m = fastrl.losses.rollout_is_weights(lp, lp - torch.tensor([[1.0, -0.1, 0.0]]), mask, threshold=2.0)
    >>> w
    tensor([[2.0000, 0.9048, 0.0000]])
    """
    lower = _check_is_args(logp, rollout_logp, mask, level, mode, threshold, threshold_lower)
    dtype = torch.promote_types(torch.promote_types(logp.dtype, rollout_logp.dtype), torch.float32)
    valid = mask != 0
    m = valid.to(dtype)
    x = torch.where(valid, logp.detach().to(dtype) - rollout_logp.to(dtype), 0.0)  # masked tokens never read
    n = m.sum(-1)
    if level == "token":
        log_w = x
    else:
        log_w = x.sum(-1, keepdim=True)
        if level == "geometric":
            log_w = log_w / n.clamp(min=1)[:, None]
    raw = torch.exp(log_w.clamp(-_IS_LOG_BOUND, _IS_LOG_BOUND)).expand_as(x) * m
    if mode == "truncate":
        w = raw.clamp(max=threshold) if threshold_lower is None else torch.where(
            valid, raw.clamp(threshold_lower, threshold), 0.0)
    else:
        w = torch.where((raw >= lower) & (raw <= threshold), raw, 0.0)
    metrics = _is_metrics(w, raw, log_w, m, n, level, mode, threshold, lower)
    if batch_normalize:
        if level == "token":
            total, count = (w * m).sum(), m.sum()
        else:
            has = (n > 0).to(dtype)
            total, count = ((w * m).sum(-1) / (n + _EPS) * has).sum(), has.sum()
        if process_group is not None:
            import torch.distributed as dist

            both = torch.stack([total, count])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=process_group)
            mean = both[0] / both[1]  # 0 / 0 = NaN: not > 1e-8, no normalization (as verl)
        else:
            mean = total / (count + _EPS) if level == "token" else total / count.clamp(min=_EPS)
        ok = mean > _EPS
        w = torch.where(ok, w / torch.where(ok, mean, 1.0), w)
        metrics["rollout_is_batch_norm_factor"] = torch.where(ok, mean, 1.0).float()
    return w.detach(), metrics


def _check_is_args(logp, rollout_logp, mask, level, mode, threshold, threshold_lower,
                   name="fastrl: rollout_is_weights"):
    """Validates rollout_is_weights' arguments; returns the effective lower bound."""
    for arg, t in (("logp", logp), ("rollout_logp", rollout_logp), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} `{arg}` must be a tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"{name} `logp` must be [B, T], got shape {tuple(logp.shape)}")
    for arg, t in (("rollout_logp", rollout_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} `{arg}` must have `logp`'s shape {tuple(logp.shape)}, got {tuple(t.shape)}")
        if t.device != logp.device:
            raise ValueError(f"{name} `{arg}` is on {t.device} but `logp` is on {logp.device}")
    for arg, t in (("logp", logp), ("rollout_logp", rollout_logp)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} `{arg}` must be floating point, got {t.dtype}")
    if level not in IS_LEVELS:
        raise ValueError(f"{name} `level` must be one of {', '.join(IS_LEVELS)}; got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"{name} `mode` must be one of {', '.join(IS_MODES)}; got {mode!r}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")  # noqa: E731
    if not number(threshold):
        raise ValueError(f"{name} `threshold` must be a finite number > 0, got {threshold!r}")
    if threshold_lower is not None and not (number(threshold_lower) and threshold_lower <= threshold):
        raise ValueError(f"{name} `threshold_lower` must be a number in (0, threshold={threshold}], "
                         f"got {threshold_lower!r}")
    return 1.0 / threshold if threshold_lower is None else float(threshold_lower)


def _is_metrics(w, raw, log_w, m, n, level, mode, upper, lower):
    """verl's compute_is_metrics (+ the IcePop out-of-bounds ratio) as device tensors."""
    count = m.sum()
    has = count > 0

    def mmean(t, dim=None):  # verl_F.masked_mean: sum / (count + 1e-8)
        return (t * m).sum(dim) / ((count if dim is None else n) + _EPS)

    def amax(t):  # 0 for an empty batch (shapes are static: no sync)
        return t.max() if t.numel() else t.new_zeros(())

    def amin(t):
        return t.min() if t.numel() else t.new_zeros(())

    def frac(b):
        return b.to(w.dtype).mean() if b.numel() else w.new_zeros(())

    out = {"rollout_is_mean": mmean(w)}
    if level == "token":
        out["rollout_is_ratio_fraction_high"] = mmean((raw > upper).to(w.dtype))
        out["rollout_is_ratio_fraction_low"] = mmean((raw < lower).to(w.dtype))
        valid = m != 0
        out["rollout_is_max"] = torch.where(has, amax(torch.where(valid, w, -float("inf"))), 0.0)
        out["rollout_is_min"] = torch.where(has, amin(torch.where(valid, w, float("inf"))), 0.0)
    else:  # per-row statistics over every row (verl includes the empty ones: log-ratio 0)
        out["rollout_is_max"] = torch.exp(amax(log_w).clamp(max=_IS_LOG_BOUND))
        out["rollout_is_min"] = torch.exp(amin(log_w))
        out["rollout_is_ratio_fraction_high"] = frac(log_w > math.log(upper))
        out["rollout_is_ratio_fraction_low"] = frac(log_w < math.log(lower))
    capped = w.clamp(0.0, upper)
    mean_c = mmean(capped)
    var = mmean(capped.square()) - mean_c.square()
    out["rollout_is_std"] = torch.where(count > 1, var.clamp(min=0.0).sqrt(), 0.0)
    ess_den = mmean((capped / (mean_c + _EPS)).square())
    out["rollout_is_eff_sample_size"] = torch.where(ess_den > 0, 1.0 / ess_den, 0.0)  # verl: ZeroDivisionError
    seq = mmean(w, -1)
    out["rollout_is_seq_mean"] = seq.mean() if seq.numel() else seq.new_zeros(())
    out["rollout_is_seq_std"] = seq.std() if seq.numel() > 1 else seq.new_zeros(())
    out["rollout_is_seq_max"] = amax(seq)
    out["rollout_is_seq_min"] = amin(seq)
    out["rollout_is_seq_max_deviation"] = amax((seq - 1.0).abs())
    raw_seq = mmean(raw, -1)
    out["rollout_is_seq_fraction_high"] = frac(raw_seq > upper)
    out["rollout_is_seq_fraction_low"] = frac(raw_seq < lower)
    if mode == "mask":
        out["rollout_is_oob_ratio"] = mmean(((raw < lower) | (raw > upper)).to(w.dtype))
    return {k: v.detach().float() for k, v in out.items()}


# ------------------------------------------------------------------- rollout rejection sampling
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def rollout_rejection_mask(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                           rs="token_k1", threshold=None):
    """verl 0.9.1's rejection sampling for rollout/trainer mismatch: ``mask`` with the rejected tokens zeroed.

    verl's ``compute_rollout_rejection_mask`` (``trainer/ppo/rollout_corr_helper.py``), vectorized with
    no host sync. With ``x = clamp(logp - rollout_logp, -20, 20)`` on the valid tokens and the
    divergence estimators ``k1 = -x``, ``k2 = x^2 / 2``, ``k3 = exp(x) - 1 - x``, each option
    ``"{level}_{k}"`` computes a statistic and keeps::

        token_k*       the token's estimator                                  (per token)
        seq_sum_k*     sum of the row's estimators                            (whole row)
        seq_mean_k*    sum / (n_b + 1e-8)                                     (whole row)
        seq_max_k2/k3  max over the row's valid tokens (0 for an empty row)   (whole row)
        k1 options     keep where log(lower) <= stat <= log(upper)
        k2/k3 options  keep where stat <= upper

    Several options (a comma separated string, as verl, or a list) must all keep a token. The
    returned mask is ``mask`` (its dtype and values) where every option keeps the token, else 0.

    Args:
        logp: ``[B, T]`` the trainer's log-probs (verl's ``old_log_prob``); read without gradient.
        rollout_logp: ``[B, T]`` the rollout engine's log-probs.
        mask: ``[B, T]`` 0/1 valid tokens (masked tokens are never read).
        rs: option name(s) from :data:`RS_OPTIONS`: ``"token_k1,seq_max_k2"`` or a list.
        threshold: verl's ``rollout_rs_threshold``: one spec shared by every option or one per option
            (a comma separated string or a list). A k1 spec is ``"lower_upper"``, a ``(lower, upper)``
            pair, or the upper bound alone (``lower = 1 / upper``); a k2/k3 spec is the upper bound.

    Returns:
        ``(mask, metrics)``: metrics are verl's keys (``rollout_rs_{option}_mean``, ``_max``, ``_min``,
        ``_fraction_high``, ``_fraction_low``, ``_std``, ``_seq_mean``, ``_seq_std``, ``_seq_max``,
        ``_seq_min``, ``_seq_max_deviation``, ``_seq_fraction_high``, ``_seq_fraction_low`` (k1 only),
        ``_masked_fraction``, ``_seq_masked_fraction``, and ``rollout_rs_masked_fraction``,
        ``rollout_rs_seq_masked_fraction``) as 0-dim float32 device tensors (k1 thresholds in log
        space, as verl reports them). With no valid token (verl raises) every metric is 0; with
        ``B == 0`` the metrics dict is empty, as verl's.

    >>> lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    >>> keep, m = fastrl.losses.rollout_rejection_mask(lp, lp - torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.1, 0.0]]),
    ...                                                torch.ones(2, 3), rs="token_k2", threshold=0.5)
    >>> keep
    tensor([[0., 1., 1.],
            [1., 1., 1.]])
    """
    options, bounds = _check_rs_args(logp, rollout_logp, mask, rs, threshold)
    if logp.shape[0] == 0:
        return mask.clone(), {}
    dtype = torch.promote_types(torch.promote_types(logp.dtype, rollout_logp.dtype), torch.float32)
    valid = mask != 0
    m = valid.to(dtype)
    n = m.sum(-1)
    count = n.sum()
    row_ok = n > 0
    rows = row_ok.to(dtype).sum()
    x = torch.where(valid, logp.detach().to(dtype) - rollout_logp.to(dtype), 0.0).clamp(-_IS_LOG_BOUND, _IS_LOG_BOUND)
    estimators = {"k1": lambda: -x, "k2": lambda: 0.5 * x.square(), "k3": lambda: torch.exp(x) - 1.0 - x}

    def mmean(t, dim=None):  # verl_F.masked_mean: sum / (count + 1e-8), masked entries never read
        return torch.where(valid, t, 0.0).sum(dim) / ((count if dim is None else n) + _EPS)

    def row_mean(t):  # mean over the rows with a valid token (0 if none)
        return torch.where(row_ok, t, 0.0).sum() / rows.clamp(min=1)

    def extreme(t, ok, largest):
        fill = -float("inf") if largest else float("inf")
        v = torch.where(ok, t, fill)
        v = (v.max() if largest else v.min()) if v.numel() else t.new_zeros(())
        return torch.where(ok.any(), v, 0.0)

    keep_tokens, keep_rows = None, torch.ones_like(row_ok)  # token options' and sequence options' verdicts
    metrics = {}
    for opt in options:
        lower, upper = bounds[opt]
        k1 = opt.endswith("k1")
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        stat = estimators[opt[-2:]]()
        if opt.startswith("token"):  # per token: statistics over the valid tokens
            keep = ((stat >= lo) & (stat <= hi)) if k1 else stat <= hi
            keep_tokens = keep if keep_tokens is None else keep_tokens & keep
            rejected = valid & ~keep
            row_rejected = rejected.any(-1)
            metrics[f"rollout_rs_{opt}_masked_fraction"] = mmean(rejected.to(dtype))
            metrics.update(_rs_metrics(f"rollout_rs_{opt}", stat, None, mmean, row_mean, extreme, valid, row_ok,
                                       count, rows, lo, hi, k1))
        else:  # one value a row: a token statistic is that value weighted by the row's n_b (O(B) work)
            if opt.startswith("seq_sum"):
                seq = torch.where(valid, stat, 0.0).sum(-1)
            elif opt.startswith("seq_mean"):
                seq = mmean(stat, -1)
            else:
                seq = torch.where(row_ok, torch.where(valid, stat, -float("inf")).amax(-1) if stat.shape[-1] else n,
                                  0.0)
            keep = ((seq >= lo) & (seq <= hi)) if k1 else seq <= hi
            keep_rows &= keep
            row_rejected = row_ok & ~keep
            metrics[f"rollout_rs_{opt}_masked_fraction"] = (n * row_rejected).sum() / (count + _EPS)
            metrics.update(_rs_metrics(f"rollout_rs_{opt}", seq, n, mmean, row_mean, extreme, valid, row_ok,
                                       count, rows, lo, hi, k1))
        metrics[f"rollout_rs_{opt}_seq_masked_fraction"] = row_mean(row_rejected.to(dtype))
    keep_all = keep_rows[:, None] if keep_tokens is None else keep_tokens & keep_rows[:, None]
    rejected = valid & ~keep_all
    metrics["rollout_rs_masked_fraction"] = mmean(rejected.to(dtype))
    metrics["rollout_rs_seq_masked_fraction"] = rejected.any(-1).to(dtype).mean()  # over every row, as verl
    out = torch.where(keep_all, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return out, {k: v.detach().float() for k, v in metrics.items()}


def _rs_metrics(prefix, values, n, mmean, row_mean, extreme, valid, row_ok, count, rows, lo, hi, k1):
    """verl's compute_rs_metrics for one option, as device tensors (0 where verl would raise).
    ``values``: the per-token statistic ``[B, T]`` (``n`` None) or the per-row one ``[B]`` standing for
    ``n_b`` equal tokens."""
    f = values.dtype
    if n is None:
        tmean, seq_values = mmean, mmean(values, -1)
        out = {f"{prefix}_max": extreme(values, valid, True), f"{prefix}_min": extreme(values, valid, False),
               f"{prefix}_fraction_high": mmean((values > hi).to(f))}
        out[f"{prefix}_fraction_low"] = mmean((values < lo).to(f)) if k1 else values.new_zeros(())
    else:
        def tmean(v):  # verl's masked_mean of the row value broadcast over the row's tokens
            return torch.where(row_ok, v * n, 0.0).sum() / (count + _EPS)

        seq_values = values
        out = {f"{prefix}_max": extreme(values, row_ok, True), f"{prefix}_min": extreme(values, row_ok, False),
               f"{prefix}_fraction_high": row_mean((values > hi).to(f))}
        out[f"{prefix}_fraction_low"] = row_mean((values < lo).to(f)) if k1 else values.new_zeros(())
    out[f"{prefix}_mean"] = tmean(values)
    clamped = values.clamp(lo, hi)
    mean_c = tmean(clamped)
    var = tmean(clamped.square()) - mean_c.square()
    out[f"{prefix}_std"] = torch.where(count > 1, var.clamp(min=0.0).sqrt(), 0.0)
    seq_mean = row_mean(seq_values)
    dev = torch.where(row_ok, seq_values - seq_mean, 0.0)
    out[f"{prefix}_seq_mean"] = seq_mean
    out[f"{prefix}_seq_std"] = torch.where(rows > 1, (dev.square().sum() / (rows - 1).clamp(min=1)).sqrt(), 0.0)
    out[f"{prefix}_seq_max"] = extreme(seq_values, row_ok, True)
    out[f"{prefix}_seq_min"] = extreme(seq_values, row_ok, False)
    out[f"{prefix}_seq_max_deviation"] = extreme(seq_values.abs(), row_ok, True)
    out[f"{prefix}_seq_fraction_high"] = row_mean((seq_values > hi).to(f))
    if k1:
        out[f"{prefix}_seq_fraction_low"] = row_mean((seq_values < lo).to(f))
    return out


def _check_rs_args(logp, rollout_logp, mask, rs, threshold):
    """Validates rollout_rejection_mask's arguments; returns (options, {option: (lower, upper)})."""
    name = "fastrl: rollout_rejection_mask"
    _check_is_args(logp, rollout_logp, mask, "token", "truncate", 1.0, None, name=name)
    options = [o.strip() for o in rs.split(",")] if isinstance(rs, str) else list(rs) if rs is not None else []
    options = list(dict.fromkeys(o for o in options if o))  # verl drops repeats, keeps the order
    bad = [o for o in options if o not in RS_OPTIONS]
    if not options or bad:
        raise ValueError(f"{name} `rs` must name options among {', '.join(RS_OPTIONS)}; got {rs!r}")
    if threshold is None:
        raise ValueError(f"{name} `threshold` is required (verl's rollout_rs_threshold), got None")
    specs = [p.strip() for p in threshold.split(",") if p.strip()] if isinstance(threshold, str) else \
        list(threshold) if isinstance(threshold, (list, tuple)) and not _is_pair(threshold) else [threshold]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"{name} `threshold` must hold one spec or one per option ({len(options)}), "
                         f"got {len(specs)}: {threshold!r}")
    specs = specs * len(options) if len(specs) == 1 else specs
    bounds = {}
    for opt, spec in zip(options, specs):
        lower, upper = _parse_rs_spec(spec)
        k1 = opt.endswith("k1")
        if lower is not None and not k1:
            raise ValueError(f"{name} `threshold` for {opt!r} must be a single upper bound (a lower bound applies "
                             f"to k1 options only), got {spec!r}")
        if k1 and lower is None and upper is not None and upper > 0:
            lower = 1.0 / upper  # verl's default lower bound, checked like a given one
        if upper is None or not 0 < upper < float("inf") or (lower is not None and not 0 < lower <= upper):
            raise ValueError(f"{name} `threshold` for {opt!r} must be positive finite bounds with lower <= upper "
                             f"(a k1 upper bound alone must be >= 1), got {spec!r}")
        bounds[opt] = (lower, upper)
    return options, bounds


def _is_pair(v):
    return isinstance(v, tuple) and len(v) == 2 and all(isinstance(e, (int, float)) for e in v)


def _parse_rs_spec(spec):
    """(lower or None, upper or None) of one threshold spec: a number, "upper", "lower_upper", (lower, upper)."""
    try:
        if _is_pair(spec):
            return float(spec[0]), float(spec[1])
        if isinstance(spec, str) and "_" in spec:
            lo, hi = spec.split("_", 1)
            return float(lo), float(hi)
        if isinstance(spec, bool):
            return None, None
        return None, float(spec)
    except (TypeError, ValueError):
        return None, None


# ----------------------------------------------------------------------------------- fake kernels
def _rows_fake(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens, *params):
    num_rows = logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = torch.float64 if _promoted(logp, old_logp, advantages, ref_logp, entropy, is_weights) == torch.float64 \
        else torch.float32
    return (logp.new_empty((), dtype=torch.float64 if logp.dtype == torch.float64 else torch.float32),
            logp.new_empty((len(_METRICS) + len(_KL_METRICS) + len(_ENTROPY_METRICS),), dtype=torch.float32),
            logp.new_empty((num_rows, _NUM_STATS), dtype=torch.float64), logp.new_empty(logp.shape, dtype=acc),
            logp.new_empty(logp.shape if ref_logp is not None else (0,), dtype=acc))


def _promoted(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows_backward_fake(grad_loss, rows, dlogp, dlogp_aux, mask, cu_seqlens, scale, entropy_coef, logp_dtype,
                        entropy_dtype):
    return (torch.empty_like(dlogp, dtype=logp_dtype),
            dlogp.new_empty(dlogp.shape, dtype=entropy_dtype) if entropy_dtype is not None else dlogp.new_empty((0,)))


def _rows_setup(ctx, inputs, output):
    _, metrics, rows, dlogp, dlogp_aux = output
    logp, mask, entropy, cu_seqlens = inputs[0], inputs[3], inputs[5], inputs[7]
    ctx.save_for_backward(rows, dlogp, dlogp_aux, mask, cu_seqlens)
    ctx.mark_non_differentiable(metrics, rows, dlogp, dlogp_aux)
    ctx.set_materialize_grads(False)  # no [B, T] zero gradients for the unused outputs
    ctx.args = (inputs[22], inputs[19], logp.dtype, None if entropy is None else entropy.dtype)  # scale, entropy_coef


def _rows_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 26
    rows, dlogp, dlogp_aux, mask, cu_seqlens = ctx.saved_tensors
    g_logp, g_ent = torch.ops.fastrl.policy_loss_rows_backward(grad_loss, rows, dlogp, dlogp_aux, mask, cu_seqlens,
                                                               *ctx.args)
    return ((g_logp if ctx.needs_input_grad[0] else None, None, None, None, None,
             g_ent if ctx.args[3] is not None and ctx.needs_input_grad[5] else None) + (None,) * 20)


class _PolicyLossRows(torch.autograd.Function):
    """fastrl::policy_loss_rows with the autograd formula registered for the op (_rows_setup /
    _rows_backward), applied directly: the op then runs below autograd, which skips the generic
    wrapper of torch.library.register_autograd (its per-call schema walk costs more host time than
    the whole op on small batches)."""

    @staticmethod
    def forward(ctx, *args):
        # below the Autograd key: straight to the CPU/CUDA kernel, not through the registered
        # autograd kernel's Python no-grad redispatch (~40 us a call)
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.fastrl.policy_loss_rows(*args)
        _rows_setup(ctx, args, out)
        return out

    backward = staticmethod(_rows_backward)


if _extension._C is not None:
    torch.library.register_fake("fastrl::policy_loss_rows")(_rows_fake)
    torch.library.register_fake("fastrl::policy_loss_rows_backward")(_rows_backward_fake)
    torch.library.register_autograd("fastrl::policy_loss_rows", _rows_backward, setup_context=_rows_setup)
