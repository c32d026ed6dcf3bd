"""A DICOM SEG for every series part the reader accepts (issue 10, item 1).

Every series part that :func:`edgeseg.dicom.find_series` finds in ../shared/data/dicom and in
pydicom's own test files (``pydicom.data``: test_files and charset_files), and that
:func:`edgeseg.dicom.load_volume` accepts, gets a SEG written from a synthetic two-label map on
its real Volume. Each SEG must pass ``dciodvfy`` (dicom3tools) without an error, read back with
:func:`edgeseg.outputs.read_seg_labels` to exactly the labels written, and reference the source
series and every source instance. The only parts allowed no SEG are listed in :data:`REFUSED`,
each with the one-sentence reason the writer must give.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_DATA
from dciodvfy import dciodvfy_errors

from edgeseg import DicomInputError, Label
from edgeseg.outputs import OutputError, read_seg_labels, write_seg

pytest.importorskip("highdicom")

SPEC = [Label(1, "Organ", (221, 130, 101)), Label(2, "Lesion", (0, 200, 255))]
ALGO = {"algorithm_name": "edgeseg-test", "algorithm_version": "1.0"}

#: Parts no SEG can be made from, by file name, and the reason the writer must give. Both are
#: invalid sources: a SEG must belong to its sources' study and repeat their UIDs.
REFUSED = {
    "bad_sequence.dcm": r"StudyInstanceUID is not a DICOM UID",
    "JPEGLSNearLossless_08.dcm": r"no \(0020,000D\) Study Instance UID",
    "JPEGLSNearLossless_16.dcm": r"no \(0020,000D\) Study Instance UID",
}

#: Larger parts are left out to keep the suite's runtime bounded (the writer has no size limit;
#: the data set has none this large today).
MAX_SLICES = 400


def _roots() -> dict[str, Path]:
    import pydicom.data

    roots = {"pydicom": Path(pydicom.data.__file__).parent}
    if DICOM_DATA.exists():
        roots["shared"] = DICOM_DATA
    return roots


@functools.cache
def _parts(root: str) -> list:
    from edgeseg.dicom import find_series

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_series([_roots()[root]]).series


def _cases() -> list:
    cases = []
    for root, path in _roots().items():
        for i, ref in enumerate(_parts(root)):
            name = Path(ref.files[0]).relative_to(path).as_posix()
            cases.append(pytest.param(root, i, id=f"{root}:{name}#{i}"))
    return cases


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Two labels whose boxes move with the slice index (a slice mix-up cannot match), label 2
    on every other slice only, and one slice without foreground when there are several."""
    nz, ny, nx = shape
    labels = np.zeros(shape, np.uint8)
    for z in range(nz):
        y0 = (z * 7) % max(ny // 2, 1)
        x0 = (z * 5) % max(nx // 2, 1)
        labels[z, y0 : y0 + max(ny // 3, 1), x0 : x0 + max(nx // 4, 1)] = 1
        if z % 2 == 0:
            labels[z, ny - max(ny // 5, 1) :, nx - max(nx // 3, 1) :] = 2
    if nz > 2:
        labels[nz // 2] = 0
    return labels


def test_the_data_has_series_to_check():
    if "shared" not in _roots():
        pytest.skip(f"shared test data not found at {DICOM_DATA} (set EDGESEG_SHARED)")
    assert len(_parts("shared")) >= 60 and len(_parts("pydicom")) >= 40
    names = {Path(f).name for root in _roots() for ref in _parts(root) for f in ref.files}
    assert set(REFUSED) <= names  # no stale entries


@pytest.mark.parametrize(("root", "index"), _cases())
def test_every_series_part_gets_a_valid_seg(root, index, tmp_path):
    from edgeseg.dicom import load_volume

    ref = _parts(root)[index]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = load_volume(ref)
    except DicomInputError as err:
        pytest.skip(f"not a volume edgeseg segments (load_volume refuses it: {err})")
    if volume.shape[0] > MAX_SLICES:
        pytest.skip(f"{volume.shape[0]} slices: larger than this suite writes (MAX_SLICES)")
    labels = _labels(volume.shape)
    target = tmp_path / "seg.dcm"
    refused = REFUSED.get(Path(ref.files[0]).name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the sources' own odd values
        if refused is not None:
            with pytest.raises(OutputError, match=refused) as err:
                write_seg(labels, volume, SPEC, target, **ALGO)
            assert "\n" not in str(err.value) and not target.exists()
            return
        write_seg(labels, volume, SPEC, target, **ALGO)

    np.testing.assert_array_equal(read_seg_labels(target, volume, labels_spec=SPEC), labels)
    seg = pydicom.dcmread(target)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == volume.headers[0].StudyInstanceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    referenced = {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence}
    assert referenced == set(volume.sop_instance_uids)
    # Frames that reference a source say which one; every one of them is a slice of this Volume.
    sources = {str(u) for u in volume.sop_instance_uids}
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            for src in derivation.SourceImageSequence:
                assert str(src.ReferencedSOPInstanceUID) in sources
    if "FrameOfReferenceUID" in seg:
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)*", seg.FrameOfReferenceUID)
    # Last: it skips the test (with the reason) where dciodvfy is not installed.
    assert dciodvfy_errors(target) == []
