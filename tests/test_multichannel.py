"""Multimodal input: series picked per study by description, put on one grid, stacked as channels."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeseg import SpecError, Volume
from edgeseg.geometry import world_resample
from edgeseg.spec import Label, ModelSpec

onnx = pytest.importorskip("onnx")

STUDY = ("tcia_brain_tumor_progression", "PGBM-003_Study3")


def _two_channel_onnx(w: np.ndarray, b: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, "h", "w"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "h", "w"])
    node = helper.make_node("Conv", ["image", "W", "B"], ["logits"])
    g = helper.make_graph(
        [node], "mix", [x], [y], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_world_resample_identity_and_integer_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    aff = np.diag([0.9, 1.1, 2.0, 1.0])
    np.testing.assert_allclose(world_resample(a, aff, a.shape, aff), a, atol=1e-6)
    shifted = aff.copy()
    shifted[:3, 3] = [0.9 * 2, 1.1 * 1, 0.0]  # target origin 2 voxels along x, 1 along y
    out = world_resample(a, aff, (6, 5, 5), shifted)
    np.testing.assert_allclose(out, a[:, 1:6, 2:7], atol=1e-5)


def test_channels_must_match_in_channels():
    with pytest.raises(SpecError, match="2 input channels"):
        ModelSpec(dims=2, in_channels=2, labels=[Label(1, "a")], channels=["t1"])


def test_run_picks_t1post_and_flair_of_a_real_study(tmp_path, dicom_data):
    from edgeseg.cli import main
    from edgeseg.dicom import find_series, load_volume
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.outputs import read_seg_labels

    w = np.array([[[[0.01]], [[-0.02]]], [[[-0.01]], [[0.02]]]], dtype=np.float32)
    b = np.array([0.0, 0.5], dtype=np.float32)
    spec = ModelSpec(
        dims=2, in_channels=2, labels=[Label(1, "bright-flair")], channels=["t1post", "flair"], batch_size=8
    )
    bundle = write_bundle(
        tmp_path / "mix.edgeseg", spec=spec, models={"fp32": _two_channel_onnx(w, b)}, name="mix"
    )
    study = dicom_data.joinpath(*STUDY)
    # ONNX Runtime: the expectation below is exact, and OpenVINO may round a near-tie the other way.
    args = ["run", str(bundle), str(study), "-o", str(tmp_path / "out"), "--json", "--backend", "onnxruntime"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["succeeded"] == 1
    outcome = doc["outcomes"][0]
    assert "T1post" in outcome["source"] and "FLAIR" in outcome["source"]

    refs = {ref.label: ref for ref in find_series([study]).series}
    t1 = load_volume(next(v for k, v in refs.items() if "T1post" in k))
    flair = load_volume(next(v for k, v in refs.items() if "FLAIR" in k))
    logits = (
        np.einsum("kc,czyx->kzyx", w[:, :, 0, 0], np.stack([t1.modality_values(), flair.modality_values()]))
        + b[:, None, None, None]
    )
    expected = logits.argmax(0).astype(np.uint8)
    assert 0 < expected.mean() < 1  # the test means something: both labels occur
    got = read_seg_labels(outcome["outputs"]["seg"], t1)
    np.testing.assert_array_equal(got, expected)


def test_ambiguous_or_missing_channel_is_one_line(tmp_path, dicom_data):
    from edgeseg.cli import main
    from edgeseg.export.bundle_writer import write_bundle

    w = np.zeros((2, 2, 1, 1), np.float32)
    spec = ModelSpec(dims=2, in_channels=2, labels=[Label(1, "x")], channels=["t1", "dwi"])
    bundle = write_bundle(
        tmp_path / "m.edgeseg",
        spec=spec,
        models={"fp32": _two_channel_onnx(w, np.zeros(2, np.float32))},
        name="m",
    )
    r = CliRunner().invoke(
        main, ["run", str(bundle), str(dicom_data.joinpath(*STUDY)), "-o", str(tmp_path), "--json"]
    )
    assert r.exit_code == 1
    err = json.loads(r.output)["outcomes"][0]["error"]
    assert "match channel pattern 't1'" in err  # T1post and T1pre both match 't1'


def test_channels_on_different_grids_are_resampled(dicom_data):
    from edgeseg.dicom import find_series, load_volume
    from edgeseg.multichannel import align_channels

    refs = {ref.label: ref for ref in find_series([dicom_data.joinpath(*STUDY)]).series}
    t1 = load_volume(next(v for k, v in refs.items() if "T1post" in k))
    crop = load_volume(next(v for k, v in refs.items() if "HippoCrop" in k))
    a, b = align_channels([t1, crop])
    assert b.shape == t1.shape and isinstance(b, Volume)
    assert any("resampled" in w for w in t1.warnings)
