"""README.md's examples run as written (one namespace, in order), so the docs stay true."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    pytest.importorskip("verl")  # one example uses the verl drop-in
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        from fastrl.integrations import verl as fverl

        fverl.uninstall()  # the README installs ours into verl's registry: leave verl as found
