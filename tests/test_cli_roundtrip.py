"""End to end through the CLI: export a real model, build a bundle, run it, read the SEG back."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeseg.cli import main

pytest.importorskip("torch")


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_run_and_read_back(tmp_path, brain_model, dicom_data):
    import highdicom as hd

    from edgeseg.dicom import read_volume
    from edgeseg.outputs import read_seg_labels
    from edgeseg.segmenter import Segmenter

    spec = Path(__file__).resolve().parents[1] / "examples" / "brain_extraction" / "spec.json"
    series = dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag"
    bundle = tmp_path / "brain.edgeseg"
    r = _cli(
        "build-engine",
        brain_model,
        "-o",
        bundle,
        "--spec",
        spec,
        "--name",
        "deepbet",
        "--parity-input",
        series,
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["parity"]["passed"] and report["parity"]["n_inputs"] == 1

    r = _cli("info", bundle, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["labels"][0]["name"] == "Brain"

    out = tmp_path / "out"
    r = _cli("run", bundle, series, "-o", out, "--format", "seg,nifti,png", "--json", "--backend", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["succeeded"] == 1 and doc["failed"] == 0
    outcome = doc["outcomes"][0]
    assert {"read", "preprocess", "infer", "postprocess", "write"} <= set(outcome["timings_ms"])
    seg_path = outcome["outputs"]["seg"]
    assert "series-" in seg_path  # named by a hash, never by patient data

    volume = read_volume(series)
    with Segmenter.open(bundle, backend="cpu") as seg:
        expected = seg.segment(volume).labels
    got = read_seg_labels(seg_path, volume)
    np.testing.assert_array_equal(got, expected)
    ds = hd.seg.segread(seg_path)
    assert ds.SeriesInstanceUID != volume.series_instance_uid
    refs = {
        r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert refs <= set(volume.sop_instance_uids) and refs


def test_run_reports_failures_per_file_and_keeps_going(tmp_path, brain_bundle, dicom_data):
    broken = dicom_data / "pydicom" / "broken"
    good = dicom_data / "dcmqi_ct3slice_seg"
    r = _cli("run", brain_bundle, broken, good, "-o", tmp_path, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["succeeded"] == 1  # the 3-slice CT still ran
    failed = [o for o in doc["outcomes"] if o["status"] == "failed"]
    assert len(failed) >= 4
    for o in failed:
        assert o["error"] and "/" in o["error"]  # names the file
        assert "Traceback" not in o["error"]


def test_missing_bundle_and_input_are_one_line_errors(tmp_path, brain_bundle):
    r = subprocess.run(
        [sys.executable, "-m", "edgeseg", "run", str(tmp_path / "nope.edgeseg"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such bundle" in r.stderr and "Traceback" not in r.stderr
    r = _cli("run", brain_bundle, tmp_path / "absent", "-o", tmp_path / "o")
    assert r.exit_code == 1 and "no such file or folder" in r.output


@pytest.mark.slow
def test_run_over_every_shared_dicom_folder_never_prints_a_traceback(tmp_path, brain_bundle, dicom_data):
    """Every folder of ../shared/data/dicom: each series segmented or a one-line failure."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeseg",
            "run",
            str(brain_bundle),
            str(dicom_data),
            "-o",
            str(tmp_path),
            "--backend",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert r.returncode == 1  # the broken files fail, the rest succeed
    doc = json.loads(r.stdout)
    assert doc["succeeded"] >= 40
    for o in doc["outcomes"]:
        if o["status"] == "failed":
            assert str(dicom_data) in o["error"]
