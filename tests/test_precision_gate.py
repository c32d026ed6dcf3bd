"""fp16 / int8 bundles from a really trained hippocampus U-Net, gated by Dice against fp32.

A good calibration set passes; a deliberately bad one (one background-only slice) is refused
with a report that names the layers that hurt most; --force writes it anyway.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import REPO, shared_path

from edgeseg import AccuracyGateError, CalibrationError, SpecError
from edgeseg.spec import load_spec

torch = pytest.importorskip("torch")
pytest.importorskip("onnxconverter_common")

EXAMPLE = REPO / "examples" / "hippocampus"
WEIGHTS = REPO / "tests" / "assets" / "hippocampus" / "unet2d.state.pt"
# Dice *agreement* with fp32 on two small structures; int8 of this 8-channel net agrees ~0.987
# while its Dice against ground truth is unchanged (see examples/hippocampus/README.md).
MIN_DICE = 0.97


def example_train():
    spec = importlib.util.spec_from_file_location("hippo_train", EXAMPLE / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def spec():
    return load_spec(str(EXAMPLE / "spec2d.json"))


@pytest.fixture(scope="module")
def model():
    net = example_train().make_model(2)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    return net.eval()


@pytest.fixture(scope="module")
def calib(tmp_path_factory, spec):
    from edgeseg.calib.dataset import CalibrationSet

    root = shared_path("seg", "msd_task04_hippocampus")
    tmp = tmp_path_factory.mktemp("hippo")
    images, labels = tmp / "images", tmp / "labels"
    images.mkdir()
    labels.mkdir()
    for p in sorted((root / "imagesTr").glob("*.nii.gz"))[:20]:
        (images / p.name).symlink_to(p)
        (labels / p.name).symlink_to(root / "labelsTr" / p.name)
    return CalibrationSet.from_paths(images, spec, labels=labels, max_samples=96, max_holdout=4)


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory, model, spec, calib):
    from edgeseg.export.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "hippo2d.edgeseg"
    report = build_bundle(
        model,
        spec,
        out,
        name="hippo2d",
        precisions=["fp32", "fp16", "int8"],
        calibration=calib,
        gate={"min_dice": MIN_DICE, "method": "percentile", "keep_fp32": []},
    )
    return out, report


def test_good_calibration_passes_the_gate(good_bundle):
    from edgeseg.bundle import Bundle
    from edgeseg.calib.qdq_rules import check_qdq

    path, report = good_bundle
    b = Bundle.open(path)
    assert b.precisions == ["fp32", "fp16", "int8", "int8_cpu"]
    acc = b.manifest["accuracy"]
    for p in ("fp16", "int8", "int8_cpu"):
        assert acc[p]["passed"] and acc[p]["min_dice_vs_fp32"] >= MIN_DICE
        assert set(acc[p]["dice_vs_fp32"]) == {"anterior", "posterior"}
        # int8 costs no accuracy against ground truth (within 0.02 of fp32)
        assert acc[p]["mean_dice_vs_truth"] > acc["fp32"]["mean_dice_vs_truth"] - 0.02
    assert acc["fp32"]["mean_dice_vs_truth"] > 0.7  # a really trained model
    assert acc["fp16"]["min_dice_vs_fp32"] > 0.995
    check_qdq(b.onnx("int8"))
    prov = b.manifest["provenance"]
    assert prov["calibration"]["n_samples"] <= 96 and prov["calibration"]["holdout_series"]
    assert len(prov["ranges"]) > 10
    runtime = b.manifest["runtime"]
    assert runtime["cpu_precision"] in b.precisions and set(runtime["cpu_ms"]) == set(b.precisions)
    assert report.cpu_precision == runtime["cpu_precision"]


def test_info_shows_the_ranges(good_bundle):
    from click.testing import CliRunner

    from edgeseg.cli import main

    res = CliRunner().invoke(main, ["info", str(good_bundle[0]), "--ranges"])
    assert res.exit_code == 0, res.output
    assert "accuracy gate:" in res.output and "int8: mean Dice vs fp32" in res.output
    assert "_output_0: [" in res.output


def _background_slice(spec, calib) -> np.ndarray:
    """One preprocessed slice with no hippocampus in it."""
    from edgeseg.preprocess import Preprocessor

    h = calib.holdout[0]
    x = Preprocessor(spec)(h.volume).array
    empty = [i for i in range(h.labels.shape[0]) if not h.labels[i].any()]
    return x[empty[0]].copy()


def test_bad_calibration_is_refused_and_force_writes_it(tmp_path, model, spec, calib):
    from edgeseg.calib.dataset import CalibrationSet
    from edgeseg.export.build import build_bundle

    bad = CalibrationSet([_background_slice(spec, calib)], calib.holdout, {"n_samples": 1})
    out = tmp_path / "bad.edgeseg"
    gate = {"min_dice": MIN_DICE, "method": "minmax", "keep_fp32": []}
    with pytest.raises(AccuracyGateError, match="every candidate failed the accuracy gate") as err:
        build_bundle(model, spec, out, name="bad", precisions=["int8"], calibration=bad, gate=gate)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    rep = err.value.report["int8"]
    assert not rep["passed"] and rep["min_dice_vs_fp32"] < MIN_DICE
    worst = rep["sensitivity"]
    assert worst and worst[0]["gain"] >= worst[-1]["gain"] and worst[0]["node"]

    forced = build_bundle(
        model, spec, out, name="bad", precisions=["int8"], calibration=bad, gate=gate, force=True
    )
    assert out.is_file() and "int8" in forced.precisions
    assert any("fails the gate" in w and "kept (--force)" in w for w in forced.warnings)
    assert forced.cpu_precision == "fp32"  # a failing candidate is never the runtime's choice


def test_keep_fp32_and_bad_inputs(tmp_path, model, spec, calib):
    from edgeseg.calib.dataset import CalibrationSet
    from edgeseg.calib.precision import build_precisions
    from edgeseg.export.onnx_export import torch_to_onnx
    from edgeseg.spec import ModelSpec

    small = calib.subset(16)
    fp32 = torch_to_onnx(model, small.samples[0][None], spec)
    res = build_precisions(
        fp32, spec, ["int8"], calibration=small, gate={"min_dice": 0.0, "keep_fp32": ["ConvTranspose"]}
    )
    assert res.provenance["quantization"]["kept_fp32"]  # the ConvTranspose nodes
    with pytest.raises(CalibrationError, match="'NoSuchLayer' matches no node name or op type"):
        build_precisions(fp32, spec, ["int8"], calibration=small, gate={"keep_fp32": ["NoSuchLayer"]})
    with pytest.raises(CalibrationError, match="int8 needs a calibration set"):
        build_precisions(fp32, spec, ["int8"])
    other = ModelSpec.from_dict({**spec.to_dict(), "target_shape": [32, 32]})
    wrong = CalibrationSet.from_volumes([calib.holdout[0].volume], other)
    with pytest.raises(SpecError, match=r"spatial size \[32, 32\] but the model expects \[64, 48\]"):
        build_precisions(fp32, spec, ["int8"], calibration=wrong)
