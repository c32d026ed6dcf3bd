"""Output names: one result per series part, never an overwrite, the same names on every run."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_bundle import threshold_bundle

from edgeseg.cli import main
from edgeseg.dicom import find_series
from edgeseg.run import series_stem

pytest.importorskip("onnx")

LOCALIZER = ("pydicom", "dicomdir_series", "98892003", "MR2")  # 3-plane localizers: 7 parts, 3 series
DTI = ("dicom2nifti_headers_random_pixels", "mr_ge_dti_noext")  # one series, 4 volumes
SAG = ("dcm_qa_decubitus", "HFS_t1_fl2d_sag")  # one series, one part


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return threshold_bundle(tmp_path_factory.mktemp("bundle"))


def _run(bundle: Path, inputs: list[Path], out: Path) -> list[dict]:
    args = ["run", str(bundle), *map(str, inputs), "-o", str(out), "--format", "seg", "--json"]
    r = CliRunner().invoke(main, [*args, "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{") :])["outcomes"]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


@pytest.mark.parametrize("where", [LOCALIZER, DTI])
def test_every_part_gets_its_own_seg(bundle, dicom_data, tmp_path, where):
    files = _files(dicom_data.joinpath(*where))
    refs = find_series(files).series
    uids = [r.series_instance_uid for r in refs]
    assert any(uids.count(u) > 1 for u in uids)  # the data has split series, or the test means nothing
    outcomes = _run(bundle, files, tmp_path / "out")
    assert len(outcomes) == len(refs) and all(o["status"] == "ok" for o in outcomes), outcomes
    segs = [o["outputs"]["seg"] for o in outcomes]
    assert len(set(segs)) == len(segs)  # no overwrite
    assert sorted(Path(s).name for s in segs) == sorted(p.name for p in (tmp_path / "out").glob("*_seg.dcm"))
    for o, ref in zip(outcomes, refs):
        split = uids.count(ref.series_instance_uid) > 1
        stem = series_stem(ref.series_instance_uid, "")
        assert o["series"] == stem[7:]
        if split:
            # --json says which part the file is, and the name carries the part's key.
            assert o["part"].startswith("part ") and o["part"] in o["source"]
            assert Path(o["outputs"]["seg"]).name == f"{stem}-{o['part_key']}_seg.dcm"
        else:
            assert o["part"] is None and Path(o["outputs"]["seg"]).name == f"{stem}_seg.dcm"


def test_names_are_stable_across_runs_and_input_order(bundle, dicom_data, tmp_path):
    files = _files(dicom_data.joinpath(*LOCALIZER)) + _files(dicom_data.joinpath(*DTI))
    first = _run(bundle, files, tmp_path / "a")
    shuffled = list(files)
    random.Random(3).shuffle(shuffled)
    # Another place and another order: names follow the instances, not where or when they came.
    copy = tmp_path / "copy"
    copy.mkdir()
    moved = []
    for i, f in enumerate(shuffled):
        moved.append(copy / f"{i:03d}_{f.name}")
        shutil.copyfile(f, moved[-1])
    second = _run(bundle, moved, tmp_path / "b")

    def names(outcomes):
        return sorted((o["part_key"] or "", Path(o["outputs"]["seg"]).name) for o in outcomes)

    assert names(first) == names(second)
    assert len({n for _, n in names(first)}) == len(first)


def test_a_one_part_series_keeps_its_name(bundle, dicom_data, tmp_path):
    files = _files(dicom_data.joinpath(*SAG))
    (ref,) = find_series(files).series
    (o,) = _run(bundle, files, tmp_path / "out")
    assert Path(o["outputs"]["seg"]).name == series_stem(ref.series_instance_uid, "") + "_seg.dcm"
    assert o["part"] is None and o["part_key"] is None


def test_the_survey_on_a_study_of_split_series(dicom_data, tmp_path):
    """benchmarks/survey_shared_dicom.py on one real study (17 parts of localizer and angio
    series): every part gets its own SEG, none is shared, dciodvfy finds no error."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "survey_shared_dicom.py"
    spec = importlib.util.spec_from_file_location("survey_shared_dicom", path)
    survey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(survey)
    report = tmp_path / "survey.json"
    root = dicom_data.joinpath("pydicom", "dicomdir_series", "98892003")
    assert survey.main(["--root", str(root), "--no-folders", "--strict", "--json", str(report)]) == 0
    whole = json.loads(report.read_text())["runs"]["whole tree"]
    assert whole["parts_found"] == whole["parts_loaded"] == whole["seg_written"] == whole["seg_files"] == 17
    assert whole["results_lost"] == 0 and whole["crash"] is None
    if survey.DCIODVFY:
        assert whole["segs_checked"] == 17 and whole["dciodvfy_errors"] == 0
