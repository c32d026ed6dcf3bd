"""TensorRT's explicit-quantization rules, checked on a Q/DQ ONNX before anything is written.

The rules (onnx-tensorrt ``QuantDequantLinearHelper``): INT8 only (no UINT8), zero point present
and all 0 (symmetric), per-axis scales only on weights with one scale per channel of the axis
(Conv weight axis 0, ConvTranspose weight axis 1), per-tensor activations, positive float32
scales (fp16 scales need opset ≥ 19), default-domain opset ≥ 13 (the ``axis`` attribute).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeseg._exceptions import CalibrationError

MIN_OPSET = 13
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def check_qdq(model: bytes | Any) -> dict[str, int]:
    """Raise :class:`CalibrationError` naming the first node that breaks a rule.

    Returns
    -------
    dict
        counts: ``{"quantize": n, "dequantize": n, "per_channel_weights": n}``.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model) if isinstance(model, bytes) else model
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise CalibrationError(
            f"the Q/DQ model has opset {opset}; TensorRT needs opset ≥ {MIN_OPSET} for Q/DQ axes"
        )
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {
        n.output[0]: next(a.t for a in n.attribute if a.name == "value")
        for n in g.node
        if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
    }
    inits.update(consts)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    counts = {"quantize": 0, "dequantize": 0, "per_channel_weights": 0}
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts["quantize" if node.op_type == "QuantizeLinear" else "dequantize"] += 1
        where = f"{node.op_type} node '{node.name or node.output[0]}'"
        if len(node.input) < 3 or not node.input[2]:
            raise CalibrationError(
                f"{where} has no zero point (defaults to UINT8); TensorRT needs an INT8 zero point of 0"
            )
        zp_t = inits.get(node.input[2])
        if zp_t is None:
            raise CalibrationError(
                f"{where}: its zero point is computed at run time; TensorRT needs a constant 0"
            )
        zp = numpy_helper.to_array(zp_t)
        if zp.dtype != np.int8:
            raise CalibrationError(f"{where} uses {zp.dtype} quantization; TensorRT accepts INT8 Q/DQ only")
        if np.any(zp != 0):
            raise CalibrationError(
                f"{where} has a non-zero zero point; TensorRT only supports symmetric quantization"
            )
        sc_t = inits.get(node.input[1])
        if sc_t is None:
            raise CalibrationError(
                f"{where}: its scale is computed at run time; TensorRT needs a constant scale"
            )
        scale = numpy_helper.to_array(sc_t)
        if scale.dtype == np.float16 and opset < 19:
            raise CalibrationError(f"{where} has an fp16 scale, which needs opset ≥ 19 (model has {opset})")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise CalibrationError(f"{where} has a zero, negative or non-finite scale (a degenerate range?)")
        if scale.size > 1:
            _check_per_axis(node, where, scale.size, inits, producers, consumers)
            counts["per_channel_weights"] += node.op_type == "DequantizeLinear"
    if counts["quantize"] + counts["dequantize"] == 0:
        raise CalibrationError("the INT8 model has no Q/DQ nodes: nothing was quantized")
    return counts


def _check_per_axis(
    node: Any, where: str, n_scales: int, inits: dict, producers: dict, consumers: dict
) -> None:
    """Per-axis scales: only on a weight, with the right axis and one scale per channel."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    # The tensor being quantized is a weight when it is an initializer, or (for a DQ) when it is
    # the output of a Q whose input is an initializer (weights behind Q→DQ).
    src = node.input[0]
    weight = inits.get(src)
    if weight is None and node.op_type == "DequantizeLinear" and src in producers:
        q = producers[src]
        if q.op_type == "QuantizeLinear":
            weight = inits.get(q.input[0])
    if weight is None:
        raise CalibrationError(
            f"{where} quantizes an activation per channel; TensorRT allows per-tensor activations only"
        )
    dims = list(weight.dims)
    if axis < 0:
        axis += len(dims)
    if not 0 <= axis < len(dims) or dims[axis] != n_scales:
        raise CalibrationError(f"{where} has {n_scales} scales for axis {axis} of a weight shaped {dims}")
    # Which op uses the weight decides the axis TensorRT expects.
    out = node.output[0]
    users = consumers.get(out, [])
    if node.op_type == "QuantizeLinear":
        users = [
            u for dq, _ in users if dq.op_type == "DequantizeLinear" for u in consumers.get(dq.output[0], [])
        ]
    for user, idx in users:
        want = WEIGHT_AXIS.get(user.op_type)
        if want is not None and idx == 1 and axis != want:
            raise CalibrationError(
                f"{where} quantizes the weight of {user.op_type} '{user.name}' on axis {axis}; TensorRT needs axis {want}"
            )
