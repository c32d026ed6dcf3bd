"""Per-frame header facts: where each frame lies and how its stored values become modality values.

Classic single-frame instances keep these at the top level of the dataset; enhanced multi-frame
instances keep them in the Per-frame and Shared Functional Groups. Both come out of
:func:`frame_infos` as the same list of :class:`FrameInfo`, so assembly never needs to know
which kind of instance a slice came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from edgeseg.dicom import elements as el

# Enhanced (functional-group) image storage classes, including the legacy-converted ones.
ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
}


@dataclass
class FrameInfo:
    """Geometry and rescale of one frame; ``None`` where the header does not say."""

    ipp: np.ndarray | None  # (3,) LPS mm of the centre of the first pixel
    iop: np.ndarray | None  # (6,) row cosines then column cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x)
    slice_thickness: float | None
    slope: float
    intercept: float


def n_frames(ds: Dataset) -> int:
    """NumberOfFrames as an int (1 when absent); raises ValueError when it is not a number."""
    value = el.get(ds, "NumberOfFrames", 1)
    if value in (None, ""):
        return 1
    return int(value)


def is_enhanced(ds: Dataset) -> bool:
    """True for functional-group multi-frame instances (Enhanced CT/MR/PET and legacy converted)."""
    return (
        el.has(ds, "PerFrameFunctionalGroupsSequence")
        or str(el.get(ds, "SOPClassUID", "")) in ENHANCED_SOP_CLASSES
    )


def _first(seq_owner: Dataset | None, seq: str) -> Dataset | None:
    if seq_owner is None:
        return None
    items = el.get(seq_owner, seq)
    if not items:
        return None
    return items[0]


def _float_list(value: Any, n: int) -> list[float] | None:
    """``n`` finite floats, or None (absent, another count, not numbers)."""
    if value is None:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(map(math.isfinite, out)):
        return None
    return out


def _floats(value: Any, n: int) -> np.ndarray | None:
    out = _float_list(value, n)
    return None if out is None else np.array(out, dtype=np.float64)


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    # Projection X-ray keeps the detector spacing under other names; any is better than none.
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        values = _float_list(el.get(ds, keyword), 2)
        if values is not None and values[0] > 0 and values[1] > 0:
            return values[0], values[1]
    return None


def _rescale(ds: Dataset | None) -> tuple[float | None, float | None]:
    if ds is None:
        return None, None
    return _float(el.get(ds, "RescaleSlope")), _float(el.get(ds, "RescaleIntercept"))


def frame_infos(ds: Dataset) -> list[FrameInfo]:
    """One :class:`FrameInfo` per frame of ``ds``, in stored frame order.

    For enhanced instances a per-frame functional group wins over the shared one, which wins
    over a (non-standard) top-level attribute.
    """
    count = n_frames(ds)
    top_slope, top_icpt = _rescale(ds)
    top = FrameInfo(
        ipp=_floats(el.get(ds, "ImagePositionPatient"), 3),
        iop=_floats(el.get(ds, "ImageOrientationPatient"), 6),
        pixel_spacing=_pixel_spacing(ds),
        slice_thickness=_float(el.get(ds, "SliceThickness")),
        slope=1.0 if top_slope is None else top_slope,
        intercept=0.0 if top_icpt is None else top_icpt,
    )
    if not is_enhanced(ds):
        return [top] * count

    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = el.get(ds, "PerFrameFunctionalGroupsSequence") or []
    out = []
    for index in range(count):
        frame = per_frame[index] if index < len(per_frame) else None
        groups = [g for g in (frame, shared) if g is not None]

        def pick(seq: str, groups: list[Dataset] = groups) -> Dataset | None:
            for group in groups:
                item = _first(group, seq)
                if item is not None:
                    return item
            return None

        pos = pick("PlanePositionSequence")
        ori = pick("PlaneOrientationSequence")
        meas = pick("PixelMeasuresSequence")
        pvt = pick("PixelValueTransformationSequence")
        slope, icpt = _rescale(pvt)
        out.append(
            FrameInfo(
                ipp=_floats(el.get(pos, "ImagePositionPatient"), 3) if pos is not None else top.ipp,
                iop=_floats(el.get(ori, "ImageOrientationPatient"), 6) if ori is not None else top.iop,
                pixel_spacing=(_pixel_spacing(meas) if meas is not None else None) or top.pixel_spacing,
                slice_thickness=(_float(el.get(meas, "SliceThickness")) if meas is not None else None)
                or top.slice_thickness,
                slope=top.slope if slope is None else slope,
                intercept=top.intercept if icpt is None else icpt,
            )
        )
    return out


_UID_FORM = re.compile(r"[0-9]+(\.[0-9]+)*")


def sop_class_name(uid: str) -> str:
    """The registered name of a SOP Class UID, the UID itself when it is a well-formed one, or
    "unknown SOP class": a damaged value is never quoted (it may hold other header bytes)."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID_FORM.fullmatch(uid):
        return "unknown SOP class"
    return UID(uid).name or uid
