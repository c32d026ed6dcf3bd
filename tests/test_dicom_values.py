"""Decoded values: lossless encodings agree, 12-bit traps, rescale and LUTs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path
from pydicom import dcmread

from edgeseg.dicom import find_series, load_volume, read_volume
from edgeseg.dicom.pixels import decode_frames


def _values(*parts: str) -> np.ndarray:
    return read_volume(shared_path("dicom", *parts)).modality_values()


@pytest.mark.parametrize(
    "reference, variants",
    [
        (
            "pydicom/mr/MR_small.dcm",
            [
                "pydicom/mr/MR_small_implicit.dcm",
                "pydicom/mr/MR_small_bigendian.dcm",
                "pydicom/mr/MR_small_expb.dcm",
                "pydicom/mr/MR_small_RLE.dcm",
                "pydicom/mr/MR_small_jp2klossless.dcm",
                "pydicom/mr/MR_small_jpeg_ls_lossless.dcm",
                "pydicom/mr/MR_small_padded.dcm",
            ],
        ),
        (
            "pydicom/mr/emri_small.dcm",
            [
                "pydicom/mr/emri_small_big_endian.dcm",
                "pydicom/mr/emri_small_RLE.dcm",
                "pydicom/mr/emri_small_jpeg_2k_lossless.dcm",
                "pydicom/mr/emri_small_jpeg_ls_lossless.dcm",
            ],
        ),
        ("pydicom/mr/MR2_UNCR.dcm", ["pydicom/mr/MR2_J2KR.dcm"]),
        ("pydicom/ct/693_UNCR.dcm", ["pydicom/ct/693_J2KR.dcm"]),
        ("pydicom/xray/RG3_UNCR.dcm", ["pydicom/xray/RG3_J2KR.dcm"]),
        ("pydicom/nm/JPEG2000_UNC.dcm", ["pydicom/nm/JPEG2000.dcm"]),
    ],
)
def test_lossless_encodings_decode_identically(reference, variants):
    expected = _values(reference)
    for variant in variants:
        got = _values(variant)
        assert got.shape == expected.shape, variant
        np.testing.assert_array_equal(got, expected, err_msg=variant)


def test_lossy_variant_is_close_but_flagged():
    volume = read_volume(shared_path("dicom", "pydicom/mr/MR2_J2KI.dcm"))
    assert any("lossy" in w for w in volume.warnings)


def test_12bit_signed_trap_decodes_documented_values():
    # The README: stripes 0x0F0F -> -241 and 0xFFFF -> -1 (sign bit is HighBit 11).
    # The file is a Siemens MOSAIC: its decoding is checked directly, then un-tiled as a volume.
    path = shared_path("dicom", "dcm_qa_12bit", "12bitSigned_0x0F0F.dcm")
    ds = dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    frames, _ = decode_frames(ds, path)
    assert frames.dtype == np.int16
    assert set(np.unique(frames[0][raw == 0x0F0F])) == {-241}
    assert set(np.unique(frames[0][raw == 0xFFFF])) == {-1}
    assert frames.min() >= -2048 and frames.max() <= 2047
    unsigned = shared_path("dicom", "dcm_qa_12bit", "12bitUnsigned_0x0F0F.dcm")
    ds_u = dcmread(unsigned)
    raw_u = np.frombuffer(ds_u.PixelData, dtype="<u2").reshape(ds_u.Rows, ds_u.Columns)
    frames_u, _ = decode_frames(ds_u, unsigned)
    assert set(np.unique(frames_u[0][raw_u == 0x0F0F])) == {3855}
    assert set(np.unique(frames_u[0][raw_u == 0xFFFF])) == {4095}
    scan = find_series([path])
    assert not scan.rejected and len(scan.series) == 1  # un-tiled (tests/test_dicom_mosaic.py)
    assert set(np.unique(load_volume(scan.series[0]).stored)) == set(np.unique(frames))


def test_ct_three_slices_hu():
    folder = shared_path("dicom", "dcmqi_ct3slice_seg")
    scan = find_series([folder / f"0{i}.dcm" for i in (1, 2, 3)])
    assert len(scan.series) == 1
    volume = load_volume(scan.series[0])
    assert volume.shape == (3, 512, 512) and volume.stored.dtype == np.int16
    np.testing.assert_array_equal(volume.slope, 1.0)
    np.testing.assert_array_equal(volume.intercept, -1024.0)
    hu = volume.modality_values()
    by_uid = {str(dcmread(folder / f"0{i}.dcm").SOPInstanceUID): i for i in (1, 2, 3)}
    for z, uid in enumerate(volume.sop_instance_uids):
        stored = dcmread(folder / f"0{by_uid[uid]}.dcm").pixel_array
        np.testing.assert_array_equal(hu[z], stored.astype(np.float32) - 1024)
    assert volume.frame_numbers == [None, None, None]
    assert volume.modality == "CT"


def test_non_unit_slope_kept_per_slice():
    volume = read_volume(shared_path("dicom", "pydicom/mr/MR2_UNCR.dcm"))
    assert volume.stored.dtype == np.uint16
    assert volume.slope[0] == pytest.approx(3.774114)


def test_modality_lut_sequence_is_applied():
    path = shared_path("dicom", "pydicom/seg_rt_lut_misc/mlut_18.dcm")
    volume = read_volume(path)
    assert volume.stored.dtype == np.float32 and volume.has_identity_rescale
    ds = dcmread(path)
    from pydicom.pixels import apply_modality_lut

    np.testing.assert_array_equal(volume.stored[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def test_monochrome1_keeps_stored_values():
    path = shared_path("dicom", "pydicom/xray/RG3_UNCR.dcm")
    volume = read_volume(path)
    assert volume.shape == (1, 1760, 1760)
    np.testing.assert_array_equal(volume.stored[0], dcmread(path).pixel_array)
    assert any("MONOCHROME1" in w for w in volume.warnings)
