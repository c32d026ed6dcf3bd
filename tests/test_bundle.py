import json
import zipfile

import pytest

from edgeseg import BundleError
from edgeseg.bundle import Bundle
from edgeseg.export.bundle_writer import write_bundle
from edgeseg.spec import Label, ModelSpec

onnx = pytest.importorskip("onnx")


def _tiny_onnx() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 4, 4])
    g = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture
def bundle_path(tmp_path):
    spec = ModelSpec(dims=2, labels=[Label(1, "x")], output="threshold")
    return write_bundle(tmp_path / "m.edgeseg", spec=spec, models={"fp32": _tiny_onnx()}, name="tiny")


def test_round_trip_and_describe(bundle_path):
    b = Bundle.open(bundle_path)
    assert b.precisions == ["fp32"] and b.cpu_precision == "fp32"
    assert b.onnx("fp32") == _tiny_onnx()
    d = b.describe()
    assert d["model"]["name"] == "tiny" and d["labels"][0]["name"] == "x"
    assert "onnx" in d["provenance"]["versions"]
    with zipfile.ZipFile(bundle_path) as zf:  # members stored, not deflated
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with pytest.raises(BundleError, match="no int8 model"):
        b.onnx("int8")


def _rewrite(src, dst, mutate):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = mutate(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def test_tampered_member_is_refused(bundle_path, tmp_path):
    bad = tmp_path / "bad.edgeseg"
    _rewrite(bundle_path, bad, lambda n, d: d[:-1] + b"\0" if n.endswith(".onnx") else d)
    with pytest.raises(BundleError, match="does not match its recorded sha256"):
        Bundle.open(bad)


def test_extra_or_missing_members_are_refused(bundle_path, tmp_path):
    extra = tmp_path / "extra.edgeseg"
    _rewrite(bundle_path, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("evil.bin", b"x")
    with pytest.raises(BundleError, match="not listed"):
        Bundle.open(extra)
    missing = tmp_path / "missing.edgeseg"
    _rewrite(bundle_path, missing, lambda n, d: None if n.endswith(".onnx") else d)
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(missing)


def test_newer_schema_and_non_bundles_are_refused(bundle_path, tmp_path):
    newer = tmp_path / "newer.edgeseg"

    def bump(name, data):
        if name == "manifest.json":
            m = json.loads(data)
            m["schema"] = 99
            return json.dumps(m)
        return data

    _rewrite(bundle_path, newer, bump)
    with pytest.raises(BundleError, match="schema 99 is newer"):
        Bundle.open(newer)
    junk = tmp_path / "junk.edgeseg"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not an edgeseg bundle"):
        Bundle.open(junk)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "absent.edgeseg")
