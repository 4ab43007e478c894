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
