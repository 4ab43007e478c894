"""Fused policy / KL / entropy losses of RL post-training: one compiled pass forward, one backward.

:func:`policy_loss` computes, for every valid token (``mask == 1``), the policy-gradient loss of
the chosen ``kind`` (verl 0.9.1 / trl 1.16.0 semantics), the KL penalty against a reference policy
and the entropy bonus, sums them per row in fp64 together with every metric, and aggregates the
rows into the scalar loss with the chosen ``agg`` mode. The backward is closed form: the forward
pass also writes each token's derivatives (one fp32 per token, two with a KL term: fp64 for fp64
inputs) and the backward scales them by the rows' incoming gradients in one streaming pass, writing
``d loss / d logp`` and ``d loss / d entropy``. No host syncs: metrics are device tensors.

Layouts: padded ``[B, T]`` with ``mask``, or packed ``[N]`` with ``cu_seqlens: int64[B+1]``.
Advantages per token (``logp``'s shape) or per sequence (``[B]``, broadcast inside the kernel).
"""
from __future__ import annotations

import torch

from fastrl import _extension
from fastrl.reference import losses as _ref

__all__ = ["policy_loss"]

KINDS = _ref.KINDS + ("clip_cov", "kl_cov")
AGGS = _ref.AGGS
KL_KINDS = _ref.KL_KINDS
RATIO_LEVELS = _ref.RATIO_LEVELS

# Columns of the per-row statistics the kernel returns (csrc/include/fastrl/losses.h RowStat).
_COUNT, _POLICY, _AUX, _CLIP, _CLIP_LOWER, _LOW, _HIGH, _NEG_LOG, _RSUM, _RMIN, _RMAX, _HSUM, _KLSUM = range(13)
_NUM_STATS = 15  # + the backward's row coefficients
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

    ``"clip_cov"`` / ``"kl_cov"`` (verl's covariance-based variants, PPO loss with the unclamped
    ratio): with ``cov_t = (A_t - mean A) (logp_t - mean logp)`` over the valid tokens and
    ``k = max(1, floor(cov_ratio * N))``, ``"kl_cov"`` adds ``ppo_kl_coef * |x_t|`` to the
    unclipped ``-A r`` at the k tokens of largest covariance; ``"clip_cov"`` takes the PPO clip loss
    and drops (zero loss and gradient) up to k tokens drawn uniformly among the valid ones with
    ``clip_cov_lb < cov < clip_cov_ub`` that the clip did not already clip. Unlike verl (an
    unseeded CPU ``randperm`` and host copies) the draw is on the device from a generator seeded with
    ``seed``: deterministic, no host sync; when there are at most k candidates every candidate is
    dropped, as in verl. ``clipfrac`` is then the dropped fraction (verl's ``pg_clipfrac``).

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
        ``metrics`` a dict of detached 0-dim float32 device tensors, token-averaged over the local
        valid tokens (0 when there is none): ``policy_loss`` (the aggregated policy term),
        ``clipfrac`` (verl's ``pg_clipfrac`` of the kind), ``clipfrac_lower`` (dual-clip active;
        geo_mean: clipped with A < 0), ``clip_low_frac`` / ``clip_high_frac`` (TRL's
        ``r < 1 - clip_low, A < 0`` / ``r > 1 + clip_high, A > 0``), ``approx_kl`` (mean of
        ``-x``, clamped as the kind clamps it), ``ratio_mean``/``ratio_min``/``ratio_max``,
        ``num_tokens``, and with ``ref_logp`` ``kl_mean``/``kl_loss``, with ``entropy``
        ``entropy_mean``/``entropy_loss`` (aggregated by ``agg``, unscaled by the coefficients).

    NaN/Inf: masked tokens are never read. A NaN or Inf in a valid token's log-prob or advantage
    propagates into the loss and its row's gradients (as in the trainers), never into other rows.

    Extra memory: ``[B, 15]`` fp64 statistics, and saved for the backward the per-token derivatives
    (``logp``'s shape in float32 -- float64 for float64 inputs --, a second one with ``ref_logp``).

    >>> lp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    >>> loss, m = fastrl.losses.policy_loss(lp, lp.detach() - 0.1, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]))
    >>> loss
    tensor(-1.1052, grad_fn=<ToCopyBackward0>)
    """
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
    num_rows = None
    if process_group is not None:
        num_tokens, num_seqs, num_rows, scale = _global_counts(mask, cu_seqlens, num_tokens, num_seqs, scale,
                                                               process_group)
    kw = dict(kind=kind, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, ref_logp=ref_logp,
              kl_coef=kl_coef, kl_kind=kl_kind, entropy=entropy, entropy_coef=entropy_coef, is_weights=is_weights,
              cu_seqlens=cu_seqlens, ratio_level=ratio_level, log_ratio_clamp=log_ratio_clamp, delta=delta,
              tau_pos=tau_pos, tau_neg=tau_neg)
    if _extension.use_reference():
        return _ref.policy_loss(logp, old_logp, advantages, mask, max_length=max_length, num_tokens=num_tokens,
                                num_seqs=num_seqs, scale=scale, num_rows=num_rows, **kw)
    rows, _, _ = torch.ops.fastrl.policy_loss_rows(
        logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens, kind, ratio_level,
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        None if log_ratio_clamp is None else float(log_ratio_clamp), None if delta is None else float(delta),
        float(tau_pos), float(tau_neg), float(kl_coef), kl_kind, float(entropy_coef))
    horizon = float(max_length if max_length is not None else logp.shape[-1])
    n = rows[:, _COUNT]
    w = _ref.agg_weights(n, agg, horizon=horizon, num_tokens=num_tokens, num_seqs=num_seqs,
                         num_rows=rows.shape[0] if num_rows is None else num_rows)
    if kind == "geo_mean":
        b = torch.as_tensor(rows.shape[0] if num_rows is None else num_rows, dtype=torch.float64)
        pg_loss = rows[:, _POLICY].sum() / b.clamp(min=1)
        loss = pg_loss + (w * rows[:, _AUX]).sum()
    else:
        pg_loss = (w * rows[:, _POLICY]).sum()
        loss = (w * (rows[:, _POLICY] + rows[:, _AUX])).sum()
    out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return (loss * scale).to(out_dtype), _metrics(rows.detach(), w.detach(), pg_loss.detach() * scale, scale,
                                                  ref_logp is not None, entropy is not None)


def _cov_loss(logp, old_logp, advantages, mask, *, kind, clip_low, clip_high, cov_ratio, clip_cov_lb, clip_cov_ub,
              ppo_kl_coef, seed, is_weights, ref_logp, kl_coef, kl_kind, **kw):
    """clip_cov / kl_cov: the token selection with static-shape device ops (a sort, no host sync),
    then the fused kernel. kl_cov's extra ``ppo_kl_coef * |x|`` at the selected tokens is the kernel's
    "abs" KL term against ``where(selected, old_logp, logp)`` (0 with zero gradient elsewhere)."""
    if not cov_ratio > 0:
        raise ValueError(f"fastrl: policy_loss `cov_ratio` must be > 0, got {cov_ratio}")
    if kind == "kl_cov" and (ref_logp is not None and kl_coef != 0.0):
        raise ValueError("fastrl: policy_loss kind='kl_cov' uses the KL term for its covariance penalty; "
                         "pass ref_logp=None (add a reference KL with a second call)")
    if kind == "kl_cov" and is_weights is not None:
        raise ValueError("fastrl: policy_loss kind='kl_cov' with `is_weights` is not supported (verl weights the "
                         "covariance penalty too, the fused kernel weights only the policy term)")
    if kw["cu_seqlens"] is not None:
        raise ValueError(f"fastrl: policy_loss kind={kind!r} supports the padded layout only")
    valid = mask != 0
    with torch.no_grad():
        adv = advantages if advantages.shape == logp.shape else advantages[:, None].expand_as(logp)
        n = valid.sum()
        count = n.clamp(min=1).to(torch.float64)
        adv_c = adv.double() - torch.where(valid, adv.double(), 0.0).sum() / count
        lp_c = logp.detach().double() - torch.where(valid, logp.detach().double(), 0.0).sum() / count
        cov = (adv_c * lp_c).to(logp.dtype if logp.dtype == torch.float64 else torch.float32)
        k = torch.floor(n.double() * cov_ratio).clamp(min=1)  # verl: max(1, int(N * ratio))
        if kind == "kl_cov":
            key = torch.where(valid, -cov, float("inf")).flatten()  # ascending = largest covariance first
        else:
            ratio = torch.exp(logp.detach() - old_logp)  # verl's clip test, in the inputs' dtype
            l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
            cand = valid & (l2 <= l1) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
            gen = torch.Generator(device=logp.device).manual_seed(seed)
            draw = torch.rand(logp.shape, generator=gen, device=logp.device, dtype=torch.float64)
            key = torch.where(cand, draw, float("inf")).flatten()
        order = torch.sort(key, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        selected = (rank.view(logp.shape) < k) & torch.isfinite(key.view(logp.shape))
    base = dict(clip_low=1.0, clip_high=1e30) if kind == "kl_cov" else dict(clip_low=clip_low, clip_high=clip_high)
    if kind == "kl_cov":
        ref = torch.where(selected, old_logp.to(logp.dtype), logp.detach())
        loss, m = policy_loss(logp, old_logp, advantages, mask, kind="vanilla", log_ratio_clamp=None, ref_logp=ref,
                              kl_coef=ppo_kl_coef, kl_kind="abs", **base, **kw)
        for key_ in ("kl_mean", "kl_loss"):
            m.pop(key_)
        m["approx_kl_abs"] = (torch.where(valid, (logp.detach() - old_logp).abs().double(), 0.0).sum()
                              / count).float()
    else:
        corr = (~selected).to(logp.dtype)
        weights = corr if is_weights is None else corr * is_weights
        loss, m = policy_loss(logp, old_logp, advantages, mask, kind="vanilla", log_ratio_clamp=None,
                              is_weights=weights, ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind, **base, **kw)
        m["clipfrac"] = (selected.sum().double() / count).float()
    return loss, m


def _global_counts(mask, cu_seqlens, num_tokens, num_seqs, scale, process_group):
    """(N, S, B) summed over the group (one all-reduce), and scale * world size."""
    import torch.distributed as dist

    valid = mask != 0
    if cu_seqlens is None:
        per_row = valid.sum(-1)
    else:
        per_row = torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.int64, device=mask.device)
        row = torch.searchsorted(cu_seqlens[1:], torch.arange(mask.shape[0], device=mask.device), right=True)
        per_row.index_add_(0, row, valid.to(torch.int64))
    counts = torch.stack([per_row.sum().double(), (per_row > 0).sum().double(),
                          torch.tensor(float(per_row.shape[0]), dtype=torch.float64, device=mask.device)])
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    world = dist.get_world_size(process_group)
    return (counts[0] if num_tokens is None else num_tokens, counts[1] if num_seqs is None else num_seqs,
            counts[2], scale * world)


def _metrics(rows, w, pg_loss, scale, has_kl, has_entropy):
    n = rows[:, _COUNT].sum()
    has = n > 0
    inv = torch.where(has, 1.0 / n.clamp(min=1), 0.0)

    def mean(col):
        return (rows[:, col].sum() * inv).float()

    m = {
        "policy_loss": pg_loss.float(),
        "clipfrac": mean(_CLIP), "clipfrac_lower": mean(_CLIP_LOWER),
        "clip_low_frac": mean(_LOW), "clip_high_frac": mean(_HIGH),
        "approx_kl": mean(_NEG_LOG), "ratio_mean": mean(_RSUM),
        "ratio_min": torch.where(has, rows[:, _RMIN].min() if rows.shape[0] else n, 0.0).float(),
        "ratio_max": torch.where(has, rows[:, _RMAX].max() if rows.shape[0] else n, 0.0).float(),
        "num_tokens": n.float(),
    }
    if has_kl:
        m["kl_mean"] = mean(_KLSUM)
        m["kl_loss"] = ((w * rows[:, _KLSUM]).sum() * scale).float()
    if has_entropy:
        m["entropy_mean"] = mean(_HSUM)
        m["entropy_loss"] = ((w * rows[:, _HSUM]).sum() * scale).float()
    return m


# ----------------------------------------------------------------------------------- fake kernels
def _rows_fake(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens, *params):
    num_rows = logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = torch.float64 if _promoted(logp, old_logp, advantages, ref_logp, entropy, is_weights) == torch.float64 \
        else torch.float32
    return (logp.new_empty((num_rows, _NUM_STATS), dtype=torch.float64), logp.new_empty(logp.shape, dtype=acc),
            logp.new_empty(logp.shape if ref_logp is not None else (0,), dtype=acc))


def _promoted(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows_backward_fake(grad_rows, rows, dlogp, dlogp_aux, mask, cu_seqlens, entropy_coef, with_entropy):
    return torch.empty_like(dlogp), dlogp.new_empty(dlogp.shape if with_entropy else (0,))


def _rows_setup(ctx, inputs, output):
    rows, dlogp, dlogp_aux = output
    mask, entropy, cu_seqlens = inputs[3], inputs[5], inputs[7]
    ctx.save_for_backward(rows, dlogp, dlogp_aux, mask, cu_seqlens)
    ctx.mark_non_differentiable(dlogp, dlogp_aux)
    ctx.set_materialize_grads(False)  # no [B, T] zero gradients for the two unused outputs
    ctx.entropy_coef = inputs[19]
    ctx.dtypes = (inputs[0].dtype, None if entropy is None else entropy.dtype)


def _rows_backward(ctx, grad_rows, _grad_dlogp, _grad_dlogp_aux):
    rows, dlogp, dlogp_aux, mask, cu_seqlens = ctx.saved_tensors
    logp_dtype, entropy_dtype = ctx.dtypes
    if grad_rows is None:
        grad_rows = torch.zeros_like(rows)
    grad_logp, grad_ent = torch.ops.fastrl.policy_loss_rows_backward(
        grad_rows, rows, dlogp, dlogp_aux, mask, cu_seqlens, ctx.entropy_coef, entropy_dtype is not None)
    g_logp = grad_logp.to(logp_dtype) if ctx.needs_input_grad[0] else None
    g_ent = grad_ent.to(entropy_dtype) if entropy_dtype is not None and ctx.needs_input_grad[5] else None
    return (g_logp, None, None, None, None, g_ent) + (None,) * 14


if _extension._C is not None:
    torch.library.register_fake("fastrl::policy_loss_rows")(_rows_fake)
    torch.library.register_fake("fastrl::policy_loss_rows_backward")(_rows_backward_fake)
    torch.library.register_autograd("fastrl::policy_loss_rows", _rows_backward, setup_context=_rows_setup)
