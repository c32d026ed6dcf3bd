"""ONNX Runtime's CUDA provider behind the device-resident contract (bind/enqueue on raw
buffers). Without a GPU the same binding code runs on the CPU provider over host pointers; the
CUDA run itself is a GPU test."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg import BackendError

pytest.importorskip("onnx")
from gpu_util import requires_gpu  # noqa: E402
from test_backend_openvino import _conv_onnx  # noqa: E402  (a small real conv net)


def test_bound_buffers_give_what_onnxruntime_gives():
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.backends.onnxruntime_cuda import OrtCudaBackend

    model = _conv_onnx(2)
    be = OrtCudaBackend(model, device="cpu")
    assert be.capturable is False and be.input.dtype == np.float32
    rng = np.random.default_rng(1)
    with OrtBackend(model, threads=1) as ref:
        for shape in ((1, 1, 6, 10, 12), (2, 1, 5, 7, 9)):
            x = rng.standard_normal(shape).astype(np.float32)
            out_shape = be.bind(x.shape, x.ctypes.data)
            assert out_shape == (shape[0], 3, *shape[2:])
            y = np.full(out_shape, np.nan, np.float32)
            be.bind(x.shape, x.ctypes.data, y.ctypes.data)
            be.enqueue(0)
            np.testing.assert_allclose(y, ref.infer(x), rtol=1e-5, atol=1e-5)  # written in place
            np.testing.assert_allclose(be.infer(x), y, rtol=1e-6, atol=1e-6)
    be.close()


def test_a_model_without_a_static_class_count_is_refused():
    from onnx import TensorProto, helper

    from edgeseg.backends.onnxruntime_cuda import OrtCudaBackend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "d"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "d"])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    be = OrtCudaBackend(model, device="cpu")
    with pytest.raises(BackendError, match="class count"):
        be.bind((1, 2, 8), 0)


def test_without_onnxruntime_gpu_the_cuda_provider_is_one_sentence():
    import onnxruntime

    from edgeseg.backends.onnxruntime_cuda import OrtCudaBackend

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendError, match="install onnxruntime-gpu in place of onnxruntime"):
        OrtCudaBackend(_conv_onnx(0))


@requires_gpu
def test_cuda_provider_on_device_buffers_matches_the_cpu():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.backends.onnxruntime_cuda import OrtCudaBackend
    from edgeseg.cuda.memory import DeviceBuffer

    model = _conv_onnx(3)
    x = np.random.default_rng(2).standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    be = OrtCudaBackend(model)
    d_in, out_shape = DeviceBuffer(x.nbytes), be.output_shape(x.shape)
    y = np.empty(out_shape, np.float32)
    d_out = DeviceBuffer(y.nbytes)
    be.bind(x.shape, d_in.ptr, d_out.ptr)
    d_in.upload(x, be.stream)
    be.enqueue(be.stream.handle)
    d_out.download(y, be.stream)
    be.stream.synchronize()
    with OrtBackend(model, threads=1) as ref:
        np.testing.assert_allclose(y, ref.infer(x), rtol=1e-3, atol=1e-3)
