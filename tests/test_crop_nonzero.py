"""crop_to_nonzero: the box nnU-Net crops to, without scipy in the runtime."""

import numpy as np
import pytest

from edgeseg.segmenter import crop_to_nonzero
from edgeseg.volume import Volume


def _volume(stored: np.ndarray, intercept: float = 0.0) -> Volume:
    nz = stored.shape[0]
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    return Volume(stored, np.ones(nz), np.full(nz, intercept), (2.5, 0.9, 0.8), affine)


def test_box_matches_nnunet_filled_mask_and_geometry_follows() -> None:
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy (export extra) is the oracle")
    rng = np.random.default_rng(3)
    stored = np.zeros((20, 30, 40), dtype=np.int16)
    stored[4:15, 6:25, 9:31] = rng.integers(1, 500, (11, 19, 22))
    stored[7:12, 10:20, 12:25] = 0  # a hole nnU-Net fills: it must not move the box
    stored[2, 3, 35] = 7  # a lone voxel widens it
    (crop,), box, full = crop_to_nonzero(_volume(stored))
    filled = ndimage.binary_fill_holes(stored != 0)
    want = tuple(
        slice(int(h[0]), int(h[-1]) + 1)
        for h in (np.flatnonzero(filled.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3))
    )
    assert box == want and full == stored.shape
    np.testing.assert_array_equal(crop.stored, stored[box])
    # the crop's first voxel sits where the full volume's voxel at the box corner sat
    corner = np.array([box[2].start, box[1].start, box[0].start, 1.0])
    np.testing.assert_allclose(crop.affine[:3, 3], (_volume(stored).affine @ corner)[:3])


def test_nonzero_is_in_modality_values_and_empty_volume_is_kept_whole() -> None:
    stored = np.full((4, 5, 6), 1000, dtype=np.int16)
    stored[1:3, 2:4, 1:5] = 1200
    (crop,), box, _ = crop_to_nonzero(_volume(stored, intercept=-1000.0))  # stored 1000 is value 0
    assert box == (slice(1, 3), slice(2, 4), slice(1, 5)) and crop.shape == (2, 2, 4)
    vols, box, full = crop_to_nonzero(_volume(np.zeros((3, 4, 5), dtype=np.int16)))
    assert box == tuple(slice(0, n) for n in full) and vols[0].shape == full
