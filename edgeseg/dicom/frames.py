"""Per-frame header facts: where each frame lies and how its stored values become modality values.

Classic single-frame instances keep these at the top level of the dataset; enhanced multi-frame
instances keep them in the Per-frame and Shared Functional Groups. Both come out of
:func:`frame_infos` as the same list of :class:`FrameInfo`, so assembly never needs to know
which kind of instance a slice came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

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
    value = ds.get("NumberOfFrames", 1)
    if value in (None, ""):
        return 1
    return int(value)


def is_enhanced(ds: Dataset) -> bool:
    """True for functional-group multi-frame instances (Enhanced CT/MR/PET and legacy converted)."""
    return "PerFrameFunctionalGroupsSequence" in ds or str(ds.get("SOPClassUID", "")) in ENHANCED_SOP_CLASSES


def _first(seq_owner: Dataset | None, seq: str) -> Dataset | None:
    if seq_owner is None:
        return None
    items = seq_owner.get(seq)
    if not items:
        return None
    return items[0]


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    # Projection X-ray keeps the detector spacing under other names; any is better than none.
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        arr = _floats(ds.get(keyword), 2)
        if arr is not None and np.all(arr > 0):
            return float(arr[0]), float(arr[1])
    return None


def _rescale(ds: Dataset | None) -> tuple[float | None, float | None]:
    if ds is None:
        return None, None
    return _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))


def frame_infos(ds: Dataset) -> list[FrameInfo]:
    """One :class:`FrameInfo` per frame of ``ds``, in stored frame order.

    For enhanced instances a per-frame functional group wins over the shared one, which wins
    over a (non-standard) top-level attribute.
    """
    count = n_frames(ds)
    top_slope, top_icpt = _rescale(ds)
    top = FrameInfo(
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_pixel_spacing(ds),
        slice_thickness=_float(ds.get("SliceThickness")),
        slope=1.0 if top_slope is None else top_slope,
        intercept=0.0 if top_icpt is None else top_icpt,
    )
    if not is_enhanced(ds):
        return [top] * count

    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
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
                ipp=_floats(pos.get("ImagePositionPatient"), 3) if pos is not None else top.ipp,
                iop=_floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else top.iop,
                pixel_spacing=(_pixel_spacing(meas) if meas is not None else None) or top.pixel_spacing,
                slice_thickness=(_float(meas.get("SliceThickness")) if meas is not None else None)
                or top.slice_thickness,
                slope=top.slope if slope is None else slope,
                intercept=top.intercept if icpt is None else icpt,
            )
        )
    return out


def sop_class_name(uid: str) -> str:
    """The registered name of a SOP Class UID, or the UID itself."""
    name = UID(uid).name if uid else ""
    return name or uid or "unknown SOP class"
