"""nnU-Net's resampling in numpy against scipy.ndimage.zoom and nnU-Net's own function.

The runtime has no scipy: :mod:`edgeseg.resample_spline` rebuilds scipy's cubic B-spline
(prefilter with its edge prepadding, grid_mode sampling) and :func:`edgeseg.geometry.resample_image`
nnU-Net's separate low-resolution axis and skimage's clip. Both are checked here against the
real thing (scipy, and nnunetv2's ``resample_data_or_seg_to_shape``) on random data.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.geometry import lowres_axis, resample_image
from edgeseg.resample_spline import cubic_axis

ndi = pytest.importorskip("scipy.ndimage")
REL = 1e-5  # float32 here, float64 in scipy: relative to the data's range


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.ptp(b), 1e-12))


@pytest.mark.parametrize(
    "shape,axis,n_out",
    [
        ((37,), 0, 53),
        ((37,), 0, 20),
        ((5, 41, 33), 1, 64),
        ((5, 41, 33), 2, 17),
        ((3,), 0, 7),
        ((30, 20, 10), 0, 31),
    ],
)
def test_cubic_axis_is_scipy_zoom_order3_nearest_grid_mode(shape, axis, n_out):
    a = (np.random.default_rng(sum(shape)).normal(size=shape) * 100).astype(np.float32)
    zoom = [1.0] * len(shape)
    zoom[axis] = n_out / shape[axis]
    ref = ndi.zoom(a.astype(np.float64), zoom, order=3, mode="nearest", grid_mode=True)
    ours = cubic_axis(a, axis, n_out)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert _rel(ours, ref) < REL


def test_cubic_reproduces_the_input_on_the_same_grid_and_overshoots_without_the_clip():
    a = np.zeros(20, dtype=np.float32)
    a[10:] = 1.0  # a step: a cubic spline rings around it
    np.testing.assert_allclose(cubic_axis(a, 0, 20), a, atol=1e-6)
    up = cubic_axis(a, 0, 50)
    assert up.min() < -1e-3 and up.max() > 1 + 1e-3  # the ringing the clip removes
    clipped = resample_image(a, (50,), "cubic", (0,))
    assert clipped.min() == 0.0 and clipped.max() == 1.0


nnunet_resampling = pytest.importorskip(
    "nnunetv2.preprocessing.resampling.default_resampling", reason="nnunetv2 is not installed"
)


@pytest.mark.parametrize(
    "shape,spacing,new_spacing",
    [
        ((24, 40, 36), (1.0, 1.0, 1.0), (1.0, 0.8, 1.3)),  # a 2d configuration: axis 0 kept
        ((20, 30, 26), (1.2, 0.9, 1.1), (1.0, 1.0, 1.0)),  # isotropic 3D, every axis cubic
        ((9, 40, 36), (5.0, 0.9, 0.9), (5.0, 0.7, 0.75)),  # thick slices: axis 0 separate, kept
        ((9, 40, 36), (5.0, 0.9, 0.9), (3.0, 1.0, 1.0)),  # thick slices resampled: nearest along 0
        ((30, 12, 28), (0.8, 4.0, 0.8), (1.0, 3.5, 1.0)),  # the low-resolution axis in the middle
        ((20, 30, 26), (1.0, 1.0, 1.0), (1.0, 4.0, 4.0)),  # anisotropic target, 2 axes share max
    ],
)
def test_images_like_nnunet_order3_with_its_separate_z(shape, spacing, new_spacing):
    rng = np.random.default_rng(7)
    img = rng.gamma(2.0, 150.0, size=shape).astype(np.float32)  # MR-like: positive, long tail
    new_shape = nnunet_resampling.compute_new_shape(shape, spacing, new_spacing)
    ref = nnunet_resampling.resample_data_or_seg_to_shape(
        img[None], new_shape, spacing, new_spacing, is_seg=False, order=3, order_z=0, force_separate_z=None
    )[0]
    low = lowres_axis(spacing, new_spacing)
    ours = resample_image(img, tuple(int(n) for n in new_shape), "cubic", (0, 1, 2), low)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < REL, (low, _rel(ours, ref))


@pytest.mark.parametrize(
    "spacing,new_spacing", [((1.0, 0.8, 1.3), (1.0, 1.0, 1.0)), ((3.0, 1.0, 1.0), (5.0, 0.9, 0.9))]
)
def test_probabilities_like_nnunet_order1(spacing, new_spacing):
    # the way back: logits from the model grid to the source grid, order 1 (0 along a separate axis)
    shape = (12, 30, 26)
    logits = np.random.default_rng(3).normal(size=(3, *shape)).astype(np.float32)
    new_shape = nnunet_resampling.compute_new_shape(shape, spacing, new_spacing)
    ref = nnunet_resampling.resample_data_or_seg_to_shape(
        logits, new_shape, spacing, new_spacing, is_seg=False, order=1, order_z=0, force_separate_z=None
    )
    low = lowres_axis(spacing, new_spacing)
    ours = resample_image(
        logits, tuple(int(n) for n in new_shape), "linear", (1, 2, 3), None if low is None else low + 1
    )
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < REL


@pytest.mark.parametrize(
    "spacing,new_spacing",
    [
        ((1, 1, 1), (1, 1, 1)),
        ((5, 1, 1), (1, 1, 1)),
        ((1, 1, 1), (1, 4, 1)),
        ((3.1, 1, 1), (1, 1, 1)),
        ((3.0, 1, 1), (1, 1, 1)),
        ((4, 4, 1), (1, 1, 1)),
        ((4, 4, 1), (1, 1, 5)),
        ((1, 0.2, 0.9), (2, 2, 2)),
    ],
)
def test_lowres_axis_is_nnunets_rule(spacing, new_spacing):
    do, axis = nnunet_resampling.determine_do_sep_z_and_axis(None, spacing, new_spacing)
    assert lowres_axis(spacing, new_spacing) == (int(axis) if do else None)
