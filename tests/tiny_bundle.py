"""A tiny real 2D bundle for tests that need a whole run, not a particular model: Identity over
a z-scored 32x32 slice, thresholded at 0.5 (so a real image gives a non-empty mask)."""

from __future__ import annotations

from pathlib import Path


def threshold_bundle(folder: Path) -> Path:
    from onnx import TensorProto, helper

    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.spec import Label, ModelSpec, ZScore

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = ModelSpec(
        dims=2, labels=[Label(1, "bright")], intensity=[ZScore()], target_shape=(32, 32), output="threshold"
    )
    return write_bundle(
        folder / "tiny.edgeseg", spec=spec, models={"fp32": model.SerializeToString()}, name="tiny"
    )
