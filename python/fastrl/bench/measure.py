"""Timing, peak memory and copy bandwidth: the measurements behind every number in a report.

Timing: each sample is one call, timed on the host with ``perf_counter`` (on CUDA with a
``synchronize`` before and after, so a sample is the wall time a trainer waits for the result).
Warm-up calls first, then as many samples as fit in a time budget, between a minimum and a
maximum count; the median is reported (robust to the odd preemption on a shared machine).

Peak extra memory: one extra, untimed call.
  * CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call,
    after ``reset_peak_memory_stats()``: bytes the caching allocator handed out at the peak,
    output included.
  * CPU: torch keeps no CPU allocator statistics, and tracemalloc does not see torch's buffers, so
    we measure the process's resident memory: ``malloc_trim(0)`` first (so freed heap pages must be
    faulted in again rather than silently reused), reset the kernel's peak-RSS mark by writing
    ``5`` to ``/proc/self/clear_refs``, call, and read ``VmHWM`` from ``/proc/self/status``.
    Peak extra = VmHWM - VmRSS before the call: every allocation the call touched (torch, numpy,
    Python objects, worker threads), output included, at page granularity (4 KiB). None where
    /proc is unavailable.
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, *, budget_s: float, min_repeats: int = 3,
            max_repeats: int = 500, first_call_s: float | None = None) -> dict:
    """Median wall time of ``fn()``.

    Warm-up: up to 3 calls, stopping once 20 % of the budget is spent; none when the caller's own
    first call (``first_call_s``, e.g. the output check) already took that long, since a slow
    Python-loop baseline gains nothing from more warm-up.
    Samples: ``budget_s / fastest warm-up call`` clamped to ``[min_repeats, max_repeats]``.
    """
    warmup_s = 0.2 * budget_s
    est = []
    if first_call_s is not None and first_call_s >= warmup_s:
        est.append(first_call_s)
    else:
        t_start = time.perf_counter()
        while len(est) < 3 and (not est or time.perf_counter() - t_start < warmup_s):
            est.append(_one(fn, device))
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(min(est), 1e-9))))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whichever impl triggered it
    try:
        samples = [_one(fn, device) for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "iqr_s": _iqr(samples),
        "repeats": repeats,
    }


def _one(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


# ---------------------------------------------------------------------------------------- memory


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may under-count reused heap memory
        pass


def _proc_status_kib(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in keys}


def cpu_peak_supported() -> bool:
    try:
        _proc_status_kib("VmRSS", "VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def peak_extra_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Peak memory above the pre-call level during one call of ``fn`` (see module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return int(peak)
    if not cpu_peak_supported():
        return None
    _malloc_trim()
    before = _proc_status_kib("VmRSS")["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    out = fn()
    hwm = _proc_status_kib("VmHWM")["VmHWM"]
    del out
    return max(0, hwm - before) * 1024


# ------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 10) -> dict:
    """The machine's practical memory bandwidth: median ``dst.copy_(src)`` of ``nbytes``, counted as
    2 x nbytes moved (read + write, the STREAM-copy convention)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages, outside the timing
    samples = [_one(lambda: dst.copy_(src), device) for _ in range(repeats)]
    med = statistics.median(samples)
    return {"bytes": nbytes, "median_s": med, "gbps": 2 * nbytes / med / 1e9,
            "threads": torch.get_num_threads()}
