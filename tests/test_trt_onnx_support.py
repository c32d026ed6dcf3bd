"""Build-time check of what TensorRT's ONNX parser will refuse, node by node, for 10.3 and 11.x."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeseg.export.trt_onnx_support import check_bundle_models, check_model  # noqa: E402


def _model(nodes, inits=(), opset=17, out_channels=1) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def test_a_plain_segmentation_graph_passes():
    w = np.ones((2, 1, 3, 3), np.float32)
    m = _model([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1] * 4, name="conv"),
                helper.make_node("Resize", ["c", "", "S"], ["r"], mode="linear", name="up"),
                helper.make_node("Softmax", ["r"], ["y"], axis=1)],
               [("W", w), ("S", np.array([1, 1, 2, 2], np.float32))])  # fmt: skip
    assert check_model(m) == []


def test_what_the_parser_refuses_is_named_by_node():
    zp = np.array(3, np.int8)
    m = _model([helper.make_node("Resize", ["x", "", "S"], ["r"], mode="cubic", name="up_cubic"),
                helper.make_node("MaxPool", ["r"], ["p", "idx"], kernel_shape=[2, 2], name="pool_idx"),
                helper.make_node("QuantizeLinear", ["p", "s", "zp"], ["q"], name="q_asym"),
                helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dq_asym"),
                helper.make_node("Unique", ["d"], ["u"], name="uniq"),
                helper.make_node("FusedConv", ["u"], ["y"], domain="com.microsoft", name="ort_fused")],
               [("S", np.array([1, 1, 2, 2], np.float32)), ("s", np.array(0.1, np.float32)), ("zp", zp)])  # fmt: skip
    problems = {(p.node, p.problem) for p in check_model(m)}
    nodes = {n for n, _ in problems}
    assert nodes == {"up_cubic", "pool_idx", "q_asym", "dq_asym", "uniq", "ort_fused"}
    assert any("resize mode 'cubic'" in t for _, t in problems)
    assert any("custom op" in t for n, t in problems if n == "ort_fused")
    sentences = check_bundle_models({"int8": m, "int8_cpu": m})
    assert sentences and all(
        s.startswith("model.int8.onnx: TensorRT 10.3 and 11.x will not parse node") for s in sentences
    )


def test_opsets_above_a_major_are_named_for_that_major_only():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], opset=21)
    problems = check_model(m)
    assert [(p.versions, p.op) for p in problems] == [(("10.3",), "opset")]
    assert "opset 21; it parses up to 20" in problems[0].problem


def test_the_build_reports_it(tmp_path):
    """A real bundle build on a model with an op TensorRT lacks: a warning, the bundle still written."""
    torch = pytest.importorskip("torch")
    from edgeseg.export.build import build_bundle
    from edgeseg.spec import Label, ModelSpec

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.interpolate(self.conv(x), scale_factor=2, mode="bicubic")[
                ..., ::2, ::2
            ]

    spec = ModelSpec(dims=2, labels=[Label(1, "a")], batch_size=2, target_shape=(32, 32))
    report = build_bundle(Net().eval(), spec, tmp_path / "m.edgeseg", name="m", measure_engines=False)
    assert (tmp_path / "m.edgeseg").exists()
    assert any("will not parse node" in w and "resize mode 'cubic'" in w for w in report.warnings), (
        report.warnings
    )
