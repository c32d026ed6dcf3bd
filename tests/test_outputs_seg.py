"""DICOM SEG writing and reading on real data: the dcmqi 3-slice CT with its reference liver SEG,
an enhanced multi-frame CT, multi-label and empty label maps, and atomic writes."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pydicom
import pytest
from conftest import shared_path

from edgeseg import EdgesegError, Label, Volume
from edgeseg.outputs import OutputError, read_seg_labels, write_seg

hd = pytest.importorskip("highdicom")

LIVER = Label(1, "Liver", (221, 130, 101), type=("10200004", "SCT", "Liver"))
ALGO = {"algorithm_name": "edgeseg-test", "algorithm_version": "1.0"}


def _read_volume(paths):
    from edgeseg.dicom import read_volume

    return read_volume(paths)


@pytest.fixture(scope="module")
def ct3():
    folder = shared_path("dicom", "dcmqi_ct3slice_seg")
    volume = _read_volume(sorted(folder.glob("0?.dcm")))
    assert volume.shape == (3, 512, 512)
    return volume, folder / "liver_seg.dcm"


@pytest.fixture(scope="module")
def liver(ct3):
    volume, ref = ct3
    return read_seg_labels(ref, volume)


def _ipp_by_source(ds) -> dict[str, np.ndarray]:
    """Referenced source SOP Instance UID → Image Position (Patient) of the SEG frame."""
    out = {}
    for item in ds.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[str(uid)] = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    return out


def test_reference_seg_reads_onto_the_volume_as_highdicom_reads_it(ct3, liver):
    volume, ref = ct3
    assert liver.dtype == np.uint8 and liver.shape == volume.shape
    assert set(np.unique(liver)) == {0, 1}
    assert all(liver[z].sum() > 30_000 for z in range(3))  # the liver is on every slice
    # dcmqi does not state (0028,135A) Spatial Locations Preserved; the frames are on the slices.
    expected = hd.seg.segread(ref).get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids,
        combine_segments=True,
        ignore_spatial_locations=True,
    )
    np.testing.assert_array_equal(liver, expected)


def test_liver_round_trip_lines_up_with_the_reference(ct3, liver, tmp_path):
    volume, ref = ct3
    out = write_seg(liver, volume, [LIVER], tmp_path / "liver.dcm", **ALGO)
    assert out == tmp_path / "liver.dcm"

    np.testing.assert_array_equal(read_seg_labels(out, volume), liver)
    seg = hd.seg.segread(out)
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids, combine_segments=True
    )
    np.testing.assert_array_equal(got, liver)

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    refs = {
        r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert refs == set(volume.sop_instance_uids) and len(refs) == 3
    reference = pydicom.dcmread(ref)
    assert seg.FrameOfReferenceUID == reference.FrameOfReferenceUID == volume.headers[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == volume.headers[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != volume.series_instance_uid

    # Each frame sits where the reference SEG's frame for the same source slice sits.
    ours, theirs = _ipp_by_source(seg), _ipp_by_source(reference)
    assert ours.keys() == theirs.keys() == set(volume.sop_instance_uids)
    for uid in ours:
        np.testing.assert_allclose(ours[uid], theirs[uid], atol=1e-3)

    desc = seg.SegmentSequence[0]
    assert desc.SegmentNumber == 1 and desc.SegmentLabel == "Liver"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentAlgorithmName == "edgeseg-test"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert list(desc.RecommendedDisplayCIELabValue) == list(
        hd.color.CIELabColor.from_rgb(221, 130, 101).value
    )


def test_multi_label_round_trip_with_an_empty_slice(ct3, liver, tmp_path):
    volume, _ = ct3
    labels = np.zeros(volume.shape, np.uint8)
    labels[liver > 0] = 2
    labels[:, 200:260, 300:380] = 5  # a second label overlapping the liver region
    labels[1] = 0  # a slice with no foreground at all
    spec = [
        Label(2, "Liver", (221, 130, 101), type=("10200004", "SCT", "Liver")),
        Label(5, "Lesion", (0, 200, 255)),  # no type: the default code
    ]
    path = write_seg(labels, volume, spec, tmp_path / "multi.dcm", **ALGO)

    np.testing.assert_array_equal(read_seg_labels(path, volume, labels_spec=spec), labels)
    by_segment = read_seg_labels(path, volume)  # without a spec: segment numbers 1, 2
    np.testing.assert_array_equal(by_segment, np.select([labels == 2, labels == 5], [1, 2], 0))

    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 4  # 2 segments x 2 non-empty slices; the empty slice has none
    assert volume.sop_instance_uids[1] not in _ipp_by_source(ds)
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence]
    assert len(set(colours)) == 2
    lesion = ds.SegmentSequence[1]
    assert lesion.SegmentNumber == 2
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # SCT Tissue


def test_enhanced_multiframe_source_references_frames(tmp_path):
    path = shared_path("dicom", "pydicom", "ct", "eCT_Supplemental.dcm")
    volume = _read_volume([path])
    assert volume.frame_numbers == [2, 1]  # stored order differs from frame order
    labels = np.zeros(volume.shape, np.uint8)
    labels[0, 100:200, 150:300] = 1
    labels[1, 300:350, 100:120] = 1
    out = write_seg(labels, volume, [LIVER], tmp_path / "mf.dcm", **ALGO)

    np.testing.assert_array_equal(read_seg_labels(out, volume), labels)
    ds = pydicom.dcmread(out)
    assert ds.NumberOfFrames == 2
    frames = ds.pixel_array
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == volume.sop_instance_uids[0]
        z = volume.frame_numbers.index(int(src.ReferencedFrameNumber))
        np.testing.assert_array_equal(frames[k], labels[z])


def test_empty_label_map_writes_one_empty_frame_per_segment(ct3, tmp_path):
    volume, _ = ct3
    spec = [LIVER, Label(2, "Spleen", (157, 108, 162))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # highdicom's "reverting to all frames" must not fire
        path = write_seg(np.zeros(volume.shape, np.uint8), volume, spec, tmp_path / "empty.dcm", **ALGO)
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 2 and not ds.pixel_array.any()
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver", "Spleen"]
    refs = {
        r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert refs == set(volume.sop_instance_uids)
    assert not read_seg_labels(path, volume).any()
    hd.seg.segread(path)  # highdicom accepts it


def test_confidence_is_summarised_per_segment(ct3, liver, tmp_path):
    volume, _ = ct3
    conf = np.where(liver > 0, 204, 255).astype(np.uint8)  # 0.8 inside the liver
    path = write_seg(liver, volume, [LIVER], tmp_path / "c.dcm", confidence=conf, **ALGO)
    algo = pydicom.dcmread(path).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "edgeseg_mean_confidence=0.8000" in algo.AlgorithmParameters


def test_no_patient_data_in_warnings_or_errors(ct3, liver, tmp_path):
    volume, _ = ct3
    name, pid = str(volume.headers[0].PatientName), str(volume.headers[0].PatientID)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_seg(liver, volume, [LIVER], tmp_path / "w.dcm", **ALGO)
    assert not [w for w in caught if name in str(w.message) or pid in str(w.message)]
    with pytest.raises(OutputError) as err:
        write_seg(liver, volume, [LIVER], tmp_path / "x.dcm", algorithm_name="", algorithm_version="1")
    assert name not in str(err.value) and pid not in str(err.value)


def test_unknown_label_value_fails_and_leaves_no_file(ct3, liver, tmp_path):
    volume, _ = ct3
    labels = liver.copy()
    labels[0, 0, 0] = 7  # more labels than segments described
    target = tmp_path / "out" / "bad.dcm"
    with pytest.raises(OutputError, match=r"value\(s\) \[7\]") as err:
        write_seg(labels, volume, [LIVER], target, **ALGO)
    assert isinstance(err.value, EdgesegError) and isinstance(err.value, ValueError)
    assert not target.exists()
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_failure_at_rename_leaves_no_temporary_file(ct3, liver, tmp_path):
    volume, _ = ct3
    target = tmp_path / "taken.dcm"
    target.mkdir()  # the SEG is fully written to a temporary file, then the rename fails
    with pytest.raises(OSError):
        write_seg(liver, volume, [LIVER], target, **ALGO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.dcm"]
    assert target.is_dir() and not any(target.iterdir())


def test_bad_inputs_are_one_sentence_errors(ct3, liver, tmp_path):
    volume, _ = ct3
    with pytest.raises(OutputError, match="NIfTI"):
        write_seg(
            liver, Volume.from_array(np.zeros(volume.shape, np.int16)), [LIVER], tmp_path / "a.dcm", **ALGO
        )
    with pytest.raises(OutputError, match="shape"):
        write_seg(liver[:2], volume, [LIVER], tmp_path / "b.dcm", **ALGO)
    with pytest.raises(OutputError, match="at least one"):
        write_seg(liver, volume, [], tmp_path / "c.dcm", **ALGO)
    with pytest.raises(OutputError, match="not a DICOM Segmentation"):
        read_seg_labels(volume_file(ct3), volume)
    assert not list(tmp_path.iterdir())


def volume_file(ct3):
    return ct3[1].with_name("01.dcm")


def test_reading_falls_back_to_plane_positions(ct3, liver):
    """A series re-exported with new UIDs (same grid): frames are placed by position."""
    import dataclasses

    volume, ref = ct3
    renamed = dataclasses.replace(volume, sop_instance_uids=[f"2.25.{i + 1}" for i in range(3)])
    np.testing.assert_array_equal(read_seg_labels(ref, renamed), liver)

    shifted_affine = volume.affine.copy()
    shifted_affine[:3, 3] += [0.0, 0.0, 0.5]  # half a slice off: no frame lies on a slice
    shifted = dataclasses.replace(renamed, affine=shifted_affine)
    with pytest.raises(OutputError, match="lies on none of the Volume's slices"):
        read_seg_labels(ref, shifted)


def test_reads_a_labelmap_seg_written_by_highdicom(ct3, liver, tmp_path):
    """LABELMAP SEGs (pixel value = segment number) are read too, e.g. from newer tools."""
    from pydicom.sr.codedict import codes

    volume, _ = ct3
    labels = liver.copy()
    labels[:, 200:260, 300:380] = 2
    by_uid = {h.SOPInstanceUID: h for h in volume.headers}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type="MANUAL",
        )
        for n, name in ((1, "one"), (2, "two"))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=[by_uid[u] for u in volume.sop_instance_uids],
            pixel_array=labels,
            segmentation_type="LABELMAP",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=2,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="0",
            device_serial_number="0",
            specific_character_set="ISO_IR 100",
        )
    seg.save_as(tmp_path / "labelmap.dcm")
    spec = [Label(3, "one"), Label(9, "two")]
    expected = np.select([labels == 1, labels == 2], [3, 9], 0).astype(np.uint8)
    np.testing.assert_array_equal(
        read_seg_labels(tmp_path / "labelmap.dcm", volume, labels_spec=spec), expected
    )


# -- real scanner faults (issue 10): every volume the reader accepts gets a valid SEG ------------

T1POST = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "11-T1post-18670")


def _rewritten(files, folder, edit) -> list:
    """Copies of real files, each changed by ``edit(ds, index)``: one real-world fault at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid values set on purpose
            edit(ds, i)
        out.append(folder / f"{i:04d}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _box_labels(volume, value: int = 1) -> np.ndarray:
    labels = np.zeros(volume.shape, np.uint8)
    nz, ny, nx = volume.shape
    labels[:, ny // 4 : ny // 2, nx // 4 : nx // 2] = value
    return labels


def _write_and_check(labels, volume, path, spec=(LIVER,)):
    """Write the SEG, then: dciodvfy finds no error (where it is installed: the other checks
    still run without it), it reads back as written, it references the Volume's series and every
    source instance; the Volume's headers are left as they were."""
    from dciodvfy import DCIODVFY, dciodvfy_errors

    before = [copy.deepcopy(h) for h in volume.headers]
    out = write_seg(labels, volume, list(spec), path, **ALGO)
    assert volume.headers == before  # only copies of the headers were changed
    if DCIODVFY is not None:
        assert dciodvfy_errors(out) == []
    np.testing.assert_array_equal(read_seg_labels(out, volume, labels_spec=list(spec)), labels)
    seg = pydicom.dcmread(out)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence} == set(
        volume.sop_instance_uids
    )
    return seg


def _frame_sources(seg) -> list[tuple[str, int | None]]:
    """(referenced SOP Instance UID, referenced frame number) of each SEG frame."""
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = src.get("ReferencedFrameNumber")
        out.append((str(src.ReferencedSOPInstanceUID), None if frame is None else int(frame)))
    return out


def test_orientation_differing_in_the_7th_digit_between_slices(tmp_path):
    """GE writes ImageOrientationPatient that differs in the 7th digit from slice to slice: the
    reader stacks it (within its tolerance), and so must the writer (highdicom alone refuses:
    "Source images must have a shared orientation")."""
    files = sorted(shared_path("dicom", *T1POST).glob("*.dcm"))

    def drift(ds, i):
        iop = [float(v) for v in ds.ImageOrientationPatient]
        iop[0] -= 1e-7 * (i % 2)
        iop[4] += 3e-7 * (i % 3 == 1)
        ds.ImageOrientationPatient = [f"{v:.14g}" for v in iop]

    volume = _read_volume(_rewritten(files, tmp_path / "ge", drift))
    assert len({tuple(h.ImageOrientationPatient) for h in volume.headers}) > 1
    labels = _box_labels(volume)
    labels[::3] = 0
    seg = _write_and_check(labels, volume, tmp_path / "ge.dcm")
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in volume.headers[0].ImageOrientationPatient],
        atol=1e-6,
    )
    # Every frame still references its own slice and sits at that slice's position.
    by_uid = {str(h.SOPInstanceUID): h for h in volume.headers}
    for item, (uid, _) in zip(seg.PerFrameFunctionalGroupsSequence, _frame_sources(seg), strict=True):
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[uid].ImagePositionPatient],
            atol=1e-4,
        )


def test_dates_times_and_sex_the_seg_cannot_copy_become_empty(tmp_path):
    """A zero year ("year 0 is out of range"), a time that does not parse, a Patient's Sex outside
    M/F/O: the SEG gets them empty (type 2), the source keeps them."""
    files = sorted(shared_path("dicom", "dcmqi_ct3slice_seg").glob("0?.dcm"))

    def spoil(ds, i):
        ds.StudyDate = "00000000"
        ds.PatientBirthDate = "00000101"
        ds.StudyTime = "256199"
        ds.PatientSex = "U"
        ds.PatientAge = "forty"

    volume = _read_volume(_rewritten(files, tmp_path / "dates", spoil))
    seg = _write_and_check(_box_labels(volume), volume, tmp_path / "dates.dcm")
    for keyword in ("StudyDate", "PatientBirthDate", "StudyTime", "PatientSex"):
        assert keyword in seg and seg[keyword].value in (None, ""), keyword
    assert seg.get("PatientAge") in (None, "")
    assert volume.headers[0].StudyDate == "00000000"  # the source is as it was read
    assert seg.StudyInstanceUID == volume.headers[0].StudyInstanceUID


def test_specific_character_set_with_code_extensions(tmp_path):
    """ISO 2022 code extensions (Japanese, as pydicom's chrH31.dcm has them): the SEG is UTF-8
    and holds the same decoded names."""
    from pydicom.data import get_charset_files

    japanese = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
    files = sorted(shared_path("dicom", "dcmqi_ct3slice_seg").glob("0?.dcm"))

    def japan(ds, i):
        ds.SpecificCharacterSet = list(japanese.SpecificCharacterSet)
        ds.PatientName = japanese.PatientName
        ds.ReferringPhysicianName = japanese.PatientName
        ds.StudyDescription = "山田"

    volume = _read_volume(_rewritten(files, tmp_path / "jp", japan))
    assert list(volume.headers[0].SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    seg = _write_and_check(_box_labels(volume), volume, tmp_path / "jp.dcm")
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert str(seg.PatientName) == str(japanese.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert str(seg.ReferringPhysicianName) == str(japanese.PatientName)
    assert seg.StudyDescription == "山田"


def test_empty_and_missing_type2_attributes(tmp_path):
    """Anonymised data: type 2 patient/study attributes empty or removed, Slice Thickness empty
    (a SEG's Pixel Measures need it: the Volume's slice spacing stands in)."""
    files = sorted(shared_path("dicom", "dcmqi_ct3slice_seg").glob("0?.dcm"))

    def anonymise(ds, i):
        for keyword in ("PatientName", "PatientBirthDate", "StudyDate", "ReferringPhysicianName", "StudyID"):
            setattr(ds, keyword, "")
        for keyword in ("PatientID", "PatientSex", "AccessionNumber", "StudyTime"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SliceThickness = ""

    volume = _read_volume(_rewritten(files, tmp_path / "anon", anonymise))
    seg = _write_and_check(_box_labels(volume), volume, tmp_path / "anon.dcm")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(volume.spacing[0])
    assert "SliceThickness" not in volume.headers[0] or volume.headers[0].SliceThickness in (None, "")


def test_enhanced_multiframe_with_per_frame_pixel_measures_and_no_frame_of_reference(tmp_path):
    """Philips enhanced MR: pixel measures and orientation per frame (highdicom alone leaks
    "'Dataset' object has no attribute 'PixelMeasuresSequence'") and, in this anonymised copy,
    no Frame of Reference: each SEG frame references its own source frame."""
    folder = shared_path("dicom", "dicom2nifti_headers_random_pixels", "mr_philips_enhanced_multiframe")
    volume = _read_volume(sorted(folder.iterdir()))
    assert "PixelMeasuresSequence" not in volume.headers[0].SharedFunctionalGroupsSequence[0]
    labels = _box_labels(volume)
    labels[1] = 0
    seg = _write_and_check(labels, volume, tmp_path / "philips.dcm")
    uid = volume.sop_instance_uids[0]
    expected = [(uid, f) for z, f in enumerate(volume.frame_numbers) if labels[z].any()]
    assert sorted(_frame_sources(seg)) == sorted(expected)
    assert seg.FrameOfReferenceUID.startswith("2.25.")  # derived: the source has none


def test_multiframe_without_plane_positions_gets_its_own_frame_of_reference(tmp_path):
    """pydicom's emri_small: a Frame of Reference but no plane positions, so the reader assumed a
    geometry; the SEG states that geometry in a Frame of Reference of its own, never the source's."""
    volume = _read_volume([shared_path("dicom", "pydicom", "mr", "emri_small.dcm")])
    seg = _write_and_check(_box_labels(volume), volume, tmp_path / "emri.dcm")
    assert seg.FrameOfReferenceUID != volume.headers[0].FrameOfReferenceUID
    uid = volume.sop_instance_uids[0]
    assert sorted(_frame_sources(seg)) == sorted((uid, int(f)) for f in volume.frame_numbers)


def test_sources_without_frame_of_reference(tmp_path):
    """With positions (an anonymised MR series): a Frame of Reference derived from the study and
    series, the same on every run and for every part of the series. Without any (a radiograph):
    a SEG without Frame of Reference, as the SEG IOD allows."""
    from edgeseg.dicom import find_series, load_volume

    hitachi = _read_volume(
        sorted(shared_path("dicom", "dicom2nifti_headers_random_pixels", "mr_hitachi").iterdir())
    )
    assert "FrameOfReferenceUID" not in hitachi.headers[0]
    one = _write_and_check(_box_labels(hitachi), hitachi, tmp_path / "h1.dcm")
    two = write_seg(_box_labels(hitachi), hitachi, [LIVER], tmp_path / "h2.dcm", **ALGO)
    assert one.FrameOfReferenceUID == pydicom.dcmread(two).FrameOfReferenceUID
    assert hd.UID(one.FrameOfReferenceUID).is_valid

    parts = find_series([shared_path("dicom", "dicom2nifti_headers_random_pixels", "mr_ge_dti_noext")]).series
    assert len(parts) >= 2 and len({p.series_instance_uid for p in parts}) == 1
    fors = set()
    for i, part in enumerate(parts[:2]):
        volume = load_volume(part)
        fors.add(_write_and_check(_box_labels(volume), volume, tmp_path / f"dti{i}.dcm").FrameOfReferenceUID)
    assert len(fors) == 1

    xray = _read_volume([shared_path("dicom", "pydicom", "xray", "RG1_J2KI.dcm")])
    seg = _write_and_check(_box_labels(xray), xray, tmp_path / "cr.dcm")
    assert "FrameOfReferenceUID" not in seg and "PatientOrientation" in seg
    assert _frame_sources(seg) == [(xray.sop_instance_uids[0], None)]


def test_frame_of_reference_repeating_the_study_uid_is_replaced(tmp_path):
    """A Frame of Reference UID equal to the Study Instance UID (one UID for two things, as in
    pydicom's DICOMDIR test series) is treated as absent: dciodvfy reports it as an error."""
    path = shared_path("dicom", "pydicom", "dicomdir_series", "98892003", "MR1", "15820")
    volume = _read_volume([path])
    assert volume.headers[0].FrameOfReferenceUID == volume.headers[0].StudyInstanceUID
    seg = _write_and_check(_box_labels(volume), volume, tmp_path / "for.dcm")
    assert seg.FrameOfReferenceUID != seg.StudyInstanceUID


def test_siemens_mosaic_gets_one_frame_per_untiled_slice(tmp_path):
    volume = _read_volume(
        [next(shared_path("dicom", "dcm_qa_decubitus", "HFS_ep2d_diff_mosaic_1file").iterdir())]
    )
    assert volume.shape == (25, 128, 128) and len(set(volume.sop_instance_uids)) == 1
    labels = _box_labels(volume)
    labels[:3] = 0
    seg = _write_and_check(labels, volume, tmp_path / "mosaic.dcm")
    assert seg.FrameOfReferenceUID == volume.headers[0].FrameOfReferenceUID
    assert int(seg.NumberOfFrames) == 22
    empty = _write_and_check(np.zeros(volume.shape, np.uint8), volume, tmp_path / "empty.dcm")
    assert int(empty.NumberOfFrames) == 1


def test_sources_a_seg_cannot_reference_are_refused_in_one_sentence(tmp_path):
    """No SEG without the study it belongs to, nor with source UIDs it cannot repeat; the
    other formats are still written by write_outputs."""
    from edgeseg.outputs import write_outputs

    for parts, reason in (
        (("ct", "bad_sequence.dcm"), "StudyInstanceUID is not a DICOM UID"),
        (("seg_rt_lut_misc", "JPEGLSNearLossless_16.dcm"), r"no \(0020,000D\) Study Instance UID"),
    ):
        volume = _read_volume([shared_path("dicom", "pydicom", *parts)])
        labels = _box_labels(volume)
        with pytest.raises(OutputError, match=reason) as err:
            write_seg(labels, volume, [LIVER], tmp_path / "x.dcm", **ALGO)
        assert "\n" not in str(err.value) and str(err.value).count(". ") == 0
        assert not (tmp_path / "x.dcm").exists()
        with pytest.raises(OutputError, match="the nifti, nifti_image output") as err:
            write_outputs(
                labels, volume, tmp_path, formats=("seg", "nifti"), labels_spec=[LIVER], stem="s", **ALGO
            )
        assert set(err.value.written) == {"nifti", "nifti_image"}
        assert (tmp_path / "s_labels.nii.gz").exists() and not (tmp_path / "s_seg.dcm").exists()


def test_multiframe_part_references_only_the_frames_it_uses(tmp_path):
    """A Volume made of some frames of a multi-frame instance whose other frames repeat its
    positions (a 4D instance): each SEG frame references its own source frame and no other, also
    for an empty label map."""
    import dataclasses

    path = shared_path("dicom", "pydicom", "ct", "eCT_Supplemental.dcm")
    volume = _read_volume([path])
    assert volume.frame_numbers == [2, 1]
    # The same instance as a second volume would be: frame 2 at frame 1's position.
    header = copy.deepcopy(volume.headers[0])
    per_frame = header.PerFrameFunctionalGroupsSequence
    per_frame[1].PlanePositionSequence[0].ImagePositionPatient = list(
        per_frame[0].PlanePositionSequence[0].ImagePositionPatient
    )
    part = dataclasses.replace(
        volume,
        stored=volume.stored[1:],
        slope=volume.slope[1:],
        intercept=volume.intercept[1:],
        sop_instance_uids=volume.sop_instance_uids[1:],
        frame_numbers=[1],
        headers=[header],
        affine=volume.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1.0]]),
    )
    for labels, name in ((_box_labels(part), "part.dcm"), (np.zeros(part.shape, np.uint8), "empty.dcm")):
        seg = _write_and_check(labels, part, tmp_path / name)
        (item,) = seg.PerFrameFunctionalGroupsSequence
        (derivation,) = item.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        assert (source.ReferencedSOPInstanceUID, int(source.ReferencedFrameNumber)) == (
            part.sop_instance_uids[0],
            1,
        )
