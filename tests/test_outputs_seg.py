"""DICOM SEG writing and reading on real data: the dcmqi 3-slice CT with its reference liver SEG,
an enhanced multi-frame CT, multi-label and empty label maps, and atomic writes."""

from __future__ import annotations

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
