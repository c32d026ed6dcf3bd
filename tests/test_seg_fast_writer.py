"""The fast DICOM SEG writer (:mod:`edgeseg.outputs.seg_fast`) against highdicom's, on real series.

Every series part the reader accepts (those of tests/test_seg_every_series.py) that the fast
writer covers gets the same label map from both writers, and the two files are compared element
by element, nested sequences included: the differences allowed are listed in :data:`JUSTIFIED`
with their reason. On named series (classic CT and MR, enhanced multi-frame CT and MR; one segment
and two) dciodvfy must find no error in the fast SEG, and ``highdicom.seg.segread`` must read the
same masks and the same per-frame source references from both files.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_path
from dciodvfy import dciodvfy_errors
from test_seg_every_series import ALGO, SPEC, _cases, _labels, _parts

from edgeseg import DicomInputError
from edgeseg.outputs import OutputError, read_seg_labels, write_seg

hd = pytest.importorskip("highdicom")

#: Values that differ on every run by design: new UIDs and the time of writing. Their presence is
#: still compared; the File Meta Information Group Length follows the length of the new UID.
PER_RUN = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "FileMetaInformationGroupLength",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
}
PER_RUN_NESTED = {"DimensionOrganizationUID", "ContributionDateTime"}

#: The differences the fast writer is allowed, and why.
JUSTIFIED = {
    # An odd-length OB value gets one pad byte: PS3.5 7.1.1 says 0x00; highdicom 0.28 appends
    # b"0" (0x30). Readers ignore it (the frames end before it).
    "PixelData: pad byte 0x00 vs 0x30",
}

NAMED = {
    "ct_3_slices": ("dicom", "dcmqi_ct3slice_seg", "0?.dcm"),
    "mr_40_slices": ("dicom", "tcia_brain_tumor_progression", "PGBM-003_Study3/11_HCropVolume/*.dcm"),
    "mr_sagittal": ("dicom", "dcm_qa_decubitus", "HFS_t1_fl2d_sag/*.dcm"),
    "enhanced_ct": ("dicom", "pydicom", "ct/eCT_Supplemental.dcm"),
    "enhanced_mr_philips": ("dicom", "dicom2nifti_headers_random_pixels", "mr_philips_enhanced_multiframe/*"),
}


def differences(fast, ref, path: str = "") -> list[str]:
    """What differs between two datasets, one line per element (``Keyword[i]>Nested: …``)."""
    out = []
    for tag in sorted(set(fast.keys()) | set(ref.keys())):
        name = path + (pydicom.datadict.keyword_for_tag(tag) or str(tag))
        if tag not in fast or tag not in ref:
            out.append(f"{name}: only in {'the fast SEG' if tag in fast else 'highdicom'}")
            continue
        a, b = fast[tag], ref[tag]
        keyword = a.keyword
        if (not path and keyword in PER_RUN) or keyword in PER_RUN_NESTED:
            continue
        if a.VR != b.VR:
            out.append(f"{name}: VR {a.VR} vs {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                out.append(f"{name}: {len(a.value)} vs {len(b.value)} items")
                continue
            for i, (x, y) in enumerate(zip(a.value, b.value)):
                out += differences(x, y, f"{name}[{i}]>")
        elif keyword == "PixelData" and a.value != b.value:
            same_frames = len(a.value) == len(b.value) and a.value[:-1] == b.value[:-1]
            out.append(
                f"{name}: pad byte 0x{a.value[-1]:02X} vs 0x{b.value[-1]:02X}"
                if same_frames
                else f"{name}: frames differ"
            )
        elif a.value != b.value:
            out.append(f"{name}: {str(a.value)[:40]!r} vs {str(b.value)[:40]!r}")
    return out


def _write_both(labels, volume, folder: Path, spec=SPEC) -> tuple[Path, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the sources' own odd values
        fast = write_seg(labels, volume, spec, folder / "fast.dcm", writer="fast", **ALGO)
        ref = write_seg(labels, volume, spec, folder / "highdicom.dcm", writer="highdicom", **ALGO)
    return fast, ref


def _named_volume(key: str):
    from edgeseg.dicom import read_volume

    *parts, pattern = NAMED[key]
    files = sorted(shared_path(*parts).glob(pattern))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_volume(files)


def _fast_refusal(labels, volume, tmp_path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_seg(labels, volume, SPEC, tmp_path / "probe.dcm", writer="fast", **ALGO)
    except OutputError as err:
        return str(err)
    return None


@pytest.mark.parametrize(("root", "index"), _cases())
def test_fast_seg_has_highdicom_attributes_element_by_element(root, index, tmp_path):
    from edgeseg.dicom import load_volume

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = load_volume(_parts(root)[index])
    except DicomInputError as err:
        pytest.skip(f"not a volume edgeseg segments ({err})")
    if volume.shape[0] > 400:
        pytest.skip("larger than tests/test_seg_every_series.py writes")
    labels = _labels(volume.shape)
    refusal = _fast_refusal(labels, volume, tmp_path)
    if refusal is not None:
        pytest.skip(f"highdicom writes this one ({refusal})")
    fast, ref = _write_both(labels, volume, tmp_path)
    a, b = pydicom.dcmread(fast), pydicom.dcmread(ref)
    found = set(differences(a.file_meta, b.file_meta) + differences(a, b))
    assert found <= JUSTIFIED, sorted(found - JUSTIFIED)
    # The new UIDs are new, and the fast SEG's dimension UIDs agree with each other.
    assert a.SOPInstanceUID == a.file_meta.MediaStorageSOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    uid = a.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert {item.DimensionOrganizationUID for item in a.DimensionIndexSequence} == {uid}


def test_the_fast_writer_covers_the_common_sources_and_says_which_ran(tmp_path, caplog):
    covered = []
    for key in NAMED:
        volume = _named_volume(key)
        with caplog.at_level(logging.DEBUG, logger="edgeseg"):
            caplog.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_seg(_labels(volume.shape), volume, SPEC, tmp_path / f"{key}.dcm", **ALGO)
        if any(r.getMessage().startswith("DICOM SEG: fast writer") for r in caplog.records):
            covered.append(key)
    assert covered == list(NAMED)

    # An empty map is left to highdicom (one plane only), and the log says why.
    volume = _named_volume("ct_3_slices")
    with caplog.at_level(logging.DEBUG, logger="edgeseg"):
        caplog.clear()
        write_seg(np.zeros(volume.shape, np.uint8), volume, SPEC, tmp_path / "empty.dcm", **ALGO)
    messages = [r.getMessage() for r in caplog.records]
    assert "DICOM SEG: highdicom writer (the label map is empty)" in messages


def test_fast_writer_refuses_what_it_does_not_cover_in_one_sentence(tmp_path):
    from edgeseg.dicom import read_volume

    mosaic = read_volume(
        [next(shared_path("dicom", "dcm_qa_decubitus", "HFS_ep2d_diff_mosaic_1file").iterdir())]
    )
    cases = [(_labels(mosaic.shape), mosaic, "planes are not the source images or frames")]
    ct = _named_volume("ct_3_slices")
    cases.append((np.zeros(ct.shape, np.uint8), ct, "the label map is empty"))
    for i, (labels, volume, reason) in enumerate(cases):
        target = tmp_path / f"refused{i}.dcm"
        with pytest.raises(OutputError, match=f"does not cover these sources: {reason}") as err:
            write_seg(labels, volume, SPEC, target, writer="fast", **ALGO)
        assert "\n" not in str(err.value) and not target.exists()
        # auto takes highdicom for them, and highdicom writes them
        write_seg(labels, volume, SPEC, target, **ALGO)
        assert target.exists()
    with pytest.raises(OutputError, match="'writer' must be 'auto', 'fast' or 'highdicom'"):
        write_seg(_labels(ct.shape), ct, SPEC, tmp_path / "x.dcm", writer="pydicom", **ALGO)


def _frame_references(seg) -> list[tuple[int, str, int | None]]:
    """(segment number, referenced SOP Instance UID, referenced frame) of each frame, from
    highdicom's reading of the file."""
    out = []
    for number in range(1, int(seg.NumberOfFrames) + 1):
        item = seg.PerFrameFunctionalGroupsSequence[number - 1]
        segment = (
            item.SegmentIdentificationSequence
            if "SegmentIdentificationSequence" in item
            else seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
        )[0].ReferencedSegmentNumber
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = src.get("ReferencedFrameNumber")
        out.append((int(segment), str(src.ReferencedSOPInstanceUID), None if frame is None else int(frame)))
    return out


@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("key", list(NAMED))
def test_fast_seg_is_valid_and_highdicom_reads_it_as_its_own(key, segments, tmp_path):
    volume = _named_volume(key)
    labels = _labels(volume.shape)
    spec = SPEC[:segments]
    if segments == 1:
        labels = np.minimum(labels, 1)
    fast, ref = _write_both(labels, volume, tmp_path, spec=spec)

    assert dciodvfy_errors(fast) == []
    found = set(differences(pydicom.dcmread(fast), pydicom.dcmread(ref)))
    assert found <= JUSTIFIED, sorted(found - JUSTIFIED)
    np.testing.assert_array_equal(read_seg_labels(fast, volume, labels_spec=spec), labels)
    a, b = hd.seg.segread(fast), hd.seg.segread(ref)
    assert _frame_references(a) == _frame_references(b)
    assert a.get_segment_numbers() == b.get_segment_numbers() == list(range(1, segments + 1))
    uids = [str(u) for u in volume.sop_instance_uids]
    if volume.frame_numbers and all(f is not None for f in volume.frame_numbers):
        read = {
            name: seg.get_pixels_by_source_frame(
                source_sop_instance_uid=uids[0], source_frame_numbers=list(volume.frame_numbers)
            )
            for name, seg in (("fast", a), ("highdicom", b))
        }
    else:
        read = {
            name: seg.get_pixels_by_source_instance(source_sop_instance_uids=uids)
            for name, seg in (("fast", a), ("highdicom", b))
        }
    np.testing.assert_array_equal(read["fast"], read["highdicom"])
    for s in range(1, segments + 1):
        np.testing.assert_array_equal(read["fast"][..., s - 1], labels == s)
    if segments == 1 and len(volume.sop_instance_uids) > 1:
        assert a.get("DimensionOrganizationType") == b.get("DimensionOrganizationType")


def test_a_failing_fast_write_leaves_no_file(tmp_path, monkeypatch):
    from edgeseg.outputs import seg_fast

    volume = _named_volume("ct_3_slices")

    def broken(*args, **kwargs):
        raise ValueError("pixels cannot be packed")

    monkeypatch.setattr(seg_fast, "_masks", broken)
    target = tmp_path / "out" / "seg.dcm"
    with pytest.raises(OutputError, match=r"cannot build a DICOM SEG .*\(pixels cannot be packed\)"):
        write_seg(_labels(volume.shape), volume, SPEC, target, writer="fast", **ALGO)
    assert not target.exists() and (not target.parent.exists() or not any(target.parent.iterdir()))
