"""Ground truth as DICOM: ``edgeseg validate`` and calibration sets with DICOM series + DICOM SEG.

Real hippocampus cases (MSD, NIfTI) are written as DICOM MR series with edgeseg's own writer
and their label maps as DICOM SEG referencing those series; validating the DICOM pairs must give
the same per-label Dice and HD95 as the NIfTI pairs.

Tolerances: the ground truth must come back from the SEG exactly (checked voxel for voxel), as
must the geometry. The images are float32, which the writer stores as int16 with a rescale
slope of range/64000, so each intensity moves by at most slope/2 (≤ 0.023 on a 0–1500 range,
~1.5e-5 of it). Measured over the last 40 MSD cases that flips 1 predicted voxel of 2.47 million;
one flipped voxel moves a case's Dice by at most 2/(|A|+|B|) < 1e-3 (hippocampus labels hold
~2000 voxels) and HD95 by at most about a voxel (1 mm). So Dice must agree within 1e-3 and HD95
within 1 mm; a pairing, orientation or segment-mapping bug costs far more than that.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, shared_path

torch = pytest.importorskip("torch")
pytest.importorskip("highdicom")

EXAMPLE = REPO / "examples" / "hippocampus"
WEIGHTS = REPO / "tests" / "assets" / "hippocampus" / "unet2d.state.pt"
N_CASES = 5


@pytest.fixture(scope="module")
def spec():
    from edgeseg.spec import load_spec

    return load_spec(str(EXAMPLE / "spec2d.json"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory, spec):
    """NIfTI pairs (symlinks, read in place) and the same cases as DICOM series + DICOM SEG."""
    from edgeseg.dicom import find_series, load_volume, write_series
    from edgeseg.nifti_input import nifti_labels, read_nifti
    from edgeseg.outputs import write_seg

    root = shared_path("seg", "msd_task04_hippocampus")
    tmp = tmp_path_factory.mktemp("hippo_dicom")
    dirs = {k: tmp / k for k in ("nii_images", "nii_labels", "dicom", "seg")}
    for d in dirs.values():
        d.mkdir()
    names = sorted(p.name for p in (root / "imagesTr").glob("*.nii.gz"))[-N_CASES:]
    truth = {}
    for name in names:
        stem = name.removesuffix(".nii.gz")
        (dirs["nii_images"] / name).symlink_to(root / "imagesTr" / name)
        (dirs["nii_labels"] / name).symlink_to(root / "labelsTr" / name)
        vol = read_nifti(root / "imagesTr" / name)
        labels = nifti_labels(root / "labelsTr" / name)
        series = dirs["dicom"] / stem
        write_series(
            vol.stored, series, spacing=vol.spacing, affine=vol.affine, series_description=stem, fsync=False
        )
        dicom_vol = load_volume(find_series([series]).series[0])
        step = (float(vol.stored.max()) - float(vol.stored.min())) / 64000
        assert np.abs(dicom_vol.modality_values() - vol.stored).max() <= step / 2 + 1e-3
        assert dicom_vol.shape == vol.shape and np.allclose(dicom_vol.affine, vol.affine)
        write_seg(
            labels,
            dicom_vol,
            spec.labels,
            dirs["seg"] / f"{stem}.dcm",
            algorithm_name="manual reference",
            algorithm_version="MSD",
        )
        truth[stem] = labels
    return {**dirs, "truth": truth, "root": tmp}


@pytest.fixture(scope="module")
def bundle(cases, spec):
    from edgeseg.export.build import build_bundle

    hs = importlib.util.spec_from_file_location("hippo_train", EXAMPLE / "train.py")
    train = importlib.util.module_from_spec(hs)
    hs.loader.exec_module(train)  # type: ignore[union-attr]
    net = train.make_model(2)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    out = cases["root"] / "hippo2d.edgeseg"
    build_bundle(net.eval(), spec, out, name="hippo2d")
    return out


def test_validate_on_dicom_seg_equals_nifti(cases, bundle, spec):
    from edgeseg.cli import main
    from edgeseg.cli.validate import _load, find_pairs, validate_bundle
    from edgeseg.dicom import SeriesRef

    pairs = find_pairs(cases["dicom"], cases["seg"])
    assert len(pairs) == N_CASES and all(isinstance(p.image, SeriesRef) for p in pairs)
    for pair in pairs:  # each SEG on its own series, read back exactly
        _, truth = _load(pair, spec)
        assert np.array_equal(truth, cases["truth"][pair.labels.stem])

    nii = validate_bundle(bundle, cases["nii_images"], cases["nii_labels"])
    dcm = validate_bundle(bundle, cases["dicom"], cases["seg"])
    assert nii["n_cases"] == dcm["n_cases"] == N_CASES
    a, b = nii["precisions"]["fp32"]["labels"], dcm["precisions"]["fp32"]["labels"]
    assert set(a) == set(b) == {"anterior", "posterior"}
    for label in a:
        assert abs(b[label]["dice"] - a[label]["dice"]) <= 1e-3
        assert abs(b[label]["hd95"] - a[label]["hd95"]) <= 1.0
    assert a["anterior"]["dice"] > 0.6  # the real trained model against the real reference

    res = CliRunner().invoke(
        main,
        ["validate", str(bundle), "--images", str(cases["dicom"]), "--labels", str(cases["seg"]), "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["precisions"]["fp32"]["labels"] == b


def test_seg_mapped_by_segment_name(cases, spec, tmp_path):
    """A SEG whose segments come in another order is read by name, not by number."""
    from edgeseg.dicom import find_series, load_volume
    from edgeseg.outputs import write_seg
    from edgeseg.seg_input import read_seg_truth
    from edgeseg.spec import Label

    stem, labels = next(iter(cases["truth"].items()))
    vol = load_volume(find_series([cases["dicom"] / stem]).series[0])
    swapped = np.choose(labels, [0, 2, 1]).astype(np.uint8)  # posterior first: segment 1
    order = [Label(value=1, name="posterior"), Label(value=2, name="anterior")]
    write_seg(swapped, vol, order, tmp_path / "swapped.dcm", algorithm_name="x", algorithm_version="1")
    assert np.array_equal(read_seg_truth(tmp_path / "swapped.dcm", vol, spec.labels), labels)
    other = [Label(value=1, name="left"), Label(value=2, name="right")]  # no names match: by number
    write_seg(labels, vol, other, tmp_path / "other.dcm", algorithm_name="x", algorithm_version="1")
    assert np.array_equal(read_seg_truth(tmp_path / "other.dcm", vol, spec.labels), labels)


def test_seg_for_no_given_series_is_one_line_naming_the_file(cases, bundle):
    from edgeseg.cli import main

    first = sorted(cases["truth"])[0]
    res = CliRunner().invoke(
        main,
        ["validate", str(bundle), "--images", str(cases["dicom"] / first), "--labels", str(cases["seg"])],
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    unmatched = sorted(cases["truth"])[1]
    assert str(cases["seg"] / f"{unmatched}.dcm") in lines[0]
    assert "references no DICOM series found in" in lines[0]


def test_calibration_ground_truth_from_dicom_seg(cases, spec, bundle):
    from edgeseg import CalibrationError
    from edgeseg.calib.dataset import CalibrationSet
    from edgeseg.cli import main

    cs = CalibrationSet.from_paths(cases["dicom"], spec, labels=cases["seg"], max_samples=32)
    assert cs.holdout and cs.summary["foreground_fraction"] > 0
    for h in cs.holdout:
        stem = h.name.split()[-1]  # the series label ends with the description we wrote
        assert np.array_equal(h.labels, cases["truth"][stem])
    plain = CalibrationSet.from_paths(cases["dicom"], spec, max_samples=32)
    assert all(h.labels is None for h in plain.holdout)

    first = sorted(cases["truth"])[0]
    with pytest.raises(CalibrationError, match="references no DICOM series found in"):
        CalibrationSet.from_paths(cases["dicom"] / first, spec, labels=cases["seg"])

    # Through build-engine: the gate reports Dice against the SEG ground truth.
    from edgeseg.bundle import Bundle

    onnx_file = cases["root"] / "hippo2d.onnx"
    onnx_file.write_bytes(Bundle.open(bundle).onnx("fp32"))
    out = cases["root"] / "fp16.edgeseg"
    args = ["build-engine", str(onnx_file), "--spec", str(EXAMPLE / "spec2d.json"), "-o", str(out)]
    args += ["--precision", "fp16", "--calib", str(cases["dicom"]), "--calib-labels", str(cases["seg"])]
    res = CliRunner().invoke(main, args + ["--calib-size", "32", "--json"])
    assert res.exit_code == 0, res.output
    acc = json.loads(res.output)["accuracy"]
    assert acc["fp32"]["dice_vs_truth"]["anterior"] > 0.6 and acc["fp16"]["passed"]


def test_third_party_seg_pairs_with_its_series(tmp_path):
    """dcmqi's liver SEG (real, not written by edgeseg) finds its 3-slice CT series by reference,
    is read by segment name in the spec's values, and a second SEG for the same series is one
    line naming both files."""
    from edgeseg import DicomInputError
    from edgeseg.dicom import find_series, load_volume
    from edgeseg.outputs import read_seg_labels
    from edgeseg.seg_input import find_seg_files, pair_with_series, read_seg_truth
    from edgeseg.spec import Label

    folder = shared_path("dicom", "dcmqi_ct3slice_seg")
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "liver_seg.dcm").symlink_to(folder / "liver_seg.dcm")
    (labels / "notes.txt").write_text("not DICOM")
    series = find_series([folder]).series
    [(ref, seg)] = pair_with_series(find_seg_files(labels), series, str(folder))
    assert seg.name == "liver_seg.dcm"
    volume = load_volume(ref)
    spec_labels = [Label(3, "kidney"), Label(7, "liver")]
    truth = read_seg_truth(seg, volume, spec_labels)
    liver = read_seg_labels(folder / "liver_seg.dcm", volume) == 1
    assert liver.any() and np.array_equal(truth, np.where(liver, 7, 0))

    other = shared_path("dicom", "pydicom", "seg_rt_lut_misc", "liver_1frame.dcm")
    (labels / "liver_1frame.dcm").symlink_to(other)
    with pytest.raises(DicomInputError, match="references the same series as") as err:
        find_seg_files(labels)
    assert "liver_1frame.dcm" in str(err.value) and "liver_seg.dcm" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
