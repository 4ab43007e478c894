"""What a non-editable `pip install .` ships: every Python folder of the package is a package."""
import pathlib
import shutil
import subprocess
import sys

import pytest
from setuptools import find_packages

PYTHON = pathlib.Path(__file__).resolve().parents[1] / "python"


def test_every_python_folder_is_packaged():
    packaged = set(find_packages(str(PYTHON)))
    folders = {
        ".".join(p.parent.relative_to(PYTHON).parts)
        for p in (PYTHON / "fastrl").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders <= packaged, f"not packaged by setup.py (missing __init__.py?): {sorted(folders - packaged)}"


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs Linux and ldd")
def test_extension_links_libstdcxx_dynamically():
    """fastrl._C must share libstdc++ with libtorch. A compiler that links libstdc++ statically into
    the extension (seen with a wrapped g++ whose -B dir holds only libstdc++.a) builds and imports
    fine, then segfaults in the first error message an op formats (its own, uninitialized copy of
    the iostream locale): every bad-input check becomes a crash."""
    import fastrl._C as ext

    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in out, (
        f"{ext.__file__} does not link libstdc++.so dynamically (static libstdc++?); rebuild with the "
        f"system g++, e.g. CXX=/usr/bin/g++. ldd:\n{out}")
