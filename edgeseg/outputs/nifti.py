"""Write labels (and the image) as NIfTI-1 with the RAS affine nibabel, ITK-SNAP and 3D Slicer expect.

A Volume is (z, y, x) with an affine from (x, y, z) voxel indices to DICOM LPS mm. NIfTI arrays
are indexed (i, j, k) = (x, y, z) with an affine to RAS mm, so the array is transposed and the
first two world axes negated; nothing is resampled or flipped in voxel space, so the label file
and the image file overlay voxel for voxel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.atomic import atomic_path
from edgeseg.outputs._common import OutputError, check_labels
from edgeseg.volume import Volume

#: LPS ↔ RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(volume: Volume) -> np.ndarray:
    """4×4 float64 affine from NIfTI voxel indices (i, j, k) = (x, y, z) to RAS mm."""
    return LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)


def write_nifti(labels: np.ndarray, volume: Volume, path: str | Path) -> Path:
    """Write a (z, y, x) label map as a uint8 NIfTI-1 label image aligned with ``volume``.

    Parameters
    ----------
    labels:
        (z, y, x) uint8 label map with the Volume's shape.
    volume:
        the Volume the labels belong to (its affine places them).
    path:
        target file, normally ``.nii.gz``; written atomically.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    labels = check_labels(labels, volume)
    img = _image(labels, volume, intent="label")
    return _save(img, path)


def write_confidence_nifti(confidence: np.ndarray, volume: Volume, path: str | Path) -> Path:
    """Write a (z, y, x) uint8 confidence map (0–255, probability of the chosen label) as NIfTI-1."""
    confidence = check_labels(confidence, volume, name="confidence")
    return _save(_image(confidence, volume, intent=None), path)


def write_volume_nifti(volume: Volume, path: str | Path) -> Path:
    """Write the Volume's modality values (HU for CT) as a float32 NIfTI-1 image.

    Same grid and affine as :func:`write_nifti`, so a user can overlay the labels on it.
    """
    img = _image(volume.modality_values(), volume, intent=None)
    return _save(img, path)


def _image(data_zyx: np.ndarray, volume: Volume, *, intent: str | None):
    from edgeseg._optional import require

    nib = require("nibabel", extra="", feature="Writing NIfTI")
    affine = ras_affine(volume)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise OutputError("the Volume's affine is singular or not finite; cannot write NIfTI")
    # (z, y, x) → (x, y, z): a transposed view; nibabel writes it in Fortran order, as NIfTI wants.
    img = nib.Nifti1Image(data_zyx.transpose(2, 1, 0), affine)
    header = img.header
    header.set_xyzt_units("mm", "sec")
    # sform carries the exact affine (shear from gantry tilt included); qform is nibabel's
    # closest rigid fit, which is what tools that only read qform can represent.
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    if intent is not None:
        header.set_intent(intent)
    return img


def _save(img, path: str | Path) -> Path:
    import nibabel as nib

    target = Path(path)
    # nibabel picks gzip from the file name, so the temporary name must keep the suffix.
    with atomic_path(target) as tmp:
        suffix = ".nii.gz" if target.name.lower().endswith(".nii.gz") else ".nii"
        staged = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(img, str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return target
