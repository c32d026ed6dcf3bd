"""TensorRT's Q/DQ rules: our int8 passes; each kind of violation is one sentence naming the node."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg import CalibrationError
from edgeseg.spec import Label, ModelSpec

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class _EncDec(torch.nn.Module):
    """Conv (weights per channel on axis 0) and ConvTranspose (axis 1), as in every U-Net."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))))


@pytest.fixture(scope="module")
def quantized():
    from edgeseg.calib.quantize import quantize_int8
    from edgeseg.export.onnx_export import torch_to_onnx

    torch.manual_seed(0)
    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], target_shape=(32, 32))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 1, 32, 32)).astype(np.float32) for _ in range(3)]
    fp32 = torch_to_onnx(_EncDec().eval(), batches[0][:1], spec)
    # tune_cpu off: this test is about the Q/DQ format, not which layers pay in int8 here.
    return quantize_int8(fp32, batches, "image", method="minmax", tune_cpu=False)


def _model(data: bytes):
    return onnx.load_from_string(data)


def _dq_of(m, op_type: str):
    """The DequantizeLinear that feeds the weight (input 1) of the first ``op_type`` node."""
    prod = {o: n for n in m.graph.node for o in n.output}
    node = next(n for n in m.graph.node if n.op_type == op_type)
    return prod[node.input[1]]


def test_trt_variant_passes_and_has_the_right_axes(quantized):
    from edgeseg.calib.qdq_rules import check_qdq

    counts = check_qdq(quantized.models["int8"])
    assert counts["per_channel_weights"] == 3 and counts["quantize"] > 3
    m = _model(quantized.models["int8"])
    axis = {
        op: next(a.i for a in _dq_of(m, op).attribute if a.name == "axis") for op in ("Conv", "ConvTranspose")
    }
    assert axis == {"Conv": 0, "ConvTranspose": 1}
    assert quantized.ranges and all(lo <= hi for lo, hi in quantized.ranges.values())


def test_cpu_variant_is_uint8_and_not_for_tensorrt(quantized):
    from edgeseg.calib.qdq_rules import check_qdq

    with pytest.raises(
        CalibrationError,
        match=r"(Deq|Q)uantizeLinear node '.+' uses (uint8|int32) quantization; TensorRT accepts INT8 Q/DQ only",
    ):
        check_qdq(quantized.models["int8_cpu"])


def _first(m, op_type: str):
    return next(n for n in m.graph.node if n.op_type == op_type)


def test_non_zero_zero_point_is_refused(quantized):
    from onnx import numpy_helper

    from edgeseg.calib.qdq_rules import check_qdq

    m = _model(quantized.models["int8"])
    q = _first(m, "QuantizeLinear")
    init = next(i for i in m.graph.initializer if i.name == q.input[2])
    init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), init.name))
    with pytest.raises(CalibrationError, match=f"'{q.name}' has a non-zero zero point"):
        check_qdq(m)


def test_per_channel_activation_is_refused(quantized):
    from onnx import numpy_helper

    from edgeseg.calib.qdq_rules import check_qdq

    m = _model(quantized.models["int8"])
    inits = {i.name for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    for name, value in ((q.input[1], np.full(2, 0.1, np.float32)), (q.input[2], np.zeros(2, np.int8))):
        m.graph.initializer.append(numpy_helper.from_array(value, name + "_pc"))
    q.input[1], q.input[2] = q.input[1] + "_pc", q.input[2] + "_pc"
    with pytest.raises(CalibrationError, match="per channel; TensorRT allows per-tensor activations only"):
        check_qdq(m)


def test_wrong_conv_transpose_axis_and_old_opset_are_refused(quantized):
    from edgeseg.calib.qdq_rules import check_qdq

    m = _model(quantized.models["int8"])
    dq = _dq_of(m, "ConvTranspose")
    prod = {o: n for n in m.graph.node for o in n.output}
    for node in (dq, prod[dq.input[0]]):
        next(a for a in node.attribute if a.name == "axis").i = 0
    with pytest.raises(CalibrationError, match="scales for axis 0|TensorRT needs axis 1"):
        check_qdq(m)
    m = _model(quantized.models["int8"])
    m.opset_import[0].version = 12
    with pytest.raises(CalibrationError, match="opset 12"):
        check_qdq(m)
