"""What a non-editable `pip install .` ships: every Python folder of the package is a package."""
import pathlib

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
