"""Parity references that may be missing (verl, trl): a module-level ``pytest.importorskip`` would
skip a whole test file, CUDA tests included, on a machine without them (the GPU machine has
neither). ``optional_module`` defers the skip to the first test that actually uses the module."""
import importlib

import pytest


class _Missing:
    def __init__(self, name: str, error: Exception):
        self._name, self._error = name, error

    def __getattr__(self, attr):
        pytest.skip(f"could not import {self._name!r}: {self._error}")


def optional_module(name: str):
    """The module, or a stand-in whose every attribute access skips the calling test."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        return _Missing(name, exc)
