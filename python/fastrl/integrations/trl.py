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

The GRPO loss patch for ``GRPOTrainer`` (``patch_grpo_trainer``) comes with fastrl's loss family.
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
        index: ``[...]`` (one label per position) or ``[..., K]`` (K labels per position, e.g. top-K:
            one streaming pass for the logsumexp, then ``logits.gather(index) / T - lse``).
        temperature: > 0 (``ValueError("temperature must be positive")`` otherwise, as TRL).
        row_mask: optional, ``index``'s shape; positions where it is 0 get log-prob 0.

    Returns:
        ``index``'s shape, ``logits.dtype``.

    >>> selective_log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]))
    tensor([-0.4076])
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.dim() == logits.dim() - 1:
        out = _logprobs(logits, index, temperature=temperature, ignore_index=_NO_IGNORE)
    else:
        no_label = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        _, lse = _logprobs(logits, no_label, temperature=temperature, return_lse=True, ignore_index=0)
        out = torch.gather(logits, -1, index).float() * (1.0 / temperature) - lse.unsqueeze(-1)
    out = out.to(logits.dtype)
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
