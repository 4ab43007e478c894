"""What a benchmark definition file declares: :class:`Case`, :class:`Skip`, :class:`Context`.

A family's file ``benchmarks/bench_<family>.py`` defines ``cases(ctx: Context) -> list[Case]``.
Each case builds its inputs once (``setup``) and runs every implementation on those same inputs:

    def cases(ctx):
        def setup():
            x = torch.randn(1 << 20, device=ctx.device)
            return SimpleNamespace(x=x)
        return [Case(
            name="double", shape="x: f32[1M]", setup=setup,
            impls={"fastrl": lambda a: fastrl_double(a.x), "torch-eager": lambda a: a.x * 2},
            bytes_moved=2 * 4 << 20, target={"torch-eager": 1.5})]

An implementation that cannot run here (package missing, wrong device) is given as ``Skip(reason)``;
the runner reports it as skipped with that reason instead of dropping it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Skip:
    """Stands for an implementation (or a whole case) that cannot run here, and says why."""

    reason: str


@dataclass
class Context:
    """What a family's ``cases(ctx)`` may depend on."""

    device: torch.device
    quick: bool = False          # small shapes (tests, smoke runs)
    compile: bool = False        # include torch.compile baselines (slow to compile on CPU)


Impl = Callable[[Any], Any]
Check = Callable[[Any, Any], "str | None"]


@dataclass
class Case:
    """One benchmark: several implementations of the same computation on identical inputs.

    Attributes:
        name: short unique name within the family (``grpo_scalar``).
        shape: human description of the inputs (``B=65536, G=4096 x 16, shuffled``).
        setup: builds the inputs once, untimed; its result is passed to every implementation.
        impls: implementation name -> ``fn(inputs) -> output`` (or :class:`Skip`). Each ``fn`` is
            what gets timed, so it should do only the work being compared.
        primary: the implementation being measured (speedups are ``baseline / primary``).
        bytes_moved: bytes the computation must at least read + write; achieved bandwidth is
            ``bytes_moved / median``. 0 when not meaningful.
        target: baseline name -> required speedup of ``primary`` over it.
        rtol, atol: tolerance of the default output check (``allclose``, NaN == NaN).
        check: custom ``check(primary_out, baseline_out) -> None | error message`` replacing the
            default (e.g. "same partition" for ids that may be numbered differently).
        device: where the work runs when it differs from the run's device (``"cpu"`` for host-side
            ops such as uid hashing in a CUDA run): picks the sync, memory and bandwidth method.
        note: one line shown under the table (caveats a reader needs).
    """

    name: str
    shape: str
    setup: Callable[[], Any]
    impls: dict[str, Impl | Skip]
    primary: str = "fastrl"
    bytes_moved: int = 0
    target: dict[str, float] = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-5
    check: Check | None = None
    device: str | None = None
    note: str = ""
    family: str = ""             # filled in by discovery

    def __post_init__(self):
        for what, names in (("primary", {self.primary}), ("target", set(self.target))):
            if names - set(self.impls):
                raise ValueError(f"Case {self.name!r}: {what} {sorted(names - set(self.impls))} names no "
                                 f"implementation (have {sorted(self.impls)})")

    @property
    def full_name(self) -> str:
        return f"{self.family}.{self.name}" if self.family else self.name


def try_import(module: str):
    """The module, or a :class:`Skip` saying why it cannot be imported (with its version if any)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a package that fails at import time
        return Skip(f"{module} not importable: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------- output checks


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def allclose(out, ref, rtol: float, atol: float) -> str | None:
    """None if ``out`` matches ``ref`` (same shape, ``|out-ref| <= atol + rtol |ref|``, NaN where NaN),
    else a message with the worst element."""
    a, b = _as_tensor(out), _as_tensor(ref)
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0:
        return None
    a, b = a.double(), b.double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return f"NaN at different positions ({int(nan_a.sum())} vs {int(nan_b.sum())} NaNs)"
    err = torch.where(nan_a, torch.zeros_like(a), (a - b).abs())
    bad = err > atol + rtol * b.abs().nan_to_num(0.0)
    if bool(bad.any()):
        i = int(err.argmax())
        return (f"{int(bad.sum())}/{a.numel()} elements off; worst at flat index {i}: "
                f"{a.flatten()[i].item():.6g} vs {b.flatten()[i].item():.6g} (rtol={rtol}, atol={atol})")
    return None


def max_abs_err(out, ref) -> float | None:
    """Largest |out - ref| over non-NaN elements, for the report (None if not comparable)."""
    try:
        a, b = _as_tensor(out).double(), _as_tensor(ref).double()
        if a.shape != b.shape or a.numel() == 0:
            return None
        return float((a - b).abs().nan_to_num(0.0).max())
    except (TypeError, RuntimeError, ValueError):
        return None


def same_partition(out, ref) -> str | None:
    """Check for group ids: both label the samples into the same groups (numbering may differ)."""
    a = _as_tensor(out).long().flatten()
    b = _as_tensor(ref).long().flatten()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0:
        return None
    na, nb = a.unique().numel(), b.unique().numel()
    pairs = torch.stack([a, b], 1).unique(dim=0).shape[0]
    # a bijection between labels: every (a, b) pair is unique to its a and to its b
    if not (na == nb == pairs):
        return f"different groupings: {na} vs {nb} groups, {pairs} distinct (id, id) pairs"
    return None
