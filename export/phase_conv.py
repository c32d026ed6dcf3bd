"""ConvTranspose → phase convolutions: the same numbers, as ops ONNX Runtime runs in INT8.

ONNX Runtime's CPU provider has no quantized ConvTranspose: in a Q/DQ model it stays float,
fenced by DequantizeLinear/QuantizeLinear, and breaks every int8 chain of a U-Net decoder. A
transposed convolution with stride ``s`` is ``s^d`` ordinary convolutions, one per output phase
(sub-pixel decomposition), interleaved. Each phase keeps only the kernel taps that land on it,
so the multiply-adds are exactly those of the ConvTranspose — no zero taps:

    y_full[s·q + r] = Σ_j x[q − j] · W[r + s·j]        (per axis; r the phase, 0 ≤ r < s)

which is a convolution of ``x`` with the flipped taps ``W[r + s·j]`` padded ``K_r − 1`` on the
left. All phases are padded to one output length, concatenated along channels, interleaved by
Reshape/Transpose/Reshape, and cropped to the ConvTranspose's pads and output_padding with a
Slice. ORT quantizes Conv, Concat, Reshape, Transpose and Slice, so the decoder stays int8.

Only used for the ONNX Runtime CPU variants; TensorRT quantizes ConvTranspose itself, so the
TensorRT models keep the original op. Handles groups = 1, dilation 1, static spatial shapes,
any dimension count and per-axis strides/kernels/pads; other ConvTransposes are left alone.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

log = logging.getLogger("edgeseg.export")


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _static_shape(value_info: dict[str, Any], name: str) -> list[int] | None:
    vi = value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        return None  # batch may be symbolic; channels and space must be known
    return dims  # type: ignore[return-value]


def phase_kernels(weight: np.ndarray, strides: list[int]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Per phase ``r`` (a tuple, one entry per axis): the Conv weight ``(Cout, Cin, *K_r)``.

    ``weight`` is the ConvTranspose weight ``(Cin, Cout, *K)``; every phase must get a tap
    (``K ≥ s`` on every axis).
    """
    dims = weight.ndim - 2
    k = weight.shape[2:]
    out = []
    for r in itertools.product(*[range(s) for s in strides]):
        index = []
        for ax in range(dims):
            taps = list(range(r[ax], k[ax], strides[ax]))  # W[r + s·j], j = 0…K_r−1
            index.append(taps[::-1])  # flipped: a correlation reads x[q − (K_r−1) + t]
        w = weight[np.ix_(range(weight.shape[0]), range(weight.shape[1]), *index)]
        out.append((r, np.ascontiguousarray(np.swapaxes(w, 0, 1))))
    return out


def rewrite_conv_transpose(model: Any, only: set[str] | None = None) -> tuple[Any, list[str]]:
    """Replace every supported ConvTranspose of ``model`` (an onnx ModelProto, changed in place)
    by phase convolutions. Returns the model and the names of the nodes replaced."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    value_info = {
        vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    replaced: list[str] = []
    for idx, node in enumerate(model.graph.node):
        wanted = node.op_type == "ConvTranspose" and (only is None or node.name in only)
        plan = _plan(node, inits, value_info) if wanted else None
        if plan is None:
            new_nodes.append(node)
            continue
        name = node.name or f"ConvTranspose_{idx}"
        nodes, tensors = _phase_graph(name, node, plan)
        new_nodes.extend(nodes)
        new_inits.extend(tensors)
        replaced.append(name)
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(new_inits)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dropped = {t.name for t in model.graph.initializer if t.name not in used}
        keep = [t for t in model.graph.initializer if t.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        # Old exporters list initializers as graph inputs too.
        inputs = [i for i in model.graph.input if i.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return model, replaced


def _plan(node: Any, inits: dict[str, Any], value_info: dict[str, Any]) -> dict[str, Any] | None:
    """What the rewrite needs to know about ``node``, or None when it cannot be rewritten."""
    from onnx import numpy_helper

    a = _attrs(node)
    if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None  # weights computed at run time
    w = numpy_helper.to_array(inits[node.input[1]])
    dims = w.ndim - 2
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1] * dims)):
        return None
    if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    in_shape = _static_shape(value_info, node.input[0])
    if in_shape is None or len(in_shape) != dims + 2:
        return None
    strides = list(a.get("strides", [1] * dims))
    pads = list(a.get("pads", [0] * (2 * dims)))
    out_pad = list(a.get("output_padding", [0] * dims))
    k = list(w.shape[2:])
    if any(kk < s for kk, s in zip(k, strides)):
        return None  # some phases get no tap at all (kernel smaller than stride): rare, left alone
    length = in_shape[2:]
    full = [s * (n - 1) + kk for s, n, kk in zip(strides, length, k)]
    out_len = [f - pads[i] - pads[dims + i] + out_pad[i] for i, f in enumerate(full)]
    k_max = [-(-kk // s) for kk, s in zip(k, strides)]  # ceil(K / s): taps of the widest phase
    # Phase outputs long enough for y_full and for what output_padding adds past its end.
    q_len = [
        max(n + km - 1, -(-(pads[i] + out_len[i]) // s))
        for i, (n, km, s) in enumerate(zip(length, k_max, strides))
    ]
    bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    return {
        "w": w,
        "bias": bias,
        "strides": strides,
        "pads": pads,
        "out_len": out_len,
        "in_len": length,
        "q_len": q_len,
        "cout": w.shape[1],
        "dims": dims,
    }


def _phase_graph(name: str, node: Any, p: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers that compute ``node``'s output from its input."""
    from onnx import helper, numpy_helper

    dims, cout, strides = p["dims"], p["cout"], p["strides"]
    nodes: list[Any] = []
    tensors: list[Any] = []
    phase_outs = []
    x = node.input[0]
    bias = []
    if p["bias"] is not None:  # every phase adds the same bias: one initializer for all
        tensors.append(numpy_helper.from_array(p["bias"], f"{name}/B"))
        bias = [f"{name}/B"]
    # Without pads or output_padding the interleaved phases are the output: no crop (a copy).
    crop = (
        list(p["pads"][:dims]) != [0] * dims or [q * s for q, s in zip(p["q_len"], strides)] != p["out_len"]
    )
    full = f"{name}/full" if crop else node.output[0]
    for r, w in phase_kernels(p["w"], strides):
        tag = f"{name}/phase" + "".join(map(str, r))
        kr = list(w.shape[2:])
        # Left pad K_r − 1 reads x[q − (K_r − 1) + t]; the right pad makes every phase q_len long.
        pad_lo = [k - 1 for k in kr]
        pad_hi = [q - n for q, n in zip(p["q_len"], p["in_len"])]
        tensors.append(numpy_helper.from_array(w, f"{tag}/W"))
        out = f"{tag}/y"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{tag}/W", *bias],
                [out],
                name=tag,
                kernel_shape=kr,
                pads=pad_lo + pad_hi,
                strides=[1] * dims,
            )
        )
        phase_outs.append(out)
    cat = f"{name}/phases"
    nodes.append(helper.make_node("Concat", phase_outs, [cat], name=cat, axis=1))
    if dims == 2 and strides[0] == strides[1]:
        # Channel (r0·s + r1)·Cout + c → pixel (s·q0 + r0, s·q1 + r1): DepthToSpace in DCR order,
        # one op that ORT runs on uint8 (measured 30 % faster than Reshape/Transpose/Reshape).
        nodes.append(
            helper.make_node(
                "DepthToSpace",
                [cat],
                [full],
                name=f"{name}/interleave",
                blocksize=strides[0],
                mode="DCR",
            )
        )
    else:
        # (N, Π s · Cout, *q) → (N, *s, Cout, *q) → (N, Cout, q0, s0, q1, s1, …) → (N, Cout, *q·s)
        split = np.array([0, *strides, cout, *p["q_len"]], np.int64)
        perm = [0, dims + 1] + [i for ax in range(dims) for i in (dims + 2 + ax, 1 + ax)]
        merged = np.array([0, cout, *[q * s for q, s in zip(p["q_len"], strides)]], np.int64)
        tensors += [
            numpy_helper.from_array(split, f"{name}/split"),
            numpy_helper.from_array(merged, f"{name}/merged"),
        ]
        nodes += [
            helper.make_node(
                "Reshape", [cat, f"{name}/split"], [f"{name}/split_y"], name=f"{name}/split_reshape"
            ),
            helper.make_node(
                "Transpose",
                [f"{name}/split_y"],
                [f"{name}/interleaved"],
                name=f"{name}/interleave",
                perm=perm,
            ),
            helper.make_node(
                "Reshape",
                [f"{name}/interleaved", f"{name}/merged"],
                [full],
                name=f"{name}/merge_reshape",
            ),
        ]
    if not crop:
        return nodes, tensors
    starts = np.array(p["pads"][:dims], np.int64)
    ends = starts + np.array(p["out_len"], np.int64)
    axes = np.arange(2, 2 + dims, dtype=np.int64)
    tensors += [
        numpy_helper.from_array(starts, f"{name}/crop_starts"),
        numpy_helper.from_array(ends, f"{name}/crop_ends"),
        numpy_helper.from_array(axes, f"{name}/crop_axes"),
    ]
    nodes.append(
        helper.make_node(
            "Slice",
            [full, f"{name}/crop_starts", f"{name}/crop_ends", f"{name}/crop_axes"],
            [node.output[0]],
            name=f"{name}/crop",
        )
    )
    return nodes, tensors
