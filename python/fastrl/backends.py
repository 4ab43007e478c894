"""Which implementation of each op can run here, and why the others can't."""
from __future__ import annotations

import torch

from fastrl import _extension

# op name -> the implementations fastrl has for it (Triton entries are added by the families that have them).
OPS: dict[str, tuple[str, ...]] = {
    "group_advantages": ("cpu", "cuda", "reference"),
    "dense_ids": ("cpu", "reference"),
    "broadcast_to_tokens": ("cpu", "torch-cuda", "reference"),  # the multiply is torch's own kernel
    "gae": ("cpu", "cuda", "reference"),
    "discounted_returns": ("cpu", "cuda", "reference"),
    "discounted_returns_whiten": ("cpu", "cuda", "reference"),  # CUDA: the scan's row moments, merge, whitening
    "masked_moments": ("cpu", "cuda", "reference"),
    "masked_whiten": ("cpu", "cuda", "reference"),
    "whiten_with_moments": ("cpu", "cuda", "reference"),  # masked_whiten(process_group=...)
    "kl_penalty": ("cpu", "cuda", "reference"),
    "token_rewards": ("cpu", "cuda", "reference"),
    "logprobs": ("cpu", "cuda", "reference"),
    "logprobs_backward": ("cpu", "cuda", "reference"),  # the reference: autograd through the fp64 log-softmax
    "logprobs_backward_": ("cpu", "cuda", "reference"),  # in place (inplace_backward=True)
    "vocab_parallel_logprobs": ("cpu", "cuda", "reference"),  # per-shard row kernels + torch.distributed
    "linear_logprobs": ("cpu", "triton", "reference"),   # cpu: chunked torch.mm + row kernels (also CUDA without Triton)
    "linear_logprobs_backward": ("cpu", "triton", "reference"),  # triton: [chunk, V] buffer, or fully fused (FASTRL_LINEAR_LOGPROBS_BACKWARD=fused)
    "segment_reduce": ("cpu", "cuda", "reference"),
    "implicit_rewards": ("cpu", "cuda", "reference"),
    "sample_tokens": ("cpu", "cuda", "reference"),
    "best_of_n": ("cpu", "cuda", "reference"),
    "expected_best_of_k": ("cpu", "cuda", "reference"),  # best_at_k / worst_at_k
    "maj_at_k": ("cpu", "cuda", "reference"),
    "all_pairs": ("cpu", "cuda", "reference"),           # select_pairs(mode="all_pairs")
    "quantile_mask": ("cpu", "cuda", "reference"),  # cuda: radix select; cpu: host radix select (the public CPU path is torch.kthvalue)
    "policy_loss_rows": ("cpu", "cuda", "reference"),           # fastrl.losses.policy_loss
    "policy_loss_rows_backward": ("cpu", "cuda", "reference"),  # reference: autograd through the fp64 formulas
}

# (op, implementation) pairs fastrl does not have yet: reported as such, not as a build problem.
NOT_IMPLEMENTED: dict[tuple[str, str], str] = {}


def _why_not(impl: str) -> str | None:
    """None if `impl` can run here, else the reason it can't."""
    if impl == "reference":
        return None
    if _extension._C is None:
        return f"fastrl._C is not built ({_extension.LOAD_ERROR}); {_extension.BUILD_HINT}"
    if impl == "cpu":
        return None
    if impl == "cuda":
        if not _extension.cuda_built():
            return ("fastrl._C was built without CUDA kernels (CPU-only torch, no nvcc, or FASTRL_CUDA=0); "
                    "rebuild with a CUDA torch and nvcc on PATH")
        if not torch.cuda.is_available():
            return "no CUDA device visible (torch.cuda.is_available() is False)"
        return None
    if impl == "torch-cuda":
        return None if torch.cuda.is_available() else "no CUDA device visible (torch.cuda.is_available() is False)"
    if impl == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available():
            return "no GPU: Triton kernels run here only under TRITON_INTERPRET=1 (tests)"
        return None
    return f"unknown implementation {impl!r}"


def backends() -> dict[str, dict[str, str]]:
    """``{op: {implementation: "available" | "unavailable: <why>"}}`` for every fastrl op.

    The active default is the first available of cuda/triton for CUDA tensors and cpu for CPU
    tensors; ``FASTRL_BACKEND=reference`` forces the pure-PyTorch references.

    >>> fastrl.backends()["group_advantages"]["cpu"]
    'available'
    """
    report = {}
    for op, impls in OPS.items():
        report[op] = {}
        for impl in impls:
            why = NOT_IMPLEMENTED.get((op, impl)) or _why_not(impl)
            report[op][impl] = "available" if why is None else f"unavailable: {why}"
    return report

