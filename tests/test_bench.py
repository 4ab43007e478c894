"""The benchmark runner (`python -m fastrl.bench`): results files, output checks, skips."""
import json
import textwrap

import pytest

from fastrl.bench.runner import main

FAKE_BENCH = textwrap.dedent('''
    from types import SimpleNamespace
    import torch
    from fastrl.bench import Case, Skip

    def cases(ctx):
        setup = lambda: SimpleNamespace(x=torch.arange(8.0))
        def inplace(a):
            a.x.add_(1)
            return a.x
        return [
            Case("good", "x[8]", setup, {"fastrl": lambda a: a.x * 2, "eager": lambda a: a.x + a.x,
                                         "absent": Skip("not installed here")}, target={"eager": 1e-3}),
            Case("wrong", "x[8]", setup, {"fastrl": lambda a: a.x * 2, "off": lambda a: a.x * 2 + 1}),
            Case("mutating", "x[8]", setup, {"fastrl": lambda a: a.x * 2, "inplace": inplace}),
        ]
''')


def _load(out):
    for name in ("results.json", "results.md", "speedups.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "results.json").read_text())


def test_quick_advantage_case(tmp_path, capsys):
    """A real advantage case in --quick mode: timed, compared with verl (or verl reported skipped)."""
    out = tmp_path / "res"
    rc = main(["--quick", "--device", "cpu", "--filter", "grpo_scalar", "--out", str(out)])
    assert rc == 0
    data = _load(out)
    assert data["environment"]["torch"] and data["copy_bandwidth"]["cpu"]["gbps"] > 0
    (case,) = data["cases"]
    assert case["name"] == "advantages.grpo_scalar" and case["status"] == "ok"
    impls = case["impls"]
    assert impls["fastrl"]["median_s"] > 0 and impls["fastrl"]["repeats"] >= 3
    assert impls["torch-eager"]["speedup"] > 0
    verl = impls["verl"]
    if verl["status"] == "skipped":
        assert verl["reason"]
    else:
        assert verl["speedup"] > 0 and verl["target"] == 100 and isinstance(verl["met"], bool)
    assert impls["torch-compile"]["status"] == "skipped"  # off unless --compile
    assert "advantages.grpo_scalar" in capsys.readouterr().out  # the table


def test_checks_and_skips(tmp_path):
    """Mismatching or input-modifying implementations fail their case untimed; skips keep a reason."""
    (tmp_path / "bench_fake.py").write_text(FAKE_BENCH)
    out = tmp_path / "res"
    rc = main(["--bench-dir", str(tmp_path), "--out", str(out), "--budget", "0.01", "--device", "cpu"])
    assert rc == 1  # a failed case makes the run fail
    cases = {c["name"]: c for c in _load(out)["cases"]}
    good, wrong, mutating = cases["fake.good"], cases["fake.wrong"], cases["fake.mutating"]
    assert good["status"] == "ok" and good["impls"]["eager"]["met"] is True
    assert good["impls"]["absent"] == {"status": "skipped", "reason": "not installed here"}
    assert wrong["status"] == "failed" and wrong["impls"]["off"]["status"] == "mismatch"
    assert "median_s" not in wrong["impls"]["fastrl"]  # not timed
    assert mutating["status"] == "failed" and "modified" in mutating["reason"]


@pytest.mark.parametrize("argv", [["--list"], ["--list", "--filter", "group_index"]])
def test_list(argv, capsys):
    assert main(argv) == 0
    assert "advantages." in capsys.readouterr().out
