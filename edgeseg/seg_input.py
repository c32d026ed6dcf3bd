"""DICOM SEG as ground truth: which SEG belongs to which DICOM series, and its label map in
a spec's label values.

Used by ``edgeseg validate`` (DICOM series + DICOM SEG pairs) and by calibration sets
(``--calib-labels`` with SEG files). A SEG is matched to its series by the Series Instance UID
it references (Referenced Series Sequence, as highdicom and most writers fill it); its
segments are mapped to the spec's labels by name when every segment label names one,
otherwise by segment number (``labels[i]`` is segment ``i + 1``, as
:func:`~edgeseg.outputs.write_seg` writes them). Messages name files, never patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg._exceptions import DicomInputError
from edgeseg.spec import Label
from edgeseg.volume import Volume


def referenced_series(ds) -> list[str]:
    """Series Instance UIDs a SEG dataset references (top level, then other studies)."""
    uids = [
        str(item.SeriesInstanceUID)
        for item in ds.get("ReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in item
    ]
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        uids.extend(
            str(item.SeriesInstanceUID)
            for item in study.get("ReferencedSeriesSequence", [])
            if "SeriesInstanceUID" in item
        )
    return list(dict.fromkeys(uids))


def find_seg_files(folder: str | Path) -> dict[str, Path]:
    """``{referenced Series Instance UID: SEG file}`` for the DICOM SEG files under ``folder``.

    Files that are not DICOM, or DICOM but not SEG (NIfTI label maps, notes), are passed over.

    Raises
    ------
    DicomInputError
        a SEG that references no series, or two SEG files for the same series.
    """
    import pydicom

    from edgeseg.dicom.scan import quiet_pydicom
    from edgeseg.nifti_input import is_nifti

    out: dict[str, Path] = {}
    root = Path(folder)
    files = (
        [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not is_nifti(p))
    )
    with quiet_pydicom():
        for f in files:
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            except Exception:  # not DICOM: not a SEG
                continue
            if str(ds.get("Modality", "")) != "SEG":
                continue
            uids = referenced_series(ds)
            if not uids:
                raise DicomInputError(
                    f, "this DICOM SEG has no Referenced Series Sequence, so no series can be matched to it"
                )
            for uid in uids:
                if uid in out and out[uid] != f:
                    raise DicomInputError(
                        f, f"this DICOM SEG references the same series as {out[uid]}; keep one SEG per series"
                    )
                out[uid] = f
    return out


def pair_with_series(segs: dict[str, Path], series: Sequence, images: str) -> list[tuple[object, Path]]:
    """Each SEG with the series part it references, in the series' order.

    ``series`` are :class:`~edgeseg.dicom.SeriesRef`; ``images`` says where they were found
    (for the message).

    Raises
    ------
    DicomInputError
        a SEG that references none of ``series``, or a series split into several parts (a SEG
        is read onto one volume).
    """
    parts: dict[str, list] = {}
    for ref in series:
        parts.setdefault(ref.series_instance_uid, []).append(ref)
    by_file: dict[Path, list[str]] = {}
    for uid, seg in segs.items():
        by_file.setdefault(seg, []).append(uid)
    for seg, uids in by_file.items():
        if not any(uid in parts for uid in uids):
            raise DicomInputError(seg, f"this DICOM SEG references no DICOM series found in {images}")
        split = next((uid for uid in uids if len(parts.get(uid, [])) > 1), None)
        if split is not None:
            raise DicomInputError(
                seg,
                f"the series this DICOM SEG references is split into {len(parts[split])} parts "
                "(gaps or mixed geometry); it can be matched to one volume only",
            )
    return [(ref, segs[ref.series_instance_uid]) for ref in series if ref.series_instance_uid in segs]


def read_seg_truth(path: str | Path, volume: Volume, labels: Sequence[Label]) -> np.ndarray:
    """The SEG at ``path`` as a (z, y, x) uint8 map on ``volume``'s grid, in ``labels``' values.

    Segments map to labels by name (case-insensitive) when every segment label names one of
    ``labels``, otherwise by number (segment ``i`` → ``labels[i - 1]``).

    Raises
    ------
    DicomInputError
        more segments than labels and names that do not match.
    OutputError
        from :func:`~edgeseg.outputs.read_seg_labels`: not a SEG, or frames off the volume's grid.
    """
    import pydicom

    from edgeseg.outputs import read_seg_labels

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    segments = [(int(s.SegmentNumber), str(s.get("SegmentLabel", ""))) for s in ds.get("SegmentSequence", [])]
    numbers = read_seg_labels(path, volume)  # segment numbers; 0 background
    by_name = {lab.name.lower(): int(lab.value) for lab in labels}
    table = np.zeros(max([n for n, _ in segments] + [int(numbers.max())]) + 1, dtype=np.uint8)
    if segments and all(name.lower() in by_name for _, name in segments):
        for number, name in segments:
            table[number] = by_name[name.lower()]
    else:
        if len(table) - 1 > len(labels):
            names = ", ".join(name or str(number) for number, name in segments)
            raise DicomInputError(
                path,
                f"this DICOM SEG has segments {names} but the spec's labels are "
                f"{', '.join(lab.name for lab in labels)}: segments are matched by label name, or by "
                "number when there are no more segments than labels",
            )
        for number in range(1, len(table)):
            table[number] = int(labels[number - 1].value)
    return table[numbers]
