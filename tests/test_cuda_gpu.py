"""Kernels on a real GPU against their numpy references (skipped without a GPU).

fp32 outputs: max relative error ≤ 1e-5 (the kernels round like the references, so they are
usually identical); labels identical; confidence within 1; graph replay == plain launches; no
device-memory growth over 1000 runs."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gpu_util import requires_gpu  # tests/ is on sys.path (rootdir-relative, no package)

from edgeseg.cuda import reference as R
from edgeseg.spec import Denoise, Label, ModelSpec, PercentileClip, Window, ZScore
from edgeseg.volume import Volume

RNG = np.random.default_rng(3)


_NET = r"""
extern "C" __global__ void net(const float* x, float* y, long long n, int c, int batch) {
    const long long total = n * batch;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / n, r = i - b * n;
        const float v = x[b * c * n + r];
        y[b * 2 * n + r] = -v;
        y[b * 2 * n + n + r] = v;
    }
}
"""


class KernelBackend:
    """TensorRT's side of the pipeline contract (``bind`` + ``enqueue`` on the pipeline's
    stream) with one CUDA kernel as the "network": output channels (-x, x) of input channel 0.
    The GPU test machine has no TensorRT; everything else in these runs is the real GPU path."""

    def __init__(self, arch: str) -> None:
        from edgeseg.backends.base import TensorInfo
        from edgeseg.cuda._api import check, driver_module
        from edgeseg.cuda.memory import Stream
        from edgeseg.cuda.nvrtc import BindingsNvrtc, compile_options

        self._check, self._drv = check, driver_module()
        cubin, _ = BindingsNvrtc().compile(_NET, "net.cu", compile_options(arch))
        self._mod = check(self._drv.cuModuleLoadData(cubin), "loading the test network")
        self._fn = check(self._drv.cuModuleGetFunction(self._mod, b"net"), "cuModuleGetFunction")
        self.stream = Stream()
        self.input = TensorInfo("image", (None, 1, None, None, None), np.dtype(np.float32))
        self.output = TensorInfo("logits", (None, 2, None, None, None), np.dtype(np.float32))
        self.shape, self.x, self.y = (), 0, 0

    def bind(self, shape, x, y=None):
        self.shape, self.x = tuple(shape), int(x)
        if y is not None:
            self.y = int(y)
        return (shape[0], 2, *shape[2:])

    def enqueue(self, handle) -> None:
        n = int(np.prod(self.shape[2:]))
        args = [ctypes.c_uint64(self.x), ctypes.c_uint64(self.y), ctypes.c_int64(n), ctypes.c_int32(self.shape[1]),
                ctypes.c_int32(self.shape[0])]  # fmt: skip
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self._check(
            self._drv.cuLaunchKernel(
                self._fn, 128, 1, 1, 256, 1, 1, 0, int(handle), ctypes.addressof(ptrs), 0
            ),
            "launching the test network",
        )

    def close(self) -> None:
        self._drv.cuModuleUnload(self._mod)
        self.stream.close()


@pytest.fixture(scope="module")
def gpu():
    from edgeseg.cuda.device import device_info
    from edgeseg.cuda.memory import Stream
    from edgeseg.cuda.module import Kernels

    info = device_info(0)
    return info, Kernels(info.sm), Stream()


def _volume():
    stored = RNG.integers(-1000, 2000, size=(9, 40, 36)).astype(np.int16)
    return Volume(
        stored, RNG.uniform(0.5, 2, 9), RNG.uniform(-50, 50, 9), (2.5, 0.9, 0.8), np.diag([0.8, 0.9, 2.5, 1])
    )


def _run_preprocess(gpu, spec, vol):
    """The GpuPipeline's preprocessing launches for ``vol`` → host array."""
    from edgeseg.cuda.memory import DeviceBuffer, PinnedPool
    from edgeseg.cuda.pipeline import GpuPipeline, Program, _Buffers
    from edgeseg.cuda.plan import output_strides, plan_volumes

    info, kernels, stream = gpu
    pipe = GpuPipeline.__new__(GpuPipeline)
    pipe.spec, pipe.kernels, pipe.stream, pipe.device = spec, kernels, stream, info
    pipe._bufs, pipe._pinned, pipe.pool = _Buffers(), {}, PinnedPool(mapped=info.integrated)
    src, layout = pipe._stage_source(0, vol.stored)
    plans, _ = plan_volumes(vol, spec, [layout])
    padded = plans[0].padded
    out = DeviceBuffer(spec.in_channels * int(np.prod(padded)) * 4)
    prog = Program(stream, kernels)
    pipe._preprocess_program(prog, plans, [src], out.ptr, output_strides(spec, padded), False)
    prog()
    host = np.empty(R.preprocess(vol, spec).shape, np.float32)
    out.download(host, stream)
    stream.synchronize()
    pipe._bufs.close()
    return host


@requires_gpu
@pytest.mark.parametrize(
    "intensity",
    [[Window(40, 400)], [PercentileClip(0.5, 99.5), ZScore()], [Window(40, 400, -1, 1), Denoise(0.8)]],
)
def test_preprocess_kernels_match_reference(gpu, intensity):
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=intensity, target_spacing=(1.5, 1.2, 1.1),
                     orientation="RAS", divisible_by=8)  # fmt: skip
    vol = _volume()
    got, want = _run_preprocess(gpu, spec, vol), R.preprocess(vol, spec)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-6)
    assert float(rel.max()) <= 1e-5


@requires_gpu
def test_postprocess_kernel_matches_reference(gpu):
    from edgeseg.cuda.memory import DeviceBuffer
    from edgeseg.cuda.module import PostParams

    _, kernels, stream = gpu
    spec = ModelSpec(dims=3, labels=[Label(1, "a"), Label(2, "b")])
    logits = RNG.normal(size=(1, 3, 10, 12, 14)).astype(np.float32)
    grid = (9, 11, 13)
    d_in, d_lab, d_conf = (
        DeviceBuffer(logits.nbytes),
        DeviceBuffer(int(np.prod(grid))),
        DeviceBuffer(int(np.prod(grid))),
    )
    d_in.upload(logits, stream)
    p = PostParams(
        logits=d_in.ptr, labels=d_lab.ptr, confidence=d_conf.ptr, label_values=0, n_offset=0, N=1, K=3
    )
    p.S[:], p.G[:] = logits.shape[2:], grid
    kernels.launch("postprocess_f32", int(np.prod(grid)), [p], stream)
    lab, conf = np.empty(grid, np.uint8), np.empty(grid, np.uint8)
    d_lab.download(lab, stream)
    d_conf.download(conf, stream)
    stream.synchronize()
    want, want_conf = R.postprocess(logits, spec, grid, with_confidence=True)
    np.testing.assert_array_equal(lab, want[0])
    assert int(np.abs(conf.astype(int) - want_conf[0]).max()) <= 1


@requires_gpu
def test_graph_replay_equals_plain_launch_and_does_not_leak(gpu):
    from edgeseg.cuda.graph import GraphRunner
    from edgeseg.cuda.memory import DeviceBuffer, memory_info

    _, kernels, stream = gpu
    n = 1 << 16
    buf = DeviceBuffer(n * 4)

    def enqueue():
        kernels.launch(
            "fill_f32", n, [ctypes.c_uint64(buf.ptr), ctypes.c_uint64(n), ctypes.c_float(2.5)], stream
        )

    enqueue()
    stream.synchronize()
    plain = np.empty(n, np.float32)
    buf.download(plain, stream)
    buf.zero(stream)
    graph = GraphRunner(stream, enqueue)
    assert graph.capture()
    free0, _ = memory_info()
    for _ in range(1000):
        graph.run()
    stream.synchronize()
    replay = np.empty(n, np.float32)
    buf.download(replay, stream)
    stream.synchronize()
    np.testing.assert_array_equal(plain, replay)
    assert memory_info()[0] >= free0 - (1 << 20)
    graph.close()


PIPELINE_SPECS = {
    "3d": ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(40, 400, -1, 1)],
                    target_spacing=(1.5, 1.2, 1.1), orientation="RAS", divisible_by=8),
    "2d": ModelSpec(dims=2, labels=[Label(1, "a")], intensity=[ZScore()], target_shape=(32, 32), batch_size=4),
    "sliding": ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(40, 400, -1, 1)],
                         patch_size=(8, 16, 16), batch_size=3, overlap=0.25),
}  # fmt: skip


def _expected_labels(vol, spec):
    """What the pipeline must return with the (-x, x) network: numpy references all the way."""
    from edgeseg.preprocess import Preprocessor, gaussian_importance, labels_to_source, window_starts

    prepared = Preprocessor(spec)(vol)
    grid = prepared.grid
    x = R.preprocess(vol, spec)
    if spec.dims == 2:
        v = x[:, 0]
        lab, _ = R.postprocess(np.stack([-v, v], axis=1), spec, grid[1:])
    elif spec.patch_size is None:
        lab, _ = R.postprocess(np.stack([-x[0], x[0]])[None], spec, grid)
        lab = lab[0]
    else:
        patch = tuple(spec.patch_size)
        size = x.shape[1:]
        starts = [(a, b, c) for a in window_starts(size[0], patch[0], spec.overlap)
                  for b in window_starts(size[1], patch[1], spec.overlap)
                  for c in window_starts(size[2], patch[2], spec.overlap)]  # fmt: skip
        out = R.sliding_window(x, starts, patch, gaussian_importance(patch),
                               lambda b: np.concatenate([-b[:, :1], b[:, :1]], axis=1), spec.batch_size)  # fmt: skip
        lab, _ = R.postprocess(out[None], spec, grid)
        lab = lab[0]
    return labels_to_source(lab, prepared)


@requires_gpu
@pytest.mark.parametrize("kind", sorted(PIPELINE_SPECS))
def test_pipeline_plain_capture_replay_and_zero_copy_agree(gpu, kind):
    """run 1 plain, run 2 captured (events become graph nodes), then replays, then a volume
    decoded into the pipeline's pinned pool: the same labels every time, timings from events."""
    from edgeseg.cuda.memory import memory_info
    from edgeseg.cuda.pipeline import GpuPipeline

    info, _, _ = gpu
    spec = PIPELINE_SPECS[kind]
    backend = KernelBackend(info.sm)
    pipe = GpuPipeline(spec, backend)
    vol = _volume()
    want = _expected_labels(vol, spec)
    for i in range(4):
        result = pipe.run(vol, with_confidence=True)
        np.testing.assert_array_equal(result.labels, want)
        assert all(np.isfinite(t) and t >= 0 for t in result.timings.values()), result.timings
        assert result.timings["infer"] > 0 and result.timings["postprocess"] > 0
        assert len(pipe._graphs) == (0 if i == 0 else 1)
    pooled = pipe.pool.allocate(vol.shape, vol.stored.dtype)
    pooled[...] = vol.stored
    zero_copy = Volume(pooled, vol.slope, vol.intercept, vol.spacing, vol.affine)
    assert pipe.pool.lookup(zero_copy.stored) is not None
    free0 = memory_info()[0]
    for _ in range(200):
        result = pipe.run(zero_copy)
    np.testing.assert_array_equal(result.labels, want)
    assert memory_info()[0] >= free0 - (1 << 20)
    pipe.close()
    backend.close()


@requires_gpu
def test_pipeline_reads_cupy_and_torch_device_arrays_in_place(gpu):
    from edgeseg.cuda.pipeline import GpuPipeline

    info, _, _ = gpu
    spec = PIPELINE_SPECS["3d"]
    backend = KernelBackend(info.sm)
    pipe = GpuPipeline(spec, backend)
    vol = _volume()
    want = _expected_labels(vol, spec)
    ran = 0
    try:
        import cupy

        with cupy.cuda.Stream(non_blocking=True):  # the producer's stream: the pipeline must wait for it
            dev = cupy.asarray(vol.stored)
            got = pipe.run(Volume(dev, vol.slope, vol.intercept, vol.spacing, vol.affine)).labels
        np.testing.assert_array_equal(got, want)
        ran += 1
    except ImportError:
        pass
    try:
        import torch

        t = torch.from_numpy(vol.stored).cuda()
        got = pipe.run(Volume(t, vol.slope, vol.intercept, vol.spacing, vol.affine)).labels
        np.testing.assert_array_equal(got, want)
        ran += 1
    except ImportError:
        pass
    pipe.close()
    backend.close()
    if not ran:
        pytest.skip("neither CuPy nor PyTorch is installed")
