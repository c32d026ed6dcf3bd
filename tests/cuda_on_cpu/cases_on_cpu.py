"""Kernel cases run on the CPU model of CUDA (only inside the sanitized child: see
tests/test_kernels_on_cpu.py, which runs this file with ``-p cuda_on_cpu.plugin``).

Everything goes through the GPU path's own launch code — ``GpuPipeline._preprocess_program``,
``_barrier``, ``_program``, ``_sliding_program``, ``module.Kernels.launch`` — and is compared with
the numpy references of :mod:`edgeseg.cuda.reference` at the tolerances of tests/test_cuda_gpu.py:
fp32 max relative error ≤ 1e-5, labels identical, confidence within 1, fp16 exactly the
reference rounded to fp16 (both round to nearest even) or within one fp16 step where the
fp32 value itself may differ by its tolerance.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_cuda_gpu import KernelBackend  # the GPU tests' stand-in network, reused

from edgeseg.cuda import reference as R
from edgeseg.spec import Clip, Denoise, Label, ModelSpec, PercentileClip, Scale, Window, ZScore
from edgeseg.volume import Volume

from .plugin import DEVICE

REL_TOL = 1e-5  # tests/test_cuda_gpu.py
F16 = np.float16
RNG = np.random.default_rng(13)
DICOM = (
    Path(os.environ.get("EDGESEG_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "dicom"
)


def record(case: str, **values) -> None:
    """Measured errors, for the parent test's summary."""
    path = os.environ.get("EDGESEG_CPU_METRICS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **values}) + "\n")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != {want.shape}")
    return float((np.abs(got - want) / np.maximum(np.abs(want), 1e-6)).max(initial=0.0))


def f16_steps(got: np.ndarray, want: np.ndarray) -> int:
    """Largest distance in fp16 steps (ordered bit patterns) between two fp16 arrays."""

    def order(a):
        u = np.asarray(a, F16).view(np.uint16).astype(np.int32)
        return np.where(u & 0x8000, 0x8000 - u, u)

    return int(np.abs(order(got) - order(want)).max(initial=0))


@pytest.fixture(scope="module")
def gpu():
    from edgeseg.cuda.device import device_info
    from edgeseg.cuda.memory import Stream
    from edgeseg.cuda.module import Kernels

    info = device_info(0)
    return info, Kernels(info.sm), Stream()


@pytest.fixture(autouse=True)
def _device_defaults():
    yield
    DEVICE.reverse, DEVICE.integrated = 0, False


# -- inputs -----------------------------------------------------------------------------------
def _series(folder: str, names: list[str] | None = None) -> Volume:
    from edgeseg.dicom import read_volume

    d = DICOM / folder
    if not d.is_dir():
        pytest.fail(f"shared DICOM data missing: {d}")  # not a skip: the suite must run it
    files = [d / n for n in names] if names else sorted(p for p in d.iterdir() if p.is_file())
    return read_volume(files)


SERIES = {
    # sagittal MR, uint16, 35 × 256 × 256: reorientation permutes every axis
    "mr_sagittal_u16": ("dcm_qa_decubitus/HFS_t1_fl2d_sag", None),
    # CT with gantry tilt: oblique affine, uint16 with intercept -1024, 4 slices
    "ct_tilt_oblique_u16": ("dicom2nifti_headers_random_pixels/ct_siemens_gantry_tilt", None),
    # CT, int16, 3 slices of 512 × 512
    "ct_3slice_i16": ("dcmqi_ct3slice_seg", ["01.dcm", "02.dcm", "03.dcm"]),
}


def _synthetic(shape=(9, 40, 36), dtype=np.int16, affine=None, per_slice=True) -> Volume:
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (max(info.min, -1000), min(info.max, 2000)) if info else (-1000.0, 2000.0)
    stored = RNG.uniform(lo, hi, size=shape).astype(dtype)
    nz = shape[0]
    slope = RNG.uniform(0.5, 2, nz) if per_slice else np.ones(nz)
    intercept = RNG.uniform(-50, 50, nz) if per_slice else np.zeros(nz)
    if affine is None:
        affine = np.diag([0.8, 0.9, 2.5, 1])
    return Volume(stored, slope, intercept, (2.5, 0.9, 0.8), affine)


def _oblique_affine() -> np.ndarray:
    a, b = np.deg2rad(25), np.deg2rad(-10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.8, 0.9, 2.5])
    m[:3, 3] = (-30.0, 12.0, 5.0)
    return m


class DeviceArray:
    """A device array with its own (non-contiguous) strides, handed over by
    ``__cuda_array_interface__`` v3 as CuPy would: the pipeline reads it in place."""

    def __init__(self, whole: np.ndarray, view: np.ndarray, stream: int | None = None) -> None:
        from edgeseg.cuda.memory import DeviceBuffer, Stream

        assert whole.flags.c_contiguous
        self.buffer = DeviceBuffer(whole.nbytes)
        s = Stream()
        self.buffer.upload(whole, s)
        s.synchronize()
        offset = view.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
        self.shape, self.dtype, self.ndim = view.shape, view.dtype, view.ndim
        self.__cuda_array_interface__ = {
            "shape": view.shape, "typestr": view.dtype.str, "data": (self.buffer.ptr + offset, False),
            "strides": view.strides, "version": 3, "stream": stream,
        }  # fmt: skip


# -- running the GPU path's launches ------------------------------------------------------------
def _pipe(gpu, spec):
    from edgeseg.cuda.memory import PinnedPool
    from edgeseg.cuda.pipeline import GpuPipeline, _Buffers

    info, kernels, stream = gpu
    pipe = GpuPipeline.__new__(GpuPipeline)  # as tests/test_cuda_gpu.py: the launch code without TensorRT
    pipe.spec, pipe.kernels, pipe.stream, pipe.device = spec, kernels, stream, info
    pipe._bufs, pipe._pinned, pipe.pool = _Buffers(), {}, PinnedPool(mapped=info.integrated)
    return pipe


def run_preprocess(gpu, spec, vols: list[Volume], *, half: bool = False) -> np.ndarray:
    """``GpuPipeline._preprocess_program`` for ``vols`` (one per channel) → host array."""
    from edgeseg.cuda.memory import DeviceBuffer
    from edgeseg.cuda.pipeline import Program
    from edgeseg.cuda.plan import output_strides, plan_volumes

    _, kernels, stream = gpu
    pipe = _pipe(gpu, spec)
    staged = [pipe._stage_source(c, v.stored) for c, v in enumerate(vols)]
    plans, _ = plan_volumes(vols, spec, [layout for _, layout in staged])
    padded = plans[0].padded
    n = spec.in_channels * int(np.prod(padded))
    out = DeviceBuffer(n * (2 if half else 4))
    prog = Program(stream, kernels)
    pipe._preprocess_program(prog, plans, [p for p, _ in staged], out.ptr, output_strides(spec, padded), half)
    prog()
    layout = (spec.in_channels, *padded) if spec.dims == 3 else (padded[0], spec.in_channels, *padded[1:])
    host = np.empty(layout, F16 if half else np.float32)
    out.download(host, stream)
    stream.synchronize()
    pipe._bufs.close()
    out.close()
    return host


def check_preprocess(gpu, case: str, spec, vols: list[Volume], ref_vols: list[Volume] | None = None) -> None:
    want = R.preprocess(ref_vols or vols, spec)
    got = run_preprocess(gpu, spec, vols)
    err = rel_err(got, want)
    got16 = run_preprocess(gpu, spec, vols, half=True)
    steps = f16_steps(got16, want.astype(F16))
    exact16 = float(np.mean(got16.view(np.uint16) == want.astype(F16).view(np.uint16)))
    record(case, shape=list(want.shape), max_rel_err=err, fp16_max_steps=steps, fp16_identical=exact16)
    assert err <= REL_TOL, f"{case}: max relative error {err:.3g}"
    assert steps <= (0 if err == 0 else 1), f"{case}: fp16 output {steps} fp16 steps from the reference"


# -- preprocessing: real series -------------------------------------------------------------------
REAL_SPECS = {
    "window_ras_linear_pad8": dict(dims=3, intensity=[Window(40, 400, -1, 1)], target_spacing=(4.0, 3.0, 3.5),
                                   orientation="RAS", divisible_by=8),
    "percentile_zscore_lps_nearest": dict(dims=3, intensity=[PercentileClip(0.5, 99.5), ZScore()],
                                          target_spacing=(7.0, 6.0, 6.0), orientation="LPS",
                                          interpolation="nearest"),
    "denoise_clip_scale": dict(dims=3, intensity=[Clip(-200, 1500), Denoise(0.8), Scale(0.001, -0.5)],
                               target_spacing=(5.0, 5.0, 5.0), orientation="RAS"),
    "2d_zscore_nonzero_odd": dict(dims=2, intensity=[ZScore(nonzero=True)], target_shape=(37, 29), batch_size=4),
}  # fmt: skip


@pytest.mark.parametrize("spec_name", sorted(REAL_SPECS))
@pytest.mark.parametrize("series", sorted(SERIES))
def test_preprocess_real_series(gpu, series, spec_name):
    vol = _series(*SERIES[series])
    spec = ModelSpec(labels=[Label(1, "a")], **REAL_SPECS[spec_name])
    check_preprocess(gpu, f"preprocess {series} {spec_name}", spec, [vol])


# -- preprocessing: awkward cases ---------------------------------------------------------------
def test_preprocess_odd_sizes_per_slice_rescale_all_stored_dtypes(gpu):
    for dtype in (np.int16, np.uint16, np.uint8, np.float32):
        vol = _synthetic((7, 13, 11), dtype)
        spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(100, 700)], target_spacing=(1.9, 1.3, 0.7),
                         orientation="RAS", divisible_by=4, pad_value=-3.0)  # fmt: skip
        check_preprocess(gpu, f"odd sizes {np.dtype(dtype).name}", spec, [vol])


def test_preprocess_one_slice(gpu):
    vol = _synthetic((1, 40, 36))
    for name, spec in {
        "3d": ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[PercentileClip(1, 99), Denoise(1.0)],
                        target_spacing=(1.0, 1.1, 1.3), orientation="RAS"),
        "2d": ModelSpec(dims=2, labels=[Label(1, "a")], intensity=[ZScore()], target_shape=(24, 20), batch_size=2),
    }.items():  # fmt: skip
        check_preprocess(gpu, f"one slice {name}", spec, [vol])


def test_preprocess_oblique(gpu):
    vol = _synthetic((6, 21, 17), affine=_oblique_affine())
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(40, 400), ZScore()],
                     target_spacing=(1.7, 1.3, 1.1), orientation="RAS")  # fmt: skip
    check_preprocess(gpu, "oblique", spec, [vol])


def test_preprocess_strided_device_array(gpu):
    """Non-contiguous device arrays read in place (their strides go into the index tables):
    a sliced one, and a flipped one with negative strides (CuPy's ``a[::-1]``)."""
    whole = RNG.integers(-1000, 2000, size=(11, 50, 45)).astype(np.int16)
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[PercentileClip(2, 98)], target_spacing=(2.0, 1.2, 1.5),
                     orientation="RAS")  # fmt: skip
    for name, view in {"sliced": whole[1::2, 3:43, ::2], "flipped": whole[::-1, 2:48, ::-2]}.items():
        vol = _synthetic(view.shape)
        ref = Volume(np.ascontiguousarray(view), vol.slope, vol.intercept, vol.spacing, vol.affine)
        dev = Volume(DeviceArray(whole, view, stream=1), vol.slope, vol.intercept, vol.spacing, vol.affine)
        check_preprocess(gpu, f"strided device array {name}", spec, [dev], [ref])


def test_preprocess_two_channels(gpu):
    a = _synthetic((8, 30, 26))
    b = Volume(RNG.integers(0, 4000, size=a.shape).astype(np.uint16), 1.0, 0.0, a.spacing, a.affine)
    for dims in (3, 2):
        spec = ModelSpec(dims=dims, labels=[Label(1, "a")], in_channels=2,
                         per_channel_intensity=[[Window(40, 400)], [PercentileClip(1, 99), ZScore(nonzero=True)]],
                         target_spacing=(2.0, 1.0, 1.0) if dims == 3 else None,
                         target_shape=(25, 23) if dims == 2 else None, orientation="RAS", divisible_by=4)  # fmt: skip
        check_preprocess(gpu, f"two channels {dims}d", spec, [a, b])


def test_stats_kernels_both_fiber_schedules(gpu):
    """radix_hist / zscore_* (the kernels with __syncthreads) with each block's threads run
    forward and reversed: the same result both ways and equal to the reference; plus the
    degenerate statistics (constant volume: hi == lo; all-zero with nonzero z-score)."""
    vol = _synthetic((5, 33, 31))
    const = Volume(np.full((4, 20, 18), 7, np.int16), 1.0, 0.0, (1.0, 1.0, 1.0), np.eye(4))
    zero = Volume(np.zeros((4, 20, 18), np.int16), 1.0, 0.0, (1.0, 1.0, 1.0), np.eye(4))
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[PercentileClip(0.5, 99.5), ZScore()],
                     target_spacing=(2.5, 1.0, 1.0))  # fmt: skip
    spec_nz = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[ZScore(nonzero=True)])
    results = []
    for reverse in (0, 1):
        DEVICE.reverse = reverse
        results.append(run_preprocess(gpu, spec, [vol]))
        check_preprocess(gpu, f"stats schedule {'reversed' if reverse else 'forward'}", spec, [vol])
        check_preprocess(gpu, f"stats constant volume {reverse}", spec, [const])
        check_preprocess(gpu, f"stats all-zero nonzero-zscore {reverse}", spec_nz, [zero])
    np.testing.assert_array_equal(results[0], results[1])


# -- postprocessing -------------------------------------------------------------------------------
def _post(gpu, logits: np.ndarray, spec, grid, *, half: bool, n_offset: int = 0, n_total: int | None = None):
    from edgeseg.cuda.memory import DeviceBuffer
    from edgeseg.cuda.pipeline import GpuPipeline

    _, kernels, stream = gpu
    n_total = n_total or logits.shape[0] + n_offset
    g = int(np.prod(grid))
    x = logits.astype(F16 if half else np.float32)
    d_in, d_lab, d_conf = DeviceBuffer(x.nbytes), DeviceBuffer(n_total * g), DeviceBuffer(n_total * g)
    d_vals = DeviceBuffer(16)
    vals = np.zeros(16, np.uint8)
    vals[: len(spec.labels)] = [lab.value for lab in spec.labels]
    d_in.upload(x, stream)
    d_vals.upload(vals, stream)
    d_lab.zero(stream)
    d_conf.zero(stream)
    pipe = GpuPipeline.__new__(GpuPipeline)
    pipe.spec, pipe._label_values = spec, d_vals.ptr
    p = pipe._post_params(
        d_in.ptr, d_lab.ptr, d_conf.ptr, x.shape[0], x.shape[1], x.shape[2:], grid, n_offset
    )
    kernels.launch("postprocess_f16" if half else "postprocess_f32", x.shape[0] * g, [p], stream)
    lab = np.empty((n_total, *grid), np.uint8)
    conf = np.empty((n_total, *grid), np.uint8)
    d_lab.download(lab, stream)
    d_conf.download(conf, stream)
    stream.synchronize()
    for b in (d_in, d_lab, d_conf, d_vals):
        b.close()
    want, want_conf = R.postprocess(x.astype(np.float32), spec, grid, with_confidence=True)
    return lab[n_offset:], conf[n_offset:], want, want_conf


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "mode",
    ["argmax-logits", "argmax-softmax", "threshold-sigmoid", "threshold-logits", "argmax-one-channel"],
)
def test_postprocess_modes(gpu, mode, half):
    output, activation = mode.split("-")[:2]
    k = 1 if mode.endswith("one-channel") else 3
    labels = [Label(2, "a"), Label(5, "b"), Label(9, "c")][: max(k, 1)]
    spec = ModelSpec(dims=3, labels=labels, output=output, activation=activation if activation != "one" else "logits",
                     threshold=0.4)  # fmt: skip
    logits = RNG.normal(size=(2, k, 7, 9, 11)).astype(np.float32)
    if activation == "softmax":
        e = np.exp(logits)
        logits = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    elif activation == "sigmoid":
        logits = (1 / (1 + np.exp(-logits))).astype(np.float32)
    grid = (5, 9, 10)
    lab, conf, want, want_conf = _post(gpu, logits, spec, grid, half=half, n_offset=1)
    diff = int(np.abs(conf.astype(int) - want_conf).max())
    record(f"postprocess {mode} {'fp16' if half else 'fp32'}", label_mismatches=int((lab != want).sum()),
           conf_max_diff=diff)  # fmt: skip
    np.testing.assert_array_equal(lab, want)
    assert diff <= 1


# -- whole pipeline (preprocess → network kernel → postprocess/sliding window → gather) ------------
_NET_F16 = r"""
extern "C" __global__ void net(const void* x, void* y, long long n, int c, int batch, int in_half, int out_half) {
    const long long total = n * batch;
    for (long long i = global_index(); i < total; i += global_stride()) {
        const long long b = i / n, r = i - b * n;
        const float v = in_half ? half_to_float(((const u16*)x)[b * c * n + r]) : ((const float*)x)[b * c * n + r];
        if (out_half) {
            ((u16*)y)[b * 2 * n + r] = float_to_half(-v);
            ((u16*)y)[b * 2 * n + n + r] = float_to_half(v);
        } else {
            ((float*)y)[b * 2 * n + r] = -v;
            ((float*)y)[b * 2 * n + n + r] = v;
        }
    }
}
"""


class Fp16NetBackend(KernelBackend):
    """tests/test_cuda_gpu.py's network with fp16 input and/or output tensors (an fp16 engine)."""

    def __init__(self, arch: str, in_half: bool, out_half: bool) -> None:
        from edgeseg.backends.base import TensorInfo
        from edgeseg.cuda._api import check, driver_module
        from edgeseg.cuda.memory import Stream
        from edgeseg.cuda.nvrtc import COMMON_FILE, BindingsNvrtc, compile_options

        common = (Path(R.__file__).parent / "kernels" / COMMON_FILE).read_text()
        self._check, self._drv = check, driver_module()
        cubin, _ = BindingsNvrtc().compile(common + "\n" + _NET_F16, "net_f16.cu", compile_options(arch))
        self._mod = check(self._drv.cuModuleLoadData(cubin), "loading the test network")
        self._fn = check(self._drv.cuModuleGetFunction(self._mod, b"net"), "cuModuleGetFunction")
        self.stream = Stream()
        self.in_half, self.out_half = in_half, out_half
        self.input = TensorInfo(
            "image", (None, 1, None, None, None), np.dtype(F16 if in_half else np.float32)
        )
        self.output = TensorInfo(
            "logits", (None, 2, None, None, None), np.dtype(F16 if out_half else np.float32)
        )
        self.shape, self.x, self.y = (), 0, 0

    def bind(self, shape, x, y=None):
        # TensorRT's setTensorAddress refuses addresses that are not 256-byte aligned: so does
        # this stand-in, which holds the pipeline to it (2D batches start mid-buffer).
        for what, ptr in (("input", x), ("output", y)):
            if ptr is not None and int(ptr) % 256:
                raise AssertionError(f"{what} tensor address {int(ptr):#x} is not 256-byte aligned")
        return super().bind(shape, x, y)

    def enqueue(self, handle) -> None:
        n = int(np.prod(self.shape[2:]))
        args = [ctypes.c_uint64(self.x), ctypes.c_uint64(self.y), ctypes.c_int64(n), ctypes.c_int32(self.shape[1]),
                ctypes.c_int32(self.shape[0]), ctypes.c_int32(self.in_half), ctypes.c_int32(self.out_half)]  # fmt: skip
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self._check(
            self._drv.cuLaunchKernel(
                self._fn, 128, 1, 1, 256, 1, 1, 0, int(handle), ctypes.addressof(ptrs), 0
            ),
            "launching the test network",
        )


def expected_labels(vols: list[Volume], spec, in_half=False, out_half=False):
    """tests/test_cuda_gpu.py's _expected_labels for several channels and fp16 engine tensors."""
    from edgeseg.preprocess import Preprocessor, gaussian_importance, labels_to_source, window_starts

    prepared = Preprocessor(spec)(vols if len(vols) > 1 else vols[0])
    grid = prepared.grid
    x = R.preprocess(vols, spec)
    to_in = (lambda a: a.astype(F16).astype(np.float32)) if in_half else (lambda a: a)
    to_out = (lambda a: a.astype(F16).astype(np.float32)) if out_half else (lambda a: a)
    if spec.dims == 2:
        v = to_in(x[:, 0])
        lab, conf = R.postprocess(to_out(np.stack([-v, v], axis=1)), spec, grid[1:], with_confidence=True)
    elif spec.patch_size is None:
        v = to_in(x[0])
        lab, conf = R.postprocess(to_out(np.stack([-v, v]))[None], spec, grid, with_confidence=True)
        lab, conf = lab[0], conf[0]
    else:
        patch = tuple(spec.patch_size)
        size = x.shape[1:]
        starts = [(a, b, c) for a in window_starts(size[0], patch[0], spec.overlap)
                  for b in window_starts(size[1], patch[1], spec.overlap)
                  for c in window_starts(size[2], patch[2], spec.overlap)]  # fmt: skip

        def infer(b):
            v = to_in(b[:, :1])
            return to_out(np.concatenate([-v, v], axis=1))

        out = R.sliding_window(x, starts, patch, gaussian_importance(patch), infer, spec.batch_size)
        lab, conf = R.postprocess(out[None], spec, grid, with_confidence=True)
        lab, conf = lab[0], conf[0]
    return labels_to_source(lab, prepared), labels_to_source(conf, prepared)


PIPELINES = {
    "3d-oblique-pad": (dict(dims=3, intensity=[Window(40, 400, -1, 1)], target_spacing=(1.5, 1.2, 1.1),
                            orientation="RAS", divisible_by=8), (9, 40, 36), True),
    "2d-odd-batches": (dict(dims=2, intensity=[ZScore()], target_shape=(31, 27), batch_size=4), (7, 40, 36), False),
    "sliding-edges": (dict(dims=3, intensity=[Window(40, 400, -1, 1)], patch_size=(4, 12, 10), batch_size=4,
                           overlap=0.3), (7, 29, 23), False),
    "2ch-sliding": (dict(dims=3, in_channels=2, per_channel_intensity=[[Window(40, 400, -1, 1)], [ZScore()]],
                         patch_size=(4, 16, 16), batch_size=3, overlap=0.5, orientation="RAS"), (5, 26, 22), True),
}  # fmt: skip


@pytest.mark.parametrize("engine", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_pipeline_plain_captured_replayed(gpu, kind, engine):
    """GpuPipeline.run end to end: run 1 plain, run 2 captured as a graph, run 3 replayed;
    labels and confidence equal the references every time; no device memory growth."""
    from edgeseg.cuda.memory import memory_info
    from edgeseg.cuda.pipeline import GpuPipeline

    info, _, _ = gpu
    kw, shape, oblique = PIPELINES[kind]
    spec = ModelSpec(labels=[Label(1, "a")], **kw)
    half = engine == "fp16"
    backend = Fp16NetBackend(info.sm, half, half)
    pipe = GpuPipeline(spec, backend)
    vols = [_synthetic(shape, affine=_oblique_affine() if oblique else None) for _ in range(spec.in_channels)]
    for v in vols[1:]:
        v.affine, v.spacing = vols[0].affine, vols[0].spacing
    want, want_conf = expected_labels(vols, spec, half, half)
    free0 = None
    for i in range(3):
        result = pipe.run(vols if len(vols) > 1 else vols[0], with_confidence=True)
        mism = int((result.labels != want).sum())
        diff = int(np.abs(result.confidence.astype(int) - want_conf).max())
        record(f"pipeline {kind} {engine} run {i}", label_mismatches=mism, conf_max_diff=diff)
        assert mism == 0 and diff <= 1, f"run {i}: {mism} labels differ, confidence off by {diff}"
        assert len(pipe._graphs) == (0 if i == 0 else 1)
        assert all(np.isfinite(t) and t >= 0 for t in result.timings.values()), result.timings
        free0 = free0 if free0 is not None else memory_info()[0]
    assert memory_info()[0] == free0
    pipe.close()
    backend.close()


def test_pipeline_integrated_zero_copy(gpu):
    """Jetson: mapped pinned memory, the kernels read the decoded pixels where they lie."""
    from edgeseg.cuda.pipeline import GpuPipeline

    DEVICE.integrated = True
    from edgeseg.cuda.device import device_info

    info = device_info(0)
    assert info.integrated
    spec = ModelSpec(labels=[Label(1, "a")], **PIPELINES["3d-oblique-pad"][0])
    backend = Fp16NetBackend(info.sm, False, False)
    pipe = GpuPipeline(spec, backend)
    vol = _synthetic((9, 40, 36))
    pooled = pipe.pool.allocate(vol.shape, vol.stored.dtype)
    pooled[...] = vol.stored
    zero_copy = Volume(pooled, vol.slope, vol.intercept, vol.spacing, vol.affine)
    want, _ = expected_labels([vol], spec)
    for _ in range(2):
        np.testing.assert_array_equal(pipe.run(zero_copy).labels, want)
        np.testing.assert_array_equal(pipe.run(vol).labels, want)
    pipe.close()
    backend.close()


def test_pipeline_real_series(gpu):
    from edgeseg.cuda.pipeline import GpuPipeline

    info, _, _ = gpu
    vol = _series(*SERIES["ct_tilt_oblique_u16"])
    spec = ModelSpec(labels=[Label(1, "a")], dims=3, intensity=[Window(40, 400, -1, 1)], patch_size=(4, 32, 32),
                     batch_size=2, overlap=0.25, target_spacing=(5.0, 4.0, 4.0), orientation="RAS")  # fmt: skip
    backend = Fp16NetBackend(info.sm, False, False)
    pipe = GpuPipeline(spec, backend, use_graphs=False)
    want, want_conf = expected_labels([vol], spec)
    result = pipe.run(vol, with_confidence=True)
    record("pipeline real CT oblique sliding", label_mismatches=int((result.labels != want).sum()),
           conf_max_diff=int(np.abs(result.confidence.astype(int) - want_conf).max()))  # fmt: skip
    np.testing.assert_array_equal(result.labels, want)
    pipe.close()
    backend.close()


# -- the model itself --------------------------------------------------------------------------
def test_fp16_conversions_exact(gpu):
    """cvt.rn.f16.f32 / cvt.f32.f16 as cuda_cpu.h does them, through the real kernels: every
    fp16 bit pattern to fp32 (sw_accumulate_f16) and fp32 → fp16 on every rounding boundary
    (sw_extract), against numpy's (IEEE round to nearest even) conversions."""
    from edgeseg.cuda.memory import DeviceBuffer

    _, kernels, stream = gpu
    u64, i32 = ctypes.c_uint64, ctypes.c_int32
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = ~np.isnan(halves.view(F16))
    hf = halves.view(F16).astype(np.float32)
    # fp32 inputs: each fp16 value, the midpoints to its neighbours and one fp32 ulp either side
    mids = (hf[finite][:-1].astype(np.float64) + hf[finite][1:]) / 2
    f = np.concatenate(
        [
            hf[finite],
            mids.astype(np.float32),
            np.nextafter(mids.astype(np.float32), np.inf),
            np.nextafter(mids.astype(np.float32), -np.inf),
            [65519.99, 65520.0, 1e9, -1e9, 1e-30, 6e-8],
        ]
    )
    f = f[np.isfinite(f)].astype(np.float32)  # fmt: skip
    n = f.size
    src, dst = DeviceBuffer(n * 4), DeviceBuffer(n * 2)
    src.upload(f, stream)
    kernels.launch("sw_extract", n, [u64(src.ptr), u64(dst.ptr), i32(1), i32(0), i32(1), i32(1), i32(1), i32(n),
                                     i32(1), i32(1), i32(n), i32(0), i32(0), i32(0)], stream)  # fmt: skip
    got = np.empty(n, np.uint16)
    dst.download(got, stream)
    m = halves.size
    out, w, acc, ws = DeviceBuffer(m * 2), DeviceBuffer(m * 4), DeviceBuffer(m * 4), DeviceBuffer(m * 4)
    out.upload(halves, stream)
    w.upload(np.ones(m, np.float32), stream)
    acc.zero(stream)
    ws.zero(stream)
    kernels.launch("sw_accumulate_f16", m, [u64(out.ptr), i32(0), i32(1), i32(1), i32(1), i32(m), u64(w.ptr),
                                            u64(acc.ptr), u64(ws.ptr), i32(1), i32(1), i32(m), i32(0), i32(0),
                                            i32(0)], stream)  # fmt: skip
    back = np.empty(m, np.float32)
    acc.download(back, stream)
    stream.synchronize()
    with np.errstate(over="ignore"):
        want = f.astype(F16).view(np.uint16)
    want_back = np.float32(0) + hf[finite] * np.float32(1)  # what the accumulation adds (-0 + 0 = +0)
    record(
        "fp16 conversions",
        f32_to_f16_checked=int(n),
        f16_to_f32_checked=int(m),
        mismatches=int((got != want).sum())
        + int((back[finite].view(np.uint32) != want_back.view(np.uint32)).sum()),
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(back[finite].view(np.uint32), want_back.view(np.uint32))
    assert np.isnan(back[~finite]).all()


def test_wrong_argument_width_fails_the_launch(gpu):
    """The launch checks each ctypes argument's size against the kernel's parameter (the driver
    would read 8 bytes from a 4-byte value); a wrong count or width is an error, not garbage."""
    from edgeseg._exceptions import BackendError
    from edgeseg.cuda.memory import DeviceBuffer

    _, kernels, stream = gpu
    buf = DeviceBuffer(64)
    with pytest.raises(BackendError):
        kernels.launch(
            "fill_f32", 16, [ctypes.c_uint64(buf.ptr), ctypes.c_uint32(16), ctypes.c_float(1.0)], stream
        )
    assert "argument sizes" in DEVICE.log[-1]
    kernels.launch(
        "fill_f32", 16, [ctypes.c_uint64(buf.ptr), ctypes.c_uint64(16), ctypes.c_float(1.0)], stream
    )
    buf.close()


def test_frees_during_capture_are_deferred_and_a_raw_free_invalidates_it(gpu):
    """Capture legality as the device enforces it. The model refuses a cudaFree while the
    thread captures and the capture ends invalidated; edgeseg's buffers (a finalizer, a buffer
    replaced mid-program) defer theirs to the capture's end, so the capture succeeds and the
    memory is freed right after it."""
    from cuda.bindings import runtime as rt

    from edgeseg.cuda.graph import GraphRunner
    from edgeseg.cuda.memory import DeviceBuffer

    _, kernels, stream = gpu
    buf = DeviceBuffer(64)

    def fill():
        kernels.launch(
            "fill_f32", 16, [ctypes.c_uint64(buf.ptr), ctypes.c_uint64(16), ctypes.c_float(2.0)], stream
        )

    raw = int(rt.cudaMalloc(64)[1])

    def raw_free():
        fill()
        rt.cudaFree(raw)

    n_log = len(DEVICE.log)
    assert not GraphRunner(stream, raw_free).capture()
    assert any("during stream capture" in m for m in DEVICE.log[n_log:])
    assert int(rt.cudaFree(raw)) == 0  # outside the capture the same free is fine

    victim = DeviceBuffer(64)
    victim_ptr = victim.ptr

    def deferred_free():
        fill()
        victim.close()
        assert victim_ptr in DEVICE.device_allocs  # not yet: the capture is open

    n_log = len(DEVICE.log)
    graph = GraphRunner(stream, deferred_free)
    assert graph.capture()
    assert not DEVICE.log[n_log:], DEVICE.log[n_log:]
    assert victim_ptr not in DEVICE.device_allocs  # freed when the capture ended
    graph.close()
    buf.close()


def test_grid_stride_loops_with_few_blocks(gpu, monkeypatch):
    """Volumes beyond MAX_BLOCKS × BLOCK items make every thread loop over several items; the
    other cases stay below that, so here the launch helper's cap is 3 blocks and each kernel
    walks its grid-stride loop many times (same launch code, same references)."""
    from edgeseg.cuda import module
    from edgeseg.cuda.pipeline import GpuPipeline

    monkeypatch.setattr(module, "MAX_BLOCKS", 3)
    first = len(DEVICE.launches)  # (the session's list: test_kernels_on_cpu checks every kernel ran)
    vol = _synthetic((6, 27, 25), affine=_oblique_affine())
    for name in ("percentile_zscore_lps_nearest", "denoise_clip_scale", "2d_zscore_nonzero_odd"):
        kw = dict(REAL_SPECS[name])
        kw.pop("target_spacing", None)
        spec = ModelSpec(labels=[Label(1, "a")], **kw)
        check_preprocess(gpu, f"3 blocks {name}", spec, [vol])
    info, _, _ = gpu
    for kind in ("sliding-edges", "2d-odd-batches"):
        spec = ModelSpec(labels=[Label(1, "a")], **PIPELINES[kind][0])
        backend = Fp16NetBackend(info.sm, False, True)
        pipe = GpuPipeline(spec, backend, use_graphs=False)
        want, want_conf = expected_labels([vol], spec, False, True)
        result = pipe.run(vol, with_confidence=True)
        diff = int(np.abs(result.confidence.astype(int) - want_conf).max())
        record(
            f"3 blocks pipeline {kind}",
            label_mismatches=int((result.labels != want).sum()),
            conf_max_diff=diff,
        )
        np.testing.assert_array_equal(result.labels, want)
        assert diff <= 1
        pipe.close()
        backend.close()
    ours = [
        g for name, g in zip(DEVICE.launches[first:], DEVICE.grids[first:]) if name != "net"
    ]  # the net picks its own grid
    assert ours and max(ours) <= 3


def test_unaligned_2d_batch_address_is_caught(gpu, monkeypatch):
    """The stand-in engine holds the pipeline to TensorRT's 256-byte alignment: with the
    staging of unaligned 2D batches switched off, the 2D case fails at once."""
    from edgeseg.cuda import pipeline as P

    info, _, _ = gpu
    real = P.slice_batches
    monkeypatch.setattr(P, "slice_batches", lambda *a: [(start, False) for start, _ in real(*a)])
    spec = ModelSpec(labels=[Label(1, "a")], **PIPELINES["2d-odd-batches"][0])
    backend = Fp16NetBackend(info.sm, False, False)
    pipe = P.GpuPipeline(spec, backend, use_graphs=False)
    with pytest.raises(AssertionError, match="not 256-byte aligned"):
        pipe.run(_synthetic(PIPELINES["2d-odd-batches"][1]))
    pipe.close()
    backend.close()
