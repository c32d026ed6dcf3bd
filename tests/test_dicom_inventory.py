"""Every file of the shared DICOM tree is loaded, rejected with a reason, or skipped — never a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import shared_path
from pydicom import dcmread

from edgeseg import DicomInputError, Volume
from edgeseg.dicom import find_series, load_volume


@pytest.fixture(scope="module")
def tree():
    root = shared_path("dicom")
    scan = find_series([root])
    loaded: dict[Path, Volume] = {}
    failed: list[DicomInputError] = []
    for ref in scan.series:
        try:
            volume = load_volume(ref)
        except DicomInputError as err:
            failed.append(err)
            for f in ref.files:
                failed.append(DicomInputError(f, err.reason))
            continue
        for f in ref.files:
            loaded[Path(f).resolve()] = volume
    return root, scan, loaded, failed


def _all_files(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*") if p.is_file()}


def test_every_file_lands_in_exactly_one_place(tree):
    root, scan, loaded, failed = tree
    rejected = {Path(e.path).resolve() for e in scan.rejected} | {
        Path(e.path).resolve() for e in failed if Path(e.path).is_file()
    }
    skipped = {p.resolve() for p in scan.skipped}
    everything = _all_files(root)
    assert set(loaded) | rejected | skipped == everything
    assert not (set(loaded) & rejected), "a file both loaded and rejected"
    assert not (set(loaded) & skipped)
    assert not (rejected & skipped)
    # The shape of the tree (see INVENTORY.md): most files load, none is silently dropped.
    assert len(loaded) >= 200 and len(scan.series) >= 60
    print(
        f"\nDICOM tree: {len(everything)} files; loaded {len(loaded)} files in "
        f"{len({id(v) for v in loaded.values()})} volumes (of {len(scan.series)} series parts); "
        f"rejected {len(rejected)}; skipped {len(skipped)}"
    )


def test_broken_files_are_rejected_with_reasons(tree):
    root, scan, loaded, failed = tree
    errors = {Path(e.path).resolve(): e for e in [*scan.rejected, *failed] if e.path}
    for path in (root / "pydicom" / "broken").iterdir():
        assert path.resolve() not in loaded, f"{path.name} should not load"
        assert path.resolve() in errors, f"{path.name} neither rejected nor loaded"
        assert errors[path.resolve()].reason


def test_expected_rejections(tree):
    root, scan, loaded, _ = tree
    reasons = {Path(e.path).relative_to(root).as_posix(): e.reason for e in scan.rejected}
    assert "Segmentation" in reasons["dcmqi_ct3slice_seg/liver_seg.dcm"]
    assert "colour" in reasons["pydicom/us_color/US1_J2KR.dcm"]
    assert "colour" in reasons["pydicom/us_color/gdcm-US-ALOKA-16.dcm"]  # PALETTE COLOR
    assert "RT Dose" in reasons["pydicom/seg_rt_lut_misc/rtdose.dcm"]
    mosaic = next(p for p in (root / "dcm_qa_decubitus").rglob("*.dcm") if "mosaic" in str(p))
    if importlib.util.find_spec("edgeseg.dicom.mosaic") is None:
        assert "MOSAIC" in reasons[mosaic.relative_to(root).as_posix()]
    else:  # un-tiled from the CSA header: one volume
        assert mosaic.resolve() in loaded
    assert "no image pixel data" in next(v for k, v in reasons.items() if "TINY_ALPHA/PT" in k)
    skipped = {p.name for p in scan.skipped}
    assert {"README.md", "DICOM12bit.png", "liver_seg.nrrd", "zipMR.gz", "DICOMDIR"} <= skipped


def test_messages_and_labels_carry_no_patient_data(tree):
    root, scan, _, failed = tree
    identities: set[str] = set()
    for path in root.rglob("*"):
        if not path.is_file() or path.suffix in (".md", ".txt", ".png", ".nrrd", ".gz"):
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        except Exception:
            continue
        for value in (ds.get("PatientName"), ds.get("PatientID")):
            text = str(value or "").strip()
            if len(text) >= 4 and not text.isdigit():
                identities.add(text)
    # Without identifiers to look for (an anonymised tree) or messages to look in, the check
    # below would pass whatever the reader printed.
    assert len(identities) >= 3, f"only {len(identities)} patient name(s)/ID(s) found to look for"
    texts = [e.reason for e in [*scan.rejected, *failed]] + [ref.label for ref in scan.series]
    assert len(scan.rejected) >= 10 and len(texts) >= 70
    for text in texts:
        for identity in identities:
            assert identity not in text, "a patient identifier leaked into a message or label"


def test_loaded_volumes_are_consistent(tree):
    _, _, loaded, _ = tree
    for volume in {id(v): v for v in loaded.values()}.values():
        nz = volume.shape[0]
        assert volume.stored.dtype.name in ("int16", "uint16", "float32")
        assert len(volume.sop_instance_uids) == len(volume.frame_numbers) == nz
        assert volume.slope.shape == (nz,) and all(s > 0 for s in volume.spacing)
        assert volume.headers and all("PixelData" not in h for h in volume.headers)
        # JPEGLSNearLossless_16.dcm has no SeriesInstanceUID at all; everything else does.
        assert volume.series_instance_uid or "SeriesInstanceUID" not in volume.headers[0]
