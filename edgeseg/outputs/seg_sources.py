"""What highdicom is told about the images a SEG is derived from: consistent *views* of them.

The geometry of record is the :class:`~edgeseg.volume.Volume`'s: the reader already decided which
images make one stack and within what tolerance. highdicom checks the source headers again, more
strictly (bit-identical orientations, pixel measures in the shared functional groups, a Frame of
Reference, valid dates), and refuses real scanner output. So highdicom never sees the Volume's
headers themselves but views of them: shallow copies, changed only where needed, that tell the
same geometry as the Volume. The Volume's headers (the user's datasets) are never modified.

What a view changes, and why:

* classic single-frame stacks: one ImageOrientationPatient for every slice (GE writes cosines that
  differ in the 7th digit between slices; the reader accepted them as one orientation, the SEG's
  Plane Orientation is shared); Pixel Spacing and Slice Thickness where they are missing or empty
  (a SEG's Pixel Measures need both; the Volume's spacing is what the reader used);
* enhanced multi-frame instances: functional groups rebuilt from what the Volume used (pixel
  measures and orientation shared, a position per frame: Philips puts all of them per frame),
  so every SEG frame matches exactly one source frame (ReferencedFrameNumber);
* Siemens MOSAIC: the one instance is the source image; the SEG's planes are placed by the
  Volume's affine (one tile per slice, so a frame cannot match the mosaic pixel for pixel);
* the first view's patient, study and equipment attributes, which the SEG copies: dates and times
  that do not parse (a zero year), a Patient's Sex outside M/F/O, other values invalid for their
  VR become empty (they are type 2 or 3 there), missing type 2 ones are added empty, and Patient
  Identity Removed YES without a method gets "not stated in the source images" (type 1C);
* Frame of Reference: kept when the sources have a valid one and real positions. A source with
  positions but no Frame of Reference UID (invalid for CT/MR, common after anonymisation), or one
  that repeats the Study Instance UID (one UID for two things), gets one derived from its study and series UIDs (the same on every run and for
  every part of the series), so the SEG still carries the geometry and the per-frame references.
  A single unpositioned image whose IOD does not need one (radiographs, ultrasound, secondary
  capture) gives a SEG without Frame of Reference, as the SEG IOD allows; frames that only have
  the positions the reader assumed get a Frame of Reference of their own, so the assumed geometry
  never claims to be the source's.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeseg.dicom import elements as el
from edgeseg.outputs._common import OutputError
from edgeseg.volume import Volume

#: Type 2 attributes highdicom reads from the first source image; absent ones are added empty.
TYPE2_COPIED = (
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

# UIDs a SEG must repeat exactly to stay linked to its source: never blanked, even if odd.
_KEEP = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID"}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR"}
# The source's equipment, which highdicom copies into the SEG's Contributing Equipment Sequence.
_EQUIPMENT = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
)
# Loose on purpose: leading zeros in a component are invalid but common in old scanners' UIDs,
# and a SEG can still repeat them; anything else is not a UID a SEG can reference.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
# Planes of frames the Volume does not use are moved this far off the stack (in slices), so a
# SEG plane never matches them (a 4D instance repeats positions in other volumes).
_AWAY = 100_000


@dataclass
class SegSources:
    """Everything highdicom's Segmentation needs about the sources, consistent by construction."""

    images: list[Any]  # views (pydicom Datasets), never the Volume's own headers
    planes: np.ndarray  # (n, y, x) uint8 segment numbers, one per plane
    plane_positions: list[Any] | None  # None: highdicom copies them from the views
    plane_orientation: Any | None
    pixel_measures: Any | None
    has_frame_of_reference: bool
    # Enhanced multi-frame: the source frame number (1-based) of each plane; None otherwise.
    frame_numbers: list[int] | None = None


def seg_sources(volume: Volume, segment_numbers: np.ndarray, empty: bool) -> SegSources:
    """Views of the Volume's sources and the planes to encode (see the module docstring).

    ``empty``: the label map has no foreground; one plane (the first slice) is encoded.

    Raises
    ------
    OutputError
        a Volume without DICOM headers, or whose slices cannot be traced to them.
    """
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
    missing = sum(u not in by_uid for u in set(uids))
    if missing:
        raise OutputError(f"{missing} source instance(s) of the Volume's slices have no header in 'headers'")
    if not str(_get(volume.headers[0], "StudyInstanceUID") or "").strip():
        raise OutputError(
            "the source images have no (0020,000D) Study Instance UID, and a DICOM SEG must belong "
            "to the study of its source images"
        )
    # One part of one series: the study, series and SOP class UIDs are those of its first image.
    first = volume.headers[0]
    for keyword, values in (
        ("StudyInstanceUID", [_get(first, "StudyInstanceUID")]),
        ("SeriesInstanceUID", [_get(first, "SeriesInstanceUID")]),
        ("SOPClassUID", [_get(first, "SOPClassUID")]),
        ("SOPInstanceUID", list(by_uid)),
    ):
        if not all(_is_uid(v) for v in values):
            raise OutputError(
                f"the source images' {keyword} is not a DICOM UID (digits and dots, at most 64 "
                "characters), and a DICOM SEG must repeat it to reference them"
            )

    if len(set(uids)) == nz and not any(_is_multiframe(by_uid[u]) for u in uids):
        return _classic(volume, [by_uid[u] for u in uids], segment_numbers, empty)
    if len(set(uids)) == 1:
        source = by_uid[uids[0]]
        if _is_multiframe(source) and all(f is not None for f in frames):
            return _multiframe(volume, source, [int(f) for f in frames], segment_numbers, empty)
        if not _is_multiframe(source) and all(f is None for f in frames):
            return _mosaic(volume, source, segment_numbers, empty)
    raise OutputError(
        "the Volume's slices come from several multi-frame instances (or mix single- and "
        "multi-frame ones), which one DICOM SEG cannot reference frame by frame"
    )


# -- the three source layouts -----------------------------------------------------------------


def _classic(volume: Volume, sources: list, segment_numbers: np.ndarray, empty: bool) -> SegSources:
    """One single-frame image per slice (slice z ↔ source z)."""
    import highdicom as hd

    positioned = all(
        _floats(_get(s, "ImagePositionPatient")) and _floats(_get(s, "ImageOrientationPatient"))
        for s in sources
    )
    if not positioned and len(sources) == 1 and not _iod_needs_frame_of_reference(sources[0]):
        # A radiograph, ultrasound or secondary capture image: no patient coordinates to state.
        view = _first_view(sources[0])
        for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
            if keyword in view:
                delattr(view, keyword)
        if "PixelSpacing" in view and not _positive(view.PixelSpacing, 2):
            delattr(view, "PixelSpacing")  # "0\\0" and the like: no pixel measures rather than wrong ones
        return SegSources([view], segment_numbers[:1], None, None, None, False)

    for_uid = _frame_of_reference(volume, sources, positioned)
    # One orientation for every slice: the first's, as the reader's affine uses it.
    iop = list(sources[0].ImageOrientationPatient) if positioned else _volume_iop(volume)
    iop_key = _floats(iop)
    spacing = _pixel_spacing(volume)
    thickness = _thickness(volume)
    views = []
    for z, src in enumerate(sources):
        changes: dict[str, Any] = {}
        if for_uid != _get(src, "FrameOfReferenceUID"):
            changes["FrameOfReferenceUID"] = for_uid
        if not positioned:
            changes["ImagePositionPatient"] = _volume_ipp(volume, z)
        if _floats(_get(src, "ImageOrientationPatient")) != iop_key:
            changes["ImageOrientationPatient"] = iop
        if not _positive(_get(src, "PixelSpacing"), 2):
            changes["PixelSpacing"] = spacing
        if not _positive(_get(src, "SliceThickness"), 1):
            changes["SliceThickness"] = thickness
        view = _first_view(src) if z == 0 else (_copy(src) if changes else src)
        for keyword, value in changes.items():
            _put(view, keyword, value)
        views.append(view)
    if not empty:
        return SegSources(views, segment_numbers, None, None, None, True)
    position = hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in views[0].ImagePositionPatient],
    )
    return SegSources(views, segment_numbers[:1], [position], None, None, True)


def _multiframe(
    volume: Volume, source, frames: list[int], segment_numbers: np.ndarray, empty: bool
) -> SegSources:
    """Slices that are frames of one enhanced multi-frame instance (any subset, any order)."""
    import highdicom as hd
    from pydicom import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    n_frames = int(_get(source, "NumberOfFrames") or 0) or max(frames)
    if max(frames) > n_frames or min(frames) < 1:
        raise OutputError(
            f"the Volume uses frame {max(frames)} of a multi-frame source that has {n_frames}; "
            "a SEG cannot reference it"
        )
    shared = _fg_item(source, "SharedFunctionalGroupsSequence", 0)
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []

    def group(frame: int, keyword: str, attribute: str):
        """The attribute from the frame's functional group, else the shared one."""
        for item in (per_frame[frame - 1] if frame <= len(per_frame) else None, shared):
            if item is not None and keyword in item and item[keyword].value:
                value = _get(item[keyword].value[0], attribute)
                if value is not None and value != "":
                    return value
        return None

    first = frames[0]
    positions = [group(f, "PlanePositionSequence", "ImagePositionPatient") for f in frames]
    positioned = all(p is not None for p in positions) and group(
        first, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    if not positioned:
        positions = [None] * len(frames)
    positions = [_ds_values(p) if p is not None else _volume_ipp(volume, z) for z, p in enumerate(positions)]
    iop = (
        _ds_values(group(first, "PlaneOrientationSequence", "ImageOrientationPatient"))
        if positioned
        else _volume_iop(volume)
    )
    spacing = group(first, "PixelMeasuresSequence", "PixelSpacing")
    spacing = _ds_values(spacing) if _positive(spacing, 2) else _pixel_spacing(volume)
    thickness = group(first, "PixelMeasuresSequence", "SliceThickness")
    thickness = _ds_values([thickness])[0] if _positive(thickness, 1) else _thickness(volume)

    # The view's functional groups say only what the Volume used: the used frames at their
    # positions, every other frame far off the stack so that no SEG plane matches it.
    by_frame = dict(zip(frames, positions))
    step = volume.affine[:3, 2]
    view_frames = []
    for f in range(1, n_frames + 1):
        item = Dataset()
        ipp = by_frame.get(f)
        if ipp is None:
            ipp = _ds_values(volume.affine[:3, 3] + step * (_AWAY + f))
        item.PlanePositionSequence = DicomSequence([_dataset(ImagePositionPatient=ipp)])
        view_frames.append(item)
    view_shared = Dataset()
    view_shared.PlaneOrientationSequence = DicomSequence([_dataset(ImageOrientationPatient=iop)])
    view_shared.PixelMeasuresSequence = DicomSequence(
        [_dataset(PixelSpacing=spacing, SliceThickness=thickness)]
    )
    view = _first_view(source)
    _put(view, "FrameOfReferenceUID", _frame_of_reference(volume, [source], bool(positioned)))
    _put(view, "NumberOfFrames", n_frames)
    _put(view, "SharedFunctionalGroupsSequence", DicomSequence([view_shared]))
    _put(view, "PerFrameFunctionalGroupsSequence", DicomSequence(view_frames))

    coords = hd.CoordinateSystemNames.PATIENT
    plane_positions = [
        hd.PlanePositionSequence(coordinate_system=coords, image_position=p) for p in positions
    ]
    orientation = hd.PlaneOrientationSequence(coordinate_system=coords, image_orientation=iop)
    measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)
    if empty:
        return SegSources(
            [view], segment_numbers[:1], plane_positions[:1], orientation, measures, True, frames[:1]
        )
    return SegSources([view], segment_numbers, plane_positions, orientation, measures, True, frames)


def _mosaic(volume: Volume, source, segment_numbers: np.ndarray, empty: bool) -> SegSources:
    """Slices untiled from one Siemens MOSAIC image: planes placed by the Volume's affine."""
    import highdicom as hd

    positioned = _has(source, "ImagePositionPatient") and _has(source, "ImageOrientationPatient")
    view = _first_view(source)
    _put(view, "FrameOfReferenceUID", _frame_of_reference(volume, [source], positioned))
    iop = _volume_iop(volume)
    _put(view, "ImageOrientationPatient", iop)
    if not positioned:
        _put(view, "ImagePositionPatient", _volume_ipp(volume, 0))
    spacing, thickness = _pixel_spacing(volume), _thickness(volume)
    _put(view, "PixelSpacing", spacing)
    _put(view, "SliceThickness", thickness)
    coords = hd.CoordinateSystemNames.PATIENT
    n = 1 if empty else volume.shape[0]
    plane_positions = [
        hd.PlanePositionSequence(coordinate_system=coords, image_position=_volume_ipp(volume, z))
        for z in range(n)
    ]
    orientation = hd.PlaneOrientationSequence(coordinate_system=coords, image_orientation=iop)
    measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)
    return SegSources([view], segment_numbers[:n], plane_positions, orientation, measures, True)


# -- Frame of Reference -------------------------------------------------------------------------


def _frame_of_reference(volume: Volume, sources: Sequence, positioned: bool) -> str:
    """The sources' Frame of Reference UID when it is valid and they have positions, else one
    derived from the study and series (per part when the positions are only assumed)."""
    first = sources[0]
    value = str(_get(first, "FrameOfReferenceUID") or "").strip()
    study = str(_get(first, "StudyInstanceUID") or "")
    if positioned and _is_uid(value) and value != study:
        return value
    key = [study, str(_get(first, "SeriesInstanceUID") or volume.series_instance_uid)]
    if not positioned:
        key += [str(u) for u in dict.fromkeys(volume.sop_instance_uids)]
    digest = hashlib.sha256("\\".join(["edgeseg frame of reference", *key]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16]).int}"


def _iod_needs_frame_of_reference(ds) -> bool:
    try:
        from highdicom._standard_utils import ModuleUsageValues, get_module_usage

        return get_module_usage("frame-of-reference", str(ds.SOPClassUID)) == ModuleUsageValues.MANDATORY
    except (KeyError, AttributeError, ImportError, ValueError):
        return True  # unknown IOD: give it a Frame of Reference, the safe side for a SEG


# -- the first view: patient and study attributes the SEG copies --------------------------------


def _first_view(ds):
    """A copy of ``ds`` whose patient/study attributes a SEG can copy as they are."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    view = _copy(ds)
    for keyword in TYPE2_COPIED:
        if keyword not in view:
            _put(view, keyword, None)
    for keyword in _copied_keywords(str(_get(ds, "SOPClassUID") or "")):
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in view:
            continue
        vr = view.get_item(tag).VR
        if vr in (None, "UN"):
            vr = dictionary_VR(tag)
        if vr not in _STRING_VRS:
            continue  # sequences are copied as they are
        try:
            elem = view[tag]  # converts a raw element with the source's character set
        except Exception:  # noqa: BLE001 (a value pydicom cannot even decode: not copied)
            del view[tag]
            continue
        if elem.value in (None, "") or _valid(elem):
            continue
        # A new element: the source's own element objects are shared with the view.
        view[tag] = DataElement(tag, elem.VR, None)
    sex = str(_get(view, "PatientSex") or "").strip().upper()
    _put(view, "PatientSex", sex if sex in ("M", "F", "O") else None)
    if str(_get(view, "PatientIdentityRemoved") or "").strip().upper() == "YES" and not (
        _has(view, "DeidentificationMethod") or _has(view, "DeidentificationMethodCodeSequence")
    ):
        # Type 1C once identity is removed; the flag matters more to a PACS than the method.
        _put(view, "DeidentificationMethod", "not stated in the source images")
    return view


@functools.lru_cache(maxsize=32)
def _copied_keywords(sop_class_uid: str) -> tuple[str, ...]:
    """Root attributes highdicom copies from the first source into a SEG: its IOD's patient and
    study modules, the specimen module, the equipment, and the few it reads by name."""
    keywords = dict.fromkeys(TYPE2_COPIED)
    keywords.update(dict.fromkeys(("LossyImageCompressionRatio", "PositionReferenceIndicator")))
    keywords.update(dict.fromkeys(_EQUIPMENT))
    try:  # highdicom's own tables of the standard (private, as in 0.28): else the named ones only
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )

        modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
        attributes = get_module_attribute_map()
    except (ImportError, KeyError):
        modules, attributes = [], {}
    for module in modules:
        if module["ie"] in ("Patient", "Study") or module["key"] == "specimen":
            keywords.update(dict.fromkeys(a["keyword"] for a in attributes[module["key"]] if not a["path"]))
    return tuple(k for k in keywords if k not in _KEEP)


def _valid(elem) -> bool:
    """Whether every value of a string element is valid for its VR (dates and times must parse)."""
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DA, DT, TM, validate_value

    parse = {"DA": DA, "DT": DT, "TM": TM}.get(elem.VR)
    values = list(elem.value) if isinstance(elem.value, (MultiValue, list, tuple)) else [elem.value]
    try:
        for value in values:
            text = "" if value is None else str(value)
            if text:
                validate_value(elem.VR, text, config.RAISE)
                if parse is not None:
                    parse(text)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


# -- small helpers ------------------------------------------------------------------------------


def _copy(ds):
    """A shallow copy: the same elements (raw ones stay raw), safe to set attributes on."""
    from pydicom import Dataset

    return Dataset({tag: elem for tag, elem in ds.items()})


def _put(view, keyword: str, value) -> None:
    """Set an attribute of a view with a new element (``setattr`` would change the value of the
    element object the view shares with the source dataset)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    tag = tag_for_keyword(keyword)
    view[tag] = DataElement(tag, dictionary_VR(tag), value)


def _is_multiframe(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(_get(ds, "NumberOfFrames") or 1) > 1


def _get(ds, keyword: str):
    """``ds.get(keyword)``, None for a value pydicom cannot decode. Plain UI, DS, IS, US and CS
    values are parsed from the raw bytes (:func:`edgeseg.dicom.elements.get`: pydicom's value,
    without converting the element), so writing a SEG does not convert every slice's header."""
    try:
        return el.get(ds, keyword)
    except Exception:  # noqa: BLE001 (a value pydicom cannot decode counts as absent)
        return None


def _has(ds, keyword: str) -> bool:
    value = _get(ds, keyword)
    return value is not None and value != "" and (not hasattr(value, "__len__") or len(value) > 0)


def _floats(values) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def _is_uid(value) -> bool:
    text = str(value or "")
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _positive(values, n: int) -> bool:
    """Whether ``values`` are ``n`` finite positive numbers (a spacing or thickness)."""
    if values is None or (isinstance(values, str) and not values.strip()):
        return False
    if isinstance(values, (str, bytes, int, float)):
        values = [values]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return len(numbers) == n and all(np.isfinite(v) and v > 0 for v in numbers)


def _fg_item(ds, keyword: str, index: int):
    seq = _get(ds, keyword)
    return seq[index] if seq is not None and len(seq) > index else None


def _dataset(**values):
    from pydicom import Dataset

    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _ds_values(values) -> list[str] | None:
    """Numbers as DS strings (at most 16 characters), for values highdicom and pydicom accept."""
    from pydicom.valuerep import format_number_as_ds

    if values is None:
        return None
    return [format_number_as_ds(float(v)) for v in values]


def _volume_ipp(volume: Volume, z: int) -> list[str]:
    return _ds_values(volume.affine[:3, 3] + volume.affine[:3, 2] * z)


def _volume_iop(volume: Volume) -> list[str]:
    d = volume.direction
    return _ds_values(np.concatenate([d[:, 0], d[:, 1]]))


def _pixel_spacing(volume: Volume) -> list[str]:
    _, sy, sx = volume.spacing
    return _ds_values([sy, sx])


def _thickness(volume: Volume) -> str:
    return _ds_values([volume.spacing[0]])[0]
