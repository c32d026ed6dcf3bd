"""Shared fixtures. Real data lives in ../shared/data and is read in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared")).resolve()
DICOM_DATA = SHARED / "data" / "dicom"
SEG_DATA = SHARED / "data" / "seg"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a clear reason when it is absent."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set EDGESEG_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def dicom_data() -> Path:
    return shared_path("dicom")


@pytest.fixture
def seg_data() -> Path:
    return shared_path("seg")
