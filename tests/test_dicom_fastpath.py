"""The fast paths of DICOM reading give exactly what pydicom gives.

* ``elements.get`` (header values parsed from the raw bytes) equals pydicom's value for every
  element it parses, in every dataset and sequence item of every real file;
* ``pixels.native_frames`` (uncompressed pixel data through ``np.frombuffer``) is bit-identical
  to ``pixel_array`` on every uncompressed real file it takes (big-endian, implicit VR, 12-bit
  signed and unsigned, multi-frame, pixel data in memory or left on disk by the scan), and
  declines what it cannot do exactly (pydicom then decodes, with its notes and errors);
* ``scan.parse_file`` (whole file read once, parsed from memory) gives the dataset ``dcmread``
  gives.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_path
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from edgeseg import DicomInputError
from edgeseg.dicom import elements as el
from edgeseg.dicom import find_series, load_volume
from edgeseg.dicom.pixels import decode_frames, native_frames
from edgeseg.dicom.scan import parse_file, quiet_pydicom

UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}


def _dicom_files(root: Path) -> list[Path]:
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with quiet_pydicom():
                pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        out.append(path)
    return out


@pytest.fixture(scope="module")
def dicom_files() -> list[Path]:
    files = _dicom_files(shared_path("dicom"))
    assert len(files) > 200
    return files


def _norm(value):
    if isinstance(value, (list, MultiValue)):
        return [_norm(v) for v in value]
    if isinstance(value, float):
        return "nan" if math.isnan(value) else float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    return value


def _compare_elements(fast: pydicom.Dataset, ref: pydicom.Dataset, where: str) -> int:
    """Compare el.get on ``fast`` (never converted by pydicom first) with pydicom on ``ref``."""
    checked = 0
    for tag in list(fast._dict.keys()):
        keyword = keyword_for_tag(tag)
        if not keyword or tag_for_keyword(keyword) != tag:  # private, or a repeating group (60xx)
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            items_fast, items_ref = el.get(fast, keyword) or [], ref.get(keyword) or []
            assert len(items_fast) == len(items_ref), f"{where} {keyword}"
            for k, (a, b) in enumerate(zip(items_fast, items_ref, strict=True)):
                checked += _compare_elements(a, b, f"{where} {keyword}[{k}]")
        elif vr in ("US", "UI", "CS", "IS", "DS"):
            got, want = el.get(fast, keyword, "absent"), ref.get(keyword, "absent")
            assert _norm(got) == _norm(want), f"{where} {keyword}: {got!r} != {want!r}"
            checked += 1
    return checked


def test_element_values_equal_pydicoms_on_every_real_file(dicom_files):
    checked = 0
    with quiet_pydicom():
        for path in dicom_files:
            fast = pydicom.dcmread(path, defer_size="64 KB")
            ref = pydicom.dcmread(path, defer_size="64 KB")
            checked += _compare_elements(fast, ref, path.name)
            checked += _compare_elements(fast.file_meta, ref.file_meta, f"{path.name} meta")
    assert checked > 5000


def test_absent_and_unknown_keywords():
    ds = pydicom.Dataset()
    assert el.get(ds, "Rows") is None and el.get(ds, "Rows", 7) == 7 and not el.has(ds, "Rows")
    with pytest.raises(KeyError):
        el.get(ds, "NotADicomKeyword")


def _reference(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    count = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape(count, int(ds.Rows), int(ds.Columns))
    return arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr


def test_native_decode_is_bit_identical_to_pixel_array(dicom_files):
    covered: set[str] = set()
    with quiet_pydicom():
        for path in dicom_files:
            in_memory = pydicom.dcmread(path)
            ts = getattr(in_memory.file_meta, "TransferSyntaxUID", None)
            if ts not in UNCOMPRESSED or "PixelData" not in in_memory:
                continue
            got = native_frames(in_memory)
            if got is None:
                continue  # declined: pydicom decodes it (see the declines test)
            want = _reference(path)
            assert got.dtype == want.dtype and got.shape == want.shape, path
            assert got.tobytes() == want.tobytes(), path

            on_disk = parse_file(path)  # pixel data over 64 KB is left in the file
            deferred = on_disk._dict[el.tag_of("PixelData")].value is None
            assert native_frames(on_disk).tobytes() == want.tobytes(), path
            into = np.full(want.shape, 77, want.dtype)
            result = native_frames(parse_file(path), into)
            assert result.tobytes() == want.tobytes(), path
            # decoded in place, except big-endian data (swapped on the way)
            assert (result is into) == (ts != ExplicitVRBigEndian), path

            bits, stored = int(in_memory.BitsAllocated), int(in_memory.BitsStored)
            covered.add(str(ts))
            if stored < bits:
                covered.add(f"{stored}-bit {'signed' if in_memory.PixelRepresentation else 'unsigned'}")
            if want.shape[0] > 1:
                covered.add("multi-frame")
            if deferred:
                covered.add("read from the file")
    assert {
        str(ImplicitVRLittleEndian),
        str(ExplicitVRLittleEndian),
        str(ExplicitVRBigEndian),
        "12-bit signed",
        "12-bit unsigned",
        "multi-frame",
        "read from the file",
    } <= covered, covered


def test_documented_12bit_values_come_from_the_fast_path():
    path = shared_path("dicom", "dcm_qa_12bit", "12bitSigned_0x0F0F.dcm")
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    frames = native_frames(ds)
    assert frames is not None and frames.dtype == np.int16
    assert set(np.unique(frames[0][raw == 0x0F0F])) == {-241}
    assert set(np.unique(frames[0][raw == 0xFFFF])) == {-1}


def _small(tmp_path: Path, name: str, **changes) -> Path:
    ds = pydicom.dcmread(shared_path("dicom", "pydicom", "mr", "MR_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    out = tmp_path / name
    ds.save_as(out)
    return out


def test_declines_what_only_pydicom_does_exactly(tmp_path):
    with quiet_pydicom():
        # excess padding: pydicom strips it and says so (the note is passed on)
        padded = pydicom.dcmread(_small(tmp_path, "padded.dcm"))
        padded.PixelData = padded.PixelData + b"\0" * 4
        assert native_frames(padded) is None
        frames, notes = decode_frames(padded, "padded.dcm")
        assert frames.shape == (1, 64, 64) and any("padding" in n for n in notes)
        # compressed, deflated and colour data
        for parts in (
            ("pydicom", "mr", "MR_small_RLE.dcm"),
            ("pydicom", "seg_rt_lut_misc", "image_dfl.dcm"),
            ("pydicom", "us_color", "ExplVR_BigEnd.dcm"),
        ):
            assert native_frames(pydicom.dcmread(shared_path("dicom", *parts))) is None, parts
        # missing pixel module values: pydicom's error, not a guess
        no_bits = pydicom.dcmread(_small(tmp_path, "nobits.dcm"))
        del no_bits.BitsStored
        assert native_frames(no_bits) is None
        with pytest.raises(DicomInputError, match="cannot be decoded"):
            decode_frames(no_bits, "nobits.dcm")
        # 8-bit big endian: pydicom swaps the OW byte pairs
        ds = pydicom.dcmread(shared_path("dicom", "pydicom", "mr", "MR_small_bigendian.dcm"))
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(range(256)) * 16
        assert native_frames(ds) is None
        frames, _ = decode_frames(ds, "be8.dcm")
        np.testing.assert_array_equal(frames[0], ds.pixel_array)


def test_file_changed_after_the_scan_is_left_to_pydicom(tmp_path):
    src = sorted(shared_path("dicom", "dcm_qa_decubitus", "HFS_t1_fl2d_sag").glob("*.dcm"))[:3]
    files = [Path(shutil.copy(f, tmp_path / f.name)) for f in src]
    with quiet_pydicom():
        ds = parse_file(files[0])
        assert ds._dict[el.tag_of("PixelData")].value is None  # left on disk
        st = os.stat(files[0])
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert native_frames(ds) is None
    ref = find_series(files).series[0]
    with open(files[1], "r+b") as fh:  # truncated after the scan, inside its pixel data
        fh.truncate(os.path.getsize(files[1]) - 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DicomInputError) as err:
            load_volume(ref)
    assert files[1].name in str(err.value) and "\n" not in str(err.value)


def test_parse_file_matches_dcmread(dicom_files):
    """parse_file gives dcmread's dataset element for element (raw values, their offsets, deferred
    ones, sequences), with its encoding, preamble and file meta; on every real file, most of
    them through the file meta read by edgeseg itself."""
    from edgeseg.dicom.scan import _parse_part10

    own_meta = 0
    with quiet_pydicom():
        for path in dicom_files:
            ours, theirs = parse_file(path), pydicom.dcmread(path, defer_size="64 KB")
            assert ours.filename == theirs.filename == os.fspath(path)
            assert ours.timestamp == theirs.timestamp and ours.buffer is None
            assert ours.file_meta == theirs.file_meta, path
            assert list(ours.file_meta.keys()) == list(theirs.file_meta.keys()), path
            assert ours.preamble == theirs.preamble
            assert list(ours.keys()) == list(theirs.keys()), path
            assert (ours.is_little_endian, ours.is_implicit_VR) == (
                theirs.is_little_endian,
                theirs.is_implicit_VR,
            )
            assert ours.original_encoding == theirs.original_encoding, path
            assert ours.original_character_set == theirs.original_character_set, path
            if ours.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                continue  # parse_file keeps every value of an inflated dataset, dcmread defers
            for tag in ours.keys():
                a, b = ours.get_item(tag), theirs.get_item(tag)
                assert type(a) is type(b), (path, tag)
                assert a == b, (path, tag)  # raw: VR, length, value bytes, offset; else the value
            data = path.read_bytes()
            own_meta += data[128:132] == b"DICM" and _parse_part10(data) is not None
    assert own_meta > 0.8 * len(dicom_files)


def test_a_file_named_twice_is_scanned_once(tmp_path):
    src = shared_path("dicom", "pydicom", "mr", "MR_small.dcm")
    (tmp_path / "a").mkdir()
    copy = Path(shutil.copy(src, tmp_path / "a" / "x.dcm"))
    link = tmp_path / "link.dcm"
    link.symlink_to(copy)
    scan = find_series([copy, link, tmp_path / "a" / ".." / "a" / "x.dcm", tmp_path])
    assert [ref.n_instances for ref in scan.series] == [1] and not scan.rejected
