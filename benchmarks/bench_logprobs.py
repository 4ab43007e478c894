"""Log-prob gathering from logits: fastrl.logprobs vs what trainers run today.

Inputs: ``[N, V]`` logits (N = 4,096 positions, V = 32,768; ``ctx.quick``: 256 x 4,096) in float32
and bfloat16, random labels. Baselines: torch eager ``log_softmax(-1).gather`` (materializes
``[N, V]`` fp32 log-softmax), TRL 1.16.0 ``selective_log_softmax`` and verl 0.9.1
``logprobs_from_logits`` (their CPU paths: a per-row logsumexp loop for fp32, a per-row
log_softmax for bf16). Forward, forward with entropy, and forward + backward (``autograd.grad``
of the summed log-probs, so the gradient buffer is counted but nothing accumulates).

fastrl returns fp32 log-probs for bf16 logits (the baselines: bf16), so the bf16 cases compare
at bf16 tolerance. Targets (issue 4): fp32 forward >= 3x TRL, bf16 forward >= 2x TRL.
bytes_moved: the logits read once (+ the gradient written once for fwd+bwd).

From hidden states (``linear_logprobs_*``): ``fastrl.linear_logprobs(hidden, weight, labels)`` (chunked
matmul + the row kernels, never ``[N, V]``) vs what a trainer does today: materialize
``hidden @ weight.T`` and call TRL's ``selective_log_softmax`` (or torch eager ``log_softmax.gather``).
On CUDA, "fastrl tf32x3" is the Triton path with ``FASTRL_LINEAR_LOGPROBS_FP32=tf32x3`` (fp32 tiles as three
TF32 tensor-core products instead of fp32 FMAs). Forward at N = 8,192, V = 65,536 (H = 128, so the matmul
stays affordable on a CPU), where the issue
asks for a peak extra memory <= 10 % of N * V * 4 bytes (= 205 MiB; compare the "peak extra" column,
the naive path's included); forward + backward (grads of hidden and weight) at N = 2,048, V = 32,768,
H = 256.

The price of batch invariance (``linear_logprobs`` computes every chunk's logits in fixed-height
``[tile, H]`` matmuls, the last tile padded): the "chunked mm (batch-dependent)" baseline is the same
chunked computation with one ``torch.mm`` per chunk of whatever height the batch leaves (so BLAS's
kernel, and a row's bits, depend on the batch), measured at the large N and at N = 100 rows, where
the padding to a 256-row tile costs the most.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import fastrl
from fastrl.bench import Case, Skip, allclose, try_import
from fastrl.linear_logprobs import linear_logprobs as fastrl_linear_logprobs


def _setup(N: int, V: int, dtype, device, grad: bool = False):
    def setup():
        gen = torch.Generator().manual_seed(0)
        logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(device)
        labels = torch.randint(0, V, (N,), generator=gen).to(device)
        return SimpleNamespace(logits=logits.requires_grad_(grad), labels=labels)
    return setup


def _eager_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _eager_logprobs_entropy(logits, labels):
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _check_pair(tol, names=("logprobs", "entropy")):
    def check(out, ref):
        for name, a, b in zip(names, out, ref):
            msg = allclose(a.float(), b.float(), tol, tol)
            if msg:
                return f"{name}: {msg}"
        return None
    return check


def _fwd_bwd(fn):
    def run(a):
        out = fn(a.logits, a.labels)
        return torch.autograd.grad(out.float().sum(), a.logits)[0]
    return run


def _linear_setup(N: int, V: int, H: int, device, grad: bool = False):
    def setup():
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=gen).to(device)
        weight = (torch.randn(V, H, generator=gen) * (3 / H ** 0.5)).to(device)
        labels = torch.randint(0, V, (N,), generator=gen).to(device)
        return SimpleNamespace(hidden=hidden.requires_grad_(grad), weight=weight.requires_grad_(grad), labels=labels)
    return setup


def _chunked_mm(a, rows: int = 256):
    """linear log-probs with one torch.mm per chunk of up to ``rows`` rows into a reused buffer (no padding,
    no fixed tile; fastrl's chunked path before batch invariance): cheaper for small batches, but a row's
    logits come from a BLAS kernel picked by the chunk's height."""
    n = a.hidden.shape[0]
    buf = a.hidden.new_empty(min(rows, n), a.weight.shape[0])  # one per call, reused by the chunks (as fastrl)
    out = []
    for s in range(0, n, rows):
        logits = torch.mm(a.hidden[s:s + rows], a.weight.t(), out=buf[:min(rows, n - s)])
        out.append(fastrl.logprobs(logits, a.labels[s:s + rows]))
    return torch.cat(out)


def _linear_fwd_bwd(fn):
    def run(a):
        return torch.autograd.grad(fn(a).float().sum(), (a.hidden, a.weight))
    return run


def _tf32x3(ctx, fn):
    """``fn`` with the Triton kernels' fp32 tiles multiplied as three TF32 products
    (``FASTRL_LINEAR_LOGPROBS_FP32=tf32x3``, not the default): CUDA only."""
    kernels = try_import("fastrl.triton.linear_logprobs") if ctx.device.type == "cuda" else Skip("Triton: CUDA only")
    if isinstance(kernels, Skip):
        return kernels

    def run(a):
        default, kernels.FP32_PRECISION = kernels.FP32_PRECISION, "tf32x3"
        try:
            return fn(a)
        finally:
            kernels.FP32_PRECISION = default
    return run


def linear_cases(ctx, trl) -> list[Case]:
    materialized = lambda fn: fn if isinstance(fn, Skip) else (  # noqa: E731
        lambda a: fn(a.hidden @ a.weight.t(), a.labels))
    trl_fn = trl if isinstance(trl, Skip) else trl.selective_log_softmax
    fused = lambda a: fastrl_linear_logprobs(a.hidden, a.weight, a.labels)  # noqa: E731
    out = []
    N, V, H = (512, 4096, 64) if ctx.quick else (8192, 65536, 128)
    out.append(Case(
        name="linear_logprobs_f32", shape=f"f32 hidden[{N}, {H}], weight[{V}, {H}], int64[{N}] labels",
        setup=_linear_setup(N, V, H, ctx.device),
        impls={"fastrl": fused, "fastrl tf32x3": _tf32x3(ctx, fused),
               "trl (materialized logits)": materialized(trl_fn),
               "torch-eager (materialized logits)": materialized(_eager_logprobs),
               "chunked mm (batch-dependent)": _chunked_mm},
        rtol=1e-4, atol=1e-4,
        note=f"log p(label) from hidden states; target (issue 4): fastrl peak extra <= 10% of N*V*4 = "
             f"{N * V * 4 // 10 / 2**20:.0f} MiB (chunk logits: 64 MiB budget)."))
    N = 100
    out.append(Case(
        name="linear_logprobs_small_batch_f32", shape=f"f32 hidden[{N}, {H}], weight[{V}, {H}], int64[{N}] labels",
        setup=_linear_setup(N, V, H, ctx.device),
        impls={"fastrl": fused, "fastrl tf32x3": _tf32x3(ctx, fused), "chunked mm (batch-dependent)": _chunked_mm,
               "torch-eager (materialized logits)": materialized(_eager_logprobs)},
        rtol=1e-4, atol=1e-4,
        note="a batch far below one matmul tile: the cost of batch invariance (a 256-row padded tile) at its "
             "highest."))
    N, V, H = (256, 4096, 64) if ctx.quick else (2048, 32768, 256)
    out.append(Case(
        name="linear_logprobs_fwd_bwd_f32", shape=f"f32 hidden[{N}, {H}], weight[{V}, {H}], int64[{N}] labels",
        setup=_linear_setup(N, V, H, ctx.device, grad=True),
        impls={"fastrl": _linear_fwd_bwd(fused), "fastrl tf32x3": _tf32x3(ctx, _linear_fwd_bwd(fused)),
               "trl (materialized logits)": trl_fn if isinstance(trl_fn, Skip) else _linear_fwd_bwd(materialized(trl_fn)),
               "torch-eager (materialized logits)": _linear_fwd_bwd(materialized(_eager_logprobs))},
        check=_check_pair(1e-3, ("grad hidden", "grad weight")),
        note="forward + autograd.grad of sum(log p) w.r.t. hidden and weight; fastrl recomputes the chunk logits."))
    return out


def cases(ctx) -> list[Case]:
    trl = try_import("trl.trainer.utils")
    verl = try_import("verl.utils.torch_functional")
    N, V = (256, 4096) if ctx.quick else (4096, 32768)
    out = []
    for dtype, name, tol, target in ((torch.float32, "f32", 1e-4, 3.0), (torch.bfloat16, "bf16", 3e-2, 2.0)):
        size = torch.finfo(dtype).bits // 8
        shape = f"{name}[{N}, {V}] logits, int64[{N}] labels"
        trl_fn = trl if isinstance(trl, Skip) else (lambda x, y: trl.selective_log_softmax(x, y))
        verl_fn = verl if isinstance(verl, Skip) else (lambda x, y: verl.logprobs_from_logits(x, y))
        impl = lambda fn: fn if isinstance(fn, Skip) else (lambda a: fn(a.logits, a.labels))
        grad_impl = lambda fn: fn if isinstance(fn, Skip) else _fwd_bwd(fn)
        out.append(Case(
            name=f"logprobs_{name}", shape=shape, setup=_setup(N, V, dtype, ctx.device),
            impls={"fastrl": lambda a: fastrl.logprobs(a.logits, a.labels),
                   "torch-eager": impl(_eager_logprobs), "trl": impl(trl_fn), "verl": impl(verl_fn)},
            bytes_moved=N * V * size, target={"trl": target}, rtol=tol, atol=tol,
            note="log p(label) only; fastrl: fp32 out, one streaming pass per row, no [N, V] temporary."))
        out.append(Case(
            name=f"logprobs_entropy_{name}", shape=shape, setup=_setup(N, V, dtype, ctx.device),
            impls={"fastrl": lambda a: fastrl.logprobs(a.logits, a.labels, return_entropy=True),
                   "torch-eager": impl(_eager_logprobs_entropy)},
            bytes_moved=N * V * size, check=_check_pair(tol),
            note="log p(label) and entropy together (compare its time with logprobs_* alone)."))
        out.append(Case(
            name=f"logprobs_fwd_bwd_{name}", shape=shape, setup=_setup(N, V, dtype, ctx.device, grad=True),
            impls={"fastrl": _fwd_bwd(lambda x, y: fastrl.logprobs(x, y)),
                   "torch-eager": _fwd_bwd(_eager_logprobs), "trl": grad_impl(trl_fn), "verl": grad_impl(verl_fn)},
            bytes_moved=N * V * size * 3, rtol=tol, atol=tol * 1e-2,
            note="forward + autograd.grad of sum(log p); output compared: the logits' gradient."))
    return out + issue_scale_cases(ctx) + linear_cases(ctx, trl)


class _Floor(tuple):
    """The output of a floor implementation (the matmuls alone): timed, never compared."""


def _rel_check(tol, names):
    """Each output within ``tol`` of the baseline's in relative norm (bf16 matmuls: elementwise
    tolerances would be set by the largest logits)."""
    def check(out, ref):
        if isinstance(ref, _Floor):
            return None
        out, ref = (out,) if torch.is_tensor(out) else out, (ref,) if torch.is_tensor(ref) else ref
        for name, a, b in zip(names, out, ref):
            err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
            if not err <= tol:
                return f"{name}: relative error {err:.3g} > {tol:g}"
        return None
    return check


def issue_scale_cases(ctx) -> list[Case]:
    """GPU shapes of issue 4's targets: the bf16 forward from logits at [16,384 x 152,064] (5 GB), and
    linear_logprobs at an LLM's size (hidden 4,096, vocabulary 152,064, bf16) against Liger's fused
    linear cross entropy (reduction="none": -log p per token) and the matmuls alone."""
    if ctx.device.type != "cuda" or ctx.quick:
        return []  # 5 GB of logits / a 1.25 GB lm_head: GPU cases
    dev = ctx.device
    N, V = 16384, 152064

    def setup(N=N, V=V):  # bound now: N and V are reassigned below for the linear cases
        gen = torch.Generator(device=dev).manual_seed(0)
        logits = (3 * torch.randn(N, V, generator=gen, device=dev)).to(torch.bfloat16)
        return SimpleNamespace(logits=logits, labels=torch.randint(0, V, (N,), generator=gen, device=dev))

    out = [Case(
        name="logprobs_bf16_16k_152k", shape=f"bf16[{N}, {V}] logits, int64[{N}] labels", setup=setup,
        impls={"fastrl": lambda a: fastrl.logprobs(a.logits, a.labels),
               "fastrl +entropy": lambda a: fastrl.logprobs(a.logits, a.labels, return_entropy=True)[0],
               "torch-eager": lambda a: _eager_logprobs(a.logits, a.labels)},
        bytes_moved=N * V * 2, rtol=3e-2, atol=3e-2,
        note="issue 4's GPU target: the forward at >= 80% of the measured copy bandwidth (bytes = one read of "
             "the logits; the % column compares them with a copy's read + write).")]

    liger = try_import("liger_kernel.ops.fused_linear_cross_entropy")
    N, V, H = 4096, 152064, 4096

    def lsetup(grad):
        def setup(N=N, V=V, H=H):
            gen = torch.Generator(device=dev).manual_seed(0)
            hidden = torch.randn(N, H, generator=gen, device=dev).to(torch.bfloat16)
            weight = (torch.randn(V, H, generator=gen, device=dev) * (3 / H ** 0.5)).to(torch.bfloat16)
            labels = torch.randint(0, V, (N,), generator=gen, device=dev)
            return SimpleNamespace(hidden=hidden.requires_grad_(grad), weight=weight.requires_grad_(grad),
                                   labels=labels)
        return setup

    fused = lambda a: fastrl_linear_logprobs(a.hidden, a.weight, a.labels)  # noqa: E731
    liger_fn = liger if isinstance(liger, Skip) else (  # noqa: E731
        lambda a: -liger.LigerFusedLinearCrossEntropyFunction.apply(
            a.hidden, a.weight, a.labels, None, None, -100, 0.0, 0.0, "none")[0])
    eager = lambda a: _eager_logprobs(a.hidden @ a.weight.t(), a.labels)  # noqa: E731
    wrap = lambda fn: fn if isinstance(fn, Skip) else _linear_fwd_bwd(fn)  # noqa: E731

    def matmuls_fwd_bwd(a):
        logits = a.hidden.detach() @ a.weight.detach().t()
        return _Floor((logits @ a.weight.detach(), logits.t() @ a.hidden.detach()))

    shape = f"bf16 hidden[{N}, {H}], weight[{V}, {H}], int64[{N}] labels"
    out.append(Case(
        name="linear_logprobs_bf16_llm", shape=shape, setup=lsetup(False),
        impls={"fastrl": fused, "liger (reduction=none)": liger_fn, "torch-eager (materialized logits)": eager,
               "matmul floor": lambda a: _Floor((a.hidden @ a.weight.t(),))},
        check=_rel_check(2e-3, ("logprobs",)),
        note="log p(label) from hidden states at an LLM's size; matmul floor = hidden @ weight.T alone (bf16 "
             "out), what any method must at least do."))
    out.append(Case(
        name="linear_logprobs_fwd_bwd_bf16_llm", shape=shape, setup=lsetup(True),
        impls={"fastrl": wrap(fused), "liger (reduction=none)": wrap(liger_fn),
               "torch-eager (materialized logits)": wrap(eager), "matmul floor": matmuls_fwd_bwd},
        check=_rel_check(2e-2, ("grad hidden", "grad weight")),
        note="forward + autograd.grad of sum(log p) w.r.t. hidden and weight; matmul floor = the three "
             "matmuls (logits, grad hidden, grad weight) alone."))
    return out
