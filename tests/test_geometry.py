"""Reorientation and resampling against independent computations (torch's interpolate)."""

import numpy as np
import pytest

from edgeseg.geometry import orientation_for, resample, spacing_to_shape

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _direction(row, col):
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    return np.stack([row, col, normal], axis=1)  # columns: x, y, z index axes


def test_axial_lps_to_ras_flips_and_reverses_axes():
    o = orientation_for(_direction([1, 0, 0], [0, 1, 0]), "RAS")
    # model D (R) ← x flipped, H (A) ← y flipped, W (S) ← z
    assert o.perm == (2, 1, 0)
    assert o.flips == (True, True, False)
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    m = o.to_model(a)
    assert m.shape == (4, 3, 2)
    assert m[0, 0, 0] == a[0, 2, 3]  # first R voxel = last x, last y, first z
    np.testing.assert_array_equal(o.from_model(m), a)


def test_sagittal_and_oblique_pick_the_nearest_axes():
    # Sagittal: rows along A→P (y), columns along S→I; normal along x.
    o = orientation_for(_direction([0, 1, 0], [0, 0, -1]), "RAS")
    assert o.model_shape((5, 6, 7)) == (5, 7, 6)
    tilt = np.deg2rad(20)
    o2 = orientation_for(_direction([1, 0, 0], [0, np.cos(tilt), np.sin(tilt)]), "SPL")
    assert o2.is_identity
    assert orientation_for(_direction([1, 0, 0], [0, 1, 0]), None).is_identity


@pytest.mark.parametrize("shape_in, shape_out", [((7, 9, 11), (16, 5, 11)), ((4, 4, 4), (4, 8, 3))])
def test_linear_resampling_matches_torch_align_corners_false(shape_in, shape_out):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape_in).astype(np.float32)
    ours = resample(a, shape_out, "linear", (0, 1, 2))
    ref = F.interpolate(
        torch.from_numpy(a)[None, None], size=shape_out, mode="trilinear", align_corners=False
    )
    np.testing.assert_allclose(ours, ref[0, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_nearest_resampling_matches_torch_nearest_exact():
    a = np.arange(5 * 7 * 9, dtype=np.float32).reshape(5, 7, 9)
    ours = resample(a, (8, 3, 13), "nearest", (0, 1, 2))
    ref = F.interpolate(torch.from_numpy(a)[None, None], size=(8, 3, 13), mode="nearest-exact")
    np.testing.assert_array_equal(ours, ref[0, 0].numpy())


def test_spacing_to_shape_keeps_extent():
    assert spacing_to_shape((10, 100, 100), (5.0, 0.5, 0.5), (1.0, 1.0, 1.0)) == (50, 50, 50)
