"""Loads the compiled extension fastrl._C, which registers every op under torch.ops.fastrl."""
import os

import torch  # noqa: F401  (loads libc10/libtorch, which fastrl._C links against)

BACKEND = os.environ.get("FASTRL_BACKEND", "").strip().lower()
"""`FASTRL_BACKEND=reference` routes every op to its pure-PyTorch reference, on purpose."""

BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` "
    "(needs torch, ninja and a C++17 compiler), or run `make test`, which does it for you. "
    "To run the pure-PyTorch references without the extension, set FASTRL_BACKEND=reference."
)

try:
    from fastrl import _C  # noqa: F401  (import registers torch.ops.fastrl.*)

    LOAD_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised by the packaging test in a subprocess
    _C = None
    LOAD_ERROR = exc
    if BACKEND != "reference":
        raise ImportError(f"fastrl's compiled extension fastrl._C could not be loaded ({exc}). {BUILD_HINT}") from exc


def use_reference() -> bool:
    return BACKEND == "reference"


def cuda_built() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))
