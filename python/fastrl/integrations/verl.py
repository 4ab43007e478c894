"""verl drop-ins: outcome-advantage estimators of verl 0.9.1 on fastrl's fused group op.

Same names, signatures and outputs as ``verl.trainer.ppo.core_algos`` (verl 0.9.1), registered by
:func:`install` under verl's registry names:

* ``compute_grpo_outcome_advantage`` -- ``"grpo"``
* ``compute_grpo_vectorized_outcome_advantage`` -- ``"grpo_vectorized"``
* ``compute_grpo_passk_outcome_advantage`` -- ``"grpo_passk"``
* ``compute_rloo_outcome_advantage`` -- ``"rloo"``
* ``compute_rloo_vectorized_outcome_advantage`` -- ``"rloo_vectorized"``
* ``compute_opo_outcome_advantage`` -- ``"opo"``
* ``compute_gpg_outcome_advantage`` -- ``"gpg"``
* ``compute_reinforce_plus_plus_baseline_outcome_advantage`` -- ``"reinforce_plus_plus_baseline"``
* ``compute_remax_outcome_advantage`` -- ``"remax"``
* ``compute_gae_advantage_return`` -- ``"gae"`` (token-level: :func:`fastrl.credit.gae` + whitening)
* ``compute_reinforce_plus_plus_outcome_advantage`` -- ``"reinforce_plus_plus"`` (token-level)

Policy losses on fastrl.losses' fused kernel (one pass forward, one backward, metrics as device
tensors): ``compute_policy_loss_{vanilla,gspo,cispo,sapo,gpg,geo_mean,clip_cov,kl_cov}`` (registered
in verl's ``POLICY_LOSS_REGISTRY`` by :func:`install`), ``agg_loss``, ``compute_entropy_loss``,
``compute_value_loss``; their differences from verl are listed where they are defined.

verl's masked statistics (``verl.utils.torch_functional``, the whitening its estimators use):
``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten`` with verl's signatures, on
fastrl's compiled fp64 moments and whitening pass where the arguments allow (``axis=None``, a 0/1
mask of the values' shape), torch's ops otherwise.

Each estimator returns ``(advantages, returns)``, both ``[bs, response_length]``, with verl's conventions:
the score of a response is ``token_level_rewards.sum(-1)``; the scalar advantage is broadcast over
the tokens as ``advantage.unsqueeze(-1) * response_mask`` (so masked positions are 0 and the dtype
is verl's: the advantage is held in the scores' dtype, then type-promoted with the mask's);
singleton groups follow verl (GRPO: mean 0, std 1; RLOO, OPO, GPG, REINFORCE++-baseline: baseline 0;
``rloo_vectorized``: advantage 0; pass@k: ``ValueError``). Where verl loops over samples in Python
and keeps a dict per uid, here one compiled call computes every group's statistics and every
advantage; ``index`` (verl's ``uid`` array) is factorized by :func:`fastrl.group_index`'s hashing on
the host, and the group count is passed on, so there is no host sync on CUDA (except pass@k's
singleton check and REINFORCE++-baseline's whitening checks, which verl also makes).

Using it in a verl run
----------------------
:func:`install` puts these functions into verl's ``ADV_ESTIMATOR_REGISTRY`` under verl's names
(replacing verl's entries) and also rebinds ``core_algos.compute_grpo_outcome_advantage``, which
verl's ``compute_advantage`` calls directly for ``adv_estimator=grpo``. It must run in the process
that builds the trainer, before it is built. With verl's own entry point
(``python -m verl.trainer.main_ppo``) the trainer lives in a Ray actor (``TaskRunnerV1``), not in the
launching process, so install it in every Ray worker process with Ray's setup hook::

    python -m verl.trainer.main_ppo ... \\
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=fastrl.integrations.verl.install

In your own driver, where the trainer is built in-process, call it first::

    import fastrl.integrations.verl as fastrl_verl
    fastrl_verl.install()        # -> ['grpo', 'grpo_vectorized', 'grpo_passk', 'rloo', ...]
    trainer = RayPPOTrainer(...) # or a TaskRunner whose run() calls install() first

:func:`uninstall` restores verl's functions. The other verl estimators (GDPO, optimal-token-baseline)
are left as they are.

Numerical differences (honest list)
-----------------------------------
* **Group statistics are more exact than verl's.** fastrl sums in fp64 (two passes), so a constant
  group has mean equal to its value and std exactly 0, and its advantages are exactly 0. verl's
  float32 ``torch.mean`` of a constant group whose value is not a short binary fraction (e.g. seven
  responses all scored 0.1) can be 1 ulp off the value; verl then returns about
  ``ulp / (0 + epsilon)`` of pure rounding noise (0.007 for 0.1, 0.06 for 0.7, 0.19 for 3.3, e.g.
  in groups of 7, 8 or 16 with torch 2.13 on the CPU), where we return 0. In general verl's result differs from the
  exact one by up to ``~2 ulp(|mean_g|) / (std_g + epsilon)`` (its fp32 mean error, amplified by its
  denominator); the parity tests allow exactly that on top of ``atol = rtol = 1e-6``, and require
  exact zeros on both sides for exactly representable constant groups (binary 0/1 rewards, the
  common case, are unaffected).
* REINFORCE++-baseline whitens in fp64 here (verl: in the rewards' dtype), same kind of bound with
  the batch mean and std. ``grpo_vectorized``: verl casts the scores to float32 for its statistics
  (fp64 rewards included), so its error there is float32-sized.
* fp64 rewards: the statistics are fp64 but the fused op returns fp32 advantages, widened back to
  fp64 (about 1e-7 relative, verl keeps fp64 throughout). bf16/fp16 rewards: verl does all the
  arithmetic in bf16 (mean, std, difference, quotient, each rounded); we compute once in fp64 and
  round once, so the two differ by a few bf16 ulps of the advantage (and of ``mean_g / std_g``).
* Integer ``token_level_rewards`` are summed as float32 (verl writes float advantages back into
  an integer tensor, truncating them).
* ``remax`` is a reverse cumulative sum, done with the same torch ops (bit-identical); a compiled
  token-level version comes with the credit-assignment family.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch

from fastrl import advantages as _adv
from fastrl.advantages import _dense_ids, group_advantages
from fastrl import credit as _credit
from fastrl.credit import broadcast_to_tokens
from fastrl.reference import credit as _ref

__all__ = [
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_gae_advantage_return",
    "compute_reinforce_plus_plus_outcome_advantage",
    "kl_penalty",
    "compute_rewards",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "install",
    "uninstall",
    "ESTIMATORS",
]


# ------------------------------------------------------------------------------------------ helpers


def _scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """verl's outcome score: the sum of the token rewards (in their dtype)."""
    scores = token_level_rewards.sum(dim=-1)
    if not scores.is_floating_point():
        scores = scores.to(torch.float32)
    return scores


def _groups(index, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group ids of verl's ``index`` (uid array) on ``device``, and the group count."""
    ids, num_groups = _dense_ids(index)
    return ids.to(device, non_blocking=True), num_groups


def _per_token(adv: torch.Tensor, dtype: torch.dtype, response_mask: torch.Tensor) -> torch.Tensor:
    """Hold the scalar advantage in ``dtype`` (verl writes it into its scores tensor), broadcast it
    over the tokens and mask: ``adv.unsqueeze(-1) * response_mask`` with verl's type promotion."""
    return broadcast_to_tokens(adv.to(dtype), response_mask)


@functools.lru_cache(maxsize=None)
def _bincount_dtype(dtype: torch.dtype) -> torch.dtype:
    # verl's rloo_vectorized sums the scores with torch.bincount(weights=scores), whose result dtype
    # is float32 for float32 weights and float64 otherwise (bf16/fp16 included); its output has it.
    return torch.bincount(torch.zeros(1, dtype=torch.int64), weights=torch.zeros(1, dtype=dtype)).dtype


def _outcome_advantage(token_level_rewards, response_mask, index, estimate, out_dtype=None):
    """The body every group estimator shares: verl's scores, dense groups, one fused
    ``estimate(scores, ids, num_groups)`` call, and verl's broadcast over the tokens (held in
    ``out_dtype(scores.dtype)``, default the scores' dtype)."""
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        ids, num_groups = _groups(index, scores.device)
        adv = estimate(scores, ids, num_groups)
        dtype = out_dtype(scores.dtype) if out_dtype is not None else scores.dtype
        return _per_token(adv, dtype, response_mask)


def _cfg_get(config, key: str, default):
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


# ------------------------------------------------- verl.utils.torch_functional masked statistics
# verl's masked_mean divides by ``mask.sum() + 1e-8``: for a float mask in the mask's dtype, for a
# bool/int one in torch's default float dtype (an integer sum plus a Python float), which is also
# the dtype of its Bessel factor ``n / (n - 1)``. The drop-ins below take fastrl's fp64 moments of
# the masked elements (one compiled, deterministic pass, no host sync) and apply those
# denominators, rounded as verl rounds them, in fp64: the same statistics as verl's up to verl's
# own float32/bf16 summation error (ours are fp64 sums). The compiled path takes floating values
# and a 0/1 mask of their shape (bool, uint8, int32, int64, float32, float64); anything else (an
# axis, a broadcast mask, integer values, a half-precision mask) goes through torch's ops with
# verl's arithmetic. A float mask holding weights instead of 0/1 (verl would weight; its callers
# pass response masks) is an error on the CPU, naming the value, and counts as 1 where nonzero on
# CUDA (no host sync to check it).

_MOMENT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MOMENT_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)


def _count_dtype(mask: torch.Tensor) -> torch.dtype:
    """The dtype of verl's ``mask.sum() + 1e-8`` (and of its Bessel factor)."""
    return mask.dtype if mask.is_floating_point() else torch.get_default_dtype()


def _sum_dtype(values: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    """The dtype of verl's ``masked_sum``: the values (a float, or the default float dtype for an
    integer tensor, which ``torch.where`` with ``0.0`` promotes) times the mask."""
    num = values.dtype if values.is_floating_point() else torch.get_default_dtype()
    return torch.promote_types(num, mask.dtype)


def _mean_dtype(values: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    return torch.promote_types(_sum_dtype(values, mask), _count_dtype(mask))


def _compiled_moments(values: torch.Tensor, mask: torch.Tensor, axis) -> bool:
    """Whether fastrl's moments op takes these arguments (else the drop-ins use torch's ops)."""
    return (axis is None and values.shape == mask.shape and values.dtype in _MOMENT_DTYPES
            and mask.dtype in _MOMENT_MASK_DTYPES)


def _torch_masked_sum(values: torch.Tensor, mask: torch.Tensor, axis) -> torch.Tensor:
    """verl's masked sum with torch's ops (any axis, broadcasting, weighted masks): the products
    ``values * mask`` where the mask is nonzero (a NaN elsewhere never reaches the sum), summed."""
    return torch.where(mask.bool(), values * mask, 0.0).sum(dim=axis)


def _verl_moments(values: torch.Tensor, mask: torch.Tensor):
    """(n, mean, biased variance) as verl's masked_mean/masked_var compute them, fp64 0-dim tensors:
    ``mean = S / (n + 1e-8)``, ``var = sum((x - mean)^2) / (n + 1e-8)`` with the denominator rounded
    in :func:`_count_dtype` (exactly n for n >= 1 in float32), from fastrl's fp64 moments."""
    n, mu, m2 = _credit._moments(values, mask)
    den = (n.to(_count_dtype(mask)) + 1e-8).double()
    mean = n * mu / den
    return n, mean, (m2 + n * (mu - mean).square()) / den


def _check_count(n: torch.Tensor) -> None:
    """verl's two checks of an unbiased variance: ``ValueError`` for a mask sum of 0 or 1, verl's
    message quoted (a host sync, as verl's ``mask_sum == 0``)."""
    c = float(n)
    if c in (0.0, 1.0):
        _ref._check_unbiased(int(c), "masked_var")


def _bessel(n: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's unbiased factor ``n / (n - 1)`` in :func:`_count_dtype`, as fp64."""
    nd = n.to(_count_dtype(mask))
    return (nd / (nd - 1)).double()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's ``masked_sum``: the sum of ``values * mask`` over the elements where ``mask`` is
    nonzero (all of them, or along ``axis``); a NaN where the mask is 0 does not reach it.

    ``axis=None`` with a 0/1 mask of ``values``' shape: fastrl's compiled fp64 moments (``n * mean``,
    deterministic, no host sync), rounded once to verl's dtype (the values' float type promoted with
    the mask's). Otherwise (an axis, a broadcast mask, integer values, a half mask) torch's ops,
    verl's arithmetic. A weighted float mask raises on the CPU (see the section comment).

    >>> masked_sum(torch.tensor([[1.0, 2.0, float("nan")]]), torch.tensor([[1, 1, 0]]))
    tensor(3.)
    """
    if not _compiled_moments(values, mask, axis):
        return _torch_masked_sum(values, mask, axis)
    n, mu, _ = _credit._moments(values, mask)
    return (n * mu).to(_sum_dtype(values, mask))


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's ``masked_mean``: ``masked_sum(values, mask, axis) / (mask.sum(axis) + 1e-8)`` (0 for an
    all-masked batch or row), in verl's dtype (values, mask and that denominator promoted).

    ``axis=None`` with a 0/1 mask of ``values``' shape: fastrl's compiled fp64 moments and verl's
    denominator in fp64 (deterministic, no host sync; more exact than verl's float32 sum).
    Otherwise torch's ops, verl's arithmetic (a per-row mean with ``axis=-1``).

    >>> masked_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]))
    tensor(1.5000)
    """
    if not _compiled_moments(values, mask, axis):
        return _torch_masked_sum(values, mask, axis) / (mask.sum(dim=axis) + 1e-8)
    return _verl_moments(values, mask)[1].to(_mean_dtype(values, mask))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """verl's ``masked_var``: the mean of ``(values - masked_mean)^2`` over the mask, times
    ``n / (n - 1)`` when ``unbiased``; ``n = mask.sum()``. Unbiased with ``n == 0`` or ``n == 1``
    raises verl's ``ValueError`` (its messages quoted; a host sync, as verl's check). A 0-dim
    tensor in :func:`masked_mean`'s dtype.

    From fastrl's compiled fp64 moments, with verl's ``+ 1e-8`` denominators and its Bessel factor
    rounded as verl rounds them; a shape or dtype the compiled op does not take goes through
    torch's ops, verl's arithmetic.

    >>> masked_var(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor(2.)
    """
    if not _compiled_moments(values, mask, None):
        mean = masked_mean(values, mask)
        var = masked_mean((values - mean) ** 2, mask)
        if not unbiased:
            return var
        n = mask.sum()
        _check_count(n)
        return var * (n / (n - 1))
    n, _, var = _verl_moments(values, mask)
    if unbiased:
        _check_count(n)
        var = var * _bessel(n, mask)
    return var.to(_mean_dtype(values, mask))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """verl's ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` at every position (``+ mean``
    when ``shift_mean`` is False), with :func:`masked_mean` and the unbiased :func:`masked_var` of the
    masked elements; in ``values``' dtype. Fewer than 2 masked elements raise verl's
    ``ValueError``.

    verl's statistics from fastrl's fp64 moments, then fastrl's compiled whitening pass (fp64 value,
    rounded once; the count check is its one host sync, as verl's). A shape or dtype the compiled
    ops do not take goes through torch's ops.

    >>> masked_whiten(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor([-0.7071,  0.7071,  4.9497])
    """
    if not _compiled_moments(values, mask, None):
        mean = masked_mean(values, mask)
        out = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
        return out if shift_mean else out + mean
    n, mean, var = _verl_moments(values, mask)
    # whiten_with_moments' unbiased variance is m2 / (n - 1): m2 = var * (n - 1) gives verl's var;
    # it raises verl's ValueError for n < 2 (after queueing its kernels on CUDA)
    var = var * _bessel(n, mask)
    return _credit._whiten_with_moments(values, (n, mean, var * (n - 1)), shift_mean, True, 1e-8)


# ----------------------------------------------------------------------------------------- GRPO


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage, verl's ``compute_grpo_outcome_advantage``.

    ``A_i = (x_i - mean_g) / (std_g + epsilon)`` (unbiased std), or ``x_i - mean_g`` with
    ``norm_adv_by_std_in_grpo=False`` (Dr. GRPO); singleton groups: mean 0, std 1.
    ``x = token_level_rewards.sum(-1)``; ``index``: verl's uid array. Returns
    ``(advantages, advantages)``, ``[bs, response_length]``, masked by ``response_mask``.
    """
    scale = "group_std" if norm_adv_by_std_in_grpo else "none"
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: group_advantages(s, g, scale=scale, eps=epsilon, num_groups=n))
    return out, out


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_vectorized_outcome_advantage``: the same math as
    :func:`compute_grpo_outcome_advantage`; verl computes its statistics in float32, so the result
    is at least float32 (bf16 rewards give a float32 advantage here, as there)."""
    scale = "group_std" if norm_adv_by_std_in_grpo else "none"
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: group_advantages(s, g, scale=scale, eps=epsilon, num_groups=n),
                             out_dtype=lambda d: torch.promote_types(d, torch.float32))
    return out, out


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass@k advantage (arXiv:2503.19595), verl's ``compute_grpo_passk_outcome_advantage``: each
    group's best response gets ``r_max - r_second_max`` (divided by ``std_g + epsilon`` unless
    ``config.norm_adv_by_std_in_grpo`` is False -- read from ``config`` as verl does, the argument
    is ignored), every other response 0. Needs ``config``; a group with one response raises
    ``ValueError``. See :func:`fastrl.advantages.passk`."""
    if config is None:
        raise ValueError("compute_grpo_passk_outcome_advantage needs `config` (it reads norm_adv_by_std_in_grpo)")
    norm = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: _adv.passk(s, g, eps=epsilon, norm_by_std=norm, num_groups=n))
    return out, out


# ----------------------------------------------------------------------------------- RLOO and OPO


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (arXiv:2402.14740), verl's ``compute_rloo_outcome_advantage``:
    ``A_i = x_i - mean of the other members = n/(n-1) (x_i - mean_g)``; singleton: ``A = x``."""
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: _adv.rloo(s, g, num_groups=n))
    return out, out


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_rloo_vectorized_outcome_advantage``: RLOO, but a singleton group gets
    ``A = 0`` (not ``x`` as in :func:`compute_rloo_outcome_advantage`: the two verl functions
    disagree there, and each drop-in follows its own). Output dtype as verl's (float64 for
    bf16/fp16 rewards: verl's ``torch.bincount`` sum is float64 for them)."""
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: group_advantages(s, g, baseline="leave_one_out", scale="none",
                                                              singleton="zero", num_groups=n),
                             out_dtype=_bincount_dtype)
    return out, out


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPO (arXiv:2505.23585), verl's ``compute_opo_outcome_advantage``: length-weighted baseline
    ``A_i = x_i - sum_g(len x) / sum_g(len)`` with ``len = response_mask.sum(-1)``; singleton:
    ``A = x``. A group whose lengths sum to 0 gets NaN (0/0), as in verl."""
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        ids, num_groups = _groups(index, scores.device)
        lengths = response_mask.sum(dim=-1)
        adv = group_advantages(scores, ids, baseline="weighted_mean", scale="none", weights=lengths,
                               num_groups=num_groups)
        out = _per_token(adv, scores.dtype, response_mask)
    return out, out


# ------------------------------------------------------------------------------------------- GPG


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config=None,
    **kwargs,
):
    """GPG (arXiv:2504.02546), verl's ``compute_gpg_outcome_advantage``:
    ``A_i = alpha (x_i - mean_g) / f_norm`` with ``alpha = bs / max(1, #{x != 0})`` (computed, the
    ``alpha`` argument is ignored as in verl); singleton: baseline 0."""
    out = _outcome_advantage(token_level_rewards, response_mask, index,
                             lambda s, g, n: _adv.gpg(s, g, f_norm=f_norm, num_groups=n))
    return out, out


# --------------------------------------------------------------------------- REINFORCE++-baseline


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (arXiv:2501.03262), verl's
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``: ``x_i - mean_g`` (singleton:
    ``x_i``) broadcast over the response tokens, then whitened over every masked token of the batch
    (mean, unbiased std, ``rsqrt(var + 1e-8)``) and masked. Raises ``ValueError`` when the mask
    holds fewer than 2 tokens (verl's ``masked_var``)."""
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        ids, num_groups = _groups(index, scores.device)
        adv = _adv.reinforce_pp_baseline(scores, ids, num_groups=num_groups)
        tokens = _per_token(adv, scores.dtype, response_mask)
        out = masked_whiten(tokens, response_mask) * response_mask
    return out, out


# ----------------------------------------------------------------------------------------- ReMax


def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (arXiv:2310.10505), verl's ``compute_remax_outcome_advantage``: returns-to-go of the
    masked token rewards, ``G_t = sum_{s >= t} r_s m_s``, and ``A_t = G_t - b m_t`` with the greedy
    response's reward ``b = reward_baselines`` ``[bs]``. Returns ``(advantages, returns)``."""
    with torch.no_grad():
        masked = token_level_rewards * response_mask
        returns = torch.cumsum(masked.flip(-1), dim=-1).flip(-1)  # reverse cumulative sum
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


# ------------------------------------------------------------------------ GAE and REINFORCE++


def _token_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """verl's output dtype: its loops compute in the inputs' promoted dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, verl's ``compute_gae_advantage_return`` (registry name ``"gae"``): the backward scan of
    :func:`fastrl.credit.gae` (masked tokens transparent: value and lambda-carry skip them), then
    verl's ``masked_whiten`` of the advantages over the response tokens (fp64 statistics).
    Returns ``(advantages, returns)``, ``[bs, response_length]``, at every position as verl: the
    whitened advantage everywhere (masked positions carry the next valid token's raw advantage
    before whitening; trailing padding whitens 0), ``returns = raw advantages + values`` (``values``
    at trailing padding). ``gamma``, ``lam``: floats (or 0-dim tensors) in [0, 1].

    On the CPU the returns are bitwise verl's for float32 rewards/values with an integer, bool or
    float32 mask (with a float64 mask verl's carries turn float64 mid-loop: equal to ~1e-7); the
    whitened advantages differ by verl's float32 statistics error (ours are fp64). The output dtype
    is verl's: rewards, values and mask promoted.

    Where that dtype is the scan's own (float32, or float64 inputs) the whitening is fused into the
    scan (:func:`fastrl.credit.gae` ``whiten=True``: the statistics come from the rows while they are
    in cache, one pass less; equal to the unfused whitening up to fp64 rounding of the statistics);
    otherwise (bf16/fp16, or a float64 mask with float32 values) the advantages are cast to verl's
    dtype and whitened by :func:`fastrl.credit.masked_whiten`."""
    with torch.no_grad():
        dtype = _token_dtype(token_level_rewards, values, response_mask)  # verl's carries mix in the mask
        scan_dtype = torch.float64 if _token_dtype(token_level_rewards, values) == torch.float64 else torch.float32
        fused = dtype == scan_dtype
        adv, returns = _credit.gae(token_level_rewards, values, response_mask, float(gamma), float(lam),
                                   whiten=fused)
        if not fused:
            adv = _credit.masked_whiten(adv.to(dtype), response_mask)
    return adv, returns.to(dtype)


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Optional[Any] = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (arXiv:2501.03262), verl's ``compute_reinforce_plus_plus_outcome_advantage``
    (registry name ``"reinforce_plus_plus"``): discounted returns with verl 0.9.1's multi-turn
    semantics (:func:`fastrl.credit.discounted_returns` ``mode="skip"``: valid tokens
    ``G_t = r_t + gamma G_{t+1}``, masked tokens 0 and transparent), whitened over the response
    tokens and masked. ``config.gamma`` is the discount (``config`` is required, as in verl).
    Returns ``(advantages, returns)``, ``[bs, response_length]``.

    For float32/float64 rewards with a mask that does not widen them (verl's dtypes are then the
    scan's) the whitening statistics are fused into the scan (:func:`fastrl.credit.discounted_returns`
    ``whiten=True``: equal to the unfused whitening up to fp64 rounding of the statistics); otherwise
    the returns are cast to the rewards' dtype and whitened by :func:`fastrl.credit.masked_whiten`."""
    if config is None:
        raise ValueError("compute_reinforce_plus_plus_outcome_advantage needs `config` (it reads config.gamma)")
    gamma = _cfg_get(config, "gamma", None)
    with torch.no_grad():
        dtype = token_level_rewards.dtype
        if dtype in (torch.float32, torch.float64) and _token_dtype(token_level_rewards, response_mask) == dtype:
            return _credit.discounted_returns(token_level_rewards, response_mask, float(gamma), mode="skip",
                                              whiten=True)
        returns = _credit.discounted_returns(token_level_rewards, response_mask, float(gamma), mode="skip")
        returns = returns.to(token_level_rewards.dtype)  # verl holds them in zeros_like(rewards)
        white = _credit.masked_whiten(returns, response_mask)
        if _token_dtype(white, response_mask) == white.dtype:
            advantages = white.mul_(response_mask)  # in place: our own fresh output
        else:
            advantages = white * response_mask
    return advantages, returns


# -------------------------------------------------------------------------------- verl registry

ESTIMATORS: dict[str, Any] = {
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gae": compute_gae_advantage_return,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
}
"""verl registry name -> fastrl drop-in, what :func:`install` registers."""

# verl's compute_advantage() calls this module attribute directly for adv_estimator == "grpo".
_DIRECT_ATTRS = {"compute_grpo_outcome_advantage": compute_grpo_outcome_advantage}

_MISSING = object()
_saved_registry: dict[str, Any] = {}
_saved_attrs: dict[str, Any] = {}
_saved_policy: dict[str, Any] = {}


def install() -> list[str]:
    """Register the fastrl estimators in verl's ``ADV_ESTIMATOR_REGISTRY`` under verl's names,
    replacing verl's entries (set directly: verl's ``register_adv_est`` refuses a replacement), and
    rebind ``core_algos.compute_grpo_outcome_advantage`` (verl's GRPO path calls it directly).
    Also puts the fused policy losses (:data:`POLICY_LOSSES`: vanilla, gspo, cispo, sapo, gpg,
    geo_mean, clip_cov, kl_cov) into verl's ``POLICY_LOSS_REGISTRY``, which
    ``get_policy_loss_fn`` (verl's actor loss) reads at every call. Idempotent. Returns the
    advantage-estimator names now served by fastrl. :func:`uninstall` undoes all of it.

    Run it in the process that builds the trainer, before building it (see the module docstring
    for verl's Ray entry point).
    """
    from verl.trainer.ppo import core_algos

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    for name, fn in ESTIMATORS.items():
        if name not in _saved_registry:
            _saved_registry[name] = registry.get(name, _MISSING)
        registry[name] = fn
    for attr, fn in _DIRECT_ATTRS.items():
        if attr not in _saved_attrs:
            _saved_attrs[attr] = getattr(core_algos, attr, _MISSING)
        setattr(core_algos, attr, fn)
    policy_registry = core_algos.POLICY_LOSS_REGISTRY
    for name, fn in POLICY_LOSSES.items():
        if name not in _saved_policy:
            _saved_policy[name] = policy_registry.get(name, _MISSING)
        policy_registry[name] = fn
    return list(ESTIMATORS)


def uninstall() -> list[str]:
    """Restore the verl entries :func:`install` replaced. Returns the names restored."""
    from verl.trainer.ppo import core_algos

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    restored = []
    for name, original in _saved_registry.items():
        if original is _MISSING:
            registry.pop(name, None)
        else:
            registry[name] = original
        restored.append(name)
    for attr, original in _saved_attrs.items():
        if original is _MISSING:
            if hasattr(core_algos, attr):
                delattr(core_algos, attr)
        else:
            setattr(core_algos, attr, original)
    for name, original in _saved_policy.items():
        if original is _MISSING:
            core_algos.POLICY_LOSS_REGISTRY.pop(name, None)
        else:
            core_algos.POLICY_LOSS_REGISTRY[name] = original
    _saved_registry.clear()
    _saved_attrs.clear()
    _saved_policy.clear()
    return restored


# ------------------------------------------------------------------------------ log-prob drop-ins
# verl 0.9.1 ``verl.utils.torch_functional.logprobs_from_logits`` / ``entropy_from_logits`` on
# fastrl's compiled streaming op (fastrl.logprobs): same signatures and shapes, no [N, V] temporary,
# outputs in the logits' dtype (as verl's log_softmax path, which runs wherever flash-attn's
# cross-entropy is not installed; that one returns float32). float32 logits agree with verl to
# ~1e-5 absolute; for bfloat16 logits verl takes log_softmax in bfloat16 while ours is the fp32
# value rounded once -- at least as close to the fp64 truth (tests/test_logprobs.py checks both).
# float64 logits are computed at fp32 accuracy.

from fastrl.logprobs import logprobs as _logprobs  # noqa: E402


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``log_softmax(logits)[..., labels]``: ``labels``' shape (``logits.shape[:-1]``), ``logits.dtype``.

    Every label must lie in ``[0, V)`` (as verl's gather requires; a bad one raises naming its
    position). ``inplace_backward`` is accepted for verl's signature and ignored: the gradient is
    written into one new buffer. (``fastrl.logprobs(..., inplace_backward=True)`` exists, but verl's
    non-fused actor paths keep the default True while also taking the entropy of the same logits,
    which an in-place backward would corrupt; fastrl bumps the version counter, so it would raise.)

    >>> logprobs_from_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]))
    tensor([-0.4076])
    """
    return _logprobs(logits, labels, ignore_index=-(2**63)).to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits) - sum(softmax(logits) * logits)`` along the last axis, streamed:
    ``logits.shape[:-1]``, ``logits.dtype``, differentiable.

    >>> entropy_from_logits(torch.zeros(1, 4))
    tensor([1.3863])
    """
    no_label = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = _logprobs(logits, no_label, return_entropy=True, ignore_index=0)
    return entropy.to(logits.dtype)


__all__ += ["logprobs_from_logits", "entropy_from_logits"]


# ------------------------------------------------------------------------------- KL in reward


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl 0.9.1's ``core_algos.kl_penalty``: :func:`fastrl.credit.kl_penalty` with
    ``convention="verl"`` ("kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3", each optionally with
    verl's "+" straight-through suffix: the value of the estimator, the gradient of k2). One
    elementwise kernel forward and one backward instead of verl's chain of torch ops; same values
    (float32: to 1 ulp of ``exp`` for k3, bitwise otherwise) and gradients. Kinds verl does not
    implement ("full", unknown names) raise ``NotImplementedError`` as verl does."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in _credit.KL_KINDS["verl"]:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented (verl 0.9.1 raises too); "
                                  f"valid: {', '.join(_credit.KL_KINDS['verl'])}, each optionally with '+'")
    return _credit.kl_penalty(logprob, ref_logprob, kl_penalty)


def compute_rewards(token_level_scores: torch.Tensor, old_log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                    kl_ratio: float) -> torch.Tensor:
    """verl 0.9.1's ``core_algos.compute_rewards``: ``token_level_scores - (old_log_prob - ref_log_prob) * kl_ratio``
    (k1 KL in the reward, no mask, every position), the k1 term from :func:`fastrl.credit.kl_penalty`.
    Same values as verl's (the same float operations in the same order) and the same dtype."""
    kl = _credit.kl_penalty(old_log_prob, ref_log_prob, "k1")
    return token_level_scores - kl * kl_ratio


# ------------------------------------------------------------------------------- policy losses
# verl 0.9.1 ``core_algos.compute_policy_loss_{vanilla,gspo,cispo,sapo,gpg,geo_mean}``, ``agg_loss``,
# ``compute_entropy_loss`` and ``compute_value_loss`` with verl's signatures. The policy losses run
# fastrl.losses.policy_loss: one compiled pass forward (loss + every metric), one backward, instead
# of verl's ~10 elementwise ops and 3 ``.item()`` host syncs. Differences from verl (honest list):
#
# * Metrics come back as detached 0-dim device tensors, not Python floats (no host sync); verl's
#   ``Metric`` accepts tensors (it calls ``.item()`` itself when it logs).
# * Sums are fp64 (verl: the inputs' dtype), so losses agree to fp32 rounding (~1e-7 relative),
#   gradients likewise; clip-fraction metrics use count / n where verl adds 1e-8 to n.
# * A batch without any valid token gives loss 0 and zero gradient (verl's token-mean: NaN).
# * Masked positions are never read (verl multiplies by the mask, so a NaN there poisons its loss).
# * clip_cov draws its dropped tokens by a hash of (seed, valid-token index) on the device (verl:
#   unseeded CPU randperm): equal to verl when every candidate is dropped, otherwise a different,
#   reproducible uniform draw, the same for padded and packed inputs.
#   kl_cov picks the same top-covariance tokens by a device sort (verl: top-k on the host).

from fastrl import losses as _losses  # noqa: E402


def _global_batch(config, loss_agg_mode: str, horizon: int) -> dict:
    """verl's ``config.global_batch_info`` (dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor) as fastrl.losses.policy_loss's num_tokens / num_seqs / scale / max_length,
    with verl's checks."""
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    return _agg_kwargs(loss_agg_mode, horizon, info.get("dp_size", 1), info.get("batch_num_tokens"),
                       info.get("global_batch_size"), info.get("loss_scale_factor"))


def _agg_kwargs(loss_agg_mode, horizon, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) -> dict:
    if loss_agg_mode not in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                             "seq-mean-token-sum-norm"):
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    dp_size = 1 if dp_size is None else dp_size
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    return dict(agg=loss_agg_mode, num_tokens=batch_num_tokens, num_seqs=global_batch_size, scale=float(dp_size),
                max_length=loss_scale_factor if loss_scale_factor is not None else horizon)


def _clip_range(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _verl_metrics(m: dict, lower: bool = True) -> dict:
    out = {"actor/pg_clipfrac": m["clipfrac"], "actor/ppo_kl": m["approx_kl"]}
    if lower:
        out["actor/pg_clipfrac_lower"] = m["clipfrac_lower"]
    return out


def _policy(kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
            **kw):
    assert config is not None
    low, high = _clip_range(config)
    agg = _global_batch(config, loss_agg_mode, log_prob.shape[-1])
    if kind == "geo_mean":  # verl: torch.mean over the rows, no global batch info
        agg = dict(agg="token-mean")
    return _losses.policy_loss(log_prob, old_log_prob, advantages, response_mask, kind=kind, clip_low=low,
                               clip_high=high, is_weights=rollout_is_weights, **agg, **kw)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Optional[Any] = None,
                                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's PPO clip: ``ratio = exp(clamp(log_prob - old_log_prob, -20, 20))``, clipped to
    ``[1 - clip_ratio_low, 1 + clip_ratio_high]``, dual clip at ``config.clip_ratio_c`` (default 3)
    for A < 0, times ``rollout_is_weights``, aggregated by ``agg_loss`` with
    ``config.global_batch_info``. Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})`` (metrics as device tensors)."""
    assert config is not None
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    loss, m = _policy("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, dual_clip=clip_ratio_c, log_ratio_clamp=20.0)
    return loss, _verl_metrics(m)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None,
                             rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's GSPO: the sequence ratio ``exp(min(mean_t(log_prob - old_log_prob), 10))`` in its
    stop-gradient token form, PPO-clipped (no dual clip). ``actor/pg_clipfrac_lower`` is 0."""
    loss, m = _policy("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights)
    out = _verl_metrics(m)
    out["actor/pg_clipfrac_lower"] = torch.zeros((), device=loss.device)
    return loss, out


def compute_policy_loss_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                              config: Optional[Any] = None,
                              rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's CISPO: ``-sg(clamp(ratio, 1 - low, 1 + high)) * A * log_prob`` (ratio with the
    [-20, 20] log clamp); ``actor/pg_clipfrac`` = fraction with a clipped ratio, lower = 0."""
    loss, m = _policy("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, log_ratio_clamp=20.0)
    out = _verl_metrics(m)
    out["actor/pg_clipfrac_lower"] = torch.zeros((), device=loss.device)
    return loss, out


def compute_policy_loss_sapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None,
                             rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's SAPO: ``-(sigmoid(tau (ratio - 1)) * 4 / tau) * A`` with ``tau = config.tau_pos`` where
    A > 0 else ``config.tau_neg``, always aggregated ``seq-mean-token-mean`` (as verl, whatever
    ``loss_agg_mode`` says). Clip fractions are 0."""
    assert config is not None
    loss, m = _policy("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                      rollout_is_weights, log_ratio_clamp=20.0, tau_pos=float(config.tau_pos),
                      tau_neg=float(config.tau_neg))
    zero = torch.zeros((), device=loss.device)
    return loss, {"actor/pg_clipfrac": zero, "actor/ppo_kl": m["approx_kl"], "actor/pg_clipfrac_lower": zero}


def compute_policy_loss_gpg(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                            config: Optional[Any] = None,
                            rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's GPG / REINFORCE: ``-log_prob * A`` (times ``rollout_is_weights``), aggregated; no metrics."""
    loss, _ = _policy("gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights)
    return loss, {}


def compute_policy_loss_geo_mean(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                 config: Optional[Any] = None,
                                 rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's GMPO: per row ``-mean(A) * exp(mean(sign(A)-clipped log-ratio))`` (times the geometric
    mean of ``rollout_is_weights``), averaged over the rows; ``loss_agg_mode`` is unused (as verl)."""
    loss, m = _policy("geo_mean", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights)
    return loss, _verl_metrics(m)


def _cov_cfg(config, key: str, default: float) -> float:
    value = getattr(config.policy_loss, key, None)
    return default if value is None else value


def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                 config: Optional[Any] = None, rollout_is_weights: torch.Tensor | None = None,
                                 seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's Clip-Cov: PPO clip loss (unclamped ratio) with up to ``max(1, int(clip_cov_ratio * N))``
    tokens of covariance in ``(clip_cov_lb, clip_cov_ub)`` (not already clipped) dropped. verl draws
    them with an unseeded CPU ``torch.randperm`` (host sync, not reproducible); here they are drawn on
    the device by a hash of (``seed``, the token's index among the valid tokens) (same distribution:
    a uniform subset), so the
    loss equals verl's whenever there are at most that many candidates and is otherwise a different,
    reproducible draw. Metrics: ``actor/pg_clipfrac`` (dropped fraction), ``actor/ppo_kl``."""
    assert config is not None
    assert config.policy_loss is not None
    ratio = _cov_cfg(config, "clip_cov_ratio", 0.0002)
    assert ratio > 0, "clip_ratio should be larger than 0."
    loss, m = _policy("clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, cov_ratio=ratio, clip_cov_lb=_cov_cfg(config, "clip_cov_lb", 1.0),
                      clip_cov_ub=_cov_cfg(config, "clip_cov_ub", 5.0), seed=seed)
    return loss, {"actor/pg_clipfrac": m["clipfrac"], "actor/ppo_kl": m["approx_kl"]}


def compute_policy_loss_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                               response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                               config: Optional[Any] = None,
                               rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's KL-Cov: ``-A * ratio`` (unclamped, unclipped) plus ``ppo_kl_coef * |log-ratio|`` at the
    ``max(1, int(kl_cov_ratio * N))`` valid tokens of largest covariance, chosen on the device by a
    stable sort (verl: a top-k after copying to the host; the same tokens barring exact ties).
    ``rollout_is_weights`` weights the policy term and the penalty, as verl. Metric: ``actor/ppo_kl`` (mean |x|)."""
    assert config is not None
    assert config.policy_loss is not None
    ratio = _cov_cfg(config, "kl_cov_ratio", 0.0002)
    assert ratio > 0, "kl_cov_ratio should be larger than 0."
    loss, m = _policy("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, cov_ratio=ratio, ppo_kl_coef=_cov_cfg(config, "ppo_kl_coef", 1.0))
    return loss, {"actor/ppo_kl": m["approx_kl_abs"]}


POLICY_LOSSES = {
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "geo_mean": compute_policy_loss_geo_mean,
}
"""verl ``POLICY_LOSS_REGISTRY`` name -> fastrl drop-in, registered by :func:`install`."""


def _row_sums(loss_mat: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """fp64 per-row sums of the masked loss matrix (masked entries never read)."""
    return torch.where(loss_mask.bool(), loss_mat.double(), 0.0).sum(-1)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None):
    """verl's ``agg_loss`` (token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm; ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` /
    ``loss_scale_factor`` as verl), with fastrl.losses' row weights: fp64 sums, 0 (not NaN) for an
    empty mask, result in ``loss_mat``'s dtype. Differentiable in ``loss_mat``."""
    kw = _agg_kwargs(loss_agg_mode, loss_mask.shape[-1], dp_size, batch_num_tokens, global_batch_size,
                     loss_scale_factor)
    n = loss_mask.bool().sum(-1)
    w = _losses._ref.agg_weights(n, kw["agg"], horizon=float(kw["max_length"]), num_tokens=kw["num_tokens"],
                                 num_seqs=kw["num_seqs"], num_rows=n.shape[0])
    return ((w * _row_sums(loss_mat, loss_mask)).sum() * kw["scale"]).to(loss_mat.dtype)


def compute_entropy_loss(logits, response_mask, loss_agg_mode: str = "token-mean"):
    """verl's ``compute_entropy_loss``: the entropy of ``logits`` [bs, T, V] (fastrl's streaming
    :func:`entropy_from_logits`, no [bs, T, V] temporaries) aggregated by :func:`agg_loss`."""
    return agg_loss(loss_mat=entropy_from_logits(logits), loss_mask=response_mask, loss_agg_mode=loss_agg_mode)


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens: Optional[int] = None,
                       global_batch_size: Optional[int] = None, loss_scale_factor: Optional[int] = None):
    """verl's clipped value loss ``0.5 * agg(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2))``
    and ``vf_clipfrac`` (fraction of valid tokens where the clipped term is larger, a device tensor).
    The clip is verl's ``clip_by_value`` (``max(min(v, hi), lo)``), so gradients match verl's."""
    clipped = torch.maximum(torch.minimum(vpreds, values + cliprange_value), values - cliprange_value)
    unclipped_sq = (vpreds - returns).square()
    clipped_sq = (clipped - returns).square()
    vf_loss = 0.5 * agg_loss(torch.maximum(unclipped_sq, clipped_sq), response_mask, loss_agg_mode, dp_size,
                             batch_num_tokens, global_batch_size, loss_scale_factor)
    valid = response_mask.bool()
    count = valid.sum()
    frac = torch.where(valid, (clipped_sq > unclipped_sq).double(), 0.0).sum() / count.clamp(min=1)
    return vf_loss, frac.to(torch.float32)


__all__ += ["POLICY_LOSSES", "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov", "compute_policy_loss_vanilla", "compute_policy_loss_gspo", "compute_policy_loss_cispo",
            "compute_policy_loss_sapo", "compute_policy_loss_gpg", "compute_policy_loss_geo_mean", "agg_loss",
            "compute_entropy_loss", "compute_value_loss"]
