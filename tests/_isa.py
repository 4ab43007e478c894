"""Runs fastrl in a subprocess with its CPU kernels capped at an ISA.

FASTRL_CPU_ISA=baseline|avx2|avx512 caps the runtime-dispatched SIMD paths (csrc/cpu/simd.h). It is
read once per process, hence the subprocess. On a CPU without the ISA the cap is a no-op.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

ISAS = ["baseline", "avx2", "avx512"]


def run_capped(isa: str, script: str, cases, tmp_path):
    """torch.save(cases) -> `script` (reads sys.argv[1], writes its outputs to sys.argv[2]) under
    FASTRL_CPU_ISA=isa -> the outputs."""
    src, dst = tmp_path / f"cases_{isa}.pt", tmp_path / f"out_{isa}.pt"
    torch.save(cases, src)
    env = dict(os.environ, FASTRL_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", script, str(src), str(dst)], env=env, check=True, capture_output=True,
                   text=True)
    return torch.load(dst)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
