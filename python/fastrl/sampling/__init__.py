"""Best-of-N and sampling: selection over groups of completions, exact estimators, token sampling.

Groups are ``group_ids: int64[B]`` in any order and any sizes, as in ``fastrl.advantages``.

- ``best_of_n``, ``select_pairs``, ``filter_groups``, ``resample``: choose completions per group
  (rejection sampling, online-DPO pairs, DAPO dynamic sampling, PF-PPO reweighting).
- ``pass_at_k``, ``best_at_k``, ``worst_at_k``, ``maj_at_k``: exact closed-form estimators for a list
  of k in one call (no bootstrap).
- ``quantile_mask``: exact quantile threshold over all masked tokens (no 2^24-element limit).
- ``sample``: token sampling from logits with temperature / top-k / top-p / min-p, no vocabulary
  sort, returning the log-prob of each token under the processed and the raw distribution.
"""
from fastrl.sampling.groups import (best_at_k, best_of_n, filter_groups, maj_at_k, pass_at_k, quantile_mask,
                                    resample, select_pairs, worst_at_k)
from fastrl.sampling.tokens import sample, sample_with_uniforms

__all__ = ["best_of_n", "select_pairs", "filter_groups", "resample", "pass_at_k", "best_at_k", "worst_at_k",
           "maj_at_k", "quantile_mask", "sample", "sample_with_uniforms"]
