"""NIfTI input: the Volume's LPS geometry matches nibabel's RAS affine, voxel for voxel."""

import numpy as np
import pytest

from edgeseg.nifti_input import nifti_labels, read_nifti

nib = pytest.importorskip("nibabel")


def test_hippocampus_case_geometry_and_values(seg_data):
    img_path = seg_data / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    lab_path = seg_data / "msd_task04_hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    vol = read_nifti(img_path)
    img = nib.load(str(img_path))
    data = img.get_fdata()
    assert vol.shape == data.shape[::-1]
    np.testing.assert_allclose(vol.modality_values(), data.transpose(2, 1, 0), rtol=1e-6)
    # A voxel's world position: Volume affine (x, y, z) → LPS equals nibabel (i, j, k) → RAS flipped.
    ijk = np.array([3, 5, 7, 1.0])
    ras = img.affine @ ijk
    lps = vol.affine @ ijk
    np.testing.assert_allclose(lps[:3], ras[:3] * [-1, -1, 1])
    zooms = img.header.get_zooms()
    assert vol.spacing == pytest.approx((zooms[2], zooms[1], zooms[0]))
    labels = nifti_labels(lab_path)
    assert labels.shape == vol.shape and set(np.unique(labels)) <= {0, 1, 2}


def test_bad_nifti_is_a_clear_error(tmp_path):
    from edgeseg import DicomInputError

    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(DicomInputError, match="cannot read NIfTI"):
        read_nifti(bad)


def test_a_folder_of_nifti_is_segmented_case_by_case_beside_its_dicom(seg_data, dicom_data, tmp_path):
    # What nnUNetv2_predict -i takes: a folder of NIfTI cases (here next to a DICOM series).
    from edgeseg.run import _single_jobs

    images = seg_data / "msd_task04_hippocampus" / "imagesTr"
    for name in ("hippocampus_003.nii.gz", "hippocampus_001.nii.gz"):
        (tmp_path / name.replace(".nii", "_0000.nii")).symlink_to(images / name)
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "01.dcm").symlink_to(dicom_data / "dcmqi_ct3slice_seg" / "01.dcm")
    items = list(_single_jobs([tmp_path]))
    assert [type(i).__name__ for i in items] == ["_Job"] * 3, [getattr(i, "error", "") for i in items]
    sources = [i.source for i in items]
    assert [s.rsplit("/", 1)[-1] for s in sources[:2]] == [
        "hippocampus_001_0000.nii.gz",
        "hippocampus_003_0000.nii.gz",
    ]
    assert sources[2].startswith(str(tmp_path / "ct"))
    assert items[0].load().shape == read_nifti(images / "hippocampus_001.nii.gz").shape
