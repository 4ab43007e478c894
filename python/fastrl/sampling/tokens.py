"""Token sampling from logits with top-k / top-p / min-p, returning the log-probs importance sampling needs.

No sort of the vocabulary: per row a max pass, an exp pass, a partial selection for the top-k
threshold (streaming filter + nth_element on the CPU, radix select on the GPU), a selection for the
top-p threshold (a histogram of the probability mass over bins of the probability, then a weighted
quickselect inside one bin on the CPU; a weighted radix select on the GPU) and an inverse-CDF scan with one uniform per row. The uniforms come from ``torch.rand(generator=...)``,
so a seeded generator reproduces the tokens, and the CPU and CUDA kernels pick the same tokens from
the same uniforms (up to expf rounding). See :func:`sample`.
"""
from __future__ import annotations

import numbers

import torch

from fastrl import _extension
from fastrl.reference import token_sampling as _ref

__all__ = ["sample", "sample_with_uniforms"]


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _param(name, value, lead, device, dtype, check, expected):
    """A scalar parameter, validated (returned as a Python number), or a per-row tensor of shape
    ``lead`` flattened to ``[N]`` in ``dtype`` on ``device`` (its values are checked by the op)."""
    if isinstance(value, torch.Tensor):
        if value.shape != lead:
            raise ValueError(f"fastrl.sampling.sample: `{name}` as a tensor must have shape logits.shape[:-1] = "
                             f"{tuple(lead)}, got {tuple(value.shape)}")
        if dtype == torch.int64 and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise ValueError(f"fastrl.sampling.sample: `{name}` as a tensor must have an integer dtype, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"fastrl.sampling.sample: `{name}` is on {value.device} but `logits` is on {device}")
        return value.reshape(-1).to(dtype)
    if not _is_number(value) or (dtype == torch.int64 and not isinstance(value, numbers.Integral)):
        kind = "an int" if dtype == torch.int64 else "a float"
        raise ValueError(f"fastrl.sampling.sample: `{name}` must be {kind} or a tensor of shape logits.shape[:-1], "
                         f"got {value!r}")
    if not check(value):
        raise ValueError(f"fastrl.sampling.sample: `{name}` must be {expected}, got {value!r}")
    return value


def sample_with_uniforms(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None,
                         min_p=None):
    """:func:`sample` with the uniforms given: ``uniforms`` float64 ``logits.shape[:-1]`` in ``[0, 1)``
    (one per row; the same uniforms give the same tokens on the CPU and on CUDA)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("fastrl.sampling.sample: `logits` must be a floating tensor of shape [..., V]")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"fastrl.sampling.sample: `logits` must have a vocabulary dimension of size >= 1, got shape "
                         f"{tuple(logits.shape)}")
    if not isinstance(uniforms, torch.Tensor) or uniforms.shape != lead:
        raise ValueError(f"fastrl.sampling.sample: `uniforms` must be a tensor of shape logits.shape[:-1] = "
                         f"{tuple(lead)}")
    dev = logits.device
    finite_pos = lambda t: t > 0 and t != float("inf")  # noqa: E731  (NaN fails both)
    t = _param("temperature", temperature, lead, dev, torch.float64, finite_pos, "a finite number > 0 (greedy "
               "decoding is top_k=1)")
    k = None if top_k is None else _param("top_k", top_k, lead, dev, torch.int64, lambda v: v >= 1, ">= 1")
    p = None if top_p is None else _param("top_p", top_p, lead, dev, torch.float64, lambda v: 0 < v <= 1, "in (0, 1]")
    mp = None if min_p is None else _param("min_p", min_p, lead, dev, torch.float64, lambda v: 0 <= v <= 1,
                                           "in [0, 1]")
    flat = logits.detach().reshape(-1, vocab)
    u = uniforms.detach().reshape(-1).to(device=dev, dtype=torch.float64)
    if _extension.use_reference():
        tok, lp, raw = _ref.sample(flat, u, temperature=t, top_k=k, top_p=p, min_p=mp)
        tok, lp, raw = tok.to(dev), lp.float().to(dev), raw.float().to(dev)
    else:
        rows = lambda v: v if isinstance(v, torch.Tensor) else None  # noqa: E731
        scalar = lambda v, default: default if v is None or isinstance(v, torch.Tensor) else v  # noqa: E731
        tok, lp, raw = torch.ops.fastrl.sample_tokens(
            flat, u, float(scalar(t, 1.0)), int(min(scalar(k, vocab), vocab)), float(scalar(p, 1.0)),
            float(scalar(mp, 0.0)), rows(t), rows(k), rows(p), rows(mp))
    return tok.view(lead), lp.view(lead), raw.view(lead)


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
           generator: torch.Generator | None = None):
    """Sample one token per row of ``logits`` after temperature, top-k, top-p and min-p, with its log-probs.

    Processors, in this order (HF / vLLM): with ``z = logits * (1 / temperature)`` (fp32) and
    ``p = softmax(z)``:

    1. top-k: keep ``z_j >= t_k``, ``t_k`` the k-th largest ``z``. Every token tied with the k-th
       value is kept (so more than ``k`` may survive ties); ``top_k >= V`` keeps all.
    2. top-p, over the top-k-renormalized distribution ``q``: keep ``q_j >= v``, with ``v`` the
       largest value such that ``sum_{q_i >= v} q_i >= top_p`` -- the smallest set of most likely
       tokens with mass ``>= top_p``, ties with the boundary token all kept. ``top_p = 1`` keeps all.
    3. min-p: keep ``p_j >= min_p * max_i p_i`` (relative to the most likely token, so the same
       before or after the renormalizations above).

    The token is drawn from the kept set renormalized, by inverse CDF in vocabulary order with one
    uniform per row from ``torch.rand(generator=generator)``: a seeded generator gives the same
    tokens run to run, whatever the thread count. Greedy decoding is ``top_k=1``.

    Numerics: each token's mass is ``floor(exp(z_j - max z) * 2^44)`` as an integer, so every
    threshold and the CDF are exact integer sums (order-independent, equal on CPU and CUDA); tokens
    less likely than ``5.7e-14`` times the most likely one are never drawn.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64 (computed in fp32), ``V < 2^20``.
            ``-inf`` entries are allowed (probability 0).
        temperature: float, finite ``> 0``, or a per-row tensor of shape ``logits.shape[:-1]``.
        top_k: None or int ``>= 1`` (or a per-row integer tensor).
        top_p: None or float in ``(0, 1]`` (or a per-row tensor).
        min_p: None or float in ``[0, 1]`` (or a per-row tensor).
        generator: the ``torch.Generator`` the uniforms are drawn from (default: torch's default
            generator of ``logits.device``); a generator on another device gives the uniforms there,
            then they are copied.

    Returns:
        ``(tokens, logprobs, raw_logprobs)``, each of shape ``logits.shape[:-1]``: int64 token ids;
        float32 ``log q(token)`` under the processed (truncated, renormalized) distribution; float32
        ``log p(token)`` under the temperature-scaled distribution before truncation (what
        importance-sampling corrections against the training policy need).

    Bad input: a parameter out of range raises ``ValueError`` naming it (per-row tensors: a
    ``RuntimeError`` from the CPU op naming the first bad row; on CUDA, without a host sync, such a
    row gets token -1 and NaN log-probs). A row holding NaN or ``+inf`` (after scaling), or only
    ``-inf``, cannot be sampled: ``RuntimeError`` on the CPU, token -1 and NaN log-probs on CUDA.
    An empty batch (``N = 0`` rows) returns empty outputs. Extra memory: per CPU thread, buffers of
    about ``3 V`` floats; on CUDA none.

    >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, float("-inf")]])
    >>> tok, lp, raw = sample(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    >>> tok, lp, raw
    (tensor([1, 2]), tensor([-1.3133, -0.0949]), tensor([-1.4952, -0.0949]))
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("fastrl.sampling.sample: `logits` must be a floating tensor of shape [..., V]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"fastrl.sampling.sample: `generator` must be a torch.Generator or None, got "
                         f"{type(generator).__name__}")
    gen_device = generator.device if generator is not None else logits.device
    uniforms = torch.rand(logits.shape[:-1], generator=generator, dtype=torch.float64, device=gen_device)
    return sample_with_uniforms(logits, uniforms.to(logits.device), temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p)


def _fake(logits, uniforms, temperature, top_k, top_p, min_p, temperature_rows, top_k_rows, top_p_rows, min_p_rows):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32))


if _extension._C is not None:
    torch.library.register_fake("fastrl::sample_tokens")(_fake)
