"""ConvTranspose → phase convolutions gives the same numbers, and lets ORT run decoders in int8.

The references are PyTorch's own ConvTranspose and the original ONNX graph under ONNX Runtime.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _export(module, x: np.ndarray) -> bytes:
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            torch.from_numpy(x),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    return buf.getvalue()


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _rewrite(model: bytes, **kw):
    from edgeseg.export.phase_conv import rewrite_conv_transpose

    m, replaced = rewrite_conv_transpose(onnx.load_from_string(model), **kw)
    onnx.checker.check_model(m)
    return m, replaced


CASES = [
    # dims, kernel, stride, padding, output_padding, spatial size
    (2, 3, 2, 1, 1, 7),  # MONAI UNet's up-convolution
    (2, 2, 2, 0, 0, 8),  # nnU-Net's (kernel = stride)
    (3, 3, 2, 1, 1, 5),
    (3, 2, 2, 0, 0, 4),
    (2, 4, 2, 1, 0, 6),
    (2, 3, 3, 0, 2, 5),  # output_padding past y_full's end
    (1, 5, 2, 2, 1, 9),
    (2, (3, 2), (2, 2), (1, 0), (1, 0), 6),  # per-axis kernel and pads
    (3, (2, 2, 1), (2, 2, 1), 0, 0, 4),  # anisotropic, as nnU-Net plans for thick slices
    (2, 3, 1, 1, 0, 6),  # stride 1: one phase, a plain convolution
]


@pytest.mark.parametrize("dims,k,s,p,op,n", CASES)
def test_phase_convolutions_equal_conv_transpose(dims, k, s, p, op, n):
    cls = [torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d][dims - 1]
    torch.manual_seed(dims * 100 + n)
    layer = cls(3, 5, k, s, p, op)
    x = np.random.default_rng(n).standard_normal((2, 3, *([n] * dims))).astype(np.float32)
    model = _export(layer, x)
    m, replaced = _rewrite(model)
    assert len(replaced) == 1 and not any(node.op_type == "ConvTranspose" for node in m.graph.node)
    want = layer(torch.from_numpy(x)).detach().numpy()
    got = _run(m.SerializeToString(), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_what_cannot_be_rewritten_is_left_alone():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    for layer in (
        torch.nn.ConvTranspose2d(4, 4, 3, 2, 1, groups=2),
        torch.nn.ConvTranspose2d(4, 4, 3, 2, 1, dilation=2),
        torch.nn.ConvTranspose2d(4, 4, 1, 2),  # kernel smaller than stride: phases without taps
    ):
        model = _export(layer, x)
        m, replaced = _rewrite(model)
        assert replaced == [] and [n.op_type for n in m.graph.node].count("ConvTranspose") == 1
        np.testing.assert_array_equal(_run(m.SerializeToString(), x), _run(model, x))


def test_only_the_named_layers_are_rewritten_in_a_monai_unet():
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    net = monai.networks.nets.UNet(2, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, norm="batch").eval()
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 48)).astype(np.float32)
    model = _export(net, x)
    names = [n.name for n in onnx.load_from_string(model).graph.node if n.op_type == "ConvTranspose"]
    assert len(names) == 2
    m, replaced = _rewrite(model, only={names[0]})
    assert replaced == [names[0]]
    m_all, replaced_all = _rewrite(model)
    assert replaced_all == names
    want = net(torch.from_numpy(x)).detach().numpy()
    for graph in (m, m_all):
        got = _run(graph.SerializeToString(), x)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def _small_unet(out_channels: int, size: int) -> tuple[bytes, list[np.ndarray]]:
    """A conv/BN/ReLU MONAI UNet (two ConvTransposes) as ONNX, and two input batches."""
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    net = monai.networks.nets.UNet(2, 1, out_channels, (16, 32, 64), (2, 2), num_res_units=0, norm="batch")
    rng = np.random.default_rng(size)
    batches = [rng.standard_normal((2, 1, size, size)).astype(np.float32) for _ in range(2)]
    return _export(net.eval(), batches[0]), batches


def test_phase_convolutions_run_int8_where_conv_transpose_stayed_float(tmp_path):
    """ORT's optimised int8 graph: the rewritten decoder layers become QLinearConv; without
    the rewrite a float ConvTranspose stays behind, fenced by DQ/Q."""
    from edgeseg.calib.quantize import quantize_int8

    model, batches = _small_unet(out_channels=3, size=64)
    m, _ = _rewrite(model)

    def optimised_ops(int8: bytes) -> list[str]:
        path = tmp_path / "opt.onnx"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(path)
        ort.InferenceSession(int8, opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    plain = quantize_int8(model, batches, "x", variants=["int8_cpu"], tune_cpu=False).models["int8_cpu"]
    phased = quantize_int8(m.SerializeToString(), batches, "x", variants=["int8_cpu"], tune_cpu=False)
    ops_plain, ops_phased = optimised_ops(plain), optimised_ops(phased.models["int8_cpu"])
    assert ops_plain.count("ConvTranspose") == 2
    assert "ConvTranspose" not in ops_phased
    assert ops_phased.count("QLinearConv") >= ops_plain.count("QLinearConv") + 2 * 4  # 4 phases per layer
    # Same network: int8 labels of both graphs agree with fp32 nearly everywhere.
    ref = _run(model, batches[0]).argmax(1)
    for int8 in (plain, phased.models["int8_cpu"]):
        assert float((_run(int8, batches[0]).argmax(1) == ref).mean()) > 0.97


def test_cpu_tuning_records_every_trial_and_keeps_only_what_was_faster():
    from edgeseg.calib.quantize import quantize_int8

    model, batches = _small_unet(out_channels=2, size=96)
    q = quantize_int8(model, batches, "x", variants=["int8", "int8_cpu"], tune_budget_s=30)
    tuning = q.settings["int8_cpu_tuning"]
    trials = tuning["trials"]
    assert trials[0]["variant"] == "plain int8"
    tried = [t["variant"] for t in trials[1:]]
    # Few-channel convs (1 input, 2 outputs) and both ConvTransposes were each tried once.
    assert tried[0] == "keep few-channel convs fp32" and sum(v.startswith("phase conv") for v in tried) == 2
    kept = [t for t in trials[1:] if t.get("kept")]
    best = min([trials[0], *kept], key=lambda t: t["ms"]) if kept else trials[0]
    assert best["ms"] <= trials[0]["ms"]
    # The chosen graph is what the tuning says it is; the TensorRT variant is untouched.
    cpu_ops = [n.op_type for n in onnx.load_from_string(q.models["int8_cpu"]).graph.node]
    assert (cpu_ops.count("ConvTranspose") < 2) == bool(tuning["phase_conv"])
    trt_ops = [n.op_type for n in onnx.load_from_string(q.models["int8"]).graph.node]
    assert trt_ops.count("ConvTranspose") == 2 and "DepthToSpace" not in trt_ops


def test_a_recorded_cpu_choice_is_rebuilt_without_timing(monkeypatch):
    """Auto-keep rounds re-quantize with the first build's CPU choice instead of re-tuning."""
    from edgeseg.calib import bench
    from edgeseg.calib.quantize import quantize_int8

    model, batches = _small_unet(out_channels=2, size=64)
    first = quantize_int8(model, batches, "x", variants=["int8_cpu"], tune_budget_s=30)
    tuning = first.settings["int8_cpu_tuning"]

    def no_timing(*a, **k):
        raise AssertionError("a replayed choice must not be timed")

    monkeypatch.setattr(bench, "time_model", no_timing)
    again = quantize_int8(model, batches, "x", variants=["int8_cpu"], cpu_tuning=tuning)
    replayed = again.settings["int8_cpu_tuning"]
    assert replayed["phase_conv"] == tuning["phase_conv"]
    assert replayed["few_channels_fp32"] == tuning["few_channels_fp32"]
    ops = [
        [n.op_type for n in onnx.load_from_string(q.models["int8_cpu"]).graph.node] for q in (first, again)
    ]
    assert ops[0] == ops[1]
