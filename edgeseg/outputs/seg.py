"""Write a label map as a DICOM Segmentation (BINARY) with highdicom.

One segment per :class:`~edgeseg.spec.Label`, in ``labels_spec`` order (segment number 1, 2, …),
each frame referencing the source image (single-frame series) or source frame (enhanced
multi-frame) it was derived from. BINARY rather than LABELMAP because most viewers and PACS only
understand BINARY so far.

A label map without any foreground still gives a valid SEG (a negative result is a result): it
has every segment described and one empty frame per segment on the first slice, because a SEG
needs at least one frame and repeating empty frames on every slice would only cost space.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.atomic import atomic_path
from edgeseg.outputs._common import (
    OutputError,
    check_labels,
    check_labels_spec,
    segment_map,
)
from edgeseg.spec import Label
from edgeseg.volume import Volume

logger = logging.getLogger("edgeseg")

#: Segmented property type used when a Label names none: SNOMED CT "Tissue".
DEFAULT_PROPERTY_TYPE: tuple[str, str, str] = ("85756007", "SCT", "Tissue")

# DICOM VR limits on the strings we put in (LO is 64 characters).
_LO_MAX = 64


@dataclass
class _Placement:
    """How the planes of the pixel array handed to highdicom relate to the source images."""

    source_images: list[Any]  # pydicom Datasets, as highdicom wants them
    plane_positions: list[Any] | None  # None: highdicom copies them from source_images
    planes: np.ndarray  # (n, y, x) uint8 segment numbers, one plane per position


def write_seg(
    labels: np.ndarray,
    volume: Volume,
    labels_spec: Sequence[Label],
    path: str | Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = "edgeseg segmentation",
    manufacturer: str = "edgeseg",
    confidence: np.ndarray | None = None,
) -> Path:
    """Write ``labels`` as a DICOM SEG referencing the Volume's source instances.

    Parameters
    ----------
    labels:
        (z, y, x) uint8 label map aligned to ``volume`` (same shape, same slice order); 0 is
        background, other values must be described by ``labels_spec``.
    volume:
        the Volume read from DICOM; its ``headers``, ``sop_instance_uids`` and
        ``frame_numbers`` say which source image or frame each slice came from.
    labels_spec:
        the labels, in segment order: ``labels_spec[i]`` becomes segment ``i + 1`` with its
        name, colour (recommended display CIELab) and SNOMED category/type codes
        (:data:`DEFAULT_PROPERTY_TYPE` when ``Label.type`` is None).
    path:
        target file; written atomically (temporary file, then rename).
    algorithm_name, algorithm_version:
        recorded per segment (algorithm type AUTOMATIC, family "Artificial Intelligence").
    series_description, manufacturer:
        (0008,103E) Series Description and (0008,0070) Manufacturer of the SEG.
    confidence:
        optional (z, y, x) uint8 0–255 probability of the chosen label. A BINARY SEG has no
        place for per-voxel values, so only each segment's mean confidence (0–1) is kept, as
        the algorithm parameter ``edgeseg_mean_confidence``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        labels that do not fit the Volume or the spec, a Volume without DICOM headers (e.g.
        read from NIfTI), or source images highdicom cannot derive a SEG from.
    """
    hd = _highdicom()
    spec = check_labels_spec(labels_spec)
    labels = check_labels(labels, volume)
    # Label value → segment number, vectorised (the labels themselves when values are 1..N).
    segment_numbers = segment_map(labels, spec)
    for name, value in (("algorithm_name", algorithm_name), ("algorithm_version", algorithm_version)):
        if not value or len(str(value)) > _LO_MAX:
            raise OutputError(f"'{name}' must be 1 to {_LO_MAX} characters")
    if len(series_description) > _LO_MAX or len(manufacturer) > _LO_MAX:
        raise OutputError(f"'series_description' and 'manufacturer' must be at most {_LO_MAX} characters")

    mean_conf = _mean_confidence(confidence, segment_numbers, len(spec), volume)
    descriptions = [
        _segment_description(hd, i, lab, algorithm_name, algorithm_version, mean_conf)
        for i, lab in enumerate(spec, start=1)
    ]
    empty = not segment_numbers.any()
    if empty:
        logger.info("the label map has no foreground: writing a SEG with empty segments")
    placement = _placement(volume, segment_numbers, empty)

    first = placement.source_images[0] = _with_type2_patient_study(placement.source_images[0])
    try:
        with warnings.catch_warnings():
            # highdicom warns about odd person names *quoting the name*: keep patient data out of logs.
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=placement.source_images,
                pixel_array=placement.planes,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=_series_number(first),
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=manufacturer,
                manufacturer_model_name="edgeseg",
                software_versions=_software_version(),
                device_serial_number="0",
                plane_positions=placement.plane_positions,
                # All-empty input keeps its single plane of empty frames (see the module docstring).
                omit_empty_frames=not empty,
                series_description=series_description,
                specific_character_set=_character_set(hd, first),
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom names the attribute at fault; person-name checks only warn (silenced above).
        raise OutputError(f"cannot build a DICOM SEG from these source images: {exc}") from None

    import pydicom

    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    return Path(path)


# -- pieces -------------------------------------------------------------------------------------


def _highdicom():
    from edgeseg._optional import require

    return require("highdicom", extra="", feature="Writing DICOM SEG")


def _segment_description(hd, number: int, lab: Label, name: str, version: str, mean_conf) -> Any:
    from pydicom.sr.codedict import codes

    if not lab.name or len(lab.name) > _LO_MAX:
        raise OutputError(f"label {lab.value}: 'name' must be 1 to {_LO_MAX} characters")
    params = None if mean_conf is None else {"edgeseg_mean_confidence": f"{mean_conf[number]:.4f}"}
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=lab.name,
        segmented_property_category=_code(hd, lab.category, lab, "category"),
        segmented_property_type=_code(hd, lab.type or DEFAULT_PROPERTY_TYPE, lab, "type"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=str(name),
            family=codes.cid7162.ArtificialIntelligence,
            version=str(version),
            parameters=params,
        ),
        display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in lab.color)),
    )


def _code(hd, triple: Sequence[str], lab: Label, what: str) -> Any:
    try:
        value, scheme, meaning = (str(t) for t in triple)
        return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
    except (ValueError, TypeError) as exc:
        raise OutputError(
            f"label {lab.value}: '{what}' must be a (code value, scheme, meaning) triple such as "
            f"('85756007', 'SCT', 'Tissue'); {exc}"
        ) from None


def _mean_confidence(confidence, segment_numbers: np.ndarray, n: int, volume: Volume):
    """(n + 1,) mean confidence in 0..1 per segment number (index 0 unused), or None."""
    if confidence is None:
        return None
    confidence = np.asarray(confidence)
    if confidence.shape != volume.shape:
        raise OutputError(f"'confidence' must have the Volume's shape {volume.shape}; got {confidence.shape}")
    sums = np.bincount(segment_numbers.ravel(), weights=confidence.ravel(), minlength=n + 1)
    counts = np.bincount(segment_numbers.ravel(), minlength=n + 1)
    scale = 255.0 if np.issubdtype(confidence.dtype, np.integer) else 1.0
    return sums / np.maximum(counts, 1) / scale


def _placement(volume: Volume, segment_numbers: np.ndarray, empty: bool) -> _Placement:
    """Decide which source images highdicom gets and how the planes map onto them."""
    nz = volume.shape[0]
    if not volume.headers:
        raise OutputError(
            "a DICOM SEG needs the source DICOM headers, and this Volume has none (was it read "
            "from NIfTI or an array?); write NIfTI instead"
        )
    uids = [str(u) for u in volume.sop_instance_uids]
    frames = list(volume.frame_numbers) or [None] * nz
    if len(uids) != nz or len(frames) != nz:
        raise OutputError(
            f"the Volume names {len(uids)} source instances and {len(frames)} frame numbers "
            f"for {nz} slices; they must match one to one"
        )
    by_uid = {str(h.SOPInstanceUID): h for h in volume.headers}
    if any("FrameOfReferenceUID" not in h for h in volume.headers):
        raise OutputError(
            "the source images have no (0020,0052) Frame of Reference UID, which a DICOM SEG "
            "must share with them; write NIfTI instead"
        )
    missing = sum(u not in by_uid for u in set(uids))
    if missing:
        raise OutputError(f"{missing} source instance(s) of the Volume's slices have no header in 'headers'")

    if len(set(uids)) == nz and not any(_is_multiframe(by_uid[u]) for u in uids):
        # Classic series: slice z ↔ source image z, positions copied from the sources.
        sources = [by_uid[u] for u in uids]
        if not empty:
            return _Placement(sources, None, segment_numbers)
        positions = [_position_single(sources[0])]
        return _Placement(sources, positions, segment_numbers[:1])

    if len(set(uids)) == 1 and all(f is not None for f in frames):
        # One enhanced multi-frame instance: give highdicom the positions of the frames the
        # Volume uses; it matches them to source frames (ReferencedFrameNumber).
        source = by_uid[uids[0]]
        positions = [_position_multiframe(source, int(f)) for f in frames]
        if empty:
            return _Placement([source], positions[:1], segment_numbers[:1])
        return _Placement([source], positions, segment_numbers)

    raise OutputError(
        "the Volume's slices come from several multi-frame instances (or mix single- and "
        "multi-frame ones); writing a SEG for such a series is not supported"
    )


def _is_multiframe(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _position_single(ds):
    import highdicom as hd

    if "ImagePositionPatient" not in ds:
        raise OutputError(
            "a source image has no (0020,0032) Image Position (Patient); a SEG cannot be placed"
        )
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in ds.ImagePositionPatient],
    )


def _position_multiframe(ds, frame_number: int):
    import highdicom as hd

    ipp = None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and 0 < frame_number <= len(per_frame):
        item = per_frame[frame_number - 1]
        if "PlanePositionSequence" in item:
            ipp = item.PlanePositionSequence[0].ImagePositionPatient
    if ipp is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PlanePositionSequence" in shared:
            ipp = shared.PlanePositionSequence[0].ImagePositionPatient
    if ipp is None:
        raise OutputError(
            f"frame {frame_number} of the multi-frame source has no (0020,9113) Plane Position "
            "Sequence; a SEG cannot be placed on it"
        )
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in ipp],
    )


#: Type 2 attributes highdicom reads from the first source image; absent ones are added empty.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _with_type2_patient_study(ds) -> Any:
    """``ds``, or a copy with the missing type 2 patient/study attributes present but empty.

    Some sources leave them out (allowed for some IODs and common in anonymised data); the SEG
    must carry them (empty is valid). The Volume's header is never modified.
    """
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    from pydicom import Dataset

    copy = Dataset({tag: elem for tag, elem in ds.items()})
    for keyword in missing:
        setattr(copy, keyword, None)
    return copy


def _character_set(hd, source) -> Any:
    """The source's (0008,0005) Specific Character Set when highdicom accepts it, else UTF-8.

    Empty means the default repertoire (None: not written); a value highdicom does not know
    becomes ISO_IR 192, which can encode whatever pydicom decoded.
    """
    value = source.get("SpecificCharacterSet")
    values = [v for v in ([value] if isinstance(value, str) else list(value or [])) if v]
    if not values:
        return None
    try:
        for v in values:
            hd.SpecificCharacterSetValues(v)
    except ValueError:
        return "ISO_IR 192"
    return values[0] if len(values) == 1 else values


def _series_number(source) -> int:
    # A number next to the source series' one, so the SEG sorts after it in a viewer.
    try:
        number = int(source.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return min(max(number, 0) + 1000, 2**31 - 1)


def _software_version() -> str:
    from edgeseg import __version__

    return f"edgeseg {__version__}"
