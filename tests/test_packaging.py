"""The installed package holds every source folder (setuptools lists packages explicitly)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "fedmerge").rglob("__init__.py")
    }
    found |= {name for name, folder in mapped.items() if (folder / "__init__.py").is_file()}
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"
