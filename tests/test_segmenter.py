"""The Segmenter on real data: a real pretrained model on real MR series."""

import numpy as np
import pytest

from edgeseg import BackendError, Volume
from edgeseg.backends.onnxruntime import OrtBackend
from edgeseg.segmenter import Segmenter
from edgeseg.spec import Label, ModelSpec

onnx = pytest.importorskip("onnx")


def _pointwise_onnx(dims: int, classes: int = 3, seed: int = 0) -> bytes:
    """A per-voxel network (1×1 conv): its output at a voxel depends on that voxel only."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((classes, 1) + (1,) * dims).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    sp = ["d", "h", "w"][-dims:]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *sp])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, *sp])
    node = helper.make_node("Conv", ["image", "W", "B"], ["logits"])
    g = helper.make_graph(
        [node], "pointwise", [x], [y], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_ort_backend_reuses_its_output_buffer_and_checks_input():
    be = OrtBackend(_pointwise_onnx(2))
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    first = be.infer(x)
    again = be.infer(x)
    assert again is first  # preallocated per shape: nothing allocated on the steady path
    other = be.infer(x[:1])
    assert other.shape == (1, 3, 8, 8) and other is not first
    with pytest.raises(ValueError, match="expects 4 dims"):
        be.infer(x[0])
    with pytest.raises(TypeError, match="float32"):
        be.infer(x.astype(np.float64))
    assert be.describe()["threads"] >= 1


def test_unloadable_model_is_a_backend_error():
    with pytest.raises(BackendError, match="cannot load"):
        OrtBackend(b"not an onnx model")


def test_sliding_window_equals_whole_volume_for_a_pointwise_net():
    rng = np.random.default_rng(3)
    vol = Volume.from_array(rng.standard_normal((20, 37, 41)).astype(np.float32))
    whole = ModelSpec(dims=3, labels=[Label(1, "a"), Label(2, "b")])
    sliding = ModelSpec(
        dims=3, labels=[Label(1, "a"), Label(2, "b")], patch_size=(16, 16, 16), overlap=0.5, batch_size=3
    )
    be = OrtBackend(_pointwise_onnx(3))
    a = Segmenter(whole, be).segment(vol, with_confidence=True)
    b = Segmenter(sliding, be).segment(vol, with_confidence=True)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.abs(a.confidence.astype(int) - b.confidence.astype(int)).max() <= 1
    assert set(b.timings) == {"preprocess", "infer", "postprocess"}


@pytest.mark.parametrize("target", [(24, 40, 50), (24, 20, 50), (16, 20, 30)])
def test_whole_volume_labels_on_the_planes_the_source_keeps_are_the_full_argmax(target):
    # A grid with more planes than the source along an axis is argmaxed only at the planes
    # nearest resampling takes back: labels and confidence equal those of the whole grid.
    from edgeseg.preprocess import Preprocessor, labels_to_source, to_labels

    rng = np.random.default_rng(8)
    vol = Volume.from_array(rng.standard_normal((20, 37, 41)).astype(np.float32))
    spec = ModelSpec(dims=3, labels=[Label(1, "a"), Label(2, "b")], target_shape=target,
                     interpolation="nearest")  # fmt: skip
    be = OrtBackend(_pointwise_onnx(3))
    got = Segmenter(spec, be).segment(vol, with_confidence=True)
    prepared = Preprocessor(spec)(vol)
    lab, conf = to_labels(be.infer(prepared.array[None]).copy(), spec, with_confidence=True)
    d, h, w = prepared.grid
    np.testing.assert_array_equal(got.labels, labels_to_source(lab[0, :d, :h, :w], prepared))
    np.testing.assert_array_equal(got.confidence, labels_to_source(conf[0, :d, :h, :w], prepared))


def test_2d_mode_runs_slices_in_batches():
    rng = np.random.default_rng(4)
    vol = Volume.from_array(rng.standard_normal((7, 12, 10)).astype(np.float32))
    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], batch_size=3, divisible_by=8)
    res = Segmenter(spec, OrtBackend(_pointwise_onnx(2))).segment(vol)
    # Independent: apply the same 1×1 conv with numpy.
    from onnx import numpy_helper

    m = onnx.load_from_string(_pointwise_onnx(2))
    w = numpy_helper.to_array(m.graph.initializer[0])[:, 0, 0, 0]
    b = numpy_helper.to_array(m.graph.initializer[1])
    logits = vol.stored[None] * w[:, None, None, None] + b[:, None, None, None]
    np.testing.assert_array_equal(res.labels, logits.argmax(0))


def test_brain_model_segments_a_real_mr_series(brain_bundle, dicom_data):
    from edgeseg.dicom import read_volume

    vol = read_volume(dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag")
    with Segmenter.open(brain_bundle, backend="cpu") as seg:
        res = seg.segment(vol)
        # "cpu" is the fastest CPU engine measured at build on this host (OpenVINO where installed).
        assert seg.describe()["backend"] in ("onnxruntime", "openvino")
    assert res.labels.shape == vol.shape and res.labels.dtype == np.uint8
    brain = res.labels == 1
    frac = brain.mean()
    assert 0.05 < frac < 0.6, frac  # a head scan: brain is a real fraction of the field of view
    # The mask is one blob near the middle of the head, not noise.
    zc, yc, xc = np.argwhere(brain).mean(0) / np.array(vol.shape)
    assert 0.2 < zc < 0.8 and 0.2 < yc < 0.8 and 0.2 < xc < 0.8


def test_tensorrt_backend_refuses_clearly_without_a_gpu(brain_bundle):
    from edgeseg.segmenter import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="TensorRT"):
        Segmenter.open(brain_bundle, backend="tensorrt")
