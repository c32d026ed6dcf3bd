"""Slice order, spacing, affine, tilt, enhanced multi-frame and DICOMDIR navigation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path
from pydicom import dcmread

from edgeseg import DicomInputError
from edgeseg.dicom import find_series, load_volume, read_volume


def _check_affine_matches_headers(volume, files):
    """Voxel (0, 0, z) must land on the IPP of the instance that slice came from."""
    ipp = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        ipp[str(ds.SOPInstanceUID)] = np.array([float(v) for v in ds.ImagePositionPatient])
    for z, uid in enumerate(volume.sop_instance_uids):
        np.testing.assert_allclose((volume.affine @ [0, 0, z, 1])[:3], ipp[uid], atol=1e-3)


def _normal(volume):
    return np.cross(volume.affine[:3, 0], volume.affine[:3, 1])


@pytest.mark.parametrize(
    "series",
    [
        "tcia_brain_tumor_progression/PGBM-003_Study3/11-T1post-18670",
        "tcia_brain_tumor_progression/PGBM-003_Study3/26401-T1prereg-52906",
        "tcia_brain_tumor_progression/PGBM-003_Study3/11_HCropVolume",
        "dcm_qa_decubitus/HFS_t1_fl2d_sag",
    ],
)
def test_real_series_assemble_in_order(series):
    folder = shared_path("dicom", series)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    volume = read_volume(folder)
    assert volume.shape[0] == len(files)
    _check_affine_matches_headers(volume, files)
    headers = {str(h.SOPInstanceUID): h for h in volume.headers}
    proj = [
        float(np.dot([float(v) for v in headers[u].ImagePositionPatient], _normal(volume)))
        for u in volume.sop_instance_uids
    ]
    assert np.all(np.diff(proj) > 0), "positions must increase strictly along the normal"
    first = headers[volume.sop_instance_uids[0]]
    expected_dz = float(first.get("SpacingBetweenSlices") or first.SliceThickness)
    assert volume.spacing[0] == pytest.approx(expected_dz, rel=1e-3)
    assert volume.spacing[1:] == pytest.approx([float(v) for v in first.PixelSpacing], rel=1e-6)
    assert not volume.warnings


def test_siemens_instance_numbers_agree_with_geometry():
    volume = read_volume(shared_path("dicom", "dcm_qa_decubitus", "HFS_t1_fl2d_sag"))
    headers = {str(h.SOPInstanceUID): h for h in volume.headers}
    numbers = [int(headers[u].InstanceNumber) for u in volume.sop_instance_uids]
    assert numbers == sorted(numbers) or numbers == sorted(numbers, reverse=True)


def test_gantry_tilt_is_detected_and_kept_in_affine():
    folder = shared_path("dicom", "dicom2nifti_headers_random_pixels", "ct_siemens_gantry_tilt")
    volume = read_volume(folder)
    assert any("gantry tilt" in w for w in volume.warnings)
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 5], atol=1e-6)
    _check_affine_matches_headers(volume, sorted(folder.iterdir()))
    assert volume.spacing[0] == pytest.approx(5.0)


def test_enhanced_ct_frames_sorted_by_position():
    volume = read_volume(shared_path("dicom", "pydicom/ct/eCT_Supplemental.dcm"))
    assert volume.shape == (2, 512, 512)
    # IOP (-1,0,0 / 0,1,0): normal is -z, so the frame at z=-149 comes before z=-159.
    assert volume.frame_numbers == [2, 1]
    np.testing.assert_allclose(volume.affine[:3, 3], [99.5, -301.5, -149.0])
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert len(volume.headers) == 1


def test_enhanced_mr_philips_uses_functional_groups():
    volume = read_volume(
        shared_path("dicom", "dicom2nifti_headers_random_pixels", "mr_philips_enhanced_multiframe")
    )
    assert volume.shape == (8, 256, 256)
    assert volume.spacing[0] == pytest.approx(1.2, abs=1e-3)
    np.testing.assert_allclose(volume.slope, 4.25885225885225)
    assert sorted(volume.frame_numbers) == list(range(1, 9))


def test_enhanced_mr_without_geometry_stacks_with_warning():
    volume = read_volume(shared_path("dicom", "pydicom/mr/emri_small.dcm"))
    assert volume.shape == (10, 64, 64) and volume.frame_numbers == list(range(1, 11))
    assert any("no plane position" in w for w in volume.warnings)


def test_dicomdir_navigation():
    root = shared_path("dicom", "pydicom", "dicomdir_series")
    scan = find_series([root / "DICOMDIR"])
    files = {p.resolve() for ref in scan.series for p in ref.files}
    assert len(files) >= 20  # every image the index lists, found through the index alone
    for variant in ("DICOMDIR-bigEnd", "DICOMDIR-implicit", "DICOMDIR-nooffset", "DICOMDIR-reordered"):
        other = find_series([root / variant])
        assert {p.resolve() for ref in other.series for p in ref.files} == files, variant
    ct5 = next(ref for ref in scan.series if ref.n_instances == 5)
    volume = load_volume(ct5)
    assert volume.shape == (5, 16, 16) and volume.spacing[0] == pytest.approx(2.5)
    _check_affine_matches_headers(volume, ct5.files)
    empty = find_series([root / "DICOMDIR-empty.dcm"])
    assert not empty.series and not empty.rejected


def test_gap_is_refused_with_reason():
    ref = next(r for r in find_series([shared_path("dicom", "pydicom/dicomdir_series/77654033/CT2")]).series)
    with pytest.raises(DicomInputError, match="uneven"):
        load_volume(ref)


def test_read_volume_refuses_many_series():
    with pytest.raises(DicomInputError, match="series found"):
        read_volume(shared_path("dicom", "tcia_brain_tumor_progression"))


def test_4d_series_is_split_into_volumes():
    scan = find_series([shared_path("dicom", "dicom2nifti_headers_random_pixels", "mr_ge_dti_noext")])
    assert [ref.n_instances for ref in scan.series] == [4, 4, 4, 4]


def test_a_slice_without_pixel_module_is_rejected_and_the_volume_says_it_is_incomplete(tmp_path):
    """A header without BitsAllocated is one sentence naming the file, not a TypeError from
    decoding; the rest of the series loads with a warning (two slices hide the hole from the
    spacing checks)."""
    files = sorted(shared_path("dicom", "dcm_qa_decubitus", "HFS_t1_fl2d_sag").glob("*.dcm"))[:3]
    for i, f in enumerate(files):
        ds = dcmread(f)
        if i == 1:
            del ds.BitsAllocated
        ds.save_as(tmp_path / f"{i}.dcm")
    scan = find_series(tmp_path)
    assert [str(r.path) for r in scan.rejected] == [str(tmp_path / "1.dcm")]
    assert "lacks BitsAllocated" in scan.rejected[0].reason
    volume = read_volume(tmp_path)
    assert volume.shape[0] == 2
    assert any("rejected" in w and "incomplete" in w for w in volume.warnings)
