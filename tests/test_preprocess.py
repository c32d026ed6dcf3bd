"""The numpy reference against independent computations."""

import numpy as np
import pytest

from edgeseg import SpecError, Volume
from edgeseg.preprocess import (
    Preprocessor,
    apply_intensity,
    gaussian_filter,
    gaussian_importance,
    labels_to_source,
    to_labels,
    window_starts,
)
from edgeseg.spec import Clip, Denoise, Label, ModelSpec, PercentileClip, Scale, Window, ZScore

RNG = np.random.default_rng(7)


def test_window_clip_scale_follow_their_formulas():
    x = np.linspace(-1000, 1000, 101, dtype=np.float32)
    out = apply_intensity(x.copy(), [Window(center=40, width=400, out_min=-1, out_max=1)])
    expected = np.clip((x - (40 - 200)) / 400, 0, 1) * 2 - 1
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(apply_intensity(x.copy(), [Clip(-5, 5)]), np.clip(x, -5, 5))
    np.testing.assert_allclose(apply_intensity(x.copy(), [Scale(0.5, 3)]), x * 0.5 + 3)


def test_percentile_and_zscore_match_numpy_statistics():
    x = RNG.gamma(2.0, 50.0, size=(8, 16, 16)).astype(np.float32)
    lo, hi = np.percentile(x, [1, 99])
    out = apply_intensity(x.copy(), [PercentileClip(1, 99, rescale=True)])
    np.testing.assert_allclose(out, (np.clip(x, lo, hi) - lo) / (hi - lo), atol=1e-6)
    z = apply_intensity(x.copy(), [ZScore()])
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    x[:2] = 0
    zn = apply_intensity(x.copy(), [ZScore(nonzero=True)])
    nz = x != 0
    np.testing.assert_allclose(zn[nz], (x[nz] - x[nz].mean()) / x[nz].std(), atol=1e-4)


def test_percentiles_take_exact_order_statistics_from_the_tails(seg_data):
    """The tail selection gives np.partition's values exactly: on a real MR volume resampled
    large enough to take that path, on ties, sorted data, and with NaNs (one, or more than
    the high tail holds: they sort last, as np.partition sorts them)."""
    from edgeseg.intensity import order_statistics, percentiles
    from edgeseg.nifti_input import read_nifti

    mr = read_nifti(seg_data / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_367.nii.gz")
    big = np.repeat(mr.modality_values().astype(np.float32), 4, axis=0)  # > 2^16 voxels
    with_nan = RNG.standard_normal(100_000).astype(np.float32)
    with_nan[7] = np.nan
    many_nans = RNG.standard_normal(100_000).astype(np.float32)
    many_nans[RNG.choice(many_nans.size, 3000, replace=False)] = np.nan
    cases = [big, RNG.integers(0, 30, 200_000).astype(np.float32), np.sort(RNG.standard_normal(150_000)),
             np.zeros(90_000, np.float32), with_nan, many_nans]  # fmt: skip
    for x in cases:
        flat = x.reshape(-1)
        n = flat.size
        for q in [(0.5, 99.5), (0, 100), (1, 99), (0.001, 99.999), (45, 55), (0, 0.5)]:
            r = [(n - 1) * v / 100.0 for v in q]
            ks = sorted({int(np.floor(v)) for v in r} | {min(int(np.floor(v)) + 1, n - 1) for v in r})
            part = np.partition(flat, ks)
            got = order_statistics(flat, ks)
            assert [str(got[k]) for k in ks] == [str(part[k]) for k in ks], (q, x.dtype)  # nan == nan
    np.testing.assert_allclose(percentiles(big, 0.5, 99.5), np.percentile(big, [0.5, 99.5]), rtol=1e-6)


def test_gaussian_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = RNG.standard_normal((6, 20, 21)).astype(np.float32)
    ours = gaussian_filter(x, 1.2)
    ref = ndimage.gaussian_filter(x, 1.2, mode="reflect", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    out = apply_intensity(x.copy(), [Denoise(1.2)])
    np.testing.assert_allclose(out, ours, atol=1e-6)


def test_deepbet_normalisation_is_reproduced():
    """Our spec for the deepbet model vs deepbet's own torch code (nearest-exact resize,
    quantile clip, [0,1] scaling, z-score, ×0.226 + 0.449)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    data = RNG.gamma(2.0, 100.0, size=(30, 40, 50)).astype(np.float32)  # (z, y, x), LPS axial
    vol = Volume.from_array(data, spacing=(2.0, 1.0, 1.0))
    spec = ModelSpec(
        dims=3,
        labels=[Label(1, "Brain")],
        orientation="RAS",
        target_shape=(32, 32, 32),
        interpolation="nearest",
        intensity=[PercentileClip(0.5, 99.5), ZScore(), Scale(0.226, 0.449)],
    )
    ours = Preprocessor(spec)(vol).array[0]
    # deepbet: RAS (x, y, z) array, i.e. (z, y, x) LPS flipped on x and y, then transposed.
    ras = torch.from_numpy(np.ascontiguousarray(data[:, ::-1, ::-1].transpose(2, 1, 0)))
    small = F.interpolate(ras[None, None], (32, 32, 32), mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    x = ((small - low) / (high - low)).clamp(0, 1)
    x = (x - x.mean()) / x.std()
    ref = (0.226 * x + 0.449).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)  # torch.std is ddof=1; ours ddof=0


def test_preprocessor_pads_to_divisible_and_reuses_its_buffer():
    vol = Volume.from_array(RNG.standard_normal((10, 30, 33)).astype(np.float32))
    spec = ModelSpec(dims=2, labels=[Label(1, "a")], divisible_by=16, pad_value=-1.0, intensity=[ZScore()])
    pre = Preprocessor(spec)
    p = pre(vol)
    assert p.array.shape == (10, 1, 32, 48)  # 2D: (D, C, H, W); slices never padded
    assert p.grid == (10, 30, 33)
    assert np.all(p.array[:, :, 30:, :] == -1.0) and np.all(p.array[:, :, :, 33:] == -1.0)
    first = p.array
    assert pre(vol).array is first  # same buffer: no per-call allocation
    with pytest.raises(SpecError, match="2 co-registered"):
        Preprocessor(ModelSpec(dims=2, in_channels=2, labels=[Label(1, "a")]))(vol)


def test_stored_integers_and_per_slice_rescale():
    stored = RNG.integers(0, 4000, size=(3, 4, 5)).astype(np.int16)
    vol = Volume(
        stored=stored, slope=[1.0, 2.0, 0.5], intercept=[-1024, 0, 10], spacing=(1, 1, 1), affine=np.eye(4)
    )
    spec = ModelSpec(dims=3, labels=[Label(1, "a")])
    out = Preprocessor(spec)(vol).array[0]
    expected = stored * np.array([1.0, 2.0, 0.5])[:, None, None] + np.array([-1024, 0, 10])[:, None, None]
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_to_labels_argmax_threshold_and_confidence():
    logits = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")])
    lab, conf = to_labels(logits, spec, with_confidence=True)
    np.testing.assert_array_equal(lab, logits.argmax(1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_array_equal(conf, np.rint(p.max(1) * 255).astype(np.uint8))
    sig = ModelSpec(dims=2, labels=[Label(3, "a"), Label(5, "b")], output="threshold")
    lab2, _ = to_labels(logits[:, :2], sig)
    expected = np.where(logits[:, 1] > 0, 5, np.where(logits[:, 0] > 0, 3, 0))
    np.testing.assert_array_equal(lab2, expected)


def test_labels_go_back_to_the_source_grid():
    data = np.zeros((12, 20, 24), np.float32)
    data[4:8, 5:15, 6:18] = 1.0
    vol = Volume.from_array(data)
    spec = ModelSpec(
        dims=3, labels=[Label(1, "a")], orientation="RAS", target_shape=(24, 10, 6), interpolation="nearest"
    )
    p = Preprocessor(spec)(vol)
    grid_labels = (p.array[0] > 0.5).astype(np.uint8)
    back = labels_to_source(grid_labels, p)
    assert back.shape == data.shape and back.dtype == np.uint8
    assert (back == (data > 0.5)).mean() > 0.97


def test_sliding_window_geometry():
    assert window_starts(100, 64, 0.5) == [0, 18, 36]
    assert window_starts(64, 64, 0.5) == [0]
    assert window_starts(130, 64, 0.25) == [0, 33, 66]
    w = gaussian_importance((8, 8, 8))
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[3, 3, 3] > w[0, 0, 0]


@pytest.mark.parametrize("dims", [2, 3])
def test_reused_buffer_pads_outside_each_grid(dims):
    """Only the padding is filled per call: a second volume of another grid with the same
    padded layout gets pad_value wherever the first one's values were."""
    spec = ModelSpec(dims=dims, labels=[Label(1, "a")], divisible_by=16, pad_value=-3.0)
    pre = Preprocessor(spec)
    first = Volume.from_array(RNG.standard_normal((20, 30, 33)).astype(np.float32))
    second = Volume.from_array(RNG.standard_normal((20 if dims == 2 else 25, 20, 40)).astype(np.float32))
    pre(first)
    got = pre(second)
    fresh = Preprocessor(spec)(second)
    assert got.array.shape == fresh.array.shape  # the buffer was reused
    np.testing.assert_array_equal(got.array, fresh.array)
    g = got.grid
    inside = np.zeros(got.array.shape, bool)
    if dims == 3:
        inside[:, : g[0], : g[1], : g[2]] = True
    else:
        inside[: g[0], :, : g[1], : g[2]] = True
    assert np.all(got.array[~inside] == -3.0) and (~inside).any()
    np.testing.assert_array_equal(got.array[inside].reshape(second.shape), second.stored)
