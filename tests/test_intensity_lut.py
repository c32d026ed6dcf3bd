"""The histogram/lookup-table intensity path gives what the array path gives, on real series.

The array path (:func:`edgeseg.preprocess.apply_intensity` on float32 voxels) is the reference:
percentiles and every clip/window/scale must match exactly, mean/std to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from edgeseg.dicom import read_volume
from edgeseg.intensity_lut import intensity_by_lut, lut_applies, weighted_percentiles
from edgeseg.preprocess import Preprocessor, apply_intensity, percentiles
from edgeseg.spec import Clip, Denoise, Label, ModelSpec, PercentileClip, Scale, Window, ZScore

CHAINS = {
    "deepbet": [PercentileClip(0.5, 99.5, True), ZScore(), Scale(0.226, 0.449)],
    "ct window": [Window(40.0, 400.0)],
    "clip, scale": [Clip(-100.0, 300.0), Scale(1 / 400.0, 0.25)],
    "negative scale, then percentiles": [Scale(-2.0, 5.0), PercentileClip(1.0, 99.0, False)],
    "nonzero zscore": [ZScore(nonzero=True), Window(0.0, 4.0, -1.0, 1.0)],
    "fixed zscore": [PercentileClip(2.0, 98.0, True), ZScore(mean=0.3, std=0.2)],
}


def _volumes():
    mr = sorted(shared_path("dicom", "dcm_qa_decubitus", "HFS_t1_fl2d_sag").glob("*.dcm"))
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")  # int16 with a rescale intercept
    return {"MR uint16": read_volume(mr), "CT int16": read_volume([ct])}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_lut_matches_the_array_path_on_real_series(chain):
    steps = CHAINS[chain]
    for name, vol in _volumes().items():
        stored = vol.stored[:, ::3, ::2]  # a strided view, as nearest resampling can give
        slope, intercept = float(vol.slope[0]), float(vol.intercept[0])
        assert lut_applies(stored, steps)
        ref = np.array(stored, dtype=np.float32)
        if slope != 1.0:
            ref *= np.float32(slope)
        if intercept != 0.0:
            ref += np.float32(intercept)
        ref = apply_intensity(ref, steps)
        got = intensity_by_lut(stored, slope, intercept, steps)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == stored.shape
        assert np.unique(ref).size > 10, (name, chain)  # the chain leaves something to compare
        if any(isinstance(s, ZScore) and s.mean is None for s in steps):
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6, err_msg=f"{name}: {chain}")
        else:
            np.testing.assert_array_equal(got, ref, err_msg=f"{name}: {chain}")


def test_weighted_percentiles_are_the_same_order_statistics():
    rng = np.random.default_rng(3)
    values = rng.integers(-50, 50, 40).astype(np.float32)
    counts = rng.integers(1, 30, 40)
    expanded = np.repeat(values, counts)
    for low, high in ((0.5, 99.5), (0.0, 100.0), (25.0, 75.0), (33.3, 66.6)):
        assert weighted_percentiles(values, counts, low, high) == percentiles(expanded.copy(), low, high)


def test_denoise_and_float_pixels_keep_the_array_path():
    assert not lut_applies(np.zeros((2, 2), np.uint16), [Denoise(1.0)])
    assert not lut_applies(np.zeros((2, 2), np.float32), [ZScore()])
    assert not lut_applies(np.zeros((2, 2), np.int32), [ZScore()])


def test_the_preprocessor_takes_the_lut_path_with_the_same_result(monkeypatch):
    import edgeseg.preprocess as pre

    vol = _volumes()["MR uint16"]

    def spec(steps):
        return ModelSpec(
            dims=3,
            labels=[Label(1, "a")],
            intensity=steps,
            target_shape=(64, 64, 64),
            interpolation="nearest",
        )

    calls = []
    real = pre.intensity_by_lut
    monkeypatch.setattr(pre, "intensity_by_lut", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = Preprocessor(spec(CHAINS["deepbet"]))(vol).array.copy()
    assert calls == [1]
    # A no-op denoise step is not per value: the same spec then runs on the array path.
    slow = Preprocessor(spec([*CHAINS["deepbet"], Denoise(0.0)]))(vol).array
    assert calls == [1]
    np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-6)
    # A fixed window reads no statistics: the array path is cheaper and gives the same values.
    window = [Window(center=300.0, width=600.0)]
    arr = Preprocessor(spec(window))(vol).array.copy()
    assert calls == [1]
    monkeypatch.setattr(pre, "needs_statistics", lambda steps: True)  # force the histogram
    np.testing.assert_array_equal(Preprocessor(spec(window))(vol).array, arr)
    assert calls == [1, 1]


def test_the_lut_writes_into_the_model_buffer_when_it_can():
    vol = _volumes()["MR uint16"]
    steps = CHAINS["deepbet"]
    want = intensity_by_lut(vol.stored, 1.0, 0.0, steps)
    out = np.empty(vol.shape, np.float32)
    assert intensity_by_lut(vol.stored, 1.0, 0.0, steps, out=out) is out
    np.testing.assert_array_equal(out, want)
    strided = np.empty((*vol.shape[:2], vol.shape[2] * 2), np.float32)[:, :, ::2]
    got = intensity_by_lut(vol.stored, 1.0, 0.0, steps, out=strided)  # not C-contiguous: a new array
    assert got is not strided
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(64, 64, 64), (70, 40, 300), (20, 300, 30)])
@pytest.mark.parametrize("orientation", [None, "PLS", "SPL"])
def test_mapping_before_the_nearest_upsampling_is_the_same(monkeypatch, shape, orientation):
    # The per-value map runs on the grid before its one growing axis is repeated, with the
    # statistics of the grown grid: the same floats as mapping the grown grid. Orientations
    # put the growing slice axis first, second or last among the model axes.
    vol = _volumes()["MR uint16"]  # 35 slices: the slice axis grows in every shape here
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=CHAINS["deepbet"], target_shape=shape,
                     interpolation="nearest", orientation=orientation)  # fmt: skip
    real, used = Preprocessor._nearest_lut, []
    monkeypatch.setattr(
        Preprocessor, "_nearest_lut", lambda self, *a: used.append(real(self, *a)) or used[-1]
    )
    fast = Preprocessor(spec)(vol).array.copy()
    grown = sum(n > m for n, m in zip(shape, Preprocessor(spec).plan(vol)[1]))
    assert (used[0] is not None) == (grown == 1)  # two growing axes: the plain path
    monkeypatch.setattr(Preprocessor, "_nearest_lut", lambda self, *a: None)
    np.testing.assert_array_equal(Preprocessor(spec)(vol).array, fast)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
def test_repeated_planes_weigh_the_statistics_like_the_repeated_array(axis, dtype):
    # repeats=(axis, counts) must give the statistics of the array whose planes along ``axis``
    # are taken counts[i] times, for unsigned and signed stored integers.
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    stored = rng.integers(max(info.min, -900), min(info.max, 2000), (6, 7, 8)).astype(dtype)
    counts = rng.integers(1, 4, stored.shape[axis])
    grown = np.repeat(stored, counts, axis=axis)
    steps = CHAINS["deepbet"]
    mapped = intensity_by_lut(stored, 1.5, -3.0, steps, repeats=(axis, counts))
    want = apply_intensity(grown.astype(np.float32) * np.float32(1.5) + np.float32(-3.0), steps)
    np.testing.assert_allclose(np.repeat(mapped, counts, axis=axis), want, rtol=0, atol=2e-6)
