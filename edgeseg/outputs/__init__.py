"""Outputs: a label map and its Volume → DICOM SEG, NIfTI, PNG quick-look.

:func:`write_outputs` is what the CLI calls; the writers are usable on their own. Every file is
written atomically (temporary file in the same folder, then rename) and named from a caller-given
``stem`` (a hash of the SeriesInstanceUID, say), never from patient data. highdicom, nibabel and
Pillow are imported only when a writer runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg.outputs._common import OutputError, check_stem
from edgeseg.outputs.nifti import ras_affine, write_confidence_nifti, write_nifti, write_volume_nifti
from edgeseg.outputs.png import write_png_montage
from edgeseg.outputs.seg import DEFAULT_PROPERTY_TYPE, write_seg
from edgeseg.outputs.seg_read import read_seg_labels
from edgeseg.spec import Label
from edgeseg.volume import Volume

#: Formats :func:`write_outputs` knows, and the files each one writes (``{stem}`` replaced).
FORMATS: dict[str, tuple[str, ...]] = {
    "seg": ("{stem}_seg.dcm",),
    "nifti": ("{stem}_labels.nii.gz", "{stem}_image.nii.gz"),
    "png": ("{stem}_montage.png",),
}


def write_outputs(
    result_labels: np.ndarray,
    volume: Volume,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("seg",),
    labels_spec: Sequence[Label],
    stem: str,
    algorithm_name: str,
    algorithm_version: str,
    confidence: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write the requested outputs of one segmented series into ``out_dir``.

    Parameters
    ----------
    result_labels:
        (z, y, x) uint8 label map aligned to ``volume``.
    volume:
        the segmented Volume (DICOM headers are needed for ``"seg"``).
    out_dir:
        folder for the files (created if missing).
    formats:
        any of ``"seg"``, ``"nifti"``, ``"png"`` (see :data:`FORMATS`).
    labels_spec:
        the model's labels (names, colours, codes), in segment order.
    stem:
        base file name chosen by the caller; letters, digits, ``.``, ``_``, ``-`` only.
    algorithm_name, algorithm_version:
        recorded in the SEG.
    confidence:
        optional (z, y, x) uint8 0–255; summarised per segment in the SEG and, with
        ``"nifti"``, also written as ``{stem}_confidence.nii.gz``.

    Returns
    -------
    dict[str, pathlib.Path]
        ``"seg"``, ``"nifti"`` (labels), ``"nifti_image"``, ``"nifti_confidence"`` and
        ``"png"``, for the files written.

    Raises
    ------
    OutputError
        unknown format, unusable stem, or any writer's own error. The SEG is written last: when
        it alone cannot be made, the other formats are on disk, the error says so and its
        ``written`` attribute holds their paths.
    """
    wanted = list(dict.fromkeys(formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown or not wanted:
        raise OutputError(f"unknown output format(s) {unknown or wanted}; known: {sorted(FORMATS)}")
    stem = check_stem(stem)
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if "nifti" in wanted:
        written["nifti"] = write_nifti(result_labels, volume, out / f"{stem}_labels.nii.gz")
        written["nifti_image"] = write_volume_nifti(volume, out / f"{stem}_image.nii.gz")
        if confidence is not None:
            written["nifti_confidence"] = write_confidence_nifti(
                confidence, volume, out / f"{stem}_confidence.nii.gz"
            )
    if "png" in wanted:
        written["png"] = write_png_montage(volume, result_labels, out / f"{stem}_montage.png", labels_spec)
    if "seg" in wanted:
        # Last, so that a source no SEG can be made from still gets its other formats.
        try:
            written["seg"] = write_seg(
                result_labels,
                volume,
                labels_spec,
                out / f"{stem}_seg.dcm",
                algorithm_name=algorithm_name,
                algorithm_version=algorithm_version,
                confidence=confidence,
            )
        except OutputError as exc:
            if not written:
                raise
            err = OutputError(f"{exc}; the {', '.join(sorted(written))} output(s) were written")
            err.written = dict(written)  # type: ignore[attr-defined]
            raise err from None
    return written


__all__ = [
    "DEFAULT_PROPERTY_TYPE",
    "FORMATS",
    "OutputError",
    "ras_affine",
    "read_seg_labels",
    "write_confidence_nifti",
    "write_nifti",
    "write_outputs",
    "write_png_montage",
    "write_seg",
    "write_volume_nifti",
]
