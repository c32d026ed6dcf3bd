"""Which quantized layers hurt: restore one layer at a time to fp32 and measure the gain.

Cheap by construction: no re-calibration. Each candidate is the INT8 graph with the Q→DQ pairs
in front of one node bypassed (its inputs and weight back to fp32), run on a few held-out
inputs; layers are ranked by how much foreground Dice vs fp32 that restores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeseg.calib.metrics import dice_counts
from edgeseg.preprocess import to_labels
from edgeseg.spec import ModelSpec


def bypass_node(model: Any, node_name: str) -> Any:
    """A copy of ``model`` where ``node_name`` reads its inputs from before their Q→DQ pairs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    producers = {o: n for n in m.graph.node for o in n.output}
    for node in m.graph.node:
        if node.name != node_name:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    return m


def _foreground_dice(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray], spec: ModelSpec) -> float:
    labels = [lab.value for lab in spec.labels]
    num = den = 0
    for o, r in zip(outs, refs):
        lo, _ = to_labels(o, spec)
        lr, _ = to_labels(r, spec)
        for n, d in dice_counts(lo, lr, labels).values():
            num += n
            den += d
    return num / den if den else 1.0


def _run(model_bytes: bytes, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    from edgeseg.backends.onnxruntime import OrtBackend

    backend = OrtBackend(model_bytes)
    try:
        return [backend.infer(b).copy() for b in batches]
    finally:
        backend.close()


def rank_layers(
    fp32: bytes,
    int8: bytes,
    batches: Sequence[np.ndarray],
    spec: ModelSpec,
    *,
    max_layers: int = 48,
    top: int = 5,
    budget_s: float = 30.0,
) -> list[dict[str, Any]]:
    """The ``top`` layers whose quantization costs the most foreground Dice vs fp32.

    Returns ``[{"node", "op", "dice_if_fp32", "gain"}]``, the largest gain first. Stops after
    ``budget_s`` seconds (big graphs): the ranking then covers the layers tried so far.
    """
    import time

    import onnx

    ref = _run(fp32, batches)
    model = onnx.load_from_string(int8)
    base = _foreground_dice(_run(int8, batches), ref, spec)
    producers = {o: n for n in model.graph.node for o in n.output}
    candidates = [
        n
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ][:max_layers]
    rows = []
    start = time.perf_counter()
    for node in candidates:
        if time.perf_counter() - start > budget_s:
            break
        variant = bypass_node(model, node.name).SerializeToString()
        d = _foreground_dice(_run(variant, batches), ref, spec)
        rows.append(
            {"node": node.name, "op": node.op_type, "dice_if_fp32": round(d, 5), "gain": round(d - base, 5)}
        )
    rows.sort(key=lambda r: -r["gain"])
    return [{"baseline_dice": round(base, 5), **r} for r in rows[:top]]
