"""Renders a run's JSON record: a text table (screen), results.json, results.md and speedups.png."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("impl", "median", "speedup", "target", "met", "peak extra", "GB/s", "% copy BW")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_speedup(x: float) -> str:
    return f"x{x:.0f}" if x >= 100 else f"x{x:.3g}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _row(primary: str, name: str, rec: dict) -> tuple[str, ...] | str:
    """The cells of one implementation's row, or a one-line status for one that was not timed."""
    if rec["status"] != "ok" or "median_s" not in rec:
        return f"{rec['status']}: {rec.get('reason', '')}".rstrip(": ")
    speed = "-" if name == primary else fmt_speedup(rec["speedup"])
    target = f">= x{rec['target']:g}" if "target" in rec else ""
    met = ("yes" if rec["met"] else "NO") if "met" in rec else ""
    gbps = f"{rec['gbps']:.3g}" if "gbps" in rec else ""
    frac = f"{100 * rec['frac_copy_bw']:.3g}%" if "frac_copy_bw" in rec else ""
    label = f"{name} *" if name == primary else name
    return (label, fmt_time(rec["median_s"]), speed, target, met, fmt_bytes(rec.get("peak_extra_bytes")), gbps, frac)


def _header(data: dict) -> list[str]:
    env, copy = data["environment"], data["copy_bandwidth"]
    bw = ", ".join(f"{d} {c['gbps']:.1f} GB/s" for d, c in copy.items())
    return [
        f"fastrl {env['fastrl']} ({env['fastrl_backend']}), torch {env['torch']}, verl {env['verl']}, "
        f"trl {env['trl']}, numpy {env['numpy']}, python {env['python']}",
        f"{env['device']}: {env['device_name']}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
        f"load average {env.get('load_avg_1min_before', float('nan')):.2f} -> {env['load_avg_1min']:.2f}; "
        f"copy bandwidth {bw}; {env['date']}; git {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}",
        f"median of >= 3 samples per implementation (budget {data['budget_s']:g} s each); speedup = baseline "
        f"median / primary (*) median, same run; peak extra = memory above the pre-call level during one call",
    ]


def table(data: dict) -> str:
    """Fixed-width text table for the terminal."""
    lines = _header(data) + [""]
    widths = (22, 10, 9, 9, 4, 11, 8, 9)

    def fmt(cells):  # first column left-aligned, numbers right-aligned
        return "  " + "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(fmt(COLUMNS))
    for case in data["cases"]:
        lines.append(f"{case['name']}  [{case.get('shape', '')}]")
        if case["status"] != "ok":
            lines.append(f"  {case['status'].upper()}: {case['reason']}")
        for name, rec in case["impls"].items():
            row = _row(case["primary"], name, rec) if case.get("primary") else None
            if isinstance(row, tuple):
                lines.append(fmt(row))
            elif row is not None and (case["status"] == "ok" or rec["status"] != "not run"):
                lines.append(f"  {name:<22}  {row}")
        if case.get("note"):
            lines.append(f"  note: {case['note']}")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    """GitHub-flavoured Markdown: environment lines, one table, per-case notes."""
    out = ["# fastrl benchmark results", ""] + [f"- {line}" for line in _header(data)] + [""]
    out.append("| case | shape | " + " | ".join(COLUMNS) + " |")
    out.append("|" + "---|" * (len(COLUMNS) + 2))
    notes = []
    blank = ("",) * (len(COLUMNS) - 2)
    for case in data["cases"]:
        rows = []  # implementation columns only; the case's name and shape go on its first row
        if case["status"] != "ok":
            rows.append((f"**{case['status']}**", case["reason"]) + blank)
        for name, rec in case["impls"].items():
            row = _row(case["primary"], name, rec)
            if not isinstance(row, tuple):
                if case["status"] != "ok" and rec["status"] == "not run":
                    continue
                row = (name, row) + blank
            rows.append(row)
        for i, row in enumerate(rows):
            head = (f"`{case['name']}`", case.get("shape", "")) if i == 0 else ("", "")
            out.append("| " + " | ".join(head + row) + " |")
        if case.get("note"):
            notes.append(f"- `{case['name']}`: {case['note']}")
    if notes:
        out += ["", "Notes:", ""] + notes
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    """Horizontal bars: speedup of the primary over each timed baseline, log scale; a black tick
    marks the target (bar green if met, red if not; blue without a target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{c['name']} vs {n}", r["speedup"], r.get("target"), r.get("met"))
            for c in data["cases"] if c["status"] == "ok"
            for n, r in c["impls"].items() if "speedup" in r]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * max(1, len(bars))))
    env = data["environment"]
    ax.set_title(f"fastrl speedup over baselines ({env['device']}: {env['device_name']}, {env['date'][:10]})",
                 fontsize=10)
    if not bars:
        ax.text(0.5, 0.5, "no timed baselines", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = list(range(len(bars)))[::-1]
        colors = ["tab:blue" if t is None else ("tab:green" if m else "tab:red") for _, _, t, m in bars]
        ax.barh(y, [b[1] for b in bars], color=colors)
        ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
        ax.set_xscale("log")
        ax.axvline(1.0, color="gray", lw=0.8)
        for yi, (_, s, t, _) in zip(y, bars):
            ax.text(s, yi, " " + fmt_speedup(s), va="center", fontsize=7)
            if t is not None:
                ax.plot([t], [yi], marker="|", color="black", markersize=14, mew=2)
        lo = min(min(b[1] for b in bars), 1.0) / 2
        hi = max(max(b[1] for b in bars), max((b[2] or 1) for b in bars)) * 4
        ax.set_xlim(lo, hi)
        ax.set_xlabel("speedup (baseline median / fastrl median), log scale; | = target")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(data: dict, out_dir: Path) -> list[Path]:
    """Writes results.json, results.md and speedups.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "speedups.png"]
    paths[0].write_text(json.dumps(data, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(data))
    plot(data, paths[2])
    return paths
