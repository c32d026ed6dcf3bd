"""Read a DICOM SEG (ours or anyone's) back into a label map aligned to a Volume.

Each SEG frame is placed on a slice of the Volume by the source instance / frame it references
(Derivation Image Sequence) and, when it references none of the Volume's instances, by its
plane position: the frame must then lie exactly on one of the Volume's slices (same orientation,
pixel spacing and in-plane origin), since a SEG is never resampled here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg.outputs._common import OutputError
from edgeseg.spec import Label
from edgeseg.volume import Volume

# Tolerances for placing a frame by position, in voxels.
_IN_PLANE_TOL = 0.05
_SLICE_TOL = 0.05


def read_seg_labels(
    path: str | Path,
    volume: Volume,
    *,
    labels_spec: Sequence[Label] | None = None,
) -> np.ndarray:
    """Read the segments of a DICOM SEG as a (z, y, x) uint8 label map aligned to ``volume``.

    Parameters
    ----------
    path:
        a DICOM Segmentation file (BINARY, FRACTIONAL or LABELMAP).
    volume:
        the Volume the SEG was derived from (or one on exactly the same grid).
    labels_spec:
        when given, segment ``i`` is written as ``labels_spec[i - 1].value`` (the inverse of
        :func:`~edgeseg.outputs.write_seg`); otherwise as the segment number itself.

    Returns
    -------
    numpy.ndarray
        (z, y, x) uint8; 0 where no segment is set. Where segments overlap, the higher
        segment number wins. FRACTIONAL segments count where they exceed half the maximum.

    Raises
    ------
    OutputError
        not a SEG, frames of another size, or a frame that lies on none of the Volume's slices.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for unreadable files
        raise OutputError(f"{path}: cannot read the file as DICOM ({type(exc).__name__})") from None
    if str(ds.get("Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise OutputError(f"{path}: not a DICOM Segmentation (Modality is not SEG)")
    nz, ny, nx = volume.shape
    if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
        raise OutputError(
            f"{path}: SEG frames are {int(ds.Rows)}x{int(ds.Columns)} (rows x columns) but the "
            f"Volume's slices are {ny}x{nx}"
        )
    seg_to_value = _segment_values(ds, labels_spec, path)

    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    kind = str(ds.get("SegmentationType", "BINARY"))
    if kind == "FRACTIONAL":
        pixels = pixels > (int(ds.get("MaximumFractionalValue", 255)) / 2)

    slot = _slot_index(volume)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * pixels.shape[0]
    placer = _PositionPlacer(volume, ds, shared, path)

    placed: list[tuple[int, int, int]] = []  # (segment number, frame index, slice)
    for i, item in enumerate(per_frame):
        z = _slice_by_reference(item, shared, slot)
        if z is None:
            z = placer.slice_of(item, i)
        number = 0 if kind == "LABELMAP" else _segment_number(item, shared, path, i)
        placed.append((number, i, z))

    out = np.zeros(volume.shape, dtype=np.uint8)
    if kind == "LABELMAP":
        for _, i, z in placed:
            frame = seg_to_value[np.minimum(pixels[i], len(seg_to_value) - 1)]
            np.copyto(out[z], frame, where=frame > 0)
        return out
    # Ascending segment number, so higher segments overwrite lower ones where they overlap.
    for number, i, z in sorted(placed):
        out[z][pixels[i].astype(bool)] = seg_to_value[number]
    return out


# -- pieces -------------------------------------------------------------------------------------


def _segment_values(ds, labels_spec: Sequence[Label] | None, path) -> np.ndarray:
    """(max segment + 1,) uint8 table: segment number → output label value."""
    numbers = [int(s.SegmentNumber) for s in ds.SegmentSequence]
    top = max(numbers, default=0)
    if labels_spec is None:
        if top > 255:
            raise OutputError(f"{path}: {top} segments do not fit a uint8 label map")
        return np.arange(top + 1, dtype=np.uint8)
    spec = list(labels_spec)
    if len(spec) < top:
        raise OutputError(f"{path}: the SEG has {top} segments but 'labels_spec' describes {len(spec)}")
    table = np.zeros(top + 1, dtype=np.uint8)
    for n in range(1, top + 1):
        table[n] = int(spec[n - 1].value)
    return table


def _slot_index(volume: Volume) -> dict[tuple[str, int | None], int]:
    frames = list(volume.frame_numbers) or [None] * volume.shape[0]
    return {
        (str(uid), None if f is None else int(f)): z
        for z, (uid, f) in enumerate(zip(volume.sop_instance_uids, frames, strict=False))
    }


def _find(item, shared, keyword: str):
    """An attribute of a per-frame functional group item, else of the shared one."""
    for group in (item, shared):
        if group is not None and keyword in group:
            return group[keyword].value
    return None


def _slice_by_reference(item, shared, slot: dict) -> int | None:
    derivation = _find(item, shared, "DerivationImageSequence")
    for der in derivation or []:
        for src in der.get("SourceImageSequence", []):
            uid = str(src.get("ReferencedSOPInstanceUID", ""))
            frames = src.get("ReferencedFrameNumber")
            if frames is None:
                candidates = [(uid, None), (uid, 1)]
            else:
                values = frames if isinstance(frames, Sequence) and not isinstance(frames, str) else [frames]
                candidates = [(uid, int(f)) for f in values]
            for key in candidates:
                if key in slot:
                    return slot[key]
    return None


def _segment_number(item, shared, path, i: int) -> int:
    ident = _find(item, shared, "SegmentIdentificationSequence")
    if not ident:
        raise OutputError(f"{path}: frame {i + 1} has no (0062,000A) Segment Identification Sequence")
    return int(ident[0].ReferencedSegmentNumber)


class _PositionPlacer:
    """Places frames on slices by (0020,0032) Image Position (Patient) when references fail."""

    def __init__(self, volume: Volume, ds, shared, path) -> None:
        self.volume = volume
        self.path = path
        self.shared = shared
        self._checked = False
        self._inv = np.linalg.inv(volume.affine)

    def _check_grid(self, item) -> None:
        # Orientation and pixel spacing must equal the Volume's: a SEG is placed, never resampled.
        orient = _find(item, self.shared, "PlaneOrientationSequence")
        measures = _find(item, self.shared, "PixelMeasuresSequence")
        if not orient or not measures:
            raise OutputError(
                f"{self.path}: a frame references none of the Volume's source images and has no "
                "plane orientation / pixel measures to place it by position"
            )
        iop = np.array([float(v) for v in orient[0].ImageOrientationPatient])
        direction = self.volume.direction
        same_orient = float(iop[:3] @ direction[:, 0]) > 0.9999 and float(iop[3:] @ direction[:, 1]) > 0.9999
        row_sp, col_sp = (float(v) for v in measures[0].PixelSpacing)
        _, sy, sx = self.volume.spacing
        same_spacing = np.allclose([row_sp, col_sp], [sy, sx], rtol=1e-3)
        if not (same_orient and same_spacing):
            raise OutputError(
                f"{self.path}: the SEG's frames are not on the Volume's grid (orientation or pixel "
                "spacing differ) and reference none of its source images"
            )
        self._checked = True

    def slice_of(self, item, i: int) -> int:
        if not self._checked:
            self._check_grid(item)
        position = _find(item, self.shared, "PlanePositionSequence")
        if not position:
            raise OutputError(
                f"{self.path}: frame {i + 1} references none of the Volume's source images and has "
                "no (0020,9113) Plane Position Sequence"
            )
        ipp = [float(v) for v in position[0].ImagePositionPatient]
        x, y, z = (self._inv @ np.array([*ipp, 1.0]))[:3]
        zi = int(round(z))
        if (
            abs(x) > _IN_PLANE_TOL
            or abs(y) > _IN_PLANE_TOL
            or abs(z - zi) > _SLICE_TOL
            or not 0 <= zi < self.volume.shape[0]
        ):
            raise OutputError(
                f"{self.path}: frame {i + 1} lies on none of the Volume's slices "
                f"(voxel position x={x:.2f}, y={y:.2f}, z={z:.2f})"
            )
        return zi
