"""Will TensorRT's ONNX parser take this model? Checked at build time, node by node, for the two
TensorRT majors edgeseg targets, so a Jetson user learns it from ``build-engine`` and not from
the first engine build on the device.

Source of the rules: onnx-tensorrt's operator support matrix (``docs/operators.md`` of the
10.x releases: the operators it marks unsupported, and the restrictions it lists for the
operators segmentation networks use) and TensorRT's opset ranges (10.x: opsets 9–20; 11.x: up
to 25, per NVIDIA's ONNX opset guide). TensorRT 11's matrix is taken as 10.x's (operators are
added, not removed, between majors); where that is an assumption the sentence says "10.x's".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Marked "N" in onnx-tensorrt's 10.x support matrix.
UNSUPPORTED = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im "
    "CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow "
    "HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
    "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul "
    "RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer "
    "StringSplit TfIdfVectorizer Unique".split()
)
MAX_OPSET = {"10.3": 20, "11.x": 25}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}


@dataclass(frozen=True)
class ParseProblem:
    versions: tuple[str, ...]  # of "10.3", "11.x"
    node: str
    op: str
    problem: str

    def sentence(self, member: str) -> str:
        which = " and ".join(self.versions)
        return f"{member}: TensorRT {which} will not parse node '{self.node}' ({self.op}): {self.problem}"


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_problems(node, inits: dict[str, np.ndarray]) -> list[str]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return [f"operator of domain '{node.domain}' (a custom op: TensorRT needs a plugin for it)"]
    if op in UNSUPPORTED:
        return ["not supported by TensorRT's ONNX parser (10.x's support matrix)"]
    out: list[str] = []
    if op in ("MaxPool", "AveragePool"):
        kernel = _attr(node, "kernel_shape") or []
        if len(kernel) not in (2, 3):
            out.append(f"{len(kernel)}D pooling; only 2D or 3D pooling is supported")
        if any(int(d) != 1 for d in (_attr(node, "dilations") or [])):
            out.append("dilated pooling is not supported")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            out.append("the Indices output of MaxPool is not supported")
    elif op == "Resize":
        mode = _attr(node, "mode", "nearest")
        transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if mode not in RESIZE_MODES:
            out.append(f"resize mode '{mode}' (only nearest and linear)")
        if transform not in RESIZE_TRANSFORMS:
            out.append(f"coordinate transformation '{transform}' is not supported")
        if int(_attr(node, "antialias") or 0):
            out.append("antialiased resize is not supported")
    elif op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
        zp = inits.get(node.input[2])
        if zp is None:
            out.append("the zero point must be a constant (an initializer) equal to 0")
        elif np.any(zp != 0):
            out.append("the zero point must be 0 (TensorRT quantizes symmetrically)")
    elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        out.append("only the first output of LayerNormalization is supported")
    return out


def check_model(model_bytes: bytes) -> list[ParseProblem]:
    """Every node of the ONNX model that TensorRT 10.3 or 11.x will not parse, and opsets out of range."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) <= 1}
    found: list[ParseProblem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    for version, limit in MAX_OPSET.items():
        if opset is not None and opset > limit:
            found.append(
                ParseProblem((version,), "(model)", "opset", f"opset {opset}; it parses up to {limit}")
            )
    every = tuple(MAX_OPSET)
    for i, node in enumerate(model.graph.node):
        for problem in _node_problems(node, inits):
            found.append(ParseProblem(every, node.name or f"#{i}", node.op_type, problem))
    return found


def check_bundle_models(models: dict[str, bytes]) -> list[str]:
    """One sentence per problem, for each precision's ONNX that TensorRT would build from."""
    sentences: list[str] = []
    for precision, data in models.items():
        if precision == "int8_cpu":  # shaped for the CPU engines; TensorRT builds from 'int8'
            continue
        sentences += [p.sentence(f"model.{precision}.onnx") for p in check_model(data)]
    return sentences
