"""The CLI end to end: a TorchScript file in, build-engine with a calibration folder, then
``edgeseg validate`` prints per-label Dice per precision against ground truth."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from conftest import REPO, shared_path

torch = pytest.importorskip("torch")
pytest.importorskip("onnxconverter_common")

EXAMPLE = REPO / "examples" / "hippocampus"
WEIGHTS = REPO / "tests" / "assets" / "hippocampus" / "unet2d.state.pt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Calibration images/labels and separate validation images/labels (symlinks, read in place)."""
    root = shared_path("seg", "msd_task04_hippocampus")
    tmp = tmp_path_factory.mktemp("hippo_cli")
    names = sorted(p.name for p in (root / "imagesTr").glob("*.nii.gz"))
    out = {}
    # The calibration cases and size are those of tests/test_precision_gate.py's set, where int8
    # fails the default gate as calibrated and passes with layers kept fp32.
    for key, chosen in (("calib", names[:20]), ("val", names[-3:])):
        for kind, src in (("images", "imagesTr"), ("labels", "labelsTr")):
            d = tmp / key / kind
            d.mkdir(parents=True)
            for n in chosen:
                (d / n).symlink_to(root / src / n)
            out[f"{key}_{kind}"] = d
    out["root"] = tmp
    return out


@pytest.fixture(scope="module")
def torchscript(folders):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hippo_train", EXAMPLE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # type: ignore[union-attr]
    net = train.make_model(2)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    return train.save(net.eval(), 2, folders["root"])


def test_build_engine_then_validate(folders, torchscript):
    from edgeseg.cli import main

    bundle = folders["root"] / "hippo2d.edgeseg"
    runner = CliRunner()
    args = ["build-engine", str(torchscript), "--spec", str(EXAMPLE / "spec2d.json"), "-o", str(bundle)]
    args += ["--precision", "auto", "--calib", str(folders["calib_images"]), "--calib-labels"]
    args += [str(folders["calib_labels"]), "--calib-size", "96"]  # the default --min-dice 0.99
    args += ["--parity-input", str(next(folders["val_images"].iterdir()))]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "CPU choice:" in res.output
    assert re.search(
        r"int8: Dice vs fp32 0\.99\d+ → kept \((\d+) layer\(s\) kept fp32 automatically", res.output
    )
    assert "... auto-keep round 1:" in res.output  # progress lines
    info = runner.invoke(main, ["info", str(bundle)])
    assert info.exit_code == 0, info.output
    assert re.search(r"int8: mean Dice vs fp32 [\d.]+, min 0\.99\d+, passed=True", info.output)
    assert "    kept fp32 automatically (" in info.output and "auto-keep rounds" in info.output
    assert list((folders["root"] / ".calib-cache").glob("calib-*.npz"))

    res = runner.invoke(
        main,
        [
            "validate",
            str(bundle),
            "--images",
            str(folders["val_images"]),
            "--labels",
            str(folders["val_labels"]),
        ],
    )
    assert res.exit_code == 0, res.output
    for prec in ("fp32", "fp16", "int8", "int8_cpu"):
        assert f"| {prec} " in res.output
    assert "anterior" in res.output and "posterior" in res.output and "HD95 mm" in res.output

    res = runner.invoke(
        main,
        [
            "validate",
            str(bundle),
            "--images",
            str(folders["val_images"]),
            "--labels",
            str(folders["val_labels"]),
        ]
        + ["--json", "--precision", "fp32,int8", "--no-hd95"],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["n_cases"] == 3 and set(report["precisions"]) == {"fp32", "int8"}
    fp32 = report["precisions"]["fp32"]["labels"]
    int8 = report["precisions"]["int8"]["labels"]
    assert fp32["anterior"]["dice"] > 0.6 and fp32["anterior"]["dice_vs_fp32"] == 1.0
    assert abs(int8["anterior"]["dice"] - fp32["anterior"]["dice"]) < 0.05
    assert int8["anterior"]["hd95"] is None  # --no-hd95


def test_build_engine_no_auto_keep_refuses_int8(folders, torchscript, tmp_path):
    from edgeseg.cli import main

    out = tmp_path / "plain.edgeseg"
    args = ["build-engine", str(torchscript), "--spec", str(EXAMPLE / "spec2d.json"), "-o", str(out)]
    args += ["--precision", "int8", "--calib", str(folders["calib_images"]), "--calib-labels"]
    args += [str(folders["calib_labels"]), "--calib-size", "96", "--no-auto-keep", "--gate-on", "pooled"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert re.search(r"int8: Dice vs fp32 0\.98\d+ → REFUSED", res.output)
    assert "warning: int8 fails the gate" in res.output and "auto-keep" not in res.output


def test_validate_without_pairs_is_one_sentence(folders, tmp_path):
    from edgeseg.cli import main

    bundle = folders["root"] / "hippo2d.edgeseg"
    if not bundle.exists():
        pytest.skip("needs the bundle of test_build_engine_then_validate")
    res = CliRunner().invoke(
        main, ["validate", str(bundle), "--images", str(tmp_path), "--labels", str(tmp_path)]
    )
    assert res.exit_code == 2 and "no image/label pairs" in res.output


def test_hd95_matches_a_hand_computed_case():
    import numpy as np

    from edgeseg.calib.metrics import dice, hd95

    a = np.zeros((1, 20, 20), bool)
    b = np.zeros((1, 20, 20), bool)
    a[0, 5:10, 5:10] = True
    b[0, 5:10, 7:12] = True  # shifted by 2 voxels along x
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, (1.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert hd95(a, a) == 0.0 and hd95(a, np.zeros_like(a)) == float("inf")
    assert dice(a.astype(np.uint8), b.astype(np.uint8), [1])[1] == pytest.approx(2 * 15 / 50)
