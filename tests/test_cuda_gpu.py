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


class FakeBackend:
    """Stands in for TensorRT: the "network" is the identity on 2 channels made from the input."""

    def __init__(self, stream):
        from edgeseg.backends.base import TensorInfo

        self.stream = stream
        self.input = TensorInfo("image", (None, 1, None, None, None), np.dtype(np.float32))
        self.output = TensorInfo("logits", (None, 2, None, None, None), np.dtype(np.float32))


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
    from edgeseg.cuda.memory import DeviceBuffer
    from edgeseg.cuda.pipeline import GpuPipeline
    from edgeseg.cuda.plan import output_strides, plan_volumes

    info, kernels, stream = gpu
    pipe = GpuPipeline.__new__(GpuPipeline)
    pipe.spec, pipe.kernels, pipe.stream, pipe.device = spec, kernels, stream, info
    from edgeseg.cuda.pipeline import _Buffers

    pipe._bufs, pipe._pinned = _Buffers(), {}
    plans, _ = plan_volumes(vol, spec)
    padded = plans[0].padded
    out = DeviceBuffer(spec.in_channels * int(np.prod(padded)) * 4)
    src = [pipe._stage_source(0, vol.stored)]
    for step in pipe._preprocess_program(plans, src, out.ptr, output_strides(spec, padded), False):
        step()
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
