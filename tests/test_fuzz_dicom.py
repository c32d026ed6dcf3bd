"""Mutation fuzzing of the DICOM reader: every case ends in a Volume or a DicomInputError naming the file.

The fuzzer is ``benchmarks/fuzz_dicom.py`` (seeded mutations of the real files in
../shared/data/dicom and pydicom's test files; each case in a worker subprocess with a time
limit, so hangs and native crashes are findings, not a dead test run). CI runs 10^4 cases
(about 65 s on 2 cores; ``EDGESEG_FUZZ_CASES`` changes the count, ``EDGESEG_FUZZ_SEED`` the
cases); the benchmark runs 10^5.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_path

from edgeseg import DicomInputError
from edgeseg.dicom import read_volume

CASES = int(os.environ.get("EDGESEG_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("EDGESEG_FUZZ_SEED", "0"))  # fixed in CI: the same 10^4 cases every run


def _fuzzer():
    name = "fuzz_dicom"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "fuzz_dicom.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


def test_harness_reports_escapes_panics_hangs_and_segfaults():
    # The probes stand in for a broken reader: if the harness could not see these, 0 findings
    # below would mean nothing.
    fuzz = _fuzzer()
    report = fuzz.run_cases([-1, -2, -3, -4], workers=2, timeout=3.0)
    got = {f["index"]: f["outcome"] for f in report.findings}
    assert got == {-1: "escape:TypeError", -2: "escape:_Panic", -3: "hang", -4: "crash:SIGSEGV"}
    assert report.escapes == 4 and report.cases == 4


def test_mutations_are_deterministic_and_find_the_structure():
    fuzz = _fuzzer()
    path = shared_path("dicom", "pydicom", "ct", "CT_small.dcm")
    data = path.read_bytes()
    elems = fuzz.walk(data)
    tags = {e.tag for e in elems}
    # The walker must see what the length and VR mutations aim at, or they degrade to flips.
    assert {0x00020010, 0x00280010, 0x7FE00010} <= tags
    assert any(e.vr_at is not None for e in elems)
    nested = fuzz.walk(shared_path("dicom", "pydicom", "mr", "MR_small_RLE.dcm").read_bytes())
    assert any(e.kind == "frag" for e in nested), "encapsulated pixel data fragments not found"
    import random

    one = fuzz.mutate(random.Random("7:42"), data)
    two = fuzz.mutate(random.Random("7:42"), data)
    assert one == two and one[0] != data


def test_a_panicking_rle_decoder_ends_in_a_named_error(tmp_path: Path):
    # One byte deleted from a real RLE file makes pylibjpeg-rle panic (pyo3 PanicException, a
    # BaseException): found by the fuzzer, kept here as a fixed case.
    pytest.importorskip("rle", reason="pylibjpeg-rle is not installed")
    src = shared_path("dicom", "pydicom", "mr", "MR_small_RLE.dcm").read_bytes()
    bad = tmp_path / "MR_small_RLE_cut.dcm"
    bad.write_bytes(src[:3628] + src[3629:])
    import pydicom

    with pytest.raises(BaseException) as raw:  # noqa: PT011 - any kind: the file must be undecodable
        _ = pydicom.dcmread(bad).pixel_array
    with pytest.raises(DicomInputError) as err:
        read_volume(bad)
    assert err.value.path == str(bad) and "pixel data cannot be decoded" in err.value.reason
    if not isinstance(raw.value, Exception):
        assert type(raw.value).__name__ in err.value.reason  # the panic, named in one sentence


def test_fuzz_cases_end_in_a_volume_or_a_named_error():
    shared_path("dicom")
    fuzz = _fuzzer()
    indices = list(range(CASES))
    report = fuzz.run_cases(indices, master=SEED, workers=2, timeout=60.0)
    print("\n" + fuzz.format_report(report, 2))
    lines = [
        f"case {f['index']} ({f['seed']}): {f['outcome']} {f['detail']} | {'; '.join(f['steps'])}"
        for f in report.findings[:15]
    ]
    assert report.cases == CASES
    assert not report.findings, (
        f"{len(report.findings)} fuzz finding(s); rerun one with "
        f"`.venv/bin/python benchmarks/fuzz_dicom.py --seed {SEED} --case N`:\n" + "\n".join(lines)
    )
    # Both ends are exercised: mutations that still load, and ones the reader refuses.
    assert report.outcomes["volume"] >= CASES // 20 and report.outcomes["error"] >= CASES // 2


def test_a_damaged_value_is_never_quoted(tmp_path: Path):
    # A SOP Class UID whose length runs over the patient module once put the patient's name
    # into "it has no image pixel data (<value>)" (a fuzz finding): values are quoted only when
    # they are well-formed, whatever the damage.
    import pydicom

    fuzz = _fuzzer()
    ds = pydicom.dcmread(shared_path("dicom", "pydicom", "ct", "CT_small.dcm"))
    ds.PatientName, ds.PatientID = "Quotable^Patient", "ID-QUOTE-4711"
    ds.save_as(tmp_path / "named.dcm")
    data = (tmp_path / "named.dcm").read_bytes()
    elems = {e.tag: e for e in fuzz.walk(data)}
    sop, name = elems[0x00080016], elems[0x00100020]
    assert sop.len_size == 2 and sop.start < name.start  # explicit VR, patient module after it
    damaged = bytearray(data)
    damaged[sop.len_at : sop.len_at + 2] = (name.end - sop.value_at).to_bytes(2, "little")
    rows = elems[0x00280010]  # and no Rows: "it has no image pixel data (<SOP class>)"
    del damaged[rows.start : rows.end]
    bad = tmp_path / "damaged.dcm"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(DicomInputError) as err:
        read_volume(bad)
    text = str(err.value)
    assert err.value.path == str(bad)
    assert "no image pixel data" in text
    assert "Quotable" not in text and "ID-QUOTE-4711" not in text
