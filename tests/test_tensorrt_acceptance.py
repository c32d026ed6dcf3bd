"""TensorRT engines pass the bundle's acceptance check before first use.

No GPU here, so the engine is stood in for by what it is built from: the "plan" is the ONNX
member itself and it runs in a real ONNX Runtime session. Everything else is the real selection
code: engine cache, acceptance check, its record, the precision fallback and the refusal.
"""

from __future__ import annotations

import json

import pytest

from edgeseg import BackendError

pytest.importorskip("onnx")
from test_backend_openvino import _bundle, _conv_onnx  # noqa: E402  (same tiny real models)


def _open(bundle, tmp_path, precision=None):
    from edgeseg.backends.engine_cache import EngineKey
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.backends.tensorrt_open import open_tensorrt_backend

    built: list[str] = []

    def builder(onnx_bytes, spec, **_):
        built.append("x")
        return onnx_bytes

    backend = open_tensorrt_backend(
        bundle,
        precision,
        root=tmp_path / "engines",
        key_for=lambda sha, prec: EngineKey("10.3.0", "sm_87", "orin", sha, prec, "p"),
        builder=builder,
        make_backend=lambda plan, prec: OrtBackend(plan, threads=1, precision=prec),
    )
    return backend, built


def test_an_int8_engine_that_fails_the_check_is_not_used(tmp_path):
    # The int8 member is another network (a tampered or broken model): its labels disagree.
    b = _bundle(tmp_path, int8=_conv_onnx(seed=5))
    backend, built = _open(b, tmp_path)
    assert backend.precision == "fp32" and backend.acceptance["passed"] and len(built) == 2
    backend.close()
    with pytest.raises(BackendError, match=r"TensorRT int8 fails the bundle's acceptance check"):
        _open(b, tmp_path, "int8")
    # Engines and their checks are cached: nothing is built or checked twice.
    again, built = _open(b, tmp_path)
    assert built == [] and again.acceptance["cached"] is True
    again.close()


def test_a_passing_int8_engine_is_used_and_a_forged_record_is_not_trusted(tmp_path):
    b = _bundle(tmp_path, int8=_conv_onnx(seed=0))  # the same network: agrees with fp32
    backend, _ = _open(b, tmp_path)
    assert backend.precision == "int8" and backend.acceptance["min_dice_vs_fp32"] == 1.0
    backend.close()
    bad = _bundle(tmp_path / "other", int8=_conv_onnx(seed=5))
    records = list((tmp_path / "engines").rglob("*.accept.json"))
    assert len(records) == 1
    # Copy the passing record over the tampered engine's: it names another plan, so it is ignored.
    with pytest.raises(BackendError, match="acceptance check"):
        _open(bad, tmp_path, "int8")
    forged = next(p for p in (tmp_path / "engines").rglob("*.accept.json") if p != records[0])
    doc = json.loads(records[0].read_text())
    forged.write_text(json.dumps({**doc, "acceptance_sha256": bad.acceptance.sha256}))
    with pytest.raises(BackendError, match="acceptance check"):
        _open(bad, tmp_path, "int8")


def test_without_an_acceptance_set_only_fp32_runs(tmp_path):
    b = _bundle(tmp_path, int8=_conv_onnx(seed=0), with_acceptance=False)
    backend, _ = _open(b, tmp_path)
    assert backend.precision == "fp32"
    backend.close()
    with pytest.raises(BackendError, match="no acceptance set"):
        _open(b, tmp_path, "int8")
