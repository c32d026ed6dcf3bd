"""Write a label map as a DICOM Segmentation (BINARY).

Two writers make the same file: :mod:`edgeseg.outputs.seg_fast` encodes the SEG directly where it
covers the sources (classic stacks and enhanced multi-frame instances, a non-empty map: the
common case, 4–5× faster), highdicom's ``Segmentation`` writes everything else (empty maps,
MOSAIC, sources without Frame of Reference). ``write_seg(..., writer=...)`` can insist on one;
which one ran is logged at debug level.

One segment per :class:`~edgeseg.spec.Label`, in ``labels_spec`` order (segment number 1, 2, …),
each frame referencing the source image (single-frame series) or source frame (enhanced
multi-frame) it was derived from; a Siemens MOSAIC's frames are placed by the Volume's affine and
the SEG references the MOSAIC instance. BINARY rather than LABELMAP because most viewers and PACS
only understand BINARY so far.

Any Volume the reader assembled gets a SEG: the writers are given consistent views of the sources
(:mod:`edgeseg.outputs.seg_sources` says what they change and why, Frame of Reference included),
never the Volume's headers themselves. A SEG is refused only where none can reference the
sources: no Study Instance UID, or source UIDs that are not UIDs.

A label map without any foreground still gives a valid SEG (a negative result is a result): it
has every segment described and one empty frame per segment on the first slice, because a SEG
needs at least one frame and repeating empty frames on every slice would only cost space.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.atomic import atomic_path
from edgeseg.outputs import seg_fast
from edgeseg.outputs._common import (
    OutputError,
    check_labels,
    check_labels_spec,
    segment_map,
)
from edgeseg.outputs.seg_sources import seg_sources
from edgeseg.spec import Label
from edgeseg.volume import Volume

logger = logging.getLogger("edgeseg")

#: Segmented property type used when a Label names none: SNOMED CT "Tissue".
DEFAULT_PROPERTY_TYPE: tuple[str, str, str] = ("85756007", "SCT", "Tissue")

# DICOM VR limits on the strings we put in (LO is 64 characters).
_LO_MAX = 64


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
    writer: str = "auto",
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
    writer:
        ``"auto"`` (default): :mod:`edgeseg.outputs.seg_fast` where it covers the sources
        (classic stacks and enhanced multi-frame instances with a non-empty map), highdicom's
        ``Segmentation`` otherwise; ``"fast"`` or ``"highdicom"`` to insist on one (``"fast"``
        raises :class:`OutputError` where it does not apply). Both write the same attributes.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        labels that do not fit the Volume or the spec, a Volume without DICOM headers (e.g.
        read from NIfTI), or sources a SEG cannot reference (no Study Instance UID, UIDs that
        are not UIDs); one sentence, without patient data.
    """
    if writer not in ("auto", "fast", "highdicom"):
        raise OutputError(f"'writer' must be 'auto', 'fast' or 'highdicom'; got {writer!r}")
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
    try:
        sources = seg_sources(volume, segment_numbers, empty)
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # A header value the reader did not need and pydicom cannot convert.
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise OutputError(
            f"the source headers cannot describe this Volume for a DICOM SEG ({reason})"
        ) from None
    first = sources.images[0]
    try:
        refusal = "asked for" if writer == "highdicom" else seg_fast.refusal(sources, len(spec), empty)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        refusal = "a source header value it checks cannot be read"  # highdicom says which
    if refusal is None:
        logger.debug("DICOM SEG: fast writer (%d planes)", len(sources.planes))
        key = (
            tuple(
                (lab.value, lab.name, tuple(lab.color), tuple(lab.category), lab.type and tuple(lab.type))
                for lab in spec
            ),
            str(algorithm_name),
            str(algorithm_version),
            None if mean_conf is None else tuple(f"{c:.4f}" for c in mean_conf),
        )
        return _write_fast(hd, sources, descriptions, key, path, first, manufacturer, series_description)
    if writer == "fast":
        raise OutputError(f"the fast SEG writer does not cover these sources: {refusal}")
    logger.debug("DICOM SEG: highdicom writer (%s)", refusal)
    try:
        with warnings.catch_warnings():
            # highdicom warns about odd person names *quoting the name*: keep patient data out of logs.
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=sources.images,
                pixel_array=sources.planes,
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
                plane_positions=sources.plane_positions,
                plane_orientation=sources.plane_orientation,
                pixel_measures=sources.pixel_measures,
                # All-empty input keeps its single plane of empty frames (see the module docstring).
                omit_empty_frames=not empty,
                series_description=series_description,
                specific_character_set=_character_set(hd, first),
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError) as exc:
        # highdicom names the attribute at fault; person-name checks only warn (silenced above).
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise OutputError(f"highdicom cannot build a DICOM SEG from these source images ({reason})") from None
    if not sources.has_frame_of_reference and "PatientOrientation" not in seg:
        # Type 2C in General Image when there is no Image Orientation (Patient) to state.
        seg.PatientOrientation = first.get("PatientOrientation") or None

    import pydicom

    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    return Path(path)


def _write_fast(
    hd, sources, descriptions, segments_key, path, first, manufacturer: str, series_description: str
) -> Path:
    try:
        data = seg_fast.encode_seg(
            sources,
            descriptions,
            series_instance_uid=hd.UID(),
            series_number=_series_number(first),
            sop_instance_uid=hd.UID(),
            manufacturer=manufacturer,
            manufacturer_model_name="edgeseg",
            software_versions=_software_version(),
            device_serial_number="0",
            series_description=series_description,
            specific_character_set=_character_set(hd, first),
            segments_key=segments_key,
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError) as exc:
        # The same errors, said the same way, as from highdicom's Segmentation.
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        raise OutputError(f"highdicom cannot build a DICOM SEG from these source images ({reason})") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# -- pieces -------------------------------------------------------------------------------------


def _highdicom():
    from edgeseg._optional import require

    hd = require("highdicom", extra="", feature="Writing DICOM SEG")
    _remember_iod_lookups()
    return hd


def _remember_iod_lookups() -> None:
    """Make highdicom's "is this attribute in this IOD?" lookups remember their answers.

    highdicom (0.28) asks them once or twice per source image (is the image multi-frame?) and
    per SEG (content date, does the source IOD have pixels?) and scans the IOD's module tables
    each time, ~0.3 ms: a fifth of the highdicom SEG write time of a 176-slice series, a tenth
    of the fast writer's on a small one. The answers depend only on the attribute and the SOP
    class, which the caches key on; a lookup with ``exclude_path_elements`` is left as it is.
    The modules that imported a lookup by name get the remembering one too.
    """
    import sys

    try:
        import highdicom._standard_utils as standard
    except ImportError:
        return
    original = getattr(standard, "is_attribute_in_iod", None)
    if original is None or getattr(original, "_edgeseg_cached", False):
        return
    cached = functools.lru_cache(maxsize=1024)(original)

    @functools.wraps(original)
    def is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None):
        if exclude_path_elements is None:
            return cached(str(attribute), str(sop_class_uid))
        return original(attribute, sop_class_uid, exclude_path_elements)

    replacements = {"is_attribute_in_iod": (original, is_attribute_in_iod)}
    has_pixels = getattr(standard, "does_iod_have_pixel_data", None)
    if has_pixels is not None:
        cached_pixels = functools.lru_cache(maxsize=256)(has_pixels)

        @functools.wraps(has_pixels)
        def does_iod_have_pixel_data(sop_class_uid):
            return cached_pixels(str(sop_class_uid))

        replacements["does_iod_have_pixel_data"] = (has_pixels, does_iod_have_pixel_data)
    is_attribute_in_iod._edgeseg_cached = True  # type: ignore[attr-defined]
    for module in [m for name, m in sys.modules.items() if name.startswith("highdicom")]:
        for name, (old, new) in replacements.items():
            if getattr(module, name, None) is old:
                setattr(module, name, new)


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


def _character_set(hd, source) -> Any:
    """The SEG's (0008,0005) Specific Character Set: the source's single plain term when
    highdicom knows it, None for the default repertoire, else ISO_IR 192 (UTF-8).

    Code extensions (several values, ISO 2022 escapes) become UTF-8: the values the SEG copies
    were decoded by pydicom with the source's character set and UTF-8 encodes any of them,
    whereas repeating an ISO 2022 set in the SEG would need the escape sequences repeated too.
    """
    value = source.get("SpecificCharacterSet")
    values = [str(v).strip() for v in ([value] if isinstance(value, str) else list(value or []))]
    if not any(values):
        return None
    if len(values) == 1 and not values[0].startswith("ISO 2022"):
        try:
            return hd.SpecificCharacterSetValues(values[0]).value
        except ValueError:
            pass
    return "ISO_IR 192"


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
