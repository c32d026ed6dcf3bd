"""Pre- and postprocessing split across threads give the same values as one thread."""

import numpy as np
import pytest

import edgeseg.parallel as parallel
from edgeseg.geometry import resample_image
from edgeseg.intensity_lut import intensity_by_lut
from edgeseg.spec import PercentileClip, Scale, ZScore


@pytest.fixture(autouse=True)
def split_everything(monkeypatch):
    monkeypatch.setattr(parallel, "SPLIT_MIN", 0)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("lowres", [None, 0])
def test_resampling_in_parts_is_the_same(mode, lowres):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4000, (7, 33, 29)).astype(np.uint16 if mode == "nearest" else np.float32)
    view = x[::-1, :, ::-1]  # oriented views are strided, as to_model gives them
    for shape in [(16, 64, 20), (5, 17, 58)]:
        one = resample_image(view, shape, mode, (0, 1, 2), lowres, threads=1)
        two = resample_image(view, shape, mode, (0, 1, 2), lowres, threads=3)
        assert one.shape == shape and one.dtype == two.dtype
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
def test_the_lut_in_parts_is_the_same(dtype):
    rng = np.random.default_rng(6)
    info = np.iinfo(dtype)
    stored = rng.integers(max(info.min, -2000), min(info.max, 3000), (9, 40, 31)).astype(dtype)
    steps = [PercentileClip(0.5, 99.5), ZScore(), Scale(0.5, 0.1)]
    one = intensity_by_lut(stored, 1.5, -20.0, steps, threads=1)
    two = intensity_by_lut(stored[:, ::-1], 1.5, -20.0, steps, threads=2)[:, ::-1]
    np.testing.assert_array_equal(one, two)


def test_labels_back_to_the_source_in_parts_is_the_same(seg_data):
    from edgeseg.nifti_input import read_nifti
    from edgeseg.preprocess import Preprocessor, labels_to_source
    from edgeseg.spec import Label, ModelSpec

    vol = read_nifti(seg_data / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[ZScore()], target_shape=(40, 64, 48),
                     interpolation="nearest", orientation="RAS")  # fmt: skip
    one = Preprocessor(spec, threads=1)(vol)
    a = one.array.copy()
    two = Preprocessor(spec, threads=2)(vol)
    np.testing.assert_array_equal(a, two.array)
    grid = (np.random.default_rng(7).random(two.grid) * 3).astype(np.uint8)
    back1, back2 = labels_to_source(grid, two, 1), labels_to_source(grid, two, 2)
    assert back1.shape == vol.shape and back1.flags.c_contiguous and back2.flags.c_contiguous
    np.testing.assert_array_equal(back1, back2)
