"""The Volume type: a stack of slices with its geometry, as every stage of edgeseg sees it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image in scanner geometry.

    Attributes
    ----------
    stored:
        (z, y, x) array of *stored* pixel values as decoded from the files: int16/uint16 for
        most CT/MR (what the GPU path copies to the device, 2 bytes a voxel), or float32
        when a Modality LUT sequence already turned them into modality values.
        z runs along the slice normal (row × column direction), y down the rows, x along them.
    slope, intercept:
        (z,) float64 per-slice modality rescale; ``stored * slope + intercept`` gives modality
        values (HU for CT).
    spacing:
        (z, y, x) voxel spacing in mm; z is the distance between slice centres.
    affine:
        4×4 float64 mapping homogeneous voxel indices (x, y, z, 1) — column, row, slice — to
        patient coordinates in mm, DICOM LPS.
    sop_instance_uids, frame_numbers:
        per slice, the source instance and (for multi-frame instances) its 1-based frame number.
    headers:
        per source instance (not per slice), the pydicom Dataset without pixel data; DICOM SEG
        writing references them.
    series_instance_uid, modality:
        copied from the headers.
    warnings:
        what assembly noticed but accepted (uneven spacing within tolerance, tilt corrected…).
    """

    stored: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    sop_instance_uids: list[str] = field(default_factory=list)
    frame_numbers: list[int | None] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)
    series_instance_uid: str = ""
    modality: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stored.ndim != 3:
            raise ValueError(f"Volume 'stored' must be (z, y, x); got shape {self.stored.shape}")
        nz = self.stored.shape[0]
        self.slope = np.broadcast_to(np.asarray(self.slope, dtype=np.float64), (nz,)).copy()
        self.intercept = np.broadcast_to(np.asarray(self.intercept, dtype=np.float64), (nz,)).copy()
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        affine: np.ndarray | None = None,
    ) -> Volume:
        """Wrap a (z, y, x) array of modality values (NIfTI, numpy) as a Volume.

        Without ``affine``, an axis-aligned LPS geometry with the given spacing is assumed.
        """
        array = np.asarray(array)
        if affine is None:
            sz, sy, sx = (float(s) for s in spacing)
            affine = np.diag([sx, sy, sz, 1.0])
        return cls(
            stored=array,
            slope=np.ones(array.shape[0]),
            intercept=np.zeros(array.shape[0]),
            spacing=tuple(spacing),  # type: ignore[arg-type]
            affine=affine,
        )

    # -- views --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.stored.shape)  # type: ignore[return-value]

    @property
    def has_identity_rescale(self) -> bool:
        return bool(np.all(self.slope == 1.0) and np.all(self.intercept == 0.0))

    def modality_values(self, out: np.ndarray | None = None) -> np.ndarray:
        """(z, y, x) float32 modality values (``stored * slope + intercept``).

        Writes into ``out`` when given (a preallocated float32 buffer of the same shape).
        """
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        np.copyto(out, self.stored, casting="unsafe")
        if not self.has_identity_rescale:
            out *= self.slope.astype(np.float32)[:, None, None]
            out += self.intercept.astype(np.float32)[:, None, None]
        return out

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose columns are the unit LPS directions of the x, y and z index axes."""
        a = self.affine[:3, :3]
        return a / np.linalg.norm(a, axis=0, keepdims=True)

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def describe(self) -> str:
        """One line for logs; contains no patient information."""
        sz, sy, sx = self.spacing
        return (
            f"{self.modality or 'image'} {self.shape[2]}x{self.shape[1]}x{self.shape[0]} "
            f"spacing {sx:.3g}x{sy:.3g}x{sz:.3g} mm, stored {self.stored.dtype}"
        )
