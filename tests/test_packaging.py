"""The wheel carries every package: pyproject lists packages explicitly, so a new
subpackage that is not listed would be missing from an install (editable ones hide it)."""

from __future__ import annotations

import tomllib

from .conftest import ROOT


def test_every_python_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "newsletter").rglob("__init__.py")}
    assert found - listed == set()
