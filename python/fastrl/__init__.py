"""fastrl: the compiled RL core for LLM post-training.

Op families (one module each): ``fastrl.advantages`` (group advantages), ``fastrl.credit``
(token-level credit assignment: GAE, discounted returns, masked whitening, per-token broadcast),
:func:`fastrl.logprobs` (log p(label) / entropy / logsumexp from logits; its module is
``fastrl.logprobs_ops``, because the name ``fastrl.logprobs`` is the function). Import cost: loads the
compiled extension ``fastrl._C`` (an ImportError says how to build it if it is missing).
"""
from fastrl import _extension  # noqa: F401  (loads fastrl._C first)
from fastrl import advantages, credit
from fastrl.advantages import GroupStats, group_advantages, group_index
from fastrl.backends import backends
from fastrl import logprobs as logprobs_ops  # the module; `fastrl.logprobs` is rebound to the function below
from fastrl.logprobs import logprobs  # noqa: E402

__version__ = "0.1.0"
__all__ = ["advantages", "credit", "group_advantages", "group_index", "GroupStats", "backends", "logprobs", "logprobs_ops", "__version__"]
