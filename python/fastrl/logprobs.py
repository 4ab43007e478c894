"""Log-prob gathering from logits: ``log p(label)``, entropy and logsumexp of ``softmax(logits / T)``.

The public function is :func:`fastrl.logprobs` (this module is also reachable as
``fastrl.logprobs_ops``, since the name ``fastrl.logprobs`` is the function).

One streaming pass over each row with an online max / sum of exponentials in fp32 (and the online
sum of ``p * z`` for the entropy): no ``[N, V]`` temporary is allocated, forward or backward (the
backward writes the gradient into one new buffer the size of the logits, as autograd needs, or with
``inplace_backward=True`` into the logits themselves).
A row's result depends only on that row (batch invariant, bitwise, whatever the thread count).
:func:`vocab_parallel_logprobs` computes the same from logits sharded over the vocabulary across a
tensor-parallel group (the per-shard row statistics combined with torch.distributed all-reduces; one
or K labels per position, in-place backward, no host sync on CUDA).
"""
from __future__ import annotations

import math

import torch

from fastrl import _extension
from fastrl.reference import logprobs as _ref

__all__ = ["logprobs", "vocab_parallel_logprobs"]


def _flatten(logits: torch.Tensor, labels: torch.Tensor, temperature: float, name: str = "fastrl.logprobs",
             min_vocab: int = 1, logits_name: str = "logits"):
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"{name}: `{logits_name}` must be a tensor of shape [..., V]")
    if logits.shape[-1] < min_vocab:
        raise ValueError(f"{name}: `{logits_name}` must have a vocabulary dimension of size >= 1, got shape "
                         f"{tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name}: `labels` must be an integer tensor of shape logits.shape[:-1]")
    # here, not only in the C++ op: the dispatcher picks the kernel from all the arguments' devices,
    # so CPU logits with meta labels would run the fake kernel and return uninitialised memory
    if labels.device != logits.device:
        raise ValueError(f"{name}: `labels` is on {labels.device} but `{logits_name}` is on {logits.device}; "
                         "move both to the same device")
    lead = tuple(logits.shape[:-1])
    topk = labels.dim() == logits.dim() and tuple(labels.shape[:-1]) == lead
    if tuple(labels.shape) != lead and not topk:
        raise ValueError(f"{name}: `labels` must have shape logits.shape[:-1] = {lead} (one label per "
                         f"position) or {lead + ('K',)} (K labels per position), got {tuple(labels.shape)}")
    if labels.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        labels = labels.long()
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"{name}: `temperature` must be a float, got {type(temperature).__name__}")
    rows = math.prod(lead)  # not -1: a shard may have V = 0 columns
    flat_labels = labels.reshape(rows, labels.shape[-1]) if topk else labels.reshape(rows)
    return logits.reshape(rows, logits.shape[-1]), flat_labels


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
             return_lse: bool = False, ignore_index: int = -100, inplace_backward: bool = False):
    """Log-probability of each label under ``softmax(logits / temperature)``, without a ``[N, V]`` temporary.

    With ``z = logits / T`` (computed as ``logits * (1 / T)`` in fp32) per row of ``V`` logits::

        lse      = log sum_j exp(z_j)
        logprob  = z[label] - lse                    (0 where label == ignore_index)
        entropy  = -sum_j p_j log p_j = lse - sum_j p_j z_j,   p = softmax(z)

    Gradients (one compiled pass per row, into a new buffer of the logits' shape and dtype, or into
    the logits themselves with ``inplace_backward=True``)::

        d logprob_k / d logits_j = ([j == label_k] - p_j) / T     (none for ignored labels)
        d entropy / d logits_j = -p_j (log p_j + entropy) / T
        d lse     / d logits_j = p_j / T

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 is accepted and computed in fp32),
            any leading shape; the last dimension is made contiguous if it is not (a copy).
        labels: integer ``[...]`` = ``logits.shape[:-1]`` (int64; narrower integers are widened), or
            ``[..., K]`` for K labels per position (top-K candidates, as TRL gathers): one pass per
            row for the logsumexp, the K log-probs read off it. A label outside ``[0, V)`` other
            than ``ignore_index`` raises a ``RuntimeError`` naming the first bad (flattened)
            position on the CPU; on CUDA (no host sync) it gives NaN.
        temperature: ``T > 0``, finite.
        return_entropy, return_lse: also return the entropy / the logsumexp of ``z``.
        ignore_index: label value whose log-prob is 0 with no gradient. The entropy and lse of
            such a position are still those of its row (they do not depend on the label).
        inplace_backward: write the gradient into the logits' own storage (flash-attn's
            ``inplace_backward``), so the backward needs no second ``[N, V]`` buffer: peak memory
            ≈ the logits. **The logits tensor is overwritten by the backward and must not be used
            afterwards** (nor saved by another autograd node: torch then raises "modified by an
            inplace operation"). Needs logits that can be flattened to ``[N, V]`` without a copy
            (otherwise the copy is what gets overwritten, which is safe but saves nothing).

    Returns:
        ``logprobs`` float32 of ``labels``' shape; or the tuple ``(logprobs, entropy)``,
        ``(logprobs, lse)`` or ``(logprobs, entropy, lse)`` when asked, entropy and lse float32
        ``logits.shape[:-1]``.

    Special values, per row (an ignored label's log-prob is 0 in every case)::

        row of the logits                   log-prob                  entropy   lse
        finite and -inf (probability 0)     -inf on a -inf logit      finite    finite
        a +inf anywhere                     NaN                       NaN       NaN
        a NaN anywhere                      NaN                       NaN       NaN
        only -inf                           NaN                       NaN       -inf

    The gradient of a row whose entropy is NaN is NaN in every element, whatever the label
    (ignored too). The CUDA kernel gives the same results for these rows (same state merge,
    ``fastrl/logprobs.h``). ``V = 1`` gives log-prob 0, entropy 0.
    Extra memory: the float32 outputs only (forward); the gradient buffer (backward; none with
    ``inplace_backward=True``). K labels per position: the backward's one-hot terms cost O(K^2) per
    row on the CPU and K compares per element on CUDA, so K is meant to be small (top-K candidates).

    >>> logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> fastrl.logprobs(logits, torch.tensor([2, -100]), return_entropy=True)
    (tensor([-0.4076,  0.0000]), tensor([0.8324, 1.0986]))
    >>> fastrl.logprobs(logits, torch.tensor([[2, 1], [0, -100]]))  # K = 2 labels per position
    tensor([[-0.4076, -1.4076],
            [-1.0986,  0.0000]])
    """
    flat_logits, flat_labels = _flatten(logits, labels, temperature)
    lead = logits.shape[:-1]
    if _extension.use_reference():
        if temperature <= 0:
            raise ValueError(f"fastrl.logprobs: `temperature` must be > 0, got {temperature}")
        lp, ent, lse = (t.float() for t in _ref.logprobs(flat_logits, flat_labels, temperature=temperature,
                                                         ignore_index=ignore_index))
    elif inplace_backward and flat_logits.requires_grad and torch.is_grad_enabled():
        if flat_logits.stride(-1) != 1:
            flat_logits = flat_logits.contiguous()  # the copy is what the backward overwrites
        lp, ent, lse = _InplaceBackward.apply(flat_logits, flat_labels, float(temperature), int(ignore_index),
                                              bool(return_entropy))
    else:
        lp, ent, lse = torch.ops.fastrl.logprobs(flat_logits, flat_labels, float(temperature), int(ignore_index),
                                                 bool(return_entropy))
    out = [lp.view(labels.shape)]
    if return_entropy:
        out.append(ent.view(lead))
    if return_lse:
        out.append(lse.view(lead))
    return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------- fake kernels, autograd


def _fake(logits, labels, temperature, ignore_index, compute_entropy):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(labels.shape, **f32), logits.new_empty(n if compute_entropy else 0, **f32),
            logits.new_empty(n, **f32))


def _backward_fake(logits, labels, lse, entropy, grad_logprobs, grad_entropy, grad_lse, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.compute_entropy = temperature, ignore_index, compute_entropy


def _backward(ctx, grad_lp, grad_ent, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.compute_entropy:
        grad_ent, entropy = None, None
    grad = torch.ops.fastrl.logprobs_backward(logits, labels, lse, entropy, grad_lp, grad_ent, grad_lse,
                                              ctx.temperature, ctx.ignore_index)
    return grad, None, None, None, None


class _InplaceBackward(torch.autograd.Function):
    """``fastrl::logprobs`` whose backward overwrites the saved logits with their gradient
    (``fastrl::logprobs_backward_``) and returns that same storage as the gradient."""

    @staticmethod
    def forward(logits, labels, temperature, ignore_index, compute_entropy):
        return torch.ops.fastrl.logprobs(logits, labels, temperature, ignore_index, compute_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if not ctx.compute_entropy:
            grad_ent, entropy = None, None
        torch.ops.fastrl.logprobs_backward_(logits, labels, lse, entropy, grad_lp, grad_ent, grad_lse,
                                            ctx.temperature, ctx.ignore_index)
        # the C++ op does not bump the version counter: do it, so that another autograd node that
        # saved these logits raises "modified by an inplace operation" instead of reading gradients
        torch.autograd.graph.increment_version(logits)
        return logits, None, None, None, None


if _extension._C is not None:
    torch.library.register_fake("fastrl::logprobs")(_fake)
    torch.library.register_fake("fastrl::logprobs_backward")(_backward_fake)
    torch.library.register_fake("fastrl::logprobs_backward_")(lambda *args: None)
    torch.library.register_autograd("fastrl::logprobs", _backward, setup_context=_setup)


# ------------------------------------------------------------------------- vocab-parallel (tensor-parallel shards)

_NOT_LOCAL = -1  # a shard's label for "ignored, or on another shard": never a local index (ignore_index may be one)


def vocab_parallel_logprobs(logits_shard: torch.Tensor, labels: torch.Tensor, *, process_group,
                            vocab_start_index: int | None = None, temperature: float = 1.0,
                            return_entropy: bool = False, ignore_index: int = -100, inplace_backward: bool = False):
    """:func:`fastrl.logprobs` of logits sharded over the vocabulary across a tensor-parallel group.

    Rank ``r`` of ``process_group`` holds ``logits_shard = logits[..., s_r : s_r + V_r]`` (a contiguous
    slice of the vocabulary) and the same global ``labels`` as every other rank; every rank gets the
    same (replicated) log-probs, as Megatron's ``vocab_parallel_cross_entropy`` / verl's
    ``vocab_parallel_log_probs_from_logits`` (which return their negation, without ignore_index,
    temperature or entropy). Each shard's row statistics come from the compiled kernel (one pass,
    no ``[N, V_r]`` temporary); with ``z = logits / T`` they are combined by one all-reduce MAX of
    ``[N]`` and one all-reduce SUM of ``[N (2 + K)]`` float32 (nothing ``[N, V]`` is gathered)::

        m = max_r lse_r,   e_r = exp(lse_r - m),   S = sum_r e_r,   lse = m + log S
        logprob = z[label] - lse                   (z[label] summed from the rank that owns the label)
        entropy = sum_r e_r (H_r + m - lse_r) / S + log S       (H_r, lse_r: the shard's own entropy, lse)

    Gradient wrt each shard (the kernel's backward given the *global* lse and entropy; no
    collective): ``([j == label] - p_j) / T`` for the log-prob and ``-p_j (log p_j + H) / T`` for the
    entropy, ``p = exp(z - lse)``; the grad_outputs must be the same on every rank (as with a loss
    computed from the replicated outputs).

    Args:
        logits_shard: ``[..., V_r]`` float32 / bfloat16 / float16. Shards may differ in size; an empty
            shard (``V_r = 0``) contributes nothing (its start must be a shard boundary).
        labels: int64 global ids in ``[0, V)`` or ``ignore_index``, identical on every rank:
            ``logits_shard.shape[:-1]`` (one label per position) or ``[..., K]`` (K labels per position,
            e.g. top-K candidates, as :func:`fastrl.logprobs`). A label outside ``[0, V)`` raises
            ``ValueError`` on every rank for CPU tensors; on CUDA (no host sync) its log-prob is NaN,
            with no gradient.
        process_group: the tensor-parallel ``torch.distributed`` group (gloo on CPU, NCCL on GPU; ``None``
            is the default group). Every rank of it must call, with the same leading shape.
        vocab_start_index: this rank's ``s_r``. Default: rank ``r`` starts at the sum of the shard sizes
            of ranks ``< r``, i.e. ``rank * V_r`` when all shards are equal (Megatron's layout). Given,
            it must be given on every rank. The shards must tile ``[0, V)`` without gap or overlap: for
            CPU tensors every rank raises ``ValueError`` otherwise; on CUDA (no host sync) every
            log-prob (but the ignored ones, 0) and entropy is NaN.
        temperature, return_entropy, ignore_index: as :func:`fastrl.logprobs` (ignored labels give 0
            with no gradient; their entropy is still their row's).
        inplace_backward: as :func:`fastrl.logprobs`: the backward writes the gradient into the
            shard's own storage (no second ``[N, V_r]`` buffer); **the shard is overwritten and must not
            be used afterwards**.

    Returns:
        ``logprobs`` float32 ``labels.shape``, or ``(logprobs, entropy)`` with ``return_entropy=True``.

    Cost per call: one all_gather of 3 int64 per rank for the layout, kept on the device (no host
    sync on CUDA: the layout, the label checks and the combination are device ops; only CPU tensors
    are read on the host, for the ``ValueError``\\ s), then the two all-reduces above. Extra memory:
    O(N K) forward; the backward writes one gradient buffer the size of the shard (none with
    ``inplace_backward``). Results equal :func:`fastrl.logprobs` of the full logits up to float32
    rounding (the merge order differs), and are bitwise identical on every rank. Not traceable by
    torch.compile (collectives).

    Example, on each of 2 ranks (``tp_group`` a gloo group of both)::

        logits = torch.tensor([[1., 2., 3., 4., 5.], [0., 0., 0., 0., 0.]])
        shard = logits[:, :3] if rank == 0 else logits[:, 3:]
        fastrl.logprobs_ops.vocab_parallel_logprobs(shard, torch.tensor([4, 1]), process_group=tp_group,
                                                    return_entropy=True)
        # on both ranks: (tensor([-0.4519, -1.6094]), tensor([1.0000, 1.6094])),
        # as fastrl.logprobs(logits, torch.tensor([4, 1]), return_entropy=True)
        fastrl.logprobs_ops.vocab_parallel_logprobs(shard, torch.tensor([[4, 0], [1, -100]]),
                                                    process_group=tp_group)  # K = 2 labels per position
        # on both ranks: tensor([[-0.4519, -4.4519], [-1.6094, 0.0000]])
    """
    import torch.distributed as dist

    name = "fastrl.vocab_parallel_logprobs"
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}: torch.distributed must be initialized (the shards are combined over "
                           "`process_group`)")
    if not isinstance(logits_shard, torch.Tensor) or logits_shard.dim() < 1:
        raise ValueError(f"{name}: `logits_shard` must be a tensor of shape [..., V_r]")
    start, vocab, valid = _shard_layout(logits_shard.shape[-1], vocab_start_index, process_group,
                                        logits_shard.device, name)
    flat_logits, flat_labels = _flatten(logits_shard, labels, temperature, name, min_vocab=0,
                                        logits_name="logits_shard")
    if flat_labels.dtype != torch.int64:
        raise ValueError(f"{name}: `labels` must be an integer tensor, got dtype {labels.dtype}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: `temperature` must be a finite number > 0, got {temperature}")
    bad = (flat_labels != ignore_index) & ((flat_labels < 0) | (flat_labels >= vocab))
    if flat_labels.device.type == "cpu" and bool(bad.any()):
        i = int(bad.view(-1).nonzero()[0, 0])
        raise ValueError(f"{name}: `labels` must lie in [0, V={int(vocab)}) (the global vocabulary) or equal "
                         f"ignore_index={ignore_index}, got labels[{i}] = {int(flat_labels.view(-1)[i])} (position "
                         f"in the flattened `labels`)")
    inplace = inplace_backward and flat_logits.requires_grad and torch.is_grad_enabled()
    if inplace and flat_logits.shape[1] > 1 and flat_logits.stride(1) != 1:
        flat_logits = flat_logits.contiguous()  # the copy is what the backward overwrites
    lp, entropy = _VocabParallel.apply(flat_logits, flat_labels, bad, start, valid, float(temperature),
                                       int(ignore_index), bool(return_entropy), process_group, inplace)
    lp = lp.view(labels.shape)
    return (lp, entropy.view(logits_shard.shape[:-1])) if return_entropy else lp


def _shard_layout(shard_vocab: int, vocab_start_index, group, device, name: str):
    """``(this rank's vocab_start_index, global V, layout valid)`` as 0-dim device tensors, from one
    all_gather of (size, given, start) per rank; nothing is read on the host unless the tensors are
    on the CPU, where an invalid layout raises the same ValueError on every rank."""
    import torch.distributed as dist

    given = vocab_start_index is not None
    if given and (isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int)):
        raise ValueError(f"{name}: `vocab_start_index` must be an int or None, got {type(vocab_start_index).__name__}")
    # filled on the device (kernel arguments), not copied from the host: no copy that waits for the stream
    mine = torch.stack([torch.full((), v, dtype=torch.int64, device=device)
                        for v in (shard_vocab, int(given), vocab_start_index if given else 0)])
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    sizes, given_on, starts = torch.stack(rows).unbind(1)  # rank order
    all_given, none_given = given_on.bool().all(), ~given_on.bool().any()
    starts = torch.where(all_given, starts, sizes.cumsum(0) - sizes)
    order = torch.argsort(2 * starts + (sizes > 0).long())  # an empty shard before a non-empty one at its start
    ends = (starts + sizes)[order]
    tiles = (starts[order][0] == 0) & (starts[order][1:] == ends[:-1]).all()
    valid = (all_given | none_given) & tiles
    if device.type == "cpu":
        if not bool(all_given | none_given):
            raise ValueError(f"{name}: `vocab_start_index` must be given on every rank or on none, got it on ranks "
                             f"{given_on.nonzero().view(-1).tolist()} of {given_on.numel()}")
        if not bool(tiles):
            raise ValueError(f"{name}: the vocabulary shards must tile [0, V) without gaps or overlaps; got "
                             f"(vocab_start_index, shard size) per rank: "
                             f"{list(zip(starts.tolist(), sizes.tolist()))}")
    return starts[dist.get_rank(group)], sizes.sum(), valid


def _local_stats(logits, local_labels, temperature, compute_entropy):
    """The shard's own ``(entropy, lse)`` per row (float32; the entropy is empty unless asked); an
    empty shard has probability 0: lse = -inf, entropy 0."""
    n = logits.shape[0]
    if logits.shape[1] == 0:
        lse = logits.new_full((n,), -math.inf, dtype=torch.float32)
        return lse.new_zeros(n if compute_entropy else 0), lse
    if _extension.use_reference():
        _, entropy, lse = _ref.logprobs(logits, local_labels, temperature=temperature, ignore_index=_NOT_LOCAL)
        return (entropy.float() if compute_entropy else lse.new_empty(0, dtype=torch.float32)), lse.float()
    _, entropy, lse = torch.ops.fastrl.logprobs(logits, local_labels, temperature, _NOT_LOCAL, compute_entropy)
    return entropy, lse


class _VocabParallel(torch.autograd.Function):
    """Forward: the shard statistics and their combination over the group; backward: the shard's
    gradient from the global lse / entropy (``fastrl::logprobs_backward``, or ``logprobs_backward_``
    into the shard itself; no collective)."""

    @staticmethod
    def forward(ctx, logits, labels, bad, start, valid, temperature, ignore_index, compute_entropy, group, inplace):
        import torch.distributed as dist

        ctx.set_materialize_grads(False)
        n, shard = logits.shape
        ignored = labels == ignore_index
        local = labels - start
        owned = ~ignored & (local >= 0) & (local < shard)
        local_labels = torch.where(owned, local, _NOT_LOCAL)
        entropy_r, lse_r = _local_stats(logits, local_labels, temperature, compute_entropy)
        if shard:  # the label's scaled logit exactly as the kernel forms it: float(x) * float(1 / T)
            inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
            picked = local_labels.clamp(min=0).view(n, labels.shape[1] if labels.dim() == 2 else 1)
            label_logit = logits.gather(1, picked).view(labels.shape).float() * inv_t
        else:
            label_logit = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)

        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(m == -math.inf, 0.0, m)  # a row of only -inf: S = 0, lse = -inf (no -inf - -inf)
        e = torch.exp(lse_r - m)
        parts = [e, torch.where(owned, label_logit, 0.0).view(-1)]
        if compute_entropy:  # e_r * (H_r + m - lse_r) >= 0; a shard with probability 0 adds nothing
            parts.append(torch.where(e > 0, e * (entropy_r + (m - lse_r)), 0.0))
        sums = torch.cat(parts)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        s, label_z = sums[:n], sums[n:n + labels.numel()].view(labels.shape)
        log_s = s.log()
        lse = torch.where(valid, m + log_s, math.nan)  # an invalid layout (CUDA only): NaN everywhere
        row_lse = lse.unsqueeze(1) if labels.dim() == 2 else lse
        lp = torch.where(ignored, 0.0, torch.where(bad, math.nan, label_z - row_lse))
        entropy = lse.new_empty(0)
        if compute_entropy:
            entropy = torch.where(valid, sums[n + labels.numel():] / s + log_s, math.nan)
        remote = ~ignored & ~owned & ~bad  # labels whose one-hot term lives on another shard
        ctx.save_for_backward(logits, local_labels, lse, entropy, remote)
        ctx.temperature, ctx.compute_entropy, ctx.inplace = temperature, compute_entropy, inplace
        return lp, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, local_labels, lse, entropy, remote = ctx.saved_tensors
        # a remote label's log-prob depends on this shard through -lse only: its term is g_lse = -g_lp
        g_lse = None
        if grad_lp is not None:
            g_lse = -torch.where(remote, grad_lp, 0.0)
            g_lse = g_lse.sum(1) if g_lse.dim() == 2 else g_lse
        if grad_ent is None or not ctx.compute_entropy:
            grad_ent, entropy = None, None
        if (grad_lp is None and grad_ent is None) or logits.shape[1] == 0:
            return torch.zeros_like(logits), *(None,) * 9
        if _extension.use_reference():
            grad = _ref.logprobs_backward(logits, local_labels, lse, entropy, grad_lp, grad_ent, g_lse,
                                          temperature=ctx.temperature, ignore_index=_NOT_LOCAL).to(logits.dtype)
        elif ctx.inplace:
            torch.ops.fastrl.logprobs_backward_(logits, local_labels, lse, entropy, grad_lp, grad_ent, g_lse,
                                                ctx.temperature, _NOT_LOCAL)
            torch.autograd.graph.increment_version(logits)  # as _InplaceBackward: the saved shard is now its grad
            grad = logits
        else:
            grad = torch.ops.fastrl.logprobs_backward(logits, local_labels, lse, entropy, grad_lp, grad_ent, g_lse,
                                                      ctx.temperature, _NOT_LOCAL)
        return grad, *(None,) * 9
