"""Write a (z, y, x) array as a classic single-frame CT or MR DICOM series.

Used by the quickstart (a NIfTI template turned into a series a scanner could have sent) and
by round-trip tests: ``read_volume(write_series(a, ...))`` gives back the geometry and the
values, within the rescale quantisation for float input.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from edgeseg.atomic import atomic_path

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_I16 = np.iinfo(np.int16)
_U16 = np.iinfo(np.uint16)


def _ds(value: float) -> str:
    # DS holds at most 16 characters; the round trip must use exactly what was written.
    return format_number_as_ds(float(value))


def _choose_storage(array: np.ndarray, rescale: tuple[float, float] | None) -> tuple[np.ndarray, str, str]:
    """Stored int16/uint16 values plus the RescaleSlope/Intercept strings that map them back."""
    if rescale is not None:
        slope_s, icpt_s = _ds(rescale[0]), _ds(rescale[1])
        slope, icpt = float(slope_s), float(icpt_s)
        if slope == 0:
            raise ValueError("rescale slope must not be 0")
        q = np.rint((array.astype(np.float64) - icpt) / slope)
        if q.size and (q.min() < _I16.min or q.max() > _I16.max):
            raise ValueError(
                f"values do not fit int16 with rescale {rescale}; choose another slope/intercept"
            )
        return q.astype(np.int16), slope_s, icpt_s
    if array.dtype.kind in "biu":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if _I16.min <= lo and hi <= _I16.max:
            return array.astype(np.int16), "1", "0"
        if 0 <= lo and hi <= _U16.max:
            return array.astype(np.uint16), "1", "0"
        array = array.astype(np.float64)  # wider integers: fall through to a real rescale
    a = np.asarray(array, dtype=np.float64)
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError("array contains NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.array_equal(a, np.rint(a)) and _I16.min <= lo and hi <= _I16.max:
        return a.astype(np.int16), "1", "0"  # integral floats: exact, no quantisation
    # Spread the range over int16 (±32000 leaves headroom for DS rounding of the slope).
    icpt_s = _ds((hi + lo) / 2.0)
    slope_s = _ds(max(hi - lo, 1e-12) / 64000.0)
    slope, icpt = float(slope_s), float(icpt_s)
    q = np.clip(np.rint((a - icpt) / slope), _I16.min, _I16.max)
    return q.astype(np.int16), slope_s, icpt_s


def _geometry(shape: tuple[int, int, int], spacing: Sequence[float], affine: np.ndarray | None):
    sz, sy, sx = (float(s) for s in spacing)
    if affine is None:
        affine = np.diag([sx, sy, sz, 1.0])
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4; got {affine.shape}")
    cx, cy, step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (cx, cy, step))
    if min(dx, dy, dz) <= 0:
        raise ValueError("affine has a zero-length axis")
    if not np.allclose([dz, dy, dx], [sz, sy, sx], rtol=1e-4, atol=1e-6):
        raise ValueError(f"spacing {tuple(spacing)} disagrees with the affine's axis lengths {(dz, dy, dx)}")
    iop = np.concatenate([cx / dx, cy / dy])
    positions = affine[:3, 3][None, :] + np.arange(shape[0])[:, None] * step[None, :]
    return iop, positions, (dy, dx), dz


def write_series(
    array_zyx: np.ndarray,
    out_dir: str | Path,
    *,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    modality: str = "MR",
    series_description: str = "edgeseg synthetic series",
    rescale: tuple[float, float] | None = None,
    patient_id: str = "ANON",
    patient_name: str = "ANON",
    study_instance_uid: str | None = None,
    series_number: int = 1,
    fsync: bool = True,
) -> list[Path]:
    """Write ``array_zyx`` as one classic single-frame DICOM series, one file a slice.

    Parameters
    ----------
    array_zyx:
        (z, y, x) values (a 2D array is one slice). Integers fitting int16/uint16 are stored
        as is; floats get a RescaleSlope/Intercept spreading their range over int16.
    out_dir:
        Folder for ``0001.dcm`` … (created; existing files of the same name are replaced).
    spacing:
        (z, y, x) mm; must agree with ``affine`` when both are given.
    affine:
        4×4 (x, y, z, 1) → LPS mm, as :class:`~edgeseg.volume.Volume` uses; axis-aligned
        from ``spacing`` when None. Column 2 is the slice step (it may be oblique).
    modality:
        "MR" (MR Image Storage) or "CT" (CT Image Storage).
    rescale:
        (slope, intercept) to use instead of the automatic choice; values must then fit int16.
    fsync:
        Flush each file to disk before its atomic rename (off for throwaway test series).

    Returns
    -------
    list[Path]
        The written files in slice order. Each is written atomically.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be 'CT' or 'MR'; got {modality!r}")
    array = np.asarray(array_zyx)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"array must be (z, y, x) and non-empty; got shape {array.shape}")
    stored, slope_s, icpt_s = _choose_storage(array, rescale)
    iop, positions, (dy, dx), dz = _geometry(array.shape, spacing, affine)
    normal = np.cross(iop[:3], iop[3:])

    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    signed = stored.dtype == np.int16
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for z in range(stored.shape[0]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = _SOP_CLASS[modality], sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer = modality, "edgeseg"
        ds.SeriesDescription = series_description[:64]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", int(series_number), z + 1
        ds.PositionReferenceIndicator, ds.PatientPosition = "", ""
        ds.ImagePositionPatient = [_ds(v) for v in positions[z]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.SliceLocation = _ds(float(positions[z] @ normal))
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(dz)
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope, ds.RescaleIntercept = slope_s, icpt_s
        ds.RescaleType = "HU" if modality == "CT" else "US"
        if modality == "CT":
            ds.KVP, ds.AcquisitionNumber = "", 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "3D", "", ""
            ds.EchoTrainLength, ds.MagneticFieldStrength = "", ""
        ds.PixelData = np.ascontiguousarray(stored[z]).astype("<" + stored.dtype.str[1:]).tobytes()
        target = out_dir / f"{z + 1:04d}.dcm"
        with atomic_path(target, fsync=fsync) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(target)
    return paths
