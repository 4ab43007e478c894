"""Discovers benchmark cases, runs them (output check first, then timing and memory) and reports.

Discovery: every ``bench_<family>.py`` in the benchmarks directory is imported and its
``cases(ctx)`` called. The default directory is the repository's ``benchmarks/`` (next to
``python/``, found from this package's location in an editable install), else ``./benchmarks``.

Per case: ``setup()`` once; the primary implementation is called, then every baseline, and each
baseline's output must match the primary's (the case's tolerance or custom check) and no call may
modify the shared inputs; otherwise the case is marked failed and nothing is timed. Then each
implementation is timed (:func:`fastrl.bench.measure.time_fn`) and its peak extra memory measured.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fastrl.bench import measure
from fastrl.bench.case import Case, Context, Skip, allclose, max_abs_err

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # <repo> in an editable install (<repo>/python/fastrl/bench)


def default_bench_dir() -> Path:
    repo = PACKAGE_ROOT / "benchmarks"
    if any(repo.glob("bench_*.py")):
        return repo
    return Path.cwd() / "benchmarks"


# ------------------------------------------------------------------------------------- discovery


def discover(bench_dir: Path, ctx: Context) -> tuple[list[Case], list[dict]]:
    """(cases, load errors). A file that fails to import is reported, never silently dropped."""
    cases, errors = [], []
    for path in sorted(Path(bench_dir).glob("bench_*.py")):
        family = path.stem[len("bench_"):]
        try:
            spec = importlib.util.spec_from_file_location(f"fastrl_bench_{family}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for case in module.cases(ctx):
                case.family = family
                cases.append(case)
        except Exception as exc:
            errors.append({"name": f"{family}.<load>", "family": family, "status": "failed",
                           "reason": f"{path.name}: {type(exc).__name__}: {exc}", "impls": {}})
    return cases, errors


def select(cases: list[Case], filters: list[str] | None) -> list[Case]:
    if not filters:
        return cases
    return [c for c in cases if any(f in c.full_name for f in filters)]


# ------------------------------------------------------------------------------------- one case


def _fingerprint(obj):
    """Cheap digest of every tensor / array in the inputs, to catch an implementation that writes
    into the shared inputs (which would corrupt every later implementation's run)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().reshape(-1).view(torch.uint8)
        t = t.view(torch.int32) if t.numel() % 4 == 0 else t
        return (tuple(obj.shape), str(obj.dtype), int(t.sum(dtype=torch.int64)))
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return (obj.shape, hash(tuple(obj.tolist())))
        return (obj.shape, str(obj.dtype), zlib.crc32(np.ascontiguousarray(obj).view(np.uint8)))
    if isinstance(obj, SimpleNamespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return tuple((k, _fingerprint(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_fingerprint(v) for v in obj)
    return None


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"


def run_case(case: Case, ctx: Context, budget_s: float, copy_gbps: dict[str, float]) -> dict:
    """Checks, times and measures one case; returns its JSON record."""
    device = case.device or ctx.device.type
    res = {
        "name": case.full_name, "family": case.family, "shape": case.shape, "primary": case.primary,
        "device": device, "bytes_moved": case.bytes_moved, "target": dict(case.target),
        "tolerance": "custom check" if case.check else {"rtol": case.rtol, "atol": case.atol},
        "note": case.note, "status": "ok", "reason": "",
        "impls": {name: {"status": "skipped", "reason": impl.reason} if isinstance(impl, Skip)
                  else {"status": "not run"} for name, impl in case.impls.items()},
    }
    primary = case.impls[case.primary]
    if isinstance(primary, Skip):
        return {**res, "status": "skipped", "reason": primary.reason}

    try:
        inputs = case.setup()
    except Exception as exc:
        return {**res, "status": "failed", "reason": f"setup: {_error(exc)}"}
    fingerprint = _fingerprint(inputs)
    runnable = {n: f for n, f in case.impls.items() if not isinstance(f, Skip)}
    first_call = {}

    # 1. correctness: every baseline against the primary, on the same inputs
    ref = None
    for name in [case.primary] + [n for n in runnable if n != case.primary]:
        rec = res["impls"][name]
        try:
            measure.sync(device)
            t0 = time.perf_counter()
            out = runnable[name](inputs)
            measure.sync(device)
            first_call[name] = time.perf_counter() - t0
        except Exception as exc:
            rec.update(status="error", reason=_error(exc))
            if name == case.primary:
                return {**res, "status": "failed", "reason": f"{name}: {rec['reason']}"}
            continue
        if _fingerprint(inputs) != fingerprint:
            rec.update(status="error", reason="modified its inputs")
            return {**res, "status": "failed", "reason": f"{name} modified the shared inputs"}
        if name == case.primary:
            ref = out
            rec["status"] = "ok"
            continue
        msg = case.check(ref, out) if case.check else allclose(ref, out, case.rtol, case.atol)
        if not case.check:
            rec["max_abs_err"] = max_abs_err(ref, out)
        if msg:
            rec.update(status="mismatch", reason=msg)
            res.update(status="failed", reason=f"{case.primary} != {name}: {msg}")
        else:
            rec["status"] = "ok"
        del out
    del ref
    if res["status"] == "failed":
        return res  # never time a case whose outputs disagree

    # 2. timing and memory
    for name, fn in runnable.items():
        rec = res["impls"][name]
        if rec["status"] != "ok":
            continue
        call = (lambda f=fn: f(inputs))
        rec.update(measure.time_fn(call, device, budget_s=budget_s, first_call_s=first_call[name]))
        rec["peak_extra_bytes"] = measure.peak_extra_bytes(call, device)
        if case.bytes_moved:
            rec["gbps"] = case.bytes_moved / rec["median_s"] / 1e9
            if device in copy_gbps:
                rec["frac_copy_bw"] = rec["gbps"] / copy_gbps[device]

    # 3. speedups of the primary over each baseline, against the targets
    p = res["impls"][case.primary]
    for name, rec in res["impls"].items():
        if name == case.primary or rec["status"] != "ok":
            continue
        rec["speedup"] = rec["median_s"] / p["median_s"]
        if name in case.target:
            rec["target"] = case.target[name]
            rec["met"] = rec["speedup"] >= case.target[name]
    return res


# ----------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import fastrl

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fastrl": fastrl.__version__,
        "fastrl_backend": os.environ.get("FASTRL_BACKEND") or "compiled",
        "verl": _version("verl"),
        "trl": _version("trl"),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],  # other processes on the machine skew timings
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu"]
    return env


# ------------------------------------------------------------------------------------------ run


def progress_line(i: int, n: int, res: dict, seconds: float) -> str:
    from fastrl.bench.report import fmt_speedup, fmt_time

    head = f"[{i}/{n}] {res['name']}: {res['status']}"
    if res["status"] != "ok":
        return f"{head} ({res['reason']}) [{seconds:.1f} s]"
    parts = []
    for name, rec in res["impls"].items():
        if rec["status"] != "ok":
            parts.append(f"{name} {rec['status']}")
            continue
        s = f"{name} {fmt_time(rec['median_s'])}"
        if "speedup" in rec:
            s += f" ({res['primary']} {fmt_speedup(rec['speedup'])}"
            if "target" in rec:
                s += f", target x{rec['target']:g} {'met' if rec['met'] else 'NOT met'}"
            s += ")"
        parts.append(s)
    return f"{head}  " + " | ".join(parts) + f"  [{seconds:.1f} s]"


def run(cases: list[Case], ctx: Context, *, budget_s: float, log=print) -> dict:
    """Runs the cases; returns the whole JSON report (environment, copy bandwidth, cases)."""
    devices = {ctx.device.type} | {c.device for c in cases if c.device}
    copy = {}
    for dev in sorted(devices):
        copy[dev] = measure.copy_bandwidth(dev, nbytes=(64 << 20) if ctx.quick else (256 << 20))
        log(f"copy bandwidth ({dev}, {copy[dev]['bytes'] >> 20} MiB copy_): {copy[dev]['gbps']:.1f} GB/s")
    gbps = {d: c["gbps"] for d, c in copy.items()}
    results = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        res = run_case(case, ctx, budget_s, gbps)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        log(progress_line(i, len(cases), res, res["seconds"]))
    return {"schema": 1, "environment": environment(ctx.device), "copy_bandwidth": copy,
            "budget_s": budget_s, "quick": ctx.quick, "cases": results}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fastrl.bench import report

    ap = argparse.ArgumentParser(prog="python -m fastrl.bench", description=(
        "Benchmark fastrl's ops against the implementations a trainer would otherwise run "
        "(verl, TRL, PyTorch eager, ...), in one process, and write JSON, Markdown and PNG results."))
    ap.add_argument("--filter", action="append", metavar="SUBSTR",
                    help="run only cases whose family.name contains SUBSTR (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small shapes and a short time budget (smoke test)")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--out", type=Path, help="results folder (default: <bench-dir>/results/latest)")
    ap.add_argument("--bench-dir", type=Path, help="folder of bench_<family>.py files")
    ap.add_argument("--budget", type=float, help="timing budget per implementation, seconds "
                    "(default 1.0, 0.05 with --quick); at least 3 samples are taken whatever the budget")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="include torch.compile baselines (slow to compile)")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(device=torch.device(args.device), quick=args.quick, compile=args.compile)
    bench_dir = args.bench_dir or default_bench_dir()
    cases, load_errors = discover(bench_dir, ctx)
    cases = select(cases, args.filter)

    if args.list:
        for c in cases:
            print(f"{c.full_name:32s} {c.shape}  [{', '.join(c.impls)}]")
        for e in load_errors:
            print(f"{e['name']:32s} LOAD ERROR: {e['reason']}")
        return 1 if load_errors else 0
    if not cases and not load_errors:
        print(f"no benchmark case matches {args.filter} in {bench_dir}", file=sys.stderr)
        return 2

    budget = args.budget if args.budget is not None else (0.05 if args.quick else 1.0)
    torch.manual_seed(0)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"fastrl.bench: {len(cases)} case(s) from {bench_dir} on {args.device}, budget {budget:g} s per implementation")
    load_before = os.getloadavg()[0]
    data = run(cases, ctx, budget_s=budget, log=log)
    data["environment"]["load_avg_1min_before"] = load_before
    data["cases"] += load_errors
    data["bench_dir"] = str(bench_dir)

    print(report.table(data))
    out = args.out or Path(bench_dir) / "results" / "latest"
    written = report.write(data, out)
    log("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(c["status"] == "failed" for c in data["cases"]) else 0
