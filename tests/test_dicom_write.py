"""write_series round trips through read_volume."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from edgeseg.dicom import read_volume, write_series


def test_integer_round_trip_axis_aligned(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(-1024, 3000, size=(5, 12, 9), dtype=np.int16)
    files = write_series(a, tmp_path, spacing=(2.5, 0.7, 0.8), modality="CT", fsync=False)
    assert len(files) == 5
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.modality_values(), a)
    assert volume.stored.dtype == np.int16 and volume.has_identity_rescale
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_allclose(volume.affine, np.diag([0.8, 0.7, 2.5, 1.0]), atol=1e-9)
    ds = dcmread(files[0])
    assert (
        ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    )
    assert ds.PatientID == "ANON" and ds.FrameOfReferenceUID and ds.StudyInstanceUID


def test_float_oblique_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(100.0, 40.0, size=(4, 10, 11)).astype(np.float32)
    theta = np.radians(20.0)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    rot = rot @ np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    spacing = (3.0, 1.25, 0.9)  # z, y, x
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([spacing[2], spacing[1], spacing[0]])
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    # Written in reverse slice order on purpose: reading must sort by position, not by name.
    write_series(a, tmp_path, spacing=spacing, affine=affine, modality="MR", fsync=False)
    volume = read_volume(tmp_path)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    assert volume.spacing == pytest.approx(spacing)
    slope = float(volume.slope[0])
    assert np.max(np.abs(volume.modality_values() - a)) <= slope / 2 + 1e-4
    assert not volume.warnings


def test_flipped_slice_axis_is_sorted_back(tmp_path):
    a = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    affine = np.diag([1.0, 1.0, -2.0, 1.0])  # slices written head-first along -z
    write_series(a, tmp_path, spacing=(2.0, 1.0, 1.0), affine=affine, fsync=False)
    volume = read_volume(tmp_path)
    # Normal is +z, so the volume comes back ascending in z: the array reversed.
    np.testing.assert_array_equal(volume.modality_values(), a[::-1])
    np.testing.assert_allclose(volume.affine[:3, 3], [0, 0, -4.0])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_series(np.zeros((2, 3, 3)), tmp_path, spacing=(1, 1, 1), modality="PT")
    with pytest.raises(ValueError):
        write_series(np.zeros((2, 3, 3)), tmp_path, spacing=(2, 1, 1), affine=np.eye(4))
