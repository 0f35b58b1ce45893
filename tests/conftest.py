"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """Folder with the real MNIST / Fashion-MNIST files in torchvision's layout (read-only).

    ``../shared/data`` next to the repository, or ``$FEDMERGE_SHARED_DATA``; skips when absent.
    """
    override = os.environ.get("FEDMERGE_SHARED_DATA")
    path = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
    if not path.is_dir():
        pytest.skip(
            f"real MNIST/Fashion-MNIST not found at {path}: these tests need ../shared/data "
            "(torchvision layout); set FEDMERGE_SHARED_DATA"
        )
    return path
