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


# ---------------------------------------------------------------------------------------------
# A real pretrained model: deepbet's brain-mask network (MIT), shipped inside the deepbet wheel.

BRAIN_SPEC = REPO / "examples" / "brain_extraction" / "spec.json"


def deepbet_model_path() -> Path | None:
    import importlib.metadata

    try:
        files = importlib.metadata.files("deepbet") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "bbox_model.pt":
            return Path(f.locate()).resolve()
    return None


@pytest.fixture(scope="session")
def brain_model() -> Path:
    path = deepbet_model_path()
    if path is None:
        pytest.skip("deepbet is not installed (pip install --no-deps deepbet==1.0.2): no pretrained model")
    return path


@pytest.fixture(scope="session")
def brain_bundle(tmp_path_factory, brain_model) -> Path:
    """A bundle built from deepbet's pretrained TorchScript model (fp32, parity on a random input)."""
    pytest.importorskip("torch")
    from edgeseg.export.build import build_bundle
    from edgeseg.spec import load_spec

    out = tmp_path_factory.mktemp("bundles") / "brain.edgeseg"
    build_bundle(brain_model, load_spec(str(BRAIN_SPEC)), out, name="deepbet-brain-mask", version="1.0.2")
    return out


@pytest.fixture(scope="session")
def brain_spec():
    from edgeseg.spec import load_spec

    return load_spec(str(BRAIN_SPEC))
