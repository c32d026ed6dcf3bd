"""Slice geometry: orientation, ordering along the slice normal, spacing checks and the affine.

The rules (see the Volume docstring for the affine convention):

* slices are ordered by ``dot(ImagePositionPatient, normal)`` with ``normal = row × column``
  cosines — never by InstanceNumber, which scanners number in acquisition order;
* the slice step is ``(last − first) / (n − 1)``; its length is the z spacing;
* a step not parallel to the normal (gantry tilt, sheared stack) is kept in the affine as is,
  so every voxel still maps to its true position, and a warning says so;
* steps that differ by more than :data:`WARN_REL` warn, by more than :data:`REFUSE_REL`
  refuse (a missing slice or a mixed stack), and positions off a straight line refuse.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

#: Relative deviation of a slice step from the median step that is silently accepted
#: (header rounding) or accepted with a warning; beyond REFUSE_REL assembly is refused.
WARN_REL = 0.01
REFUSE_REL = 0.10
#: Orientation cosines equal within this are "the same orientation".
IOP_TOL = 1e-3
#: Two slices whose positions along the normal differ by less than this (mm) are duplicates.
DUP_TOL_MM = 1e-3
#: Step directions within this angle of the normal are "not tilted" (degrees).
TILT_TOL_DEG = 0.5


class GeometryError(ValueError):
    """The slice positions cannot form a regular stack; ``str()`` is one plain sentence."""


def orientation(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row cosine, column cosine and slice normal (row × column) from ImageOrientationPatient.

    The arrays are read-only: every slice of a series shares one orientation, so the result is
    remembered for the orientations seen last.
    """
    return _orientation(np.asarray(iop, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=64)
def _orientation(key: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.frombuffer(key, dtype=np.float64)
    row = iop[:3].copy()
    col = iop[3:].copy()
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 0.5 or nc < 0.5:
        raise GeometryError("ImageOrientationPatient has a zero-length direction cosine")
    row, col = row / nr, col / nc
    if abs(float(row @ col)) > 0.01:
        raise GeometryError("ImageOrientationPatient row and column cosines are not perpendicular")
    normal = np.cross(row, col)
    normal = normal / np.linalg.norm(normal)
    for arr in (row, col, normal):
        arr.flags.writeable = False
    return row, col, normal


def same_orientation(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(np.asarray(a) - np.asarray(b))) <= IOP_TOL)


def _median(values: np.ndarray) -> float:
    """``float(np.median(values))`` (the same value), without np.median's set-up and first-call
    import of numpy.ma."""
    ordered = np.sort(values)
    mid = ordered.shape[0] // 2
    if ordered.shape[0] % 2:
        return float(ordered[mid])
    return float(np.mean(ordered[mid - 1 : mid + 1]))


@dataclass
class StackGeometry:
    affine: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm
    warnings: list[str] = field(default_factory=list)


def stack_geometry(
    positions: np.ndarray,
    iop: np.ndarray,
    pixel_spacing: tuple[float, float],
    single_slice_step: float,
) -> StackGeometry:
    """Affine and spacing for slices already sorted along the normal.

    Parameters
    ----------
    positions:
        (n, 3) ImagePositionPatient of each slice, sorted, without duplicates.
    iop:
        (6,) ImageOrientationPatient shared by every slice.
    pixel_spacing:
        (row spacing, column spacing) = (y, x) in mm.
    single_slice_step:
        z spacing to use when there is only one slice (SliceThickness or 1.0).

    Raises
    ------
    GeometryError
        When the positions are not evenly spaced on a line.
    """
    row, col, normal = orientation(iop)
    dy, dx = pixel_spacing
    warnings: list[str] = []
    positions = np.asarray(positions, dtype=np.float64)
    n = positions.shape[0]
    if n == 1:
        step = normal * single_slice_step
    else:
        steps = np.diff(positions, axis=0)
        lengths = np.linalg.norm(steps, axis=1)
        med = _median(lengths)
        if med <= DUP_TOL_MM:
            raise GeometryError("slices share one position; they do not form a 3D stack")
        step = (positions[-1] - positions[0]) / (n - 1)
        # Every step must point the same way: positions on one straight line.
        unit = step / np.linalg.norm(step)
        off_line = np.linalg.norm(steps - np.outer(steps @ unit, unit), axis=1)
        if float(off_line.max()) > max(0.05 * med, 0.01):
            raise GeometryError(
                f"slice positions do not lie on a straight line (up to {off_line.max():.2f} mm off); "
                "the series mixes stacks or is curved"
            )
        dev = float(np.max(np.abs(lengths - med)) / med)
        lo, hi = float(lengths.min()), float(lengths.max())
        if dev > REFUSE_REL:
            raise GeometryError(
                f"slice spacing is uneven ({lo:.3g} to {hi:.3g} mm, median {med:.3g} mm), "
                "probably a missing slice or gap; refusing to stack it as a regular volume"
            )
        if dev > WARN_REL:
            warnings.append(
                f"uneven slice spacing ({lo:.4g} to {hi:.4g} mm, median {med:.4g} mm) accepted; "
                "the mean step is used"
            )
        cos = float(abs(unit @ normal))
        angle = float(np.degrees(np.arccos(min(1.0, cos))))
        if angle > TILT_TOL_DEG:
            warnings.append(
                f"gantry tilt / sheared stack: the slice step is {angle:.1f} degrees off the slice "
                "normal; the affine uses the actual step, so the voxel grid is not orthogonal"
            )
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return StackGeometry(affine=affine, spacing=(float(np.linalg.norm(step)), dy, dx), warnings=warnings)
