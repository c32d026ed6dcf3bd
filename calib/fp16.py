"""FP16 in ONNX space (onnxconverter-common), I/O kept fp32, fragile ops and overflowing nodes
kept fp32.

Before converting, the fp32 model runs on a few calibration samples with every intermediate
tensor as an output; a node whose output exceeds fp16's range (|x| > 65504), or comes within
``headroom`` of it, stays fp32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeseg._exceptions import CalibrationError

FP16_MAX = 65504.0
# Numerically fragile in fp16: normalisation statistics, exponentials and reductions.
FRAGILE_OPS = [
    "InstanceNormalization",
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
]


@dataclass
class Fp16Result:
    """The fp16 model and what stayed fp32 and why."""

    model: bytes
    kept_ops: list[str]
    overflow: list[dict[str, Any]] = field(default_factory=list)
    kept_nodes: list[str] = field(default_factory=list)


def intermediate_maxima(
    fp32: bytes, batches: Sequence[np.ndarray], input_name: str
) -> dict[str, tuple[str, float]]:
    """``{tensor: (producer node, max |x|)}`` over ``batches`` for every float intermediate tensor."""
    import onnx
    import onnxruntime as ort

    from edgeseg.calib.quantize import name_nodes

    m = name_nodes(onnx.load_from_string(fp32))
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    producer = {o: n.name for n in m.graph.node for o in n.output}
    have = {o.name for o in m.graph.output}
    for name in producer:
        vi = types.get(name)
        if name in have or vi is None or vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No graph optimisation: fused nodes would hide the tensors we want to see.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    peak: dict[str, float] = {}
    for batch in batches:
        for name, value in zip(names, sess.run(names, {input_name: batch})):
            v = float(np.max(np.abs(value))) if value.size else 0.0
            peak[name] = max(peak.get(name, 0.0), v)
    return {n: (producer.get(n, ""), v) for n, v in peak.items()}


def fold_constant_identities(model: Any) -> Any:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The torch exporter emits them for shared weights; onnxconverter-common converts the
    initializer to fp16 but leaves the Identity's output typed float, which ORT rejects.
    """
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in graph_outputs:
            copy = type(inits[node.input[0]])()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return model


def convert_fp16(
    fp32: bytes,
    batches: Sequence[np.ndarray] = (),
    input_name: str = "image",
    *,
    keep_ops: Sequence[str] | None = None,
    keep_nodes: Sequence[str] = (),
    headroom: float = 0.5,
) -> Fp16Result:
    """Convert ``fp32`` to fp16 with I/O kept fp32.

    Parameters
    ----------
    batches:
        a couple of calibration batches for the overflow check (none: no check).
    keep_ops:
        op types kept fp32 (default :data:`FRAGILE_OPS`); always added to the converter's own
        default block list, which a custom list would otherwise replace.
    keep_nodes:
        node names kept fp32 (``--keep-fp32``).
    headroom:
        a node is kept fp32 when its output exceeds ``headroom * 65504`` on the samples.
    """
    import onnx
    from onnxconverter_common import float16

    from edgeseg.calib.quantize import name_nodes

    overflow: list[dict[str, Any]] = []
    block_nodes = set(keep_nodes)
    if len(batches):
        for tensor, (node, peak) in intermediate_maxima(fp32, batches, input_name).items():
            if peak > headroom * FP16_MAX or not np.isfinite(peak):
                overflow.append(
                    {"tensor": tensor, "node": node, "max_abs": peak, "overflows": peak > FP16_MAX}
                )
                if node:
                    block_nodes.add(node)
    ops = list(FRAGILE_OPS if keep_ops is None else keep_ops)
    model = fold_constant_identities(name_nodes(onnx.load_from_string(fp32)))
    try:
        with warnings.catch_warnings():
            # "float32 number … will be truncated": tiny weights rounding to fp16's minimum.
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + ops,
                node_block_list=sorted(block_nodes),
            )
    except Exception as exc:
        raise CalibrationError(f"fp16 conversion failed: {str(exc).splitlines()[0]}") from None
    return Fp16Result(converted.SerializeToString(), ops, overflow, sorted(block_nodes))
