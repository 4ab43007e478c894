"""Token-level credit-assignment benchmarks: fastrl vs verl 0.9.1's GAE and REINFORCE++ loops, verl's
kl_penalty, PyTorch compositions of OpenRLHF's compute_approx_kl and compute_reward, and PyTorch
loops for GAE with turn ends (dones) and OpenRLHF's dense GAE.

Inputs look like a multi-turn PPO batch: B responses x T tokens, fp32 rewards (a score on each
response's last valid token plus small per-token rewards) and values, verl's int64 response mask
with random lengths and interior observation spans. Shapes: 4,096 x 4,096 (``ctx.quick``: 256 x 512).

Targets (issue 3): >= 100x over verl's function, and within 2x of the time to stream the bytes the
op must read and write. The second is declared as a target against ``stream-floor``: torch's own
elementwise kernels reading the same inputs and writing the same number of output bytes (a speedup
>= 0.5 over it = within 2x of streaming); its outputs are not compared (they are not the same
computation). The achieved GB/s and fraction of the measured copy bandwidth are reported too.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import fastrl
from fastrl.bench import Case, Skip, allclose, try_import

F32, I64 = 4, 8


class Floor(tuple):
    """Outputs of the stream-floor baseline: timed, never compared."""


def check_pair(rtol: float, atol: float):
    """Compare (advantages, returns) pairs; skip the stream floor."""
    def check(out, ref):
        if isinstance(ref, Floor):
            return None
        for name, a, b in zip(("advantages", "returns"), out, ref):
            msg = allclose(a, b, rtol, atol)
            if msg:
                return f"{name}: {msg}"
        return None
    return check


def make_batch(B: int, T: int, device, seed: int = 0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    starts = torch.randint(0, T, (B, 2), generator=gen)  # two observation spans of up to T/16 tokens
    span = torch.randint(1, max(2, T // 16), (B, 2), generator=gen)
    t = torch.arange(T)[None, :]
    for k in range(2):
        mask &= ~((t >= starts[:, k:k + 1]) & (t < starts[:, k:k + 1] + span[:, k:k + 1]))
    rewards = 0.01 * torch.randn(B, T, generator=gen)
    rewards[torch.arange(B), lengths - 1] += (torch.rand(B, generator=gen) < 0.5).float()
    values = torch.randn(B, T, generator=gen)
    return SimpleNamespace(r=rewards.to(device), v=values.to(device), m=mask.to(torch.int64).to(device),
                           cfg=SimpleNamespace(gamma=0.99))


def scan_then_whiten(r, v, m):
    adv, ret = fastrl.credit.gae(r, v, m, 0.99, 0.95)
    return fastrl.credit.masked_whiten(adv, m), ret


def returns_then_whiten(r, m, gamma):
    """REINFORCE++ as the drop-in computed it before the fused statistics: scan, whiten, mask."""
    ret = fastrl.credit.discounted_returns(r, m, gamma)
    return fastrl.credit.masked_whiten(ret, m).mul_(m), ret


def gae_turns_loop(r, v, m, dones, gamma, lam, turn_gamma):
    """GAE with turn ends as a user writes it in PyTorch (the loop of fastrl.reference.credit.gae):
    one step of small tensor ops per token position."""
    from fastrl.reference import credit as ref
    return ref.gae(r, v, m, gamma, lam, dones=dones, turn_gamma=turn_gamma)


def openrlhf_gae_loop(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's get_advantages_and_returns (padded path), formula for formula."""
    values, rewards = action_mask * values, action_mask * rewards
    lastgaelam, rev = 0, []
    T = rewards.size(1)
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        lastgaelam = rewards[:, t] + gamma * nextvalues - values[:, t] + gamma * lambd * lastgaelam
        rev.append(lastgaelam)
    adv = torch.stack(rev[::-1], dim=1)
    return adv, adv + values


def openrlhf_approx_kl(log_probs, log_probs_base, clamp):
    """OpenRLHF's compute_approx_kl(kl_estimator='k3'), formula for formula (fp32), with or without
    its final clamp."""
    log_ratio = -(log_probs.float() - log_probs_base.float())
    log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10) if clamp else log_ratio


def openrlhf_reward_torch(scores, kl, mask, kl_coef, clip):
    """OpenRLHF's compute_reward (eos placement by flip/argmax/scatter) with the KL masked, in PyTorch."""
    r = scores.clamp(-clip, clip)
    eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    last = torch.zeros_like(kl).scatter_(1, eos, r.unsqueeze(1).to(kl.dtype))
    return (last + -kl_coef * kl) * mask


def cases(ctx) -> list[Case]:
    core_algos = try_import("verl.trainer.ppo.core_algos")
    verl_F = try_import("verl.utils.torch_functional")
    dropin = try_import("fastrl.integrations.verl")
    B, T = (256, 512) if ctx.quick else (4096, 4096)
    # the CPU kernel is verl's loop operation for operation; the CUDA one a parallel scan (rounding)
    on_cpu = torch.device(ctx.device).type == "cpu"
    dense_tol = (0, 0) if on_cpu else (1e-5, 1e-5)
    # GAE with resets vs a sequential loop: on CUDA the re-associated scan is off by rounding that
    # cancellation can lift above 1e-6 absolute (seen on an H100: 1.2e-6 on one of 16M elements)
    turns_tol = (1e-6, 1e-6) if on_cpu else (1e-5, 1e-5)
    shape = f"f32[{B}, {T}] rewards/values, int64 mask (random lengths, 2 observation spans per row)"
    setup = lambda: make_batch(B, T, ctx.device)

    def setup_turns():
        a = make_batch(B, T, ctx.device)
        gen = torch.Generator().manual_seed(1)
        a.d = (torch.rand(B, T, generator=gen) < 1 / 256).to(ctx.device)
        return a

    def setup_kl():
        gen = torch.Generator().manual_seed(2)
        rf = -5 * torch.rand(B, T, generator=gen)
        return SimpleNamespace(lp=(rf + torch.randn(B, T, generator=gen)).to(ctx.device), rf=rf.to(ctx.device))

    def setup_rewards():
        a = make_batch(B, T, ctx.device)
        gen = torch.Generator().manual_seed(3)
        a.s = (3 * torch.randn(B, generator=gen)).to(ctx.device)
        a.kl = (0.1 * torch.rand(B, T, generator=gen)).to(ctx.device)
        return a

    def verl_kl(kind):
        if isinstance(core_algos, Skip):
            return core_algos
        return lambda a: core_algos.kl_penalty(a.lp, a.rf, kind)

    def kl_case(name, kind, note, convention="verl", baseline=None):
        base = {"verl": verl_kl(kind)} if baseline is None else {"torch": baseline}
        return Case(
            name=f"kl_penalty_{name}", shape=f"f32[{B}, {T}] logp, ref_logp", setup=setup_kl,
            bytes_moved=B * T * 3 * F32,
            impls={"fastrl": lambda a: fastrl.credit.kl_penalty(a.lp, a.rf, kind, convention=convention), **base,
                   "stream-floor": lambda a: Floor((torch.sub(a.lp, a.rf),))},
            target={"stream-floor": 0.5}, check=check_single, note=note)

    def check_single(out, ref):
        return None if isinstance(ref, Floor) else allclose(out, ref, 1e-6, 1e-6)

    def verl(name, *args):
        if isinstance(core_algos, Skip):
            return core_algos
        fn = getattr(core_algos, name)
        return lambda a: fn(*[getattr(a, k) for k in args[:-1]], **args[-1](a))

    gae_kw = lambda a: {"gamma": 0.99, "lam": 0.95}
    rpp_kw = lambda a: {"config": a.cfg}
    gae_bytes = B * T * (F32 + F32 + I64 + F32 + F32)  # read rewards, values, mask; write adv, returns
    rpp_bytes = B * T * (F32 + I64 + F32 + F32)        # read rewards, mask; write adv, returns
    gae_floor = lambda a: Floor((a.r.clone(), torch.mul(a.v, a.m)))          # same bytes as gae_bytes
    rpp_floor = lambda a: Floor((torch.mul(a.r, a.m), torch.zeros_like(a.r)))  # same bytes as rpp_bytes
    note_ws = ("fastrl = fastrl.integrations.verl drop-in: compiled scan emitting per-row fp64 moments "
               "(fused whitening statistics) + one whitening pass over the advantages; scan+whiten = the scan, "
               "then masked_whiten (the drop-in before the fused statistics); bytes_moved counts only the "
               "bytes the op must read and write once.")
    return [
        Case(
            name="gae_verl", shape=shape, setup=setup, bytes_moved=gae_bytes,
            impls={
                "fastrl": (dropin if isinstance(dropin, Skip) else
                           lambda a: dropin.compute_gae_advantage_return(a.r, a.v, a.m, 0.99, 0.95)),
                "verl": verl("compute_gae_advantage_return", "r", "v", "m", gae_kw),
                "scan+whiten": lambda a: scan_then_whiten(a.r, a.v, a.m),
                "stream-floor": gae_floor,
            },
            target={"verl": 100, "stream-floor": 0.5}, check=check_pair(1e-5, 1e-5), note=note_ws,
        ),
        Case(
            name="reinforce_pp_verl", shape=shape, setup=setup, bytes_moved=rpp_bytes,
            impls={
                "fastrl": (dropin if isinstance(dropin, Skip) else
                           lambda a: dropin.compute_reinforce_plus_plus_outcome_advantage(a.r, a.m, config=a.cfg)),
                "verl": verl("compute_reinforce_plus_plus_outcome_advantage", "r", "m", rpp_kw),
                "scan+whiten": lambda a: returns_then_whiten(a.r, a.m, 0.99),
                "stream-floor": rpp_floor,
            },
            target={"verl": 100, "stream-floor": 0.5}, check=check_pair(1e-5, 1e-5), note=note_ws,
        ),
        Case(
            name="gae_scan", shape=shape, setup=setup, bytes_moved=gae_bytes,
            impls={"fastrl": lambda a: fastrl.credit.gae(a.r, a.v, a.m, 0.99, 0.95), "stream-floor": gae_floor},
            target={"stream-floor": 0.5}, check=check_pair(0, 0),
            note="the scan alone (fastrl.credit.gae, no whitening) against streaming its bytes.",
        ),
        Case(
            name="returns_scan", shape=shape, setup=setup, bytes_moved=B * T * (F32 + I64 + F32),
            impls={"fastrl": lambda a: fastrl.credit.discounted_returns(a.r, a.m, 0.99),
                   "stream-floor": lambda a: Floor((torch.mul(a.r, a.m),))},
            target={"stream-floor": 0.5}, check=check_pair(0, 0),
            note="REINFORCE++ returns alone (fastrl.credit.discounted_returns, mode='skip'): read rewards "
                 "and mask, write returns.",
        ),
        Case(
            name="gae_whiten_fused", shape=shape, setup=setup, bytes_moved=gae_bytes,
            impls={"fastrl": lambda a: fastrl.credit.gae(a.r, a.v, a.m, 0.99, 0.95, whiten=True),
                   "scan+whiten": lambda a: scan_then_whiten(a.r, a.v, a.m),
                   "verl": verl("compute_gae_advantage_return", "r", "v", "m", gae_kw),
                   "stream-floor": gae_floor},
            target={"verl": 100, "stream-floor": 0.5}, check=check_pair(1e-5, 1e-5),
            note="verl's GAE + whitening with the whitening statistics fused into the scan "
                 "(fastrl.credit.gae(whiten=True): per-row fp64 moments while the row is in cache) vs "
                 "scan+whiten = fastrl.credit.gae then fastrl.credit.masked_whiten (the drop-in before it used the "
                 "fused path).",
        ),
        Case(
            name="gae_turn_ends", shape=shape + ", bool dones (~1 turn end per 256 tokens)",
            setup=setup_turns, bytes_moved=gae_bytes + B * T,
            impls={"fastrl": lambda a: fastrl.credit.gae(a.r, a.v, a.m, 0.99, 0.95, dones=a.d, turn_gamma=0.9),
                   "torch-loop": lambda a: gae_turns_loop(a.r, a.v, a.m, a.d, 0.99, 0.95, 0.9),
                   "stream-floor": gae_floor},
            target={"torch-loop": 100, "stream-floor": 0.5}, check=check_pair(*turns_tol),
            note="multi-turn GAE with turn ends (turn_gamma=0.9); torch-loop = the same semantics as a "
                 "PyTorch loop over T (fastrl.reference.credit.gae), what a user writes without fastrl.",
        ),
        Case(
            name="gae_openrlhf_dense", shape=shape, setup=setup, bytes_moved=gae_bytes,
            impls={"fastrl": lambda a: fastrl.credit.gae(a.r, a.v, a.m, 0.99, 0.95, mode="dense"),
                   "openrlhf-loop": lambda a: openrlhf_gae_loop(a.v, a.r, a.m, 0.99, 0.95),
                   "stream-floor": gae_floor},
            target={"openrlhf-loop": 100, "stream-floor": 0.5}, check=check_pair(*dense_tol),
            note="OpenRLHF get_advantages_and_returns convention (mode='dense'); openrlhf-loop is its "
                 "loop written from the source (OpenRLHF is not installed). Compared bitwise on the CPU "
                 "(the same fp32 operations in the same order); on CUDA to rtol = atol = 1e-5, because "
                 "the kernel is a parallel associative scan whose re-associated products differ from a "
                 "sequential loop by rounding.",
        ),
        Case(
            name="masked_whiten", shape=f"f32[{B}, {T}] x, int64 mask",
            setup=setup, bytes_moved=B * T * (F32 + I64 + F32),
            impls={"fastrl": lambda a: fastrl.credit.masked_whiten(a.r, a.m),
                   "verl": (verl_F if isinstance(verl_F, Skip) else lambda a: verl_F.masked_whiten(a.r, a.m)),
                   "stream-floor": lambda a: Floor((torch.mul(a.r, a.m),))},
            target={"stream-floor": 0.5},  # verl's statistics are fp32 (ours fp64): 1e-5
            check=lambda out, ref: None if isinstance(ref, Floor) else allclose(out, ref, 1e-5, 1e-5),
            note="verl's masked_whiten (shift_mean, unbiased, eps 1e-8). fastrl: fp64 moments of fixed "
                 "chunks (no fp64 copy of x), a fixed-order merge, one whitening pass; one host sync "
                 "(verl's count check), as verl. bytes_moved counts reading x and mask once and writing "
                 "the output; the op reads x twice.",
        ),
        kl_case("k3", "low_var_kl", "verl 0.9.1 core_algos.kl_penalty(logp, ref, 'low_var_kl'): clamp/exp/sub/"
                "clamp as torch ops (several passes); fastrl: one elementwise pass."),
        kl_case("k1", "kl", "k1 is one subtraction: both sides are one streaming pass; the case shows no overhead."),
        kl_case("k3_openrlhf", "k3", "OpenRLHF compute_approx_kl 'k3' with its [-10, 10] clamp; torch = its "
                "formula as torch ops (written from openrlhf/models/utils.py; OpenRLHF is not installed).",
                convention="openrlhf", baseline=lambda a: openrlhf_approx_kl(a.lp, a.rf, clamp=True)),
        kl_case("k3_openrlhf_unclamped", "k3", "OpenRLHF compute_approx_kl 'k3' before the clamp was added "
                "(convention='openrlhf_unclamped'); torch = its formula as torch ops.",
                convention="openrlhf_unclamped", baseline=lambda a: openrlhf_approx_kl(a.lp, a.rf, clamp=False)),
        Case(
            name="token_rewards", shape=shape + ", f32 kl, scores f32[B]", setup=setup_rewards,
            bytes_moved=B * T * (I64 + F32 + F32),
            impls={"fastrl": lambda a: fastrl.credit.token_rewards(a.s, a.m, kl=a.kl, kl_coef=0.05, clip=5.0),
                   "torch": lambda a: openrlhf_reward_torch(a.s, a.kl, a.m, 0.05, 5.0),
                   "stream-floor": lambda a: Floor((torch.mul(a.kl, a.m),))},
            target={"stream-floor": 0.5}, check=check_single,
            note="OpenRLHF compute_reward (score at the last valid token minus kl_coef * kl, masked) as a "
                 "PyTorch composition vs fastrl's one pass.",
        ),
    ]
