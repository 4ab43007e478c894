"""Token-level credit assignment: per-token advantages and returns from token rewards.

Both token layouts are first-class: padded ``[B, T]`` with a ``mask`` (verl, TRL), and packed
``[N]`` with ``cu_seqlens: int64[B+1]`` (row ``b`` is ``[cu_seqlens[b], cu_seqlens[b+1])``; verl's
remove-padding, OpenRLHF packing), where ``mask`` is ``[N]`` too. A mask is bool, uint8, int32,
int64, float32 or float64 holding only 0 and 1.

* :func:`gae` -- generalized advantage estimation, verl's multi-turn semantics (masked tokens are
  transparent), a reset or OpenRLHF's dense convention as options, turn ends (``dones``) with a
  turn-level gamma/lambda; one compiled backward scan per row.
* :func:`discounted_returns` -- reward-to-go: verl REINFORCE++'s skip, a reset, or ReMax's cumsum;
  turn ends (``dones``) with a turn-level discount, as in :func:`gae`.
* :func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten` -- verl's token-weighted batch
  statistics, fp64 accumulation, deterministic.
* :func:`broadcast_to_tokens` -- a per-sample value on every token (padded or packed).
* :func:`kl_penalty` -- per-token KL estimators (k1/abs/k2/k3) in verl's or OpenRLHF's convention,
  differentiable (closed-form gradient).
* :func:`segment_reduce` -- token -> sequence reductions (sum, mean, GSPO's geometric-mean ratio,
  last valid token), differentiable in the token values.
* :func:`implicit_rewards` -- PRIME's implicit process rewards ``beta * (logp - ref_logp)`` per token
  or summed per step at the step's last token.
* :func:`token_rewards` -- the outcome score at each row's last valid token minus ``kl_coef * kl``
  (OpenRLHF ``compute_reward`` / TRL PPO), one pass.

``masked_mean``/``masked_var``/``masked_whiten`` take ``process_group=``: the statistics are then
those of the concatenation of every rank's tensor (one all-reduce of a ``[world, 3]`` fp64 tensor).

None of the scans/statistics is differentiable (every trainer computes them under no_grad); the
ops have no autograd formula, so a tensor that requires grad is used as a constant.

On the CPU, ``gae`` and ``discounted_returns`` on float32 inputs are bitwise verl 0.9.1's loops (same
operations in the same order). On CUDA they are a block-wide scan over affine pairs: equal to the
CPU results up to float rounding (re-associated products; tested to ``rtol = atol = 1e-5`` on
unit-scale rewards), and bitwise reproducible run to run. CUDA does not check mask values or
``cu_seqlens`` or ``dones``/``step_ends`` flags (that would need a host sync: a nonzero value counts
as 1); the CPU raises for bad ones.
"""
from __future__ import annotations

import torch

from fastrl import _extension
from fastrl.reference import credit as _ref

__all__ = ["broadcast_to_tokens", "gae", "discounted_returns", "masked_mean", "masked_var", "masked_whiten",
           "kl_penalty", "token_rewards", "segment_reduce", "implicit_rewards"]

RETURNS_MODES = _ref.RETURNS_MODES
GAE_MODES = _ref.GAE_MODES
KL_KINDS = _ref.KL_KINDS
KL_CONVENTIONS = _ref.KL_CONVENTIONS
SEGMENT_REDUCTIONS = _ref.SEGMENT_REDUCTIONS


def broadcast_to_tokens(values: torch.Tensor, mask: torch.Tensor, *,
                        cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """A per-sample value (an advantage) on every token of its sample, zeroed where the mask is 0::

        padded  out[b, t] = values[b] * mask[b, t]
        packed  out[i]    = values[b] * mask[i]      for cu_seqlens[b] <= i < cu_seqlens[b + 1]

    Args:
        values: ``[B]`` per-sample values.
        mask: ``[B, T]`` response mask (padded), or ``[N]`` (packed, with ``cu_seqlens``); float,
            bool or int (masked tokens get 0; any values are multiplied as they are, as torch does).
        cu_seqlens: ``int64[B+1]`` row offsets for the packed layout (0, non-decreasing, ending at
            N = ``mask.shape[0]``; checked on the CPU, trusted on CUDA).

    Returns:
        ``mask``'s shape in ``torch.promote_types(values.dtype, mask.dtype)`` -- bitwise what
        ``values.unsqueeze(-1) * mask`` gives (verl, TRL, OpenRLHF write it so), and in the packed
        layout bitwise the padded result at the same tokens. Computed by torch's own multiply into
        an output allocated for streaming: on Linux CPUs, a large output is backed by transparent
        huge pages (one page fault per 2 MiB instead of per 4 KiB), which makes the step 2-3x
        faster at [8192, 2048]. Packed: each token's row index is expanded from the row lengths
        (``repeat_interleave`` with the output size N read from ``mask.shape``, so no host sync on
        CUDA; extra memory: an int64 ``[N]`` index and a ``[N]`` gather of ``values``), then the
        same multiply. Differentiable in ``values``: ``d values[b] = sum over row b of grad * mask``,
        a :func:`segment_reduce` sum (fp64, token order) in both layouts, so packed and padded
        gradients are the same bits.

    >>> fastrl.credit.broadcast_to_tokens(torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    tensor([[ 1.,  1.,  0.],
            [-2., -0., -0.]])
    >>> fastrl.credit.broadcast_to_tokens(torch.tensor([1.0, -2.0]), torch.tensor([1, 1, 1, 0]),
    ...                                   cu_seqlens=torch.tensor([0, 2, 4]))
    tensor([ 1.,  1., -2., -0.])
    """
    if _extension.use_reference():
        return _ref.broadcast_to_tokens(values, mask, cu_seqlens=cu_seqlens)
    return torch.ops.fastrl.broadcast_to_tokens(values, mask, cu_seqlens)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, *,
        cu_seqlens: torch.Tensor | None = None, dones: torch.Tensor | None = None, mode: str = "skip",
        turn_gamma: float = 0.0, turn_lam: float | None = None,
        whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation; verl 0.9.1's masked-token semantics by default, turn ends for
    multi-turn credit, OpenRLHF's convention as ``mode="dense"``.

    Per row, for t from the row's end down to its start (``nv_t``: the value at the next *step*
    position after t, 0 if there is none)::

        delta_t = r_t + g_t * nv_t - v_t
        A_t     = delta_t + g_t * l_t * A_{t+1}      at a step position
        R_t     = A_t + v_t                          (every position)

    with ``(g_t, l_t) = (gamma, lam)``, or ``(turn_gamma, turn_lam)`` where a turn ends at t.

    ``mode`` says what a masked position (``mask_t == 0``) is:

    * ``"skip"`` (verl 0.9.1 ``compute_gae_advantage_return`` before its whitening): not a step, and
      transparent -- value and lambda-carry skip it, so it outputs the advantage of the next valid
      token (multi-turn observation spans); trailing padding gets ``A = 0``, ``R = v``.
    * ``"reset"``: not a step; the recurrence restarts below it (carry and next value 0): masked
      positions output ``A = 0``, ``R = v``, and a masked span ends the episode.
    * ``"dense"`` (OpenRLHF ``get_advantages_and_returns``): every position is a step, with ``r`` and
      ``v`` zeroed where the mask is 0 (``nv_t`` is then the next position's masked value) and
      ``R_t = A_t + mask_t * v_t``.

    ``dones`` (turn-level credit for multi-turn rollouts): a 0/1 flag per token, ``mask``'s shape.
    A flag on a step position t ends a turn at t; a flag on a non-step position ends the turn at the
    nearest step position before it (so a flag anywhere in an observation span ends the preceding
    response's turn). At a turn end the step uses ``turn_gamma`` and ``turn_lam`` (default: ``lam``):

    * ``turn_gamma = 0`` (default): a hard reset -- no bootstrap from the next turn's value and no
      advantage carried across the boundary (each turn its own episode, value-terminated);
    * ``gamma = lam = 1`` with ``turn_gamma, turn_lam < 1``: turn-level discounting -- tokens inside
      a turn are undiscounted and each turn boundary discounts by ``turn_gamma`` and mixes by
      ``turn_lam`` (GAE over turns, with turn-level rewards placed at turn ends).

    Without ``dones`` the results are bitwise those of the plain call.

    ``whiten=True`` returns the advantages whitened as verl does before returning them:
    ``masked_whiten(A, mask)`` (``shift_mean=True``, unbiased, ``eps=1e-8``; fewer than 2 valid
    tokens raise ``ValueError``); the returns stay unwhitened (verl computes them first). On the CPU
    the scan emits each row's fp64 moments of ``A`` while the row is still in cache and they are
    merged in row order, so the statistics pass over ``A`` and ``mask`` disappears (equal to
    :func:`masked_whiten` up to fp64 rounding of the merge order; deterministic). On CUDA the same
    fusion: the scan kernel also emits each row's fp64 moments of ``A`` (per thread, merged by a
    fixed-shape block reduction), a one-block kernel merges the rows in a fixed order, and one
    elementwise pass whitens ``A`` in place (3 launches, no fp64 ``[B, T]`` temporary,
    deterministic and independent of the grid size). The check for fewer than 2 valid tokens is the
    call's one host sync on CUDA (a copy of the count, after every kernel is queued), as verl's.

    Args:
        rewards, values: ``[B, T]`` (padded) or ``[N]`` (packed), floating; promoted to a common dtype.
        mask: same shape, 0/1.
        gamma, lam: discount and GAE lambda, in [0, 1].
        cu_seqlens: ``int64[B+1]`` row offsets for the packed layout (0, non-decreasing, ending at N).
        dones: optional 0/1 turn-end flags, ``mask``'s shape (bool, uint8, int32, int64, float32, float64).
        mode: ``"skip"``, ``"reset"`` or ``"dense"``.
        turn_gamma, turn_lam: in [0, 1]; used only at turn ends.
        whiten: whiten the advantages (verl's ``masked_whiten``), fused into the scan on the CPU.

    Returns:
        ``(advantages, returns)``, the inputs' shape, float64 for float64 inputs else float32
        (accumulated in that type). Not differentiable (no_grad math in every trainer).
        Extra memory: none beyond the outputs (plus a bool copy of a non-bool ``dones``).
        NaN/Inf in a step's inputs propagate to the positions before it in the row, as in verl
        (also across a ``"reset"`` span or a turn end: those steps multiply the carry by 0, and
        0 * NaN is NaN; the same on the CPU and CUDA). Rewards at masked positions are never read.

    >>> r = torch.tensor([[0.0, 0.0, 1.0, 0.0]]); v = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    >>> m = torch.tensor([[1, 0, 1, 0]])
    >>> fastrl.credit.gae(r, v, m, gamma=1.0, lam=1.0)
    (tensor([[0.5000, 0.5000, 0.5000, 0.0000]]), tensor([[1., 1., 1., 0.]]))
    >>> fastrl.credit.gae(r, v, m, gamma=1.0, lam=1.0, dones=torch.tensor([[0, 1, 0, 0]]))  # turn ends at t=0
    (tensor([[-0.5000,  0.5000,  0.5000,  0.0000]]), tensor([[0., 1., 1., 0.]]))
    """
    turn_lam = lam if turn_lam is None else turn_lam
    if _extension.use_reference():
        return _ref.gae(rewards, values, mask, gamma, lam, cu_seqlens=cu_seqlens, dones=dones, mode=mode,
                        turn_gamma=turn_gamma, turn_lam=turn_lam, whiten=whiten)
    return torch.ops.fastrl.gae(rewards, values, mask, cu_seqlens, float(gamma), float(lam), dones, mode,
                                float(turn_gamma), float(turn_lam), bool(whiten))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, *, mode: str = "skip",
                       cu_seqlens: torch.Tensor | None = None, dones: torch.Tensor | None = None,
                       turn_gamma: float = 0.0,
                       whiten: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Discounted reward-to-go per row, backwards from the row's end (``G`` after the end is 0).

    ``mode`` says what a masked position (``mask_t == 0``) does:

    * ``"skip"`` (verl 0.9.1 REINFORCE++): ``G_t = r_t + gamma * G_{t+1}`` on valid tokens; a masked
      token outputs 0 and passes the running return through unchanged (observation spans are
      transparent, rewards after them still reach earlier turns).
    * ``"reset"``: as ``"skip"``, but the running return restarts from 0 below a masked token (a
      masked span ends the episode; older single-turn REINFORCE++ code, where masked = padding).
    * ``"cumsum"``: ``G_t = mask_t * r_t + gamma * G_{t+1}`` at every position (ReMax's returns with
      ``gamma = 1``; masked positions hold the running return).

    ``dones`` (turn ends, the same rule as :func:`gae`'s, in every mode): a 0/1 flag per token,
    ``mask``'s shape. The *step* positions are the valid tokens (``"skip"``, ``"reset"``) or every
    position (``"cumsum"``). A flag on a step position t ends a turn at t; a flag on a non-step
    position ends the turn at the nearest step position before it (a flag anywhere in an observation
    span ends the preceding response's turn). At a turn end the discount is ``turn_gamma``::

        G_t = r_t + turn_gamma * G_{t+1}

    ``turn_gamma = 0`` (default) makes each turn its own episode (no return flows back across the
    boundary); ``gamma = 1`` with ``turn_gamma < 1`` discounts per turn instead of per token. In
    ``"reset"`` mode a masked span already restarts the return, so only flags on valid tokens change
    anything there. Without ``dones`` (or with ``turn_gamma = gamma``) the result is bitwise the
    plain call's.

    ``whiten=True`` returns verl REINFORCE++'s ``(advantages, returns)`` instead of the returns:
    ``advantages = masked_whiten(returns, mask) * mask`` in the returns' dtype (``shift_mean=True``,
    unbiased, ``eps=1e-8``; fewer than 2 valid tokens raise ``ValueError``, as verl). On the CPU the
    scan emits each row's fp64 moments of the returns while the row is in cache and they are merged
    in row order (no statistics pass; equal to :func:`masked_whiten` up to fp64 rounding of the
    merge order; deterministic), and one more pass whitens and masks. CUDA fuses the same way (the
    scan kernel emits the rows' moments, a one-block kernel merges them in a fixed order, one pass
    whitens and masks; one host sync, for the count check, as :func:`gae`).

    >>> fastrl.credit.discounted_returns(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1, 1, 0]]), 1.0,
    ...                                  whiten=True)
    (tensor([[ 0.7071, -0.7071, -0.0000]]), tensor([[1., 0., 0.]]))

    Args:
        rewards: ``[B, T]`` or packed ``[N]``, floating. mask: same shape, 0/1. gamma: in [0, 1].
        cu_seqlens: ``int64[B+1]`` for the packed layout.
        dones: optional 0/1 turn-end flags, ``mask``'s shape (bool, uint8, int32, int64, float32, float64).
        turn_gamma: in [0, 1]; the discount at turn ends.
        whiten: return ``(advantages, returns)`` as above.

    Returns:
        The inputs' shape, float64 for float64 rewards else float32 (both tensors with ``whiten``).
        Not differentiable. Extra memory: none beyond the output(s) (plus a bool copy of a non-bool
        ``dones``).

    NaN/Inf are not errors: a NaN/Inf reward at a step position reaches every earlier output of its
    row that holds the running return (its valid tokens; every position in ``"cumsum"``), across
    masked spans and turn ends (``r + gamma * NaN`` is NaN; an Inf stays Inf, or turns NaN where it
    meets a zero discount, e.g. a ``"reset"`` span: ``0 + 0 * carry``). Rewards at masked tokens are
    never read (a NaN there changes nothing), and masked tokens output 0 in ``"skip"``/``"reset"``.
    verl's REINFORCE++ loop agrees at valid tokens for NaN; it multiplies masked tokens in, so there
    a NaN/Inf reward at a masked token poisons the row before it, masked outputs before a NaN are
    NaN (here 0), and an Inf carried across a masked token becomes NaN (``inf * 0``).

    >>> fastrl.credit.discounted_returns(torch.tensor([[1.0, 5.0, 1.0]]), torch.tensor([[1, 0, 1]]), 0.5)
    tensor([[1.5000, 0.0000, 1.0000]])
    >>> fastrl.credit.discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3), 1.0,
    ...                                  dones=torch.tensor([[0, 1, 0]]), turn_gamma=0.5)  # turn ends at t=1
    tensor([[5., 4., 4.]])
    """
    if _extension.use_reference():
        return _ref.discounted_returns(rewards, mask, gamma, mode=mode, cu_seqlens=cu_seqlens, dones=dones,
                                       turn_gamma=turn_gamma, whiten=whiten)
    op = torch.ops.fastrl.discounted_returns_whiten if whiten else torch.ops.fastrl.discounted_returns
    return op(rewards, mask, cu_seqlens, float(gamma), mode, dones, float(turn_gamma))


def _moments(x: torch.Tensor, mask: torch.Tensor, process_group=None):
    """(count, mean, m2) of the masked elements, fp64 0-dim tensors; with a process group, those of
    the concatenation of every rank's elements."""
    if _extension.use_reference():
        moments = _ref.masked_moments(x, mask)
    else:
        moments = torch.ops.fastrl.masked_moments(x, mask)
    if process_group is None:
        return moments
    return _all_reduce_moments(moments, process_group)


def _all_reduce_moments(moments, process_group):
    """Each rank writes its (count, mean, m2) into its row of a zeroed ``[world, 3]`` fp64 tensor,
    one SUM all-reduce gathers them, and every rank merges the rows the same way (parallel-axis
    formula: ``mean = sum n_r mean_r / N``, ``m2 = sum m2_r + sum n_r (mean_r - mean)^2``), so all
    ranks get bitwise the same statistics, stable for any mean/std ratio."""
    import torch.distributed as dist

    count = moments[0]
    rows = count.new_zeros(dist.get_world_size(process_group), 3)
    rows[dist.get_rank(process_group)] = torch.stack(moments)
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=process_group)
    n, means, m2s = rows.unbind(1)
    total = n.sum()
    mean = torch.where(total > 0, (n * means).sum() / total.clamp(min=1), 0.0)
    return total, mean, m2s.sum() + (n * (means - mean).square()).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, process_group=None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over all elements (verl's ``masked_mean``; 0 for an empty mask).

    Elements outside the mask never reach the sum (a NaN there is ignored). Accumulated in fp64
    with a fixed chunking (deterministic whatever the thread count); returned as a 0-dim tensor in
    ``x.dtype``. ``x``, ``mask``: any shape, the same; mask 0/1. Not differentiable. On CUDA: two
    kernels (fp64 moments of fixed 4096-element chunks, each thread's share summarized in
    registers; a one-block merge in a fixed order), no fp64 copy of ``x``, no host sync;
    deterministic, equal to the CPU's up to fp64 rounding.
    ``process_group`` (a ``torch.distributed`` group, gloo or NCCL; every rank of it must call):
    the mean over the masked elements of all ranks, token-weighted (one all-reduce).

    >>> fastrl.credit.masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor(1.5000)
    """
    return _moments(x, mask, process_group)[1].to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, process_group=None) -> torch.Tensor:
    """Variance of the masked elements, ``sum(mask * (x - mean)^2) / (n - 1)`` (``/ n`` when
    ``unbiased=False``; 0 for an empty mask), ``n = sum(mask)``: verl's ``masked_var``.

    With ``unbiased=True`` fewer than 2 masked elements raise ``ValueError``, as verl (one host
    sync on CUDA, as verl). fp64 accumulation, 0-dim result in ``x.dtype``. ``process_group``: the
    variance of the masked elements of all ranks (one all-reduce; the count check is global).

    >>> fastrl.credit.masked_var(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor(2.)
    """
    count, _, m2 = _moments(x, mask, process_group)
    if unbiased:
        _ref._check_unbiased(int(count), "masked_var")
        return (m2 / (count - 1)).to(x.dtype)
    return torch.where(count > 0, m2 / count.clamp(min=1), 0.0).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8, process_group=None) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` at every position, ``+ mean`` when ``shift_mean=False``,
    with ``mean``/``var`` of the masked elements (:func:`masked_mean`, :func:`masked_var`): verl's
    ``masked_whiten``.

    One fused pass computes the fp64 statistics (fixed chunks merged in order: deterministic), a
    second writes the output in ``x.dtype``. ``unbiased=True`` with fewer than 2 masked elements
    raises ``ValueError`` as verl does (e.g. an all-masked batch; on CUDA this check is the call's
    one host sync, as in verl, made after the kernels are queued; ``unbiased=False`` makes none).
    On CUDA: the :func:`masked_mean` kernels, then one elementwise kernel reading the merged
    moments on the device (no fp64 copy of ``x``); the whitening value is computed with the CPU's
    operations, so the two differ only by the fp64 rounding of their statistics. Not differentiable.

    ``process_group`` (a ``torch.distributed`` group, gloo on CPU or NCCL on GPU; every rank of it
    must call): ``mean``/``var`` are those of the masked elements of all ranks together, so each
    rank's output equals its slice of the single-process whitening of the concatenated batch (to
    fp64 rounding). Cost: one all-reduce of a ``[world_size, 3]`` fp64 tensor, one host sync for
    the unbiased count check (as without a group on CUDA); the output comes from the same
    elementwise kernel as without a group (``fastrl::whiten_with_moments``), no fp64 copy of ``x``.

    >>> fastrl.credit.masked_whiten(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([1, 1, 0]))
    tensor([-0.7071,  0.7071,  4.9497])
    """
    if process_group is not None:
        return _whiten_with_moments(x, _moments(x, mask, process_group), shift_mean, unbiased, eps)
    if _extension.use_reference():
        return _ref.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    return torch.ops.fastrl.masked_whiten(x, mask, shift_mean, unbiased, float(eps))


def _whiten_with_moments(x, moments, shift_mean: bool, unbiased: bool, eps: float) -> torch.Tensor:
    """:func:`masked_whiten` of ``x`` with given fp64 ``(count, mean, m2)`` 0-dim tensors (all-reduced
    ones, or verl's statistics in the drop-ins): ``fastrl::whiten_with_moments``, or the reference's
    operations under ``FASTRL_BACKEND=reference``."""
    if not eps >= 0.0:
        raise ValueError(f"fastrl: `eps` must be >= 0, got {eps}")
    count, mean, m2 = moments
    if _extension.use_reference():
        if unbiased:
            _ref._check_unbiased(int(count))
            var = m2 / (count - 1)
        else:
            var = torch.where(count > 0, m2 / count.clamp(min=1), 0.0)
        out = (x.double() - mean) * (1.0 / torch.sqrt(var + eps))  # the CPU kernel's operations
        return (out if shift_mean else out + mean).to(x.dtype)
    return torch.ops.fastrl.whiten_with_moments(x, torch.stack([count, mean, m2]), shift_mean, unbiased, float(eps))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", *,
               convention: str = "verl") -> torch.Tensor:
    """Per-token KL estimator of the policy against the reference, elementwise, with ``d = logp - ref_logp``
    (http://joschu.net/blog/kl-approx.html).

    ``convention="verl"`` (default) is verl 0.9.1's ``kl_penalty`` / ``kl_penalty_forward``
    (read from its source; the parity tests run the installed verl)::

        "k1", "kl"           d
        "abs"                |d|
        "k2", "mse"          0.5 * d^2
        "k3", "low_var_kl"   kl = clamp(ref_logp - logp, -20, 20);  clamp(exp(kl) - kl - 1, -10, 10)
        "<kind>+"            the value of <kind>, the gradient of k2 (verl's straight-through
                             estimator: d(out)/d(logp) = d)

    Output in the inputs' promoted dtype (arithmetic in fp32, fp64 for fp64 inputs; verl rounds each
    bf16/fp16 operation, we round once). ``"full"`` (verl: ``NotImplementedError``) needs the full
    vocabulary distributions and raises ``ValueError`` here.

    ``convention="openrlhf"`` is OpenRLHF's ``compute_approx_kl(log_probs, log_probs_base,
    kl_estimator)`` as of its 2025 sources (openrlhf/models/utils.py, e.g. commit 473f61bd: both
    inputs cast to fp32, then ``k1 = d``, ``k2 = d**2 / 2``, ``k3 = exp(-d) - 1 + d`` computed as
    ``(exp(x) - 1) - x`` with ``x = -d``, and the result clamped to [-10, 10] for every estimator),
    output float32. ``convention="openrlhf_unclamped"`` is the same function before that final
    clamp was added (e.g. commit 02a26057): the same fp32 formulas with no clamp, so k3 grows without
    bound (``+inf`` once ``-d`` passes ~88.7, as ``torch.exp`` in fp32) and every gradient passes.
    Both written from the source text, not run against OpenRLHF (not installable here).
    Confidence: high for the formulas, medium for which release you are matching.

    On the CPU the fp32 k3 of every convention runs on SIMD lanes with a vectorized ~1-ulp exp (the
    same bits on every x86 ISA, ``FASTRL_CPU_ISA``); it differs from ``torch.exp``/``expf`` by
    about an ulp of ``exp``.

    Differentiable in ``logp`` and ``ref_logp`` (closed-form gradient, a second elementwise kernel):
    ``d out/d logp = f'(d)`` with torch.clamp's rule (zero gradient where a clamp is active),
    ``d out/d ref_logp = -f'(d)``; the same gradients autograd gives through the trainers'
    expressions.

    Args:
        logp, ref_logp: the same shape, any; floating (promoted to a common dtype).
        kind: an estimator name above (the error lists the valid ones).
        convention: ``"verl"``, ``"openrlhf"`` or ``"openrlhf_unclamped"``.

    Returns:
        The inputs' shape. Extra memory: none beyond the output.

    >>> fastrl.credit.kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), "k3")
    tensor([0.1065, 0.7183])
    """
    if _extension.use_reference():
        return _ref.kl_penalty(logp, ref_logp, kind, convention=convention)
    return torch.ops.fastrl.kl_penalty(logp, ref_logp, kind, convention)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0, clip: float | tuple[float, float] | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level rewards from outcome scores, OpenRLHF ``compute_reward`` / TRL PPO style::

        r[b, t] = (clamp(scores[b], lo, hi) if t is row b's last valid token else 0)
                  - kl_coef * kl[b, t]        at tokens with mask 1
        r[b, t] = 0                           at tokens with mask 0

    One pass over the tokens (each row walked once from its end). A row with no valid token gets
    all zeros: its score is dropped (OpenRLHF's ``argmax`` would put it on the row's last position,
    TRL's on the position before the first padding token).

    Args:
        scores: ``[B]`` floating outcome scores.
        mask: ``[B, T]`` 0/1 (padded), or ``[N]`` with ``cu_seqlens`` (packed rows).
        kl: optional per-token KL, ``mask``'s shape (e.g. :func:`kl_penalty`); ``None`` = no penalty.
        kl_coef: >= 0 (OpenRLHF silently turns a negative one into 0; here it is an error).
        clip: ``None``, ``c > 0`` (``[lo, hi] = [-c, c]``) or a ``(lo, hi)`` pair, ``lo <= hi``:
            the scores are clipped to ``[lo, hi]`` first (OpenRLHF's ``reward_clip_range``, which
            may be asymmetric).
        cu_seqlens: ``int64[B+1]`` row offsets for the packed layout.

    Returns:
        ``mask``'s shape, float64 if ``scores``/``kl`` promote to float64, else float32 (fp32
        arithmetic, bitwise OpenRLHF's ``last_reward + (-kl_coef * kl)`` at valid tokens for fp32
        inputs). Not differentiable (a reward).

    NaN/Inf are not errors and never spread: a NaN/Inf score lands on its row's last valid token
    only (``clip`` clamps an Inf into the range and keeps a NaN, as ``torch.clamp``; a row with no
    valid token drops it); a NaN/Inf ``kl`` at a valid token makes that token's reward NaN/Inf
    (also with ``kl_coef = 0``: ``0 * NaN`` and ``0 * Inf`` are NaN, as OpenRLHF's ``-kl_coef * kl``).
    Masked tokens are never read and hold 0 (OpenRLHF does not mask, so a NaN ``kl`` there is NaN
    in its output).

    >>> fastrl.credit.token_rewards(torch.tensor([1.0, 5.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]),
    ...                             kl=torch.full((2, 3), 0.5), kl_coef=0.1, clip=2.0)
    tensor([[-0.0500,  0.9500,  0.0000],
            [-0.0500, -0.0500,  1.9500]])
    """
    if _extension.use_reference():
        return _ref.token_rewards(scores, mask, kl=kl, kl_coef=kl_coef, clip=clip, cu_seqlens=cu_seqlens)
    if isinstance(clip, (tuple, list)):  # a range: clamp the [B] scores here, the op clips symmetrically
        lo, hi = _ref.clip_range(clip)
        scores, clip = scores.clamp(min=lo, max=hi), None
    return torch.ops.fastrl.token_rewards(scores, mask, kl, cu_seqlens, float(kl_coef),
                                          None if clip is None else float(clip))


def segment_reduce(x: torch.Tensor, mask: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                   reduce: str = "sum") -> torch.Tensor:
    """Per-sequence reduction of token values: ``[B, T]`` (+ ``mask``) or packed ``[N]`` (+ ``cu_seqlens``) -> ``[B]``.

    With ``V_b`` the valid tokens of row ``b`` (``mask == 1``; every token when ``mask`` is None) and
    ``n_b = |V_b|``::

        "sum"      out_b = sum_{t in V_b} x_t
        "mean"     out_b = sum_{t in V_b} x_t / n_b                  (0 when n_b = 0)
        "geomean"  out_b = exp(sum_{t in V_b} x_t / n_b)             (1 = exp(0) when n_b = 0)
        "last"     out_b = x at the last t in V_b                    (0 when n_b = 0)

    ``"geomean"`` takes ``x`` in log space: with ``x = logp - old_logp`` it is the geometric mean of
    the token ratios, GSPO's sequence-level importance ratio
    ``s_b = exp(mean_t (logp_t - old_logp_t)) = (prod_t pi(y_t) / pi_old(y_t)) ** (1 / n_b)``.
    Masked tokens never reach the result (a NaN there is ignored).

    Args:
        x: ``[B, T]`` (padded) or ``[N]`` (packed), floating (float32/float64/bfloat16/float16).
        mask: ``x``'s shape, 0/1 (bool, uint8, int32, int64, float32, float64), or None (all valid).
        cu_seqlens: ``int64[B+1]`` row offsets for the packed layout (0, non-decreasing, ending at N).
        reduce: ``"sum"``, ``"mean"``, ``"geomean"`` or ``"last"`` (``ValueError`` otherwise).

    Returns:
        ``[B]``, float64 for float64 ``x`` else float32, accumulated in fp64 in token order (rows in
        parallel; deterministic whatever the thread count). Differentiable in ``x`` (a compiled
        backward: ``g * mask`` for sum, ``g * mask / n_b`` for mean, ``g * out_b * mask / n_b`` for
        geomean, ``g`` at the last valid token for last; 0 for an empty row). On CUDA: one block
        per row, fp64 partial sums merged in a fixed order (deterministic; equal to the CPU's up
        to fp64 rounding); mask values and ``cu_seqlens`` are not checked there (no host sync).

    >>> x = torch.tensor([[0.1, 0.3, 9.0], [-0.2, 0.0, 0.0]]); m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> fastrl.credit.segment_reduce(x, m, reduce="mean")
    tensor([ 0.2000, -0.2000])
    >>> fastrl.credit.segment_reduce(x[m.bool()], cu_seqlens=torch.tensor([0, 2, 3]), reduce="geomean")
    tensor([1.2214, 0.8187])
    """
    if _extension.use_reference():
        return _ref.segment_reduce(x, mask, cu_seqlens=cu_seqlens, reduce=reduce)
    return torch.ops.fastrl.segment_reduce(x, mask, cu_seqlens, reduce)


def implicit_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float, *, mask: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, step_ends: torch.Tensor | None = None) -> torch.Tensor:
    """PRIME's implicit process rewards: ``r_t = beta * (logp_t - ref_logp_t)`` per token, or summed
    per reasoning step and placed at the step's last token, ready as the ``rewards`` of :func:`gae`
    or :func:`discounted_returns` (add the outcome score with :func:`token_rewards`).

    Without ``step_ends``: ``r_t`` at valid tokens, 0 at masked ones. With ``step_ends`` (0/1 flags,
    1 on a step's last token)::

        out[e_k] = sum_{t in step k, mask_t = 1} r_t     at e_k, the last valid token of step k
        out[t]   = 0                                      everywhere else

    A flag on a masked token closes the step at the valid token before it; the tokens after a
    row's last flag form a final step ending at the row's last valid token (so all-zero
    ``step_ends`` is PRIME's whole-response granularity: the row sum at its last valid token); a
    step with no valid token writes nothing.

    Args:
        logp, ref_logp: ``[B, T]`` (padded) or ``[N]`` (packed, with ``cu_seqlens``), floating.
        beta: finite (PRIME: 0.05).
        mask: 0/1, ``logp``'s shape, or None (every token valid).
        cu_seqlens: ``int64[B+1]`` row offsets for the packed layout.
        step_ends: 0/1 flags, ``logp``'s shape, or None (per-token rewards).

    Returns:
        ``logp``'s shape, float64 for float64 inputs else float32: ``r_t`` computed in that type
        (``d = logp - ref_logp`` first, then ``beta * d``), step sums accumulated in fp64 in token
        order and rounded once. Not differentiable (a reward; PRIME's PRM loss differentiates the
        log-ratio sum, :func:`segment_reduce`). On CUDA: per-token rewards elementwise; step sums
        with one block per row, each step summed by one thread in token order, so the results are
        bitwise the CPU's (the latency is that of the longest step: a row without flags is walked
        by one thread). Mask values, ``step_ends`` flags and ``cu_seqlens`` are not checked on CUDA
        (no host sync; a nonzero value counts as 1).

    NaN/Inf are not errors and never spread: a NaN/Inf in ``logp``/``ref_logp`` at a valid token
    makes that token's reward NaN/Inf (``inf - inf`` and ``beta = 0`` times an Inf are NaN), or,
    with ``step_ends``, its step's sum, written at the step's last valid token; other tokens and
    steps are unaffected. Masked tokens are never read (0, and left out of the step sums).

    >>> lp = torch.tensor([[-1.0, -2.0, -0.5, -1.0]]); ref = torch.tensor([[-1.5, -1.0, -0.5, -2.0]])
    >>> fastrl.credit.implicit_rewards(lp, ref, 0.1)
    tensor([[ 0.0500, -0.1000,  0.0000,  0.1000]])
    >>> fastrl.credit.implicit_rewards(lp, ref, 0.1, step_ends=torch.tensor([[0, 1, 0, 0]]))
    tensor([[ 0.0000, -0.0500,  0.0000,  0.1000]])
    """
    if _extension.use_reference():
        return _ref.implicit_rewards(logp, ref_logp, beta, mask=mask, cu_seqlens=cu_seqlens, step_ends=step_ends)
    return torch.ops.fastrl.implicit_rewards(logp, ref_logp, mask, cu_seqlens, step_ends, float(beta))


# ----------------------------------------------------------------------------------- fake kernels


def _broadcast_fake(values, mask, cu_seqlens=None):
    return mask.new_empty(mask.shape, dtype=torch.promote_types(values.dtype, mask.dtype))


def _broadcast_setup(ctx, inputs, output):
    values, mask, cu_seqlens = inputs
    ctx.save_for_backward(mask, cu_seqlens)
    ctx.values_dtype = values.dtype


def _broadcast_backward(ctx, grad):
    mask, cu_seqlens = ctx.saved_tensors
    g = torch.ops.fastrl.segment_reduce(grad * mask, None, cu_seqlens, "sum")  # per-row sums, fp64
    return g.to(ctx.values_dtype), None, None


def _token_dtype(*dtypes: torch.dtype) -> torch.dtype:
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    return torch.float64 if common == torch.float64 else torch.float32


def _gae_fake(rewards, values, mask, cu_seqlens, gamma, lam, dones=None, mode="skip", turn_gamma=0.0, turn_lam=1.0,
              whiten=False):
    dtype = _token_dtype(rewards.dtype, values.dtype)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _returns_fake(rewards, mask, cu_seqlens, gamma, mode, dones=None, turn_gamma=0.0):
    return rewards.new_empty(rewards.shape, dtype=_token_dtype(rewards.dtype))


def _returns_whiten_fake(rewards, mask, cu_seqlens, gamma, mode, dones=None, turn_gamma=0.0):
    return tuple(_returns_fake(rewards, mask, cu_seqlens, gamma, mode) for _ in range(2))


def _moments_fake(x, mask):
    return tuple(x.new_empty((), dtype=torch.float64) for _ in range(3))


def _whiten_fake(x, mask_or_moments, shift_mean, unbiased, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _kl_fake(logp, ref_logp, kind, convention):
    dtype = torch.promote_types(logp.dtype, ref_logp.dtype) if convention == "verl" else torch.float32
    return logp.new_empty(logp.shape, dtype=dtype)


def _kl_backward_fake(grad, logp, ref_logp, kind, convention):
    return logp.new_empty(logp.shape, dtype=torch.promote_types(logp.dtype, ref_logp.dtype))


def _kl_setup(ctx, inputs, output):
    logp, ref_logp, kind, convention = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind, ctx.convention = kind, convention


def _kl_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    g = torch.ops.fastrl.kl_penalty_backward(grad, logp, ref_logp, ctx.kind, ctx.convention)
    grad_logp = g.to(logp.dtype) if ctx.needs_input_grad[0] else None
    grad_ref = g.neg().to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
    return grad_logp, grad_ref, None, None


def _token_rewards_fake(scores, mask, kl, cu_seqlens, kl_coef, clip):
    dtypes = (scores.dtype,) if kl is None else (scores.dtype, kl.dtype)
    return mask.new_empty(mask.shape, dtype=_token_dtype(*dtypes))


def _implicit_fake(logp, ref_logp, mask, cu_seqlens, step_ends, beta):
    return logp.new_empty(logp.shape, dtype=_token_dtype(logp.dtype, ref_logp.dtype))


def _segment_fake(x, mask, cu_seqlens, reduce):
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty((rows,), dtype=_token_dtype(x.dtype))


def _segment_backward_fake(grad, x, mask, cu_seqlens, reduce):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _segment_setup(ctx, inputs, output):
    x, mask, cu_seqlens, reduce = inputs
    ctx.save_for_backward(x, mask, cu_seqlens)
    ctx.reduce = reduce


def _segment_backward(ctx, grad):
    x, mask, cu_seqlens = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fastrl.segment_reduce_backward(grad, x, mask, cu_seqlens, ctx.reduce)
    return grad_x, None, None, None


if _extension._C is not None:
    torch.library.register_fake("fastrl::broadcast_to_tokens")(_broadcast_fake)
    torch.library.register_autograd("fastrl::broadcast_to_tokens", _broadcast_backward, setup_context=_broadcast_setup)
    torch.library.register_fake("fastrl::gae")(_gae_fake)
    torch.library.register_fake("fastrl::discounted_returns")(_returns_fake)
    torch.library.register_fake("fastrl::discounted_returns_whiten")(_returns_whiten_fake)
    torch.library.register_fake("fastrl::masked_moments")(_moments_fake)
    torch.library.register_fake("fastrl::masked_whiten")(_whiten_fake)
    torch.library.register_fake("fastrl::whiten_with_moments")(_whiten_fake)
    torch.library.register_fake("fastrl::kl_penalty")(_kl_fake)
    torch.library.register_fake("fastrl::kl_penalty_backward")(_kl_backward_fake)
    torch.library.register_autograd("fastrl::kl_penalty", _kl_backward, setup_context=_kl_setup)
    torch.library.register_fake("fastrl::token_rewards")(_token_rewards_fake)
    torch.library.register_fake("fastrl::segment_reduce")(_segment_fake)
    torch.library.register_fake("fastrl::segment_reduce_backward")(_segment_backward_fake)
    torch.library.register_autograd("fastrl::segment_reduce", _segment_backward, setup_context=_segment_setup)
    torch.library.register_fake("fastrl::implicit_rewards")(_implicit_fake)
