"""Group-advantage benchmarks: fastrl vs verl 0.9.1's estimators, numpy and plain PyTorch.

Inputs look like a GRPO step: P prompts x n samples in shuffled order, uid strings per prompt
(verl's ``index``: ``str(uuid4())`` in a numpy object array), rule-based 0/1 rewards with a
per-prompt pass rate (so some groups are all-0 or all-1: zero variance).
Shapes: see ``cases``; ``ctx.quick`` shrinks them for tests.
"""
from __future__ import annotations

import random
import uuid
from types import SimpleNamespace

import numpy as np
import torch

import fastrl
from fastrl.bench import Case, Skip, same_partition, try_import

F32, I64 = 4, 8


def make_groups(prompts: int, n: int, device, seed: int = 0) -> SimpleNamespace:
    """uid strings (object array, shuffled), dense ids (on ``device``) and 0/1 scores."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    uids = np.array([str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(prompts)], dtype=object)
    perm = torch.randperm(prompts * n, generator=gen)
    index = np.repeat(uids, n)[perm.numpy()]
    pass_rate = torch.rand(prompts, generator=gen).repeat_interleave(n)[perm]
    scores = (torch.rand(prompts * n, generator=gen) < pass_rate).float()
    ids = fastrl.group_index(index)
    return SimpleNamespace(index=index, ids=ids.to(device), G=prompts, scores=scores.to(device),
                           trr=scores[:, None].to(device), mask=torch.ones(prompts * n, 1, device=device))


# ------------------------------------------------------------------ plain PyTorch, vectorized


def eager_group_stats(x: torch.Tensor, ids: torch.Tensor, G: int):
    """(count, mean, centered, unbiased var) per group with index_add: what a user writes by hand."""
    z = x.new_zeros(G)
    cnt = z.index_add(0, ids, torch.ones_like(x))
    mean = z.index_add(0, ids, x) / cnt
    d = x - mean[ids]
    var = z.index_add(0, ids, d * d) / (cnt - 1).clamp(min=1)
    return cnt, mean, d, var


def eager_grpo(x: torch.Tensor, ids: torch.Tensor, G: int, eps: float = 1e-6) -> torch.Tensor:
    """verl's GRPO rule: (x - mean_g) / (std_g + eps); singleton: x / (1 + eps)."""
    cnt, _, d, var = eager_group_stats(x, ids, G)
    single = cnt[ids] == 1
    return torch.where(single, x, d) / (torch.where(single, torch.ones_like(x), var.sqrt()[ids]) + eps)


def eager_rloo(x: torch.Tensor, ids: torch.Tensor, G: int) -> torch.Tensor:
    """x - mean of the other members = n/(n-1) (x - mean_g); singleton: x."""
    cnt, _, d, _ = eager_group_stats(x, ids, G)
    n = cnt[ids]
    return torch.where(n > 1, d * n / (n - 1).clamp(min=1), x)


def eager_batch_std(x: torch.Tensor, ids: torch.Tensor, G: int, eps: float = 1e-4) -> torch.Tensor:
    """TRL's scale_rewards="batch": (x - mean_g) / (std of the whole batch + 1e-4)."""
    _, _, d, _ = eager_group_stats(x, ids, G)
    return d / (x.std() + eps)


# ------------------------------------------------------------------------------------- verl


def verl_fn(module, name: str, col: bool = True):
    """Times only verl's function on the inputs verl takes: [B, T] rewards and mask, numpy uids.
    Output: the advantages (column 0 for the [B, 1] scalar cases)."""
    if isinstance(module, Skip):
        return module
    fn = getattr(module, name, None)
    if fn is None:
        return Skip(f"{module.__name__}.{name} does not exist in this verl version")
    if col:
        return lambda a: fn(a.trr, a.mask, a.index)[0][:, 0]
    return lambda a: fn(a.trr, a.mask, a.index)[0]


def cases(ctx) -> list[Case]:
    dev = ctx.device
    quick = ctx.quick
    core_algos = try_import("verl.trainer.ppo.core_algos")
    groupwise = try_import("verl.utils.groupwise")

    P, n = (256, 16) if quick else (4096, 16)  # scalar cases: 65,536 samples
    B = P * n
    scalar_shape = f"B={B} scores, {P} groups of {n}, shuffled"
    scalar_bytes = B * (F32 + I64 + F32)  # read scores + ids, write advantages
    ids_note = ("fastrl and torch-eager take dense group ids (fastrl.group_index, untimed: see "
                "`group_index`); verl takes uid strings (its API) and rewards as [B, 1].")
    setup = lambda: make_groups(P, n, dev)

    compiled = Skip("torch.compile baseline is off by default (compiling takes ~20 s on a 2-core CPU); "
                    "pass --compile")
    if ctx.compile:
        grpo_c = torch.compile(eager_grpo, dynamic=False)
        compiled = lambda a: grpo_c(a.scores, a.ids, a.G)

    out = [
        Case(
            name="grpo_scalar", shape=scalar_shape, setup=setup, bytes_moved=scalar_bytes,
            impls={
                "fastrl": lambda a: fastrl.advantages.grpo(a.scores, a.ids, num_groups=a.G),
                "verl": verl_fn(core_algos, "compute_grpo_outcome_advantage"),
                "verl-vectorized": verl_fn(core_algos, "compute_grpo_vectorized_outcome_advantage"),
                "torch-eager": lambda a: eager_grpo(a.scores, a.ids, a.G),
                "torch-compile": compiled,
            },
            target={"verl": 100}, rtol=1e-5, atol=1e-5, note=ids_note,
        ),
        Case(
            name="rloo", shape=scalar_shape, setup=setup, bytes_moved=scalar_bytes,
            impls={
                "fastrl": lambda a: fastrl.advantages.rloo(a.scores, a.ids, num_groups=a.G),
                "verl": verl_fn(core_algos, "compute_rloo_outcome_advantage"),
                "verl-vectorized": verl_fn(core_algos, "compute_rloo_vectorized_outcome_advantage"),
                "torch-eager": lambda a: eager_rloo(a.scores, a.ids, a.G),
            },
            target={"verl": 100}, rtol=1e-5, atol=1e-5,
            note="target set by analogy with grpo_scalar (same loop structure in verl). " + ids_note,
        ),
        Case(
            name="batch_std", shape=scalar_shape, setup=setup, bytes_moved=scalar_bytes,
            impls={
                "fastrl": lambda a: fastrl.group_advantages(a.scores, a.ids, scale="batch_std", eps=1e-4,
                                                            num_groups=a.G),
                "torch-eager": lambda a: eager_batch_std(a.scores, a.ids, a.G),
            },
            rtol=1e-5, atol=1e-5,
            note="(x - mean_g) / (batch std + 1e-4), TRL's scale_rewards='batch' (TRL computes it inline "
                 "in GRPOTrainer, so the baseline is the same formula in plain PyTorch).",
        ),
        _verl_tokens_case(ctx, core_algos),
    ]
    out += _group_index_cases(ctx, groupwise)
    return out


# ------------------------------------------------------------------ verl-compatible token layout


def _verl_tokens_case(ctx, core_algos) -> Case:
    """GRPO through verl's signature at a realistic [B, T]: our drop-in vs verl's own functions."""
    P, n, T = (64, 16, 256) if ctx.quick else (512, 16, 2048)
    B = P * n

    def setup():
        a = make_groups(P, n, ctx.device, seed=1)
        gen = torch.Generator().manual_seed(2)
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
        trr = torch.zeros(B, T)
        trr[torch.arange(B), lengths - 1] = a.scores.cpu()  # the score sits on the last valid token
        return SimpleNamespace(index=a.index, trr=trr.to(ctx.device), mask=mask.to(ctx.device))

    dropin = try_import("fastrl.integrations.verl")
    if not isinstance(dropin, Skip):
        fn = getattr(dropin, "compute_grpo_outcome_advantage", None)
        dropin = (Skip("fastrl.integrations.verl has no compute_grpo_outcome_advantage") if fn is None
                  else (lambda a: fn(a.trr, a.mask, a.index)[0]))
    return Case(
        name="grpo_verl_tokens", shape=f"token_level_rewards f32[{B}, {T}] ({P} prompts x {n}), random lengths",
        setup=setup, bytes_moved=3 * B * T * F32,  # read rewards + mask, write advantages
        impls={
            "fastrl": dropin,
            "verl": verl_fn(core_algos, "compute_grpo_outcome_advantage", col=False),
            "verl-vectorized": verl_fn(core_algos, "compute_grpo_vectorized_outcome_advantage", col=False),
        },
        target={"verl": 5}, rtol=1e-5, atol=1e-5,
        note="end to end through verl's signature: every implementation gets uid strings, [B, T] "
             "rewards and mask (fastrl = fastrl.integrations.verl.compute_grpo_outcome_advantage).",
    )


# ----------------------------------------------------------------------------------- uids -> ids


def _group_index_cases(ctx, groupwise) -> list[Case]:
    """uid strings -> dense ids, on the host (verl's index is a numpy array whatever the device)."""
    P, n = (64, 16) if ctx.quick else (512, 16)  # 8,192 uids
    B = P * n
    as_torch_index = (groupwise if isinstance(groupwise, Skip)
                      else (lambda a: groupwise.as_torch_index(a.index, device="cpu")))

    def dict_ids(a):
        table = {}
        return [table.setdefault(u, len(table)) for u in a.index.tolist()]

    def case(name, dtype, uid_bytes, note):
        kind = "object" if dtype is object else dtype
        return Case(
            name=name, shape=f"{B} uids ({P} x {n}, shuffled), numpy {kind}", device="cpu",
            setup=lambda: SimpleNamespace(index=make_groups(P, n, "cpu").index.astype(dtype)),
            bytes_moved=B * (uid_bytes + I64),
            impls={
                "fastrl": lambda a: fastrl.group_index(a.index),
                "numpy-unique": lambda a: np.unique(a.index, return_inverse=True)[1],
                "verl-as_torch_index": as_torch_index,
                "python-dict": dict_ids,
            },
            target={"numpy-unique": 5}, check=same_partition, note=note,
        )

    return [
        case("group_index", object, I64 + 36, "object array of str: bytes = 8-byte pointer + 36 chars read, "
             "int64 id written per uid; ids may be numbered differently (checked: same partition)."),
        case("group_index_U36", "<U36", 36 * 4, "fixed-width '<U36' (UCS-4): 144 bytes read, int64 id "
             "written per uid."),
    ]
