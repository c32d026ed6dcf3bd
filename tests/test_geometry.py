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


@pytest.mark.parametrize("n_in, n_out", [(128, 256), (64, 256), (32, 256), (130, 256), (256, 128), (5, 3), (1, 4)])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_take_axis_is_np_take_along_every_axis(n_in, n_out, flip, dtype):
    # The shortcuts (a view for evenly spaced picks, the byte-widening for integer upsampling
    # of uint8 labels, threads) must give np.take's values on C-order and strided inputs.
    from edgeseg.geometry import nearest_indices, take_axis

    rng = np.random.default_rng(2)
    index = nearest_indices(n_in, n_out)[:: -1 if flip else 1]
    for axis in range(3):
        shape = [3, 4, 5]
        shape[axis] = n_in
        a = rng.integers(0, 250, shape).astype(dtype)
        for arr in (a, np.flip(np.transpose(a, (1, 0, 2)), 1).transpose(1, 0, 2)):
            for threads in (1, 3):
                got = take_axis(arr, index, axis, threads)
                np.testing.assert_array_equal(got, np.take(arr, index, axis=axis))
                assert got.dtype == arr.dtype


def test_evenly_spaced_nearest_picks_are_views():
    from edgeseg.geometry import resample_axis

    a = np.arange(4 * 256 * 6, dtype=np.uint16).reshape(4, 256, 6)
    half = resample_axis(a, 1, 128, "nearest")  # takes 1, 3, 5, …
    assert np.shares_memory(half, a) and half.shape == (4, 128, 6)
    np.testing.assert_array_equal(half, a[:, 1::2])
    assert not np.shares_memory(resample_axis(a, 1, 100, "nearest"), a)


@pytest.mark.parametrize("code", ["RAS", "LPS", "PSL", "ILA"])
def test_labels_back_to_the_source_are_the_resampled_labels_in_source_order(code):
    # labels_to_source gathers straight into source order; the reference resamples on the model
    # grid, then views that in source order. Labels already at their source length on a
    # shrinking axis (the planes source_planes keeps) give the same.
    from edgeseg.preprocess import Prepared, labels_to_source, source_planes

    rng = np.random.default_rng(4)
    direction = _direction([0, 1, 0], [0, 0, -1])  # sagittal
    orient = orientation_for(direction, code)
    source = (35, 64, 60)
    oriented = orient.model_shape(source)
    grid = (32, 128, 128)
    prepared = Prepared(np.empty(0, np.float32), grid, oriented, source, orient)
    labels = rng.integers(0, 3, grid).astype(np.uint8)
    want = np.ascontiguousarray(orient.from_model(resample(labels, oriented, "nearest", (0, 1, 2))))
    got = labels_to_source(labels, prepared, threads=2)
    assert got.shape == source and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    picked = labels
    for axis, planes in enumerate(source_planes(prepared)):
        if planes is not None:
            picked = np.take(picked, planes, axis=axis)
    assert picked.shape != grid  # the in-plane axes shrink back to 64 and 60
    np.testing.assert_array_equal(labels_to_source(picked, prepared), want)
