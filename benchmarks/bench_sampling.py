"""Token sampling: fastrl.sampling.sample vs the sort-based samplers trainers and rollout engines run.

Inputs: fp32 logits ``[256, 152,064]`` (Qwen2 vocabulary; ``ctx.quick``: ``[16, 4,096]``),
``3 * randn``. Every implementation returns what an importance-sampling correction needs: the
sampled tokens, their log-prob under the processed (truncated) distribution and under the raw
temperature-scaled one.

Baselines (plain PyTorch eager, as HF / vLLM write them):
  * ``torch-sort``: sort the row, softmax + cumsum of the sorted values, mask the tail (top-k by
    position, top-p by cumulative mass), scatter back, softmax, ``torch.multinomial``; then
    ``log_softmax`` gathers for the two log-probs.
  * ``torch-topk`` (top-k case): HF's TopKLogitsWarper (``torch.topk`` threshold, mask), softmax,
    ``torch.multinomial``, the two log-prob gathers.
Target (issue 5): top-p 0.9 >= 3x the sort-based sampler. Tokens are random, so the output check
is that, on the first 8 rows, every implementation's tokens lie in the fp64 reference's kept set.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from fastrl.bench import Case
from fastrl.reference import token_sampling as ref
from fastrl.sampling.tokens import sample

CHECK_ROWS = 8


def _setup(N, V, device, state):
    def setup():
        gen = torch.Generator().manual_seed(0)
        state["logits"] = (3 * torch.randn(N, V, generator=gen)).to(device)
        return SimpleNamespace(logits=state["logits"], gen=torch.Generator(device=device).manual_seed(1))
    return setup


def _logprobs(masked, logits, tokens):
    idx = tokens.unsqueeze(-1)
    return (torch.log_softmax(masked, -1).gather(-1, idx).squeeze(-1),
            torch.log_softmax(logits, -1).gather(-1, idx).squeeze(-1))


def sort_sampler(logits, gen, top_k=None, top_p=None):
    """The HF / vLLM sort-based top-k/top-p sampler (vLLM's apply_top_k_top_p, then multinomial)."""
    sorted_logits, order = logits.sort(-1, descending=False)
    V = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits[:, V - top_k].unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least one
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    masked = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    tokens = torch.multinomial(masked.softmax(-1), 1, generator=gen).squeeze(-1)
    return (tokens,) + _logprobs(masked, logits, tokens)


def topk_sampler(logits, gen, top_k):
    """HF's TopKLogitsWarper + softmax + multinomial."""
    kth = torch.topk(logits, top_k, -1).values[:, -1:]
    masked = logits.masked_fill(logits < kth, float("-inf"))
    tokens = torch.multinomial(masked.softmax(-1), 1, generator=gen).squeeze(-1)
    return (tokens,) + _logprobs(masked, logits, tokens)


def _check(state, kw):
    def check(out, base):
        probs, _ = ref.processed_probs(state["logits"][:CHECK_ROWS].cpu(), **kw)
        for name, res in (("fastrl", out), ("baseline", base)):
            tok = res[0][:CHECK_ROWS].cpu()
            if tok.dtype != torch.int64 or not bool((probs.gather(-1, tok[:, None]) > 0).all()):
                return f"{name} sampled a token outside the reference's kept set"
        return None
    return check


def cases(ctx) -> list[Case]:
    N, V = (16, 4096) if ctx.quick else (256, 152064)
    shape = f"f32[{N}, {V}] logits"
    out = []
    state_p: dict = {}
    out.append(Case(
        name="sample_top_p", shape=shape + ", top_p=0.9", setup=_setup(N, V, ctx.device, state_p),
        impls={"fastrl": lambda a: sample(a.logits, top_p=0.9, generator=a.gen),
               "torch-sort": lambda a: sort_sampler(a.logits, a.gen, top_p=0.9)},
        bytes_moved=N * V * 4, target={"torch-sort": 3.0}, check=_check(state_p, dict(top_p=0.9)),
        note="tokens + processed and raw log-probs; fastrl: no sort (mass histogram + quickselect in one "
             "bin on the CPU, radix select on the GPU)."))
    state_k: dict = {}
    out.append(Case(
        name="sample_top_k", shape=shape + ", top_k=50", setup=_setup(N, V, ctx.device, state_k),
        impls={"fastrl": lambda a: sample(a.logits, top_k=50, generator=a.gen),
               "torch-topk": lambda a: topk_sampler(a.logits, a.gen, 50),
               "torch-sort": lambda a: sort_sampler(a.logits, a.gen, top_k=50)},
        bytes_moved=N * V * 4, check=_check(state_k, dict(top_k=50)),
        note="tokens + processed and raw log-probs; top-k 50 by streaming filter + nth_element (CPU)."))
    state_c: dict = {}
    kw = dict(top_k=1000, top_p=0.9)
    out.append(Case(
        name="sample_top_k_top_p", shape=shape + ", top_k=1000, top_p=0.9", setup=_setup(N, V, ctx.device, state_c),
        impls={"fastrl": lambda a: sample(a.logits, generator=a.gen, **kw),
               "torch-sort": lambda a: sort_sampler(a.logits, a.gen, **kw)},
        bytes_moved=N * V * 4, check=_check(state_c, kw),
        note="vLLM's default combination path (top-k then top-p over the top-k set)."))
    return out
