"""NIfTI images as input (research data, calibration sets): NIfTI → Volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg._exceptions import DicomInputError
from edgeseg._optional import require
from edgeseg.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI image as a Volume (modality values as float32, LPS geometry).

    nibabel arrays are indexed (i, j, k) with an affine to RAS; a Volume is (z, y, x) with an
    affine to LPS, so the array is transposed and the first two world axes negated.
    """
    nib = require("nibabel", extra="", feature="Reading NIfTI")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DicomInputError(path, f"cannot read NIfTI image ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomInputError(path, f"expected a 3D image, got shape {data.shape}")
    slope, inter = img.dataobj.slope, img.dataobj.inter  # keep raw ints + rescale, as for DICOM
    stored = np.ascontiguousarray(data.transpose(2, 1, 0))
    if not np.issubdtype(stored.dtype, np.integer):
        stored = stored.astype(np.float32)
    ras = np.asarray(img.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    zooms = img.header.get_zooms()[:3]
    nz = stored.shape[0]
    return Volume(
        stored=stored,
        slope=np.full(nz, 1.0 if slope is None or np.isnan(slope) else float(slope)),
        intercept=np.full(nz, 0.0 if inter is None or np.isnan(inter) else float(inter)),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        affine=lps,
        modality="",
    )


def nifti_labels(path: str | Path) -> np.ndarray:
    """A NIfTI label image as (z, y, x) uint8, matching :func:`read_nifti`'s layout."""
    nib = require("nibabel", extra="", feature="Reading NIfTI")
    img = nib.load(str(path))
    return np.ascontiguousarray(np.asarray(img.dataobj).astype(np.uint8).transpose(2, 1, 0))
