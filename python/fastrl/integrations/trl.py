"""TRL drop-ins: GRPOTrainer's reward combination and advantages (TRL 1.16.0) on fastrl's fused op.

:func:`grpo_advantages` computes what ``GRPOTrainer._generate_and_score_completions`` computes from
the gathered ``rewards_per_func`` (``trl/trainer/grpo_trainer.py``, lines 2755-2810 of TRL
1.16.0): the advantages and the ``is_std_zero`` flags behind the ``frac_reward_zero_std`` metric,
for every ``scale_rewards`` mode (``"group"``, ``"batch"``, ``"none"``, and the legacy ``True`` /
``False`` that ``GRPOConfig`` maps to ``"group"`` / ``"none"``) and both
``multi_objective_aggregation`` modes:

* ``"sum_then_normalize"``: ``r = nansum_k(w_k r_k)``; a row whose reward functions all returned
  None (all NaN: "unscorable") gets ``r = NaN``; ``A = (r - mean_g) / (std_g + 1e-4)`` over the
  scored members of each group of ``num_generations`` consecutive rows (``"batch"``: the std of
  every scored row of the batch; ``"none"``: no division).
* ``"normalize_then_sum"`` (GDPO): each reward function is normalized within each group first,
  ``(r_k - mean_gk) / (std_gk + 1e-4)``, the weighted NaN-skipping sum is then normalized over the
  batch. ``scale_rewards`` does not apply (as in TRL).

TRL's conventions are options of :func:`fastrl.group_advantages`: ``nan="ignore"`` (NaN means "not
scored", left out of every statistic), ``singleton="zero"`` (TRL's std of fewer than 2 scored
values is NaN, and its ``nan_to_num`` turns the resulting NaN advantage into 0), ``eps=1e-4`` added
to the unbiased std. Unscorable rows get advantage 0, and the final ``nan_to_num`` (NaN -> 0, +-inf
-> the dtype's largest finite value) is applied as in TRL. All group statistics are one fused call
(``normalize_then_sum``: one call over every (group, function) pair, one for the batch).

Rows are grouped as TRL does: ``num_generations`` consecutive rows per prompt, over the batch
gathered from every process; the trainer then keeps its process's slice.

Numerical differences: fastrl's statistics are fp64 two-pass, TRL's float32. A constant group of a
non-dyadic reward (e.g. eight completions all scored 0.7) has exactly zero advantage and
``is_std_zero=True`` here, while TRL's float32 mean can be 1 ulp off: it then returns
``ulp / (std + 1e-4)`` of rounding noise (6e-4 for 0.7, 2e-3 for 3.3) and, once that ulp makes its
std exceed ``isclose``'s 1e-8 (constant values above ~0.13), ``is_std_zero=False`` -- the group is
then missing from TRL's ``frac_reward_zero_std`` but not from ours. In general the advantages
differ by at most ``~2 ulp(|mean_g|) / (std_g + 1e-4)`` on top of 1e-6. Binary and other exactly
representable rewards are unaffected. float64 rewards: fp64 statistics, float32 advantages widened
back to float64 (about 1e-7 relative).

:func:`grpo_loss` is ``GRPOTrainer._compute_loss``'s loss math for every ``loss_type`` (grpo, bnpo,
dr_grpo, dapo, cispo, sapo, luspo, vespo), with ``use_bias_correction_kl``, ``off_policy_mask_threshold``
and ``top_entropy_quantile``, on fastrl's fused policy-loss kernel; :func:`patch_grpo_trainer` makes
``GRPOTrainer._compute_loss`` use it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from fastrl.advantages import group_advantages

__all__ = ["GRPOAdvantages", "grpo_advantages"]

_EPS = 1e-4  # TRL's `std + 1e-4`
_SCALE_ALIASES = {True: "group", False: "none"}  # GRPOConfig.__post_init__'s legacy booleans
_SCALES = ("group", "batch", "none")
_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


class GRPOAdvantages(NamedTuple):
    """``advantages`` ``[B]`` (the rewards' dtype) and ``is_std_zero`` ``bool[B]`` (TRL's
    ``torch.isclose(std_rewards, 0)``, the per-row flags averaged into ``frac_reward_zero_std``)."""

    advantages: torch.Tensor
    is_std_zero: torch.Tensor


def _weights(reward_weights, num_funcs: int, like: torch.Tensor) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(num_funcs, dtype=like.dtype, device=like.device)
    w = reward_weights
    if not isinstance(w, torch.Tensor):
        w = torch.tensor(w, dtype=torch.float32)  # GRPOTrainer's self.reward_weights dtype
    if w.shape != (num_funcs,):
        raise ValueError(f"fastrl.integrations.trl.grpo_advantages: `reward_weights` must have shape ({num_funcs},) "
                         f"(one per reward function), got {tuple(w.shape)}")
    return w.to(like.device)


def _common():
    return dict(eps=_EPS, unbiased=True, singleton="zero", nan="ignore")


def grpo_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor | Sequence[float] | None,
    num_generations: int,
    *,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> GRPOAdvantages:
    """TRL 1.16.0 GRPOTrainer advantages from the gathered per-function rewards.

    Args:
        rewards_per_func: ``[B, K]`` rewards of ``K`` reward functions (NaN: the function returned
            None for that completion), rows grouped by prompt in blocks of ``num_generations``.
        reward_weights: ``[K]`` weights (``GRPOTrainer.reward_weights``), or None for all ones.
        num_generations: completions per prompt; ``B`` must be a multiple of it.
        scale_rewards: ``"group"`` / ``True``, ``"batch"``, ``"none"`` / ``False``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.

    Returns:
        :class:`GRPOAdvantages` ``(advantages [B], is_std_zero bool[B])``.
    """
    scale = _SCALE_ALIASES[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if scale not in _SCALES:
        raise ValueError(f"Invalid value for scale_rewards: {scale_rewards}. "
                         "Must be one of 'batch', 'group', or 'none'.")
    if multi_objective_aggregation not in _AGGREGATIONS:
        raise ValueError(f"Invalid multi_objective_aggregation: {multi_objective_aggregation}. Must be "
                         "'sum_then_normalize' or 'normalize_then_sum'.")
    if not isinstance(rewards_per_func, torch.Tensor) or rewards_per_func.dim() != 2:
        raise ValueError("fastrl.integrations.trl.grpo_advantages: `rewards_per_func` must be a [B, K] tensor")
    B, K = rewards_per_func.shape
    n = int(num_generations)
    if n < 1 or B % n:
        raise ValueError(f"fastrl.integrations.trl.grpo_advantages: the batch ({B} rows) must be a whole number of "
                         f"groups of num_generations={n}")
    G = B // n
    dev = rewards_per_func.device
    w = _weights(reward_weights, K, rewards_per_func)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    zeros_b = torch.zeros(B, dtype=torch.float32, device=dev)

    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1).masked_fill(unscorable, float("nan"))
        ids = torch.arange(B, device=dev) // n
        if scale == "batch":
            adv = group_advantages(rewards, ids, scale="batch_std", num_groups=G, **_common())
            if B > 1:  # the batch std, for is_std_zero only
                _, batch = group_advantages(rewards, torch.zeros_like(ids), scale="none", num_groups=1,
                                            return_stats=True, **_common())
                std = batch.std.expand(B)
            else:
                std = zeros_b
        else:
            adv, st = group_advantages(rewards, ids, scale="group_std" if scale == "group" else "none",
                                       num_groups=G, return_stats=True, **_common())
            std = st.std[ids] if n > 1 else zeros_b
    else:
        # every (group, reward function) pair is a group of the fused op: id = group * K + k
        pos = torch.arange(B * K, device=dev)
        ids_gk = (pos // (n * K)) * K + pos % K
        reward_k = group_advantages(rewards_per_func.reshape(-1), ids_gk, num_groups=G * K,
                                    **_common()).view(B, K)
        rewards = (reward_k.to(rewards_per_func.dtype) * w.unsqueeze(0)).nansum(dim=1)
        rewards = rewards.masked_fill(unscorable, float("nan"))
        adv, batch = group_advantages(rewards, torch.zeros(B, dtype=torch.int64, device=dev), num_groups=1,
                                      return_stats=True, **_common())
        std = batch.std.expand(B) if B > 1 else zeros_b

    adv = torch.nan_to_num(adv.to(rewards.dtype), nan=0.0)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return GRPOAdvantages(adv, is_std_zero)


# ------------------------------------------------------------------------------ log-prob drop-ins
# TRL 1.16.0 ``trl.trainer.utils.selective_log_softmax`` / ``entropy_from_logits`` on fastrl's
# compiled streaming op (fastrl.logprobs): same signatures, same output shapes and dtypes (the
# logits' dtype), no [N, V] temporary, gradients for both (TRL's Triton path drops the entropy's).
#
# Accuracy: fastrl computes in fp32 and rounds once to the logits' dtype. For float32 logits the
# results agree with TRL's to ~1e-5 absolute (both fp32-accurate); for bfloat16/float16 logits TRL's
# non-Triton path takes log_softmax / softmax in that dtype, while ours is the fp32 value rounded
# once: at least as close to the fp64 truth as TRL's (tests/test_logprobs.py checks both).
# float64 logits are computed at fp32 accuracy.

from fastrl.logprobs import logprobs as _logprobs  # noqa: E402

_NO_IGNORE = -(2**63)  # TRL has no ignore_index: every index must be valid (as torch.gather requires)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)`` without the ``[..., V]`` log-softmax.

    Args:
        logits: ``[..., V]``.
        index: ``[...]`` (one label per position) or ``[..., K]`` (K labels per position, e.g. top-K;
            still one streaming pass per row).
        temperature: > 0 (``ValueError("temperature must be positive")`` otherwise, as TRL).
        row_mask: optional, ``index``'s shape; positions where it is 0 get log-prob 0.

    Returns:
        ``index``'s shape, ``logits.dtype``.

    >>> selective_log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]))
    tensor([-0.4076])
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    out = _logprobs(logits, index, temperature=temperature, ignore_index=_NO_IGNORE).to(logits.dtype)
    if row_mask is not None:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy ``-sum_j p_j log p_j`` (nats) of ``softmax(logits)`` along the last axis: ``logits.shape[:-1]``,
    ``logits.dtype``. ``chunk_size`` is accepted for TRL's signature and unused: the op streams each row
    and never materializes the softmax. Differentiable.

    >>> entropy_from_logits(torch.zeros(1, 4))
    tensor([1.3863])
    """
    no_label = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = _logprobs(logits, no_label, return_entropy=True, ignore_index=0)
    return entropy.to(logits.dtype)


__all__ += ["selective_log_softmax", "entropy_from_logits"]


# ---------------------------------------------------------------------------------- GRPO loss
# trl 1.16.0 GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), from the per-token log-probs
# on: the importance ratio (token or sequence level, no log clamp), the loss_type's per-token loss
# (TRL's two-sided ``delta`` clip and VESPO's gamma weights included), the off-policy sequence mask,
# the high-entropy token mask, the vLLM importance-sampling correction, beta * k3 KL (TRL's unclamped
# estimator, optionally bias-corrected by the ratio), the loss_type's normalizer (gradient
# accumulation included) and the entropy bonus. Not covered: TRL's logging (``_metrics``, ``.item()``).
#
# Every factor TRL multiplies into the policy term (off-policy mask, entropy mask, vLLM ratio, VESPO's
# detached phi) is a no-gradient per-token weight: their product is the fused kernel's `is_weights`.

import math  # noqa: E402

from fastrl import losses as _losses  # noqa: E402
from fastrl.reference.losses import agg_weights as _agg_weights  # noqa: E402
from fastrl.sampling import quantile_mask as _quantile_mask  # noqa: E402

_TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_TRL_AGG = {"grpo": "grpo", "sapo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "luspo": "luspo",
            "dapo": "token-sum", "cispo": "token-sum", "vespo": "token-sum"}
_VESPO_LOG_MIN = math.log(1e-8)  # TRL's get_gamma_weights lower clamp of the log-weights


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, loss_type: str = "dapo", epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, delta: float | None = None, importance_sampling_level: str = "token",
              beta: float = 0.0, ref_per_token_logps: torch.Tensor | None = None,
              use_bias_correction_kl: bool = True, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
              vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
              off_policy_mask_threshold: float | None = None, sampling_per_token_logps: torch.Tensor | None = None,
              top_entropy_quantile: float = 1.0, max_completion_length: int | None = None,
              num_items_in_batch: torch.Tensor | None = None, num_processes: int = 1,
              gradient_accumulation_steps: int = 1, steps_per_generation: int = 1, training: bool = True,
              importance_sampling_ratio: torch.Tensor | None = None, entropies: torch.Tensor | None = None,
              entropy_coef: float = 0.0, process_group=None):
    """The loss ``GRPOTrainer._compute_loss`` (trl 1.16.0) returns, and its metrics, in one fused pass.

    Args mirror the trainer's state: ``per_token_logps`` ``[B, T]`` (gets the gradient),
    ``old_per_token_logps`` (None: ``per_token_logps.detach()``, as TRL), ``advantages`` ``[B]`` or
    ``[B, T]``, ``mask`` (``completion_mask``, times ``tool_mask`` if any), ``loss_type`` and the
    ``GRPOConfig`` fields ``epsilon`` (= ``epsilon_low``), ``epsilon_high``, ``delta``,
    ``importance_sampling_level``, ``beta``, ``use_bias_correction_kl`` (TRL's default ``True``),
    ``sapo_temperature_*``, ``vespo_k_*`` / ``vespo_lambda_*``, ``off_policy_mask_threshold``,
    ``top_entropy_quantile``, ``max_completion_length`` (dr_grpo; default ``T``),
    ``steps_per_generation``; ``num_items_in_batch`` (dapo/cispo/vespo, a tensor, never synced),
    ``num_processes``, ``gradient_accumulation_steps`` and ``training`` (the trainer divides by the
    accumulation steps in train mode only); ``importance_sampling_ratio`` (the vLLM correction,
    ``[B, T]`` or ``[B, 1]``; pass it only where TRL applies it: ``use_vllm`` and
    ``vllm_importance_sampling_correction``, and for vespo whenever the trainer's inputs hold it);
    ``sampling_per_token_logps`` (the off-policy mask's behaviour log-probs; default
    ``old_per_token_logps``, as TRL); ``entropies`` with ``entropy_coef`` (the entropy bonus, gets a
    gradient; ``entropies`` is required by ``top_entropy_quantile < 1``). ``process_group``: the
    entropy quantile is taken over the valid tokens of every rank of the group, as TRL gathers them.

    Per token (``r`` = exp(log-ratio ``x``), sequence level: exp of its masked row mean)::

        grpo/bnpo/dr_grpo/dapo/luspo  -min(min(r, delta) A, clamp(r, 1 - eps_low, 1 + eps_high) A)
        cispo                         -sg(min(r, eps_high)) A logp
        sapo                          -(sigmoid(tau (r - 1)) 4 / tau) A
        vespo                         -phi A logp,  phi = exp(lam + k log w - lam w)  (no gradient, 0 if not finite),
                                      log w = clamp(sum_b clamp(x, -20, 20) + sum_b clamp(log isr, log 1e-8, 20),
                                      log 1e-8, 20), (k, lam) = (k_pos, lam_pos) if A >= 0 else
                                      (k_neg, lam_neg), lam clamped to >= 1e-4

    times the off-policy mask (``A >= 0`` or the row's mean of ``sampling - logp`` (NaN -> 0) ``<=
    off_policy_mask_threshold``), times the high-entropy mask (``entropies >= torch.quantile`` of the
    valid entropies at ``1 - top_entropy_quantile``, exact, by :func:`fastrl.sampling.quantile_mask`),
    times ``importance_sampling_ratio`` (not for vespo: there it enters ``w``, summed over every
    position of the ratio tensor as TRL does -- TRL's ratio is 1 on padding), plus ``beta * KL`` with
    ``KL = exp(ref - logp) - (ref - logp) - 1``, times ``r`` (differentiated) with
    ``use_bias_correction_kl``; then grpo/sapo: mean over rows of the row means (``/ max(n_b, 1)``);
    bnpo: ``/ max(N, 1)``; dr_grpo: ``/ (B * max_completion_length)``; luspo: mean over rows of the
    row sums; each divided by the accumulation steps (train); dapo/cispo/vespo: ``sum /
    (max(num_items_in_batch, 1) / num_processes * accumulation_steps / steps_per_generation)`` (train;
    eval without the last factor). The entropy bonus is the mean entropy over the valid tokens the
    entropy mask keeps, divided by the accumulation steps.

    The policy term is the fused kernel; the bias-corrected KL is a composition of elementwise torch
    ops (autograd) aggregated with the kernel's row weights; the entropy quantile costs one host sync
    (the number of valid tokens), as in TRL.

    Returns:
        ``(loss, metrics)``: metrics are detached device tensors with TRL's names for the local
        batch (TRL gathers them over processes): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean`` (mean over rows for
        per-sequence advantages, over valid tokens for per-token ones, as TRL), ``kl`` (beta != 0),
        ``entropy``; and ``policy_loss`` (TRL's loss before the accumulation division and entropy
        bonus), ``entropy_active_sum`` / ``entropy_active_tokens`` (the entropy sum and count over the
        tokens the bonus acts on: the adaptive entropy controller's statistics). Token level averages
        are token-weighted; TRL weighs sequence-level clip metrics per sequence.

    >>> lp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    >>> loss, m = grpo_loss(lp, lp.detach() - 0.1, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]),
    ...                     loss_type="vespo", num_items_in_batch=torch.tensor(2))
    >>> round(float(loss), 4), round(float(m["vespo/phi_seq_mean"]), 4)
    (0.5759, 0.7678)
    """
    if loss_type not in _TRL_LOSS_TYPES:
        raise ValueError(f"fastrl: grpo_loss `loss_type` must be one of {', '.join(_TRL_LOSS_TYPES)}; got "
                         f"{loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
                         "'token' and 'sequence'.")
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"fastrl: grpo_loss `top_entropy_quantile` must be in (0, 1], got {top_entropy_quantile}")
    if loss_type == "cispo" and not (0.0 < epsilon_high < math.inf):
        raise ValueError(f"fastrl: grpo_loss loss_type='cispo' needs a finite `epsilon_high` > 0 (the cap of the "
                         f"importance ratio), got {epsilon_high}")
    if top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError("fastrl: grpo_loss top_entropy_quantile < 1 needs `entropies` (the per-token entropies)")
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    valid = mask != 0
    adv = advantages if advantages.dim() == 2 else advantages[:, None]  # TRL's [B, 1] or [B, T]
    isw = importance_sampling_ratio
    factors = []  # TRL's no-gradient multipliers of the policy term, in its order
    if off_policy_mask_threshold is not None:
        factors.append(_off_policy_mask(adv, per_token_logps, old_per_token_logps if sampling_per_token_logps is None
                                        else sampling_per_token_logps, valid, off_policy_mask_threshold))
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropies, valid, 1.0 - top_entropy_quantile, process_group)
        factors.append(entropy_mask)
    phi = None
    if loss_type == "vespo":
        phi = _vespo_phi(adv, per_token_logps, old_per_token_logps, valid, isw, vespo_k_pos, vespo_lambda_pos,
                         vespo_k_neg, vespo_lambda_neg)
        factors.append(phi)
    elif isw is not None:
        factors.append(isw)
    weights = None
    for f in factors:
        f = f.to(per_token_logps.dtype)
        weights = f if weights is None else weights * f
    if weights is not None:
        weights = weights.expand_as(per_token_logps)
    if loss_type == "cispo":
        # TRL: clamp(r, max=epsilon_high), any cap > 0 (GRPOConfig's default epsilon_high is epsilon, 0.2);
        # r >= 0, so the kernel's [1 - clip_low, 1 + clip_high] = [0, epsilon_high] clip (its cap
        # 1 + (epsilon_high - 1) can be 1 float64 ulp off epsilon_high, e.g. for 0.2).
        clip = dict(kind="cispo", clip_low=1.0, clip_high=epsilon_high - 1.0)
    elif loss_type == "sapo":
        clip = dict(kind="sapo", tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg)
    elif loss_type == "vespo":
        clip = dict(kind="gpg")
    else:
        clip = dict(kind="vanilla", clip_low=epsilon_low, clip_high=epsilon_high, delta=delta)
    horizon = max_completion_length if max_completion_length is not None else per_token_logps.shape[-1]
    fused_kl = beta != 0.0 and not use_bias_correction_kl
    loss, m = _losses.policy_loss(
        per_token_logps, old_per_token_logps, advantages, mask, agg=_TRL_AGG[loss_type],
        ratio_level=importance_sampling_level, log_ratio_clamp=None, is_weights=weights,
        ref_logp=ref_per_token_logps if fused_kl else None, kl_coef=beta if fused_kl else 0.0,
        kl_kind="k3_unclamped", max_length=horizon, **clip)
    kl_mean = m.get("kl_mean")
    if beta != 0.0 and use_bias_correction_kl:
        kl_loss, kl_mean = _bias_corrected_kl(per_token_logps, old_per_token_logps, ref_per_token_logps, valid,
                                              importance_sampling_level, _TRL_AGG[loss_type], float(horizon))
        loss = loss + beta * kl_loss.to(loss.dtype)
    accum = float(gradient_accumulation_steps) if training else 1.0
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"fastrl: grpo_loss loss_type={loss_type!r} needs `num_items_in_batch`")
        normalizer = torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = loss / normalizer
        policy_loss = loss.detach()
    else:
        policy_loss = loss.detach()
        loss = loss / accum
    metrics = {"policy_loss": policy_loss}
    if entropies is not None:
        metrics["entropy"] = _masked_mean(entropies.detach(), valid).float()
        active = valid if entropy_mask is None else valid & entropy_mask  # the tokens the bonus acts on
        count = active.sum()
        total = torch.where(active, entropies, 0.0).sum()
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * (total / count.clamp(min=1) / accum)
        metrics["entropy_active_sum"], metrics["entropy_active_tokens"] = total.detach().float(), count.float()
    if beta != 0.0:
        metrics["kl"] = kl_mean.float()
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = m["clip_high_frac"]
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = (phi.mean() if phi.shape[1] == 1 else _masked_mean(phi, valid)).float()
    elif loss_type != "sapo":
        metrics["clip_ratio/low_mean"] = m["clip_low_frac"]
        metrics["clip_ratio/high_mean"] = m["clip_high_frac"]
        metrics["clip_ratio/region_mean"] = m["clip_low_frac"] + m["clip_high_frac"]
    return loss, metrics


def _masked_mean(x, valid):
    """Mean of ``x`` over ``valid`` (0 when there is none), masked entries never read."""
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def _off_policy_mask(adv, logp, sampling_logp, valid, threshold):
    """TRL's get_off_policy_mask: keep a row (token, for per-token advantages) if A >= 0 or its mean
    forward KL ``sampling - logp`` over the valid tokens (NaN -> 0) is <= threshold. bool ``[B, 1]`` or ``[B, T]``."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    seq = torch.where(valid, kl, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return (adv >= 0) | (seq <= threshold)


def _high_entropy_mask(entropies, valid, q, process_group):
    """TRL's get_high_entropy_mask: valid tokens whose entropy is >= the q-quantile of the valid
    entropies of every rank of ``process_group`` (torch.quantile's interpolation, exact)."""
    ent = entropies.detach().float()
    if process_group is None:
        return _quantile_mask(ent, valid, q)[0]
    import torch.distributed as dist

    local = ent[valid]
    world = dist.get_world_size(process_group)
    sizes = [torch.zeros((), dtype=torch.int64, device=ent.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(local.numel(), device=ent.device), group=process_group)
    longest = max(int(s) for s in sizes)
    parts = [ent.new_empty(longest) for _ in range(world)]
    dist.all_gather(parts, torch.cat([local, local.new_zeros(longest - local.numel())]), group=process_group)
    everything = torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])
    if everything.numel() == 0:
        return torch.zeros_like(valid)
    _, threshold = _quantile_mask(everything, torch.ones_like(everything, dtype=torch.bool), q)
    return (ent >= threshold) & valid


@torch.no_grad()
def _vespo_phi(adv, logp, old_logp, valid, isw, k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL's get_gamma_weights (VESPO), in fp64: ``[B, 1]`` (``[B, T]`` for per-token advantages), no gradient."""
    f = torch.float64
    x = (logp.detach() - old_logp).to(f).clamp(-20.0, 20.0)
    log_w = torch.where(valid, x, 0.0).sum(-1, keepdim=True)
    if isw is not None:  # over every position of the ratio, as TRL (its ratio is 1 on padding)
        log_w = log_w + torch.log(isw.to(f)).clamp(_VESPO_LOG_MIN, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(_VESPO_LOG_MIN, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, float(k_pos), float(k_neg)).to(f)
    lam = torch.where(nonneg, float(lambda_pos), float(lambda_neg)).to(f).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0).to(logp.dtype)


def _bias_corrected_kl(logp, old_logp, ref_logp, valid, level, agg, horizon):
    """``sum_b w_b sum_t KL_t r_t`` (TRL's ``use_bias_correction_kl``: the k3 KL times the importance ratio,
    both differentiated) with the row weights of ``agg``, and the KL metric (token mean of ``KL r``)."""
    if ref_logp is None:
        raise ValueError("fastrl: grpo_loss beta != 0 needs `ref_per_token_logps`")
    # masked tokens get d = x = 0, hence KL = 0: never read, no NaN through the backward either
    d = torch.where(valid, ref_logp - logp, 0.0)
    x = torch.where(valid, logp - old_logp, 0.0)
    if level == "sequence":
        x = x.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    kl = (torch.exp(d) - d - 1) * torch.exp(x)
    n = valid.sum(-1)
    w = _agg_weights(n, agg, horizon=horizon, num_tokens=None, num_seqs=None, num_rows=n.shape[0])
    rows = kl.sum(-1)
    return (w.to(rows.dtype) * rows).sum(), kl.detach().sum() / n.sum().clamp(min=1)


__all__ += ["grpo_loss"]


def _fused_compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss with the loss math of :func:`grpo_loss` (see :func:`patch_grpo_trainer`)."""
    if self.loss_type not in _TRL_LOSS_TYPES:  # a loss type of a later TRL: its own method
        return type(self)._fastrl_original_compute_loss(self, model, inputs)
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
    extra = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
             "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
    per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in extra})
    mode = "train" if self.model.training else "eval"
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    if self.loss_type == "vespo":  # VESPO folds the ratio into its weights whenever the inputs hold one
        isr = inputs.get("importance_sampling_ratio")
    else:
        isr = inputs["importance_sampling_ratio"] if self.use_vllm and self.vllm_importance_sampling_correction \
            else None
    group = None
    if self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
        import torch.distributed as dist

        group = dist.group.WORLD  # TRL gathers the entropies over every process
    bonus = self._entropy_bonus_enabled
    args = self.args
    adaptive = self.use_adaptive_entropy
    # adaptive control applies the coefficient of the last optimizer step, gated by the last world entropy
    coef = (self.entropy_coef if not adaptive or self._last_world_entropy <= args.entropy_target else 0.0) \
        if bonus else 0.0
    loss, m = grpo_loss(
        per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask, loss_type=self.loss_type,
        epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=args.delta,
        importance_sampling_level=self.importance_sampling_level, beta=self.beta,
        ref_per_token_logps=inputs.get("ref_per_token_logps"), use_bias_correction_kl=args.use_bias_correction_kl,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=getattr(args, "vespo_k_pos", 2.0), vespo_lambda_pos=getattr(args, "vespo_lambda_pos", 3.0),
        vespo_k_neg=getattr(args, "vespo_k_neg", 3.0), vespo_lambda_neg=getattr(args, "vespo_lambda_neg", 2.0),
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
        top_entropy_quantile=self.top_entropy_quantile, max_completion_length=self.max_completion_length,
        num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
        gradient_accumulation_steps=self.current_gradient_accumulation_steps,
        steps_per_generation=args.steps_per_generation, training=mode == "train", importance_sampling_ratio=isr,
        entropies=entropies, entropy_coef=coef, process_group=group)
    if self.aux_loss_enabled:  # the MoE router loss, scaled for gradient accumulation as the policy loss
        loss = loss + self.router_aux_loss_coef * aux_loss / accum
    # TRL's logging (its own host syncs, one per metric, as in TRL): global weighted means
    n = (mask != 0).sum().float()

    def log_mean(key, value, count=n):
        totals = self.accelerator.reduce(torch.stack([value.float() * count, count]), reduction="sum")
        self._metrics[mode][key].append((totals[0] / totals[1].clamp(min=1.0)).item())

    if bonus:
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(m["policy_loss"]).nanmean().item())
        if adaptive and mode == "train":
            _adaptive_entropy_step(self, torch.stack([m["entropy_active_sum"], m["entropy_active_tokens"]]))
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    if self.beta != 0.0:
        log_mean("kl", m["kl"])
    log_mean("entropy", m["entropy"])
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"):
        if key in m and self.importance_sampling_level == "token":
            log_mean(key, m[key])
    if "vespo/phi_seq_mean" in m:  # TRL: a mean over rows for per-sequence advantages
        rows = torch.tensor(float(mask.shape[0]), device=n.device)
        log_mean("vespo/phi_seq_mean", m["vespo/phi_seq_mean"], n if inputs["advantages"].dim() == 2
                 and inputs["advantages"].shape[1] > 1 else rows)
    return loss


def _adaptive_entropy_step(self, stats):
    """TRL's adaptive entropy controller: accumulate the micro-batch's (entropy sum, token count) over the
    accumulation window; at the optimizer step, move ``entropy_coef`` by ``entropy_coef_delta`` towards
    more (world entropy <= ``entropy_target``) or less bonus, within [entropy_coef_min, entropy_coef_max]."""
    window = self._entropy_window_stats
    self._entropy_window_stats = stats if window is None else window + stats
    if not self.accelerator.sync_gradients:
        return
    totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    args = self.args
    if world_entropy <= args.entropy_target:
        self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    self._last_world_entropy = world_entropy
    self._entropy_window_stats = None


def patch_grpo_trainer(trainer_cls=None):
    """Make ``GRPOTrainer`` (or the given subclass) compute its loss with :func:`grpo_loss`:
    replaces ``_compute_loss`` on the class (every instance, existing ones included); idempotent.
    Every trl 1.16.0 configuration runs on :func:`grpo_loss`: every ``loss_type`` (vespo included),
    ``use_bias_correction_kl``, ``off_policy_mask_threshold``, ``top_entropy_quantile < 1`` (the
    entropy quantile gathered over the processes as TRL), the static or adaptive entropy bonus (TRL's
    controller state updated as TRL does) and the MoE router aux loss. Logged: ``kl``, ``entropy``,
    the token-level clip ratios, ``vespo/phi_seq_mean``, ``policy_loss``, ``entropy_coef`` and
    ``aux_loss`` as TRL logs them; TRL's per-sequence min/max clip metrics and the sequence-level clip
    ratios are not logged. Returns the patched class; :func:`unpatch_grpo_trainer` restores TRL's
    method."""
    if trainer_cls is None:
        from trl import GRPOTrainer as trainer_cls
    if "_fastrl_original_compute_loss" not in trainer_cls.__dict__:
        trainer_cls._fastrl_original_compute_loss = trainer_cls._compute_loss
        trainer_cls._compute_loss = _fused_compute_loss
    return trainer_cls


def unpatch_grpo_trainer(trainer_cls=None):
    """Undo :func:`patch_grpo_trainer` on that class (a no-op if it is not patched)."""
    if trainer_cls is None:
        from trl import GRPOTrainer as trainer_cls
    original = trainer_cls.__dict__.get("_fastrl_original_compute_loss")
    if original is not None:
        trainer_cls._compute_loss = original
        del trainer_cls._fastrl_original_compute_loss
    return trainer_cls


__all__ += ["patch_grpo_trainer", "unpatch_grpo_trainer"]
