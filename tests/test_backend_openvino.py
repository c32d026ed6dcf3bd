"""The OpenVINO CPU engine, the acceptance check before first use, and the measured CPU choice.

Real OpenVINO and ONNX Runtime sessions on small real ONNX graphs written here (a 3×3×3 conv
net); the deepbet bundle case runs the real pretrained network on a real MR series. Speed is
measured in benchmarks/, never here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeseg import BackendError
from edgeseg.spec import Label, ModelSpec

pytest.importorskip("openvino", reason="OpenVINO is not installed (no wheel for this platform)")
onnx = pytest.importorskip("onnx")

SPEC = ModelSpec(dims=3, labels=[Label(1, "a"), Label(2, "b")])


def _conv_onnx(seed: int = 0, classes: int = 3) -> bytes:
    """Conv(1→8, 3³) → Relu → Conv(8→classes, 1³): dynamic batch, any spatial size."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 1, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = rng.standard_normal((classes, 8, 1, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "d", "h", "w"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, "d", "h", "w"])
    nodes = [
        helper.make_node("Conv", ["image", "W1"], ["c1"], pads=[1] * 6),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (b2, "B2"))]
    g = helper.make_graph(nodes, "convnet", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path / "cache"))


def _bundle(tmp_path, int8: bytes | None = None, *, with_acceptance: bool = True):
    """fp32 + an "int8" member the build's (ONNX Runtime) gate recorded as passed."""
    from edgeseg.backends.acceptance import MEMBER, build_acceptance
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.bundle import Bundle
    from edgeseg.export.bundle_writer import write_bundle

    fp32 = _conv_onnx(0)
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1, 1, 12, 16, 16)).astype(np.float32) for _ in range(2)]
    extra = {}
    if with_acceptance:
        with OrtBackend(fp32) as ref:
            extra[MEMBER] = build_acceptance(ref, inputs, SPEC).to_bytes()
    models = {"fp32": fp32, **({"int8": int8} if int8 is not None else {})}
    accuracy = {"int8": {"passed": True, "min_dice": 0.99, "min_dice_vs_fp32": 0.995}} if int8 else {}
    path = write_bundle(
        tmp_path / "m.edgeseg", spec=SPEC, models=models, name="conv", accuracy=accuracy, extra_members=extra
    )
    return Bundle.open(path)


def test_openvino_matches_onnxruntime_and_reuses_its_output_buffer():
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.backends.openvino import OpenVinoBackend

    model = _conv_onnx(1)
    x = np.random.default_rng(0).standard_normal((2, 1, 10, 12, 14)).astype(np.float32)
    with OpenVinoBackend(model, threads=1) as ov, OrtBackend(model, threads=1) as ort:
        assert ov.input.shape[0] is None and ov.input.dtype == np.float32
        first = ov.infer(x)
        np.testing.assert_allclose(first, ort.infer(x), rtol=1e-4, atol=1e-4)
        again = ov.infer(x + 1.0)
        assert again is first  # one preallocated output per shape, written in place
        np.testing.assert_allclose(again, ort.infer(x + 1.0), rtol=1e-4, atol=1e-4)
        half = ov.infer(x[:1])
        assert half.shape == (1, 3, 10, 12, 14) and half is not first
        with pytest.raises(TypeError, match="float32"):
            ov.infer(x.astype(np.float64))
        d = ov.describe()
        assert d["backend"] == "openvino" and d["threads"] == 1 and d["openvino"]


def test_a_larger_batch_after_a_smaller_one_runs(tmp_path):
    # Found on 20 real cases through an nnU-Net 3d_fullres bundle: a case with one window (batch
    # 1) and then one with several (batch 2) failed, "Could set new shape", in OpenVINO.
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.backends.openvino import OpenVinoBackend

    model = _conv_onnx(1)
    x = np.random.default_rng(1).standard_normal((3, 1, 10, 12, 14)).astype(np.float32)
    with OpenVinoBackend(model, threads=1) as ov, OrtBackend(model, threads=1) as ort:
        for n in (1, 2, 3, 1, 3, 2):
            np.testing.assert_allclose(ov.infer(x[:n]), ort.infer(x[:n]), rtol=1e-4, atol=1e-4)
        # A whole-volume model meets a new grid per series: what is kept per shape stays bounded.
        for d in range(10, 18):
            y = np.ones((1, 1, d, 12, 14), np.float32)
            np.testing.assert_allclose(ov.infer(y), ort.infer(y), rtol=1e-4, atol=1e-4)
        assert len(ov._outputs) <= ov._outputs.size and len(ort._outputs) <= ort._outputs.size


def test_compiled_models_are_cached_per_openvino_version_and_cpu(tmp_path):
    from edgeseg.backends.host import host_cpu
    from edgeseg.backends.openvino import OpenVinoBackend, openvino_cache_dir, openvino_version

    where = openvino_cache_dir()
    assert where.parts[-2:] == (openvino_version(), host_cpu().slug)
    OpenVinoBackend(_conv_onnx(2)).close()
    blobs = list(where.glob("*.blob"))
    assert len(blobs) == 1
    OpenVinoBackend(_conv_onnx(2)).close()  # the same model again: read from the cache, no new blob
    assert list(where.glob("*.blob")) == blobs


def test_a_model_openvino_cannot_compile_is_a_sentence_not_a_crash(tmp_path):
    from edgeseg.backends.choice import measure
    from edgeseg.backends.openvino import OpenVinoBackend

    with pytest.raises(BackendError, match="OpenVINO cannot compile the int8 model"):
        OpenVinoBackend(b"\x08\x07 not an onnx graph", precision="int8")
    # In the engine table it is a row saying so; the other engine still runs the variant.
    b = _bundle(tmp_path, int8=b"\x08\x07 not an onnx graph")
    rows = {(r["engine"], r["precision"]): r for r in measure(b, 1)}
    assert rows[("openvino", "int8")]["status"].startswith("not available: ")
    assert rows[("openvino", "fp32")]["status"] == "ok" and rows[("openvino", "fp32")]["ms"] > 0


def test_int8_that_fails_the_acceptance_check_on_openvino_is_not_run_there(tmp_path):
    """The build's gate (ONNX Runtime) recorded int8 as passed; on OpenVINO its labels disagree
    with fp32 on the acceptance set, so OpenVINO int8 is refused, never chosen, and fp32 runs."""
    from edgeseg.backends.choice import choose, engine_table, open_cpu_backend
    from edgeseg.segmenter import Segmenter

    b = _bundle(tmp_path, int8=_conv_onnx(seed=5))  # another network under the int8 name
    with pytest.raises(
        BackendError, match="OpenVINO int8 fails the bundle's acceptance check: worst label Dice"
    ):
        open_cpu_backend(b, "openvino", "int8", threads=1)
    with pytest.raises(BackendError, match="acceptance check"):
        Segmenter.open(b, backend="openvino", precision="int8", threads=1)
    rows, source = engine_table(b, 1)
    assert source == "cache"  # measured once, by the Segmenter.open above
    bad = next(r for r in rows if (r["engine"], r["precision"]) == ("openvino", "int8"))
    assert "acceptance check" in bad["status"]
    engine, precision, _ = choose(b, 1)
    assert (engine, precision) != ("openvino", "int8")
    assert choose(b, 1, engine="openvino")[:2] == ("openvino", "fp32")
    with Segmenter.open(b, backend="openvino", threads=1) as seg:
        assert seg.describe()["precision"] == "fp32" and seg.backend.acceptance["passed"]


def test_a_check_record_for_another_engine_is_not_trusted(tmp_path):
    """A cached "passed" that does not name this engine and acceptance set (an engine compiled
    from a tampered model, a record copied from elsewhere) is ignored: the check runs again."""
    from edgeseg.backends.choice import open_cpu_backend
    from edgeseg.backends.openvino import OpenVinoBackend, openvino_cache_dir

    b = _bundle(tmp_path, int8=_conv_onnx(seed=5))
    engine_id = OpenVinoBackend(b.onnx("int8"), threads=1, precision="int8").engine_id(
        b.sha256("model.int8.onnx")
    )
    record = openvino_cache_dir() / "checks" / f"{engine_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    forged = {
        "min_dice_vs_fp32": 1.0,
        "voxel_agreement": 1.0,
        "n_inputs": 2,
        "min_dice": 0.99,
        "passed": True,
    }
    record.write_text(json.dumps({"engine_id": "0" * 64, "acceptance_sha256": b.acceptance.sha256,
                                  "min_dice": 0.99, "result": forged}))  # fmt: skip
    with pytest.raises(BackendError, match="acceptance check"):
        open_cpu_backend(b, "openvino", "int8", threads=1)
    assert json.loads(record.read_text())["engine_id"] == engine_id  # rewritten with the real result
    # And the honest record of a passing engine is reused: the second open does not re-check.
    first = open_cpu_backend(b, "openvino", "fp32", threads=1)
    second = open_cpu_backend(b, "openvino", "fp32", threads=1)
    assert first.acceptance["cached"] is False and second.acceptance["cached"] is True


def test_recorded_choice_is_used_on_the_same_host_and_remeasured_elsewhere(tmp_path):
    from edgeseg.backends.choice import engine_table
    from edgeseg.backends.host import host_cpu
    from edgeseg.bundle import Bundle
    from edgeseg.export.bundle_writer import rewrite_bundle

    b = _bundle(tmp_path)
    here = {"host": host_cpu(1).to_dict(), "rows": [{"engine": "onnxruntime", "precision": "fp32", "ms": 1.0,
            "status": "ok"}], "choice": {"engine": "onnxruntime", "precision": "fp32"}}  # fmt: skip
    same = Bundle.open(rewrite_bundle(b.path, tmp_path / "same.edgeseg", manifest_updates={
        "runtime": {"cpu_precision": "fp32", "cpu_engines": here}}))  # fmt: skip
    assert same.acceptance is not None  # the acceptance set survives a rewrite
    assert engine_table(same, 1) == (here["rows"], "bundle")
    other = dict(here, host=dict(here["host"], slug="another-cpu_00000000"))
    moved = Bundle.open(rewrite_bundle(b.path, tmp_path / "moved.edgeseg", manifest_updates={
        "runtime": {"cpu_precision": "fp32", "cpu_engines": other}}))  # fmt: skip
    rows, source = engine_table(moved, 1)
    assert source == "measured" and {r["engine"] for r in rows} == {"openvino", "onnxruntime"}
    assert engine_table(moved, 1)[1] == "cache"  # measured once per bundle and host


def test_bundle_without_acceptance_set_runs_openvino_only_at_fp32(tmp_path):
    from edgeseg.backends.choice import open_cpu_backend

    b = _bundle(tmp_path, int8=_conv_onnx(0), with_acceptance=False)
    with pytest.raises(BackendError, match="no acceptance set"):
        open_cpu_backend(b, "openvino", "int8", threads=1)
    open_cpu_backend(b, "openvino", "fp32", threads=1).close()


def test_deepbet_on_openvino_agrees_with_onnxruntime_on_a_real_mr_series(brain_bundle, dicom_data):
    from edgeseg.dicom import read_volume
    from edgeseg.segmenter import Segmenter

    series = dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag"
    if not series.is_dir():
        pytest.skip(f"{series} is not in the shared data")
    vol = read_volume(series)
    with (
        Segmenter.open(brain_bundle, backend="onnxruntime") as a,
        Segmenter.open(brain_bundle, backend="openvino") as b,
    ):
        assert b.describe()["backend"] == "openvino"
        la, lb = a.segment(vol).labels, b.segment(vol).labels
    assert la.any() and float((la == lb).mean()) >= 0.999


def test_gate_lower_confidence_bound_is_below_a_noisy_mean_and_can_decide():
    from edgeseg.calib.gate import lower_bound_95

    assert lower_bound_95([0.99]) is None
    tight = lower_bound_95([0.995, 0.996, 0.994, 0.995])
    noisy = lower_bound_95([0.999, 0.985, 0.998, 0.984])
    assert 0.99 < tight < 0.995 and noisy < 0.99 < float(np.mean([0.999, 0.985, 0.998, 0.984]))
