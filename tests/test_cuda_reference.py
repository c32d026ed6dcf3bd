"""The kernels' numpy references against independent computations: the CPU preprocessing path,
np.partition / np.percentile, to_labels, preprocess.gaussian_filter and a naive sliding window."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edgeseg.cuda import reference as R
from edgeseg.preprocess import Preprocessor, gaussian_filter, gaussian_importance, to_labels, window_starts
from edgeseg.spec import Clip, Denoise, Label, ModelSpec, PercentileClip, Scale, Window, ZScore
from edgeseg.volume import Volume

RNG = np.random.default_rng(7)
LABELS = [Label(1, "a"), Label(2, "b")]
OBLIQUE = np.array([[0, 0, -2.5, 10], [-0.9, 0, 0, 5], [0, 0.8, 0, 1], [0, 0, 0, 1]], float)


def _volume(dtype, per_slice: bool, affine=None, shape=(7, 20, 24)) -> Volume:
    if dtype == np.float32:
        stored = RNG.normal(size=shape).astype(np.float32)
    else:
        stored = RNG.integers(0 if dtype == np.uint16 else -1000, 2000, size=shape).astype(dtype)
    slope = RNG.uniform(0.5, 2, shape[0]) if per_slice else np.full(shape[0], 1.5)
    intercept = RNG.uniform(-100, 100, shape[0]) if per_slice else np.full(shape[0], -1024.0)
    return Volume(
        stored, slope, intercept, (2.5, 0.9, 0.8), np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine
    )


SPECS = {
    "window-3d-target-shape": dict(dims=3, intensity=[Window(40, 400)], target_shape=(5, 13, 30)),
    "percentile-zscore-spacing-ras": dict(
        dims=3,
        intensity=[PercentileClip(0.5, 99.5), ZScore()],
        target_spacing=(1.3, 1.1, 0.7),
        orientation="RAS",
    ),
    "2d-clip-scale-zscore-nonzero-pad": dict(
        dims=2,
        intensity=[Clip(-100, 300), Scale(0.01, 0.5), ZScore(nonzero=True)],
        target_shape=(17, 19),
        divisible_by=8,
        pad_value=-1.0,
    ),  # fmt: skip
    "nearest-denoise-percentile-patch-lpi": dict(
        dims=3,
        intensity=[Window(40, 400, -1, 1), Denoise(0.7), PercentileClip(1, 99, rescale=False)],
        interpolation="nearest",
        patch_size=(8, 16, 16),
        orientation="LPI",
    ),  # fmt: skip
    "zscore-given-mean-denoise-asl": dict(
        dims=3, intensity=[ZScore(mean=3.0), Denoise(1.2), ZScore(3.0, 50.0)], orientation="ASL"
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(("dtype", "per_slice", "oblique"), [(np.int16, False, False), (np.uint16, True, True),
                                                             (np.float32, False, True)])  # fmt: skip
def test_fused_preprocess_reference_equals_cpu_path(name, dtype, per_slice, oblique):
    spec = ModelSpec(labels=LABELS, **SPECS[name])
    vol = _volume(dtype, per_slice, OBLIQUE if oblique else None)
    cpu = Preprocessor(spec)(vol).array
    ref = R.preprocess(vol, spec)
    assert ref.shape == cpu.shape
    np.testing.assert_array_equal(ref, cpu)  # bit-identical (see reference.py's docstring)


def test_reference_reads_non_contiguous_stored_pixels():
    spec = ModelSpec(labels=LABELS, dims=3, intensity=[Window(40, 400)], target_shape=(4, 9, 11))
    vol = _volume(np.int16, False)
    big = np.zeros((7, 20, 48), np.int16)
    big[:, :, ::2] = vol.stored
    strided = Volume(big[:, :, ::2], vol.slope, vol.intercept, vol.spacing, vol.affine)
    np.testing.assert_array_equal(R.preprocess(strided, spec), Preprocessor(spec)(vol).array)


def test_multichannel_reference():
    spec = ModelSpec(labels=LABELS, dims=3, in_channels=2, per_channel_intensity=[[Window(40, 400)], [ZScore()]],
                     target_shape=(6, 10, 12))  # fmt: skip
    a, b = _volume(np.int16, False), _volume(np.int16, True)
    np.testing.assert_array_equal(R.preprocess([a, b], spec), Preprocessor(spec)([a, b]).array)


def test_radix_select_is_exact():
    x = np.concatenate(
        [RNG.normal(size=5000).astype(np.float32), np.float32([0, -0.0, 3, 3, 3, -1e30, 1e30])]
    )
    ranks = (0, 1, 2500, len(x) - 1)
    got = R.radix_select(x, ranks)
    np.testing.assert_array_equal(got, np.sort(x)[list(ranks)])


@pytest.mark.parametrize("q", [(0.5, 99.5), (0, 100), (25, 75), (1, 1)])
def test_percentile_stats_match_numpy(q):
    from edgeseg.cuda.plan import Barrier, percentile_ranks

    x = RNG.integers(-1000, 1000, size=(9, 11, 13)).astype(np.float32) * np.float32(0.37)
    ranks, fracs = percentile_ranks(x.size, *q)
    slot = R.percentile_stats(x, Barrier("percentile", ranks=ranks, fracs=fracs))
    lo, hi = np.percentile(x, q)
    assert slot[0] == np.float32(lo) and slot[1] == np.float32(hi)


def test_gauss_reference_equals_gaussian_filter():
    from edgeseg.preprocess import gaussian_kernel

    x = RNG.normal(size=(3, 5, 40)).astype(np.float32)  # radius > size on the first axes
    k = gaussian_kernel(1.5)
    y = x
    for axis in range(3):
        y = R.gauss_axis(y, axis, k)
    np.testing.assert_array_equal(y, gaussian_filter(x, 1.5))


@pytest.mark.parametrize("output", ["argmax", "threshold"])
@pytest.mark.parametrize("activation", ["logits", "softmax", "sigmoid"])
@pytest.mark.parametrize("k", [2, 4])
def test_postprocess_reference_equals_to_labels(output, activation, k):
    labels = [Label(v, f"l{v}") for v in range(1, k if output == "argmax" else k + 1)]
    spec = ModelSpec(dims=3, labels=labels, activation=activation, output=output, threshold=0.4)
    logits = RNG.normal(size=(2, k, 5, 6, 7)).astype(np.float32) * 3
    logits[0, :, 0, 0, 0] = 1.0  # ties go to the lower channel
    lab, conf = R.postprocess(logits, spec, (4, 6, 5), with_confidence=True)
    want, want_conf = to_labels(logits[:, :, :4, :6, :5], spec, with_confidence=True)
    np.testing.assert_array_equal(lab, want)
    np.testing.assert_array_equal(conf, want_conf)
    if output == "argmax" and activation == "logits":
        np.testing.assert_array_equal(lab, np.argmax(logits[:, :, :4, :6, :5], axis=1))


def test_sliding_window_reference_equals_naive_loop():
    patch, size = (6, 8, 8), (10, 13, 8)
    vol = RNG.normal(size=(1, *size)).astype(np.float32)
    starts = [(a, b, c) for a in window_starts(size[0], patch[0], 0.5) for b in window_starts(size[1], patch[1], 0.5)
              for c in window_starts(size[2], patch[2], 0.5)]  # fmt: skip
    w = gaussian_importance(patch)
    proj = RNG.normal(size=(3, 1)).astype(np.float32)

    def infer(batch):  # a per-voxel linear "network" with 3 output channels
        return np.einsum("kc,ncdhw->nkdhw", proj, batch)

    got = R.sliding_window(vol, starts, patch, w, infer, batch_size=3)
    num = np.zeros((3, *size))
    den = np.zeros(size)
    for a, b, c in starts:  # voxel by voxel over the patches that cover it
        for i, j, k in np.ndindex(*patch):
            num[:, a + i, b + j, c + k] += w[i, j, k] * (proj[:, 0] * vol[0, a + i, b + j, c + k])
            den[a + i, b + j, c + k] += w[i, j, k]
    np.testing.assert_allclose(got, num / den, rtol=1e-5, atol=1e-6)


def test_param_structs_match_the_kernels_static_asserts():
    from edgeseg.cuda.module import PostParams, PreParams

    assert ctypes.sizeof(PreParams) == 208 and ctypes.sizeof(PostParams) == 88


def test_dlpack_and_cuda_array_interface_views_without_copy():
    torch = pytest.importorskip("torch")
    from edgeseg.cuda.interop import as_device_view, from_cuda_array_interface, from_dlpack

    t = torch.arange(24, dtype=torch.int16).reshape(2, 3, 4).permute(0, 2, 1)
    v = from_dlpack(t)
    assert (v.shape, v.dtype, v.strides, v.ptr) == ((2, 4, 3), np.int16, (12, 1, 4), t.data_ptr())
    assert not v.on_device and as_device_view(t) is None  # a CPU tensor is not device memory

    class Fake:
        __cuda_array_interface__ = {"shape": (5, 6), "typestr": "<u2", "data": (4096, False), "strides": None,
                                    "version": 3}  # fmt: skip

    cai = from_cuda_array_interface(Fake())
    assert (cai.ptr, cai.shape, cai.strides, cai.is_c_contiguous) == (4096, (5, 6), (6, 1), True)
