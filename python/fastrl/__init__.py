"""fastrl: the compiled RL core for LLM post-training.

Op families (one module each): ``fastrl.advantages`` (group advantages), ``fastrl.credit``
(token-level credit assignment: GAE with turn ends, discounted returns, masked whitening, KL penalties,
token and implicit rewards, segment reductions, per-token broadcast),
:func:`fastrl.logprobs` (log p(label) / entropy / logsumexp from logits; its module is
``fastrl.logprobs_ops``, because the name ``fastrl.logprobs`` is the function) and
:func:`fastrl.linear_logprobs` (the same from hidden states x lm_head, no [N, V] logits; module
``fastrl.linear_logprobs_ops``), ``fastrl.sampling``
(best-of-N over groups, pairs, filters, exact pass@k / best@k, token sampling; :func:`fastrl.best_of_n`),
``fastrl.losses`` (fused policy / KL / entropy losses; :func:`fastrl.policy_loss`). Import cost: loads the
compiled extension ``fastrl._C`` (an ImportError says how to build it if it is missing).
"""
from fastrl import _extension  # noqa: F401  (loads fastrl._C first)
from fastrl import advantages, credit
from fastrl.advantages import GroupStats, group_advantages, group_index
from fastrl.backends import backends
from fastrl import logprobs as logprobs_ops  # the module; `fastrl.logprobs` is rebound to the function below
from fastrl.logprobs import logprobs  # noqa: E402
from fastrl import linear_logprobs as linear_logprobs_ops  # noqa: E402  (module; the name is the function)
from fastrl.linear_logprobs import linear_logprobs  # noqa: E402
from fastrl import sampling  # noqa: E402
from fastrl.sampling import best_of_n  # noqa: E402
from fastrl import losses  # noqa: E402  (registers the loss ops' fake kernels and autograd)
from fastrl.losses import linear_policy_loss, policy_loss, rollout_is_weights, rollout_rejection_mask  # noqa: E402

__version__ = "0.1.0"
__all__ = ["advantages", "credit", "group_advantages", "group_index", "GroupStats", "backends", "logprobs", "logprobs_ops",
           "linear_logprobs", "linear_logprobs_ops", "sampling",
           "best_of_n", "losses", "policy_loss", "linear_policy_loss", "rollout_is_weights", "rollout_rejection_mask",
           "__version__"]
