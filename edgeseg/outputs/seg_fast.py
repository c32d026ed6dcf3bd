"""A BINARY DICOM SEG encoded directly, for sources whose slices are their own images or frames.

highdicom's ``Segmentation`` builds a pydicom Dataset per frame (four nested sequences each) and
pydicom then writes them element by element: on a 40-slice series that is most of the SEG's
time. The frames of a BINARY SEG differ only in a few values (source reference, position,
segment, dimension index), so this module encodes the per-frame functional groups, the source
references and the pixel data straight to Explicit VR Little Endian bytes, and builds the small
rest (patient, study, equipment, segments, shared groups) with pydicom and highdicom's own public
pieces. The file carries what highdicom's would, attribute for attribute (uids and times aside):
tests/test_seg_fast_writer.py compares the two on real series.

What highdicom does, and this module does the same way (highdicom 0.28, ``_init_multiframe_image``):

* frames go segment by segment (1..N); within a segment, planes are sorted by their distance
  along the volume normal (``get_normal_vector`` with the volume index convention), planes empty
  in every segment are left out before indexing, a plane empty for this segment is skipped;
* Dimension Index Values are (segment number, rank of the plane among the planes kept);
* pixels are bit-packed, least significant bit first, frames bit-contiguous (not padded to a
  byte each, PS3.5 8.1.1 / 8.2), zero bits up to the last byte and one pad byte to an even
  length; highdicom pads with ``b"0"`` (0x30), this module with 0x00 as PS3.5 7.1.1 says for OB;
* Spacing Between Slices from all planes' positions when the sources do not state it; Dimension
  Organization Type 3D only for one segment on regularly spaced planes;
* one segment: its Segment Identification goes in the shared functional groups.

Covered (:func:`refusal` names the reason otherwise, and the caller uses highdicom): positioned
classic single-frame stacks with a Frame of Reference, and one enhanced multi-frame instance
whose frames are the slices. Left to highdicom: an all-empty label map (one plane only), a
Siemens MOSAIC (planes placed by the affine, matched to the source by highdicom), sources without
Frame of Reference or positions, slide coordinates, frames of fewer than 8 pixels.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeseg.outputs.seg_sources import SegSources

#: Segmentation Storage (BINARY and FRACTIONAL share it).
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# VRs with a 4-byte length in Explicit VR (PS3.5 7.1.2).
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
# highdicom's check of Content Label (its stricter form of CS).
_CONTENT_LABEL_RE = re.compile(r"[A-Z][A-Z0-9_ ]{0,15}")
_ITEM = b"\xfe\xff\x00\xe0"
_PLAIN_DS = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def refusal(sources: SegSources, n_segments: int, empty: bool) -> str | None:
    """``None`` when :func:`encode_seg` writes these sources as highdicom would, else why not."""
    from highdicom import CoordinateSystemNames
    from highdicom.spatial import get_image_coordinate_system

    if empty:
        return "the label map is empty"
    if not sources.has_frame_of_reference:
        return "the sources have no Frame of Reference"
    images = sources.images
    first = images[0]
    planes = sources.planes
    if planes.ndim != 3 or planes.shape[0] == 0 or planes.dtype != np.uint8:
        return "the planes are not a (z, y, x) uint8 stack"
    if planes.shape[1] * planes.shape[2] < 8:
        return "frames of fewer than 8 pixels"
    multiframe = "PerFrameFunctionalGroupsSequence" in first
    if multiframe != (sources.plane_positions is not None):
        # Positions given for single-frame images: a MOSAIC (or an empty map's one plane).
        return "planes are not the source images or frames themselves"
    if multiframe and (
        len(images) != 1
        or len(sources.plane_positions or []) != planes.shape[0]
        or len(sources.frame_numbers or []) != planes.shape[0]
    ):
        return "not one multi-frame source with one frame per plane"
    if not multiframe and len(images) != planes.shape[0]:
        return "not one source image per plane"
    if get_image_coordinate_system(first) != CoordinateSystemNames.PATIENT:
        return "the sources are not in patient coordinates"
    modality = str(first.get("Modality") or "")
    if not _CONTENT_LABEL_RE.fullmatch(f"{modality}_SEG"):
        return "the source Modality does not make a valid Content Label"
    key = _same_series_key(first)
    iop = _floats(_value(first, "ImageOrientationPatient")) if not multiframe else None
    for image in images:
        if _same_series_key(image) != key:
            return "the sources differ in study, series, size or Frame of Reference"
        if not multiframe and _floats(_value(image, "ImageOrientationPatient")) != iop:
            return "the sources do not share one orientation"
    if (int(first.Rows), int(first.Columns)) != planes.shape[1:]:
        return "the planes do not have the sources' rows and columns"
    if n_segments < 1:
        return "no segments"
    return None


def encode_seg(
    sources: SegSources,
    descriptions: Sequence[Any],
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    series_description: str,
    specific_character_set: Any,
    segments_key: tuple | None = None,
) -> bytes:
    """The SEG file's bytes (preamble, file meta, dataset) for sources :func:`refusal` accepts.

    ``descriptions``: highdicom ``SegmentDescription`` items numbered 1..N in order;
    ``sources.planes`` holds segment numbers 0..N per voxel. ``segments_key``: a hashable that
    determines the descriptions (the labels, the algorithm, …): their encoding is then reused
    by the next SEG with the same key and character set (a model writes the same segments for
    every series; pydicom takes ~0.5 ms a segment to encode them).
    """
    import highdicom as hd
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
    from pydicom.valuerep import format_number_as_ds

    first = sources.images[0]
    planes = sources.planes
    n_planes, rows, columns = planes.shape
    n_segments = len(descriptions)
    multiframe = sources.plane_positions is not None
    geometry = _multiframe_geometry(sources) if multiframe else _classic_geometry(sources)
    orientation, measures, planar, references = geometry
    position_texts = [text for text, _ in planar]
    positions = np.array([values for _, values in planar], dtype=np.float64)
    iop = [float(v) for v in orientation[0].ImageOrientationPatient]

    # Plane order: by distance along the normal; equal distances are duplicates to highdicom.
    normal = get_normal_vector(iop, index_convention=VOLUME_INDEX_CONVENTION)
    distances, sort_index = np.unique(positions @ normal, return_index=True)
    if len(distances) != n_planes:
        raise ValueError("Plane positions must not contain duplicates.")
    if "SpacingBetweenSlices" not in measures[0]:
        spacing, _ = get_volume_positions(image_positions=positions, image_orientation=iop)
        if spacing is not None:
            measures[0].SpacingBetweenSlices = format_number_as_ds(spacing)

    present, pixel_data = _masks(planes, n_segments, sort_index)
    any_segment = present.any(axis=0)
    kept = [int(p) for p in sort_index if any_segment[p]]  # planes with any foreground, sorted
    rank = {p: i for i, p in enumerate(kept, start=1)}

    header = _header(
        first,
        descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        series_description=series_description,
        specific_character_set=specific_character_set,
    )
    header.Rows, header.Columns = rows, columns
    dimension_uid = hd.UID()
    header.DimensionIndexSequence = [
        _dataset(
            DimensionIndexPointer=0x0062000B,  # Referenced Segment Number
            FunctionalGroupPointer=0x0062000A,  # Segment Identification Sequence
            DimensionOrganizationUID=dimension_uid,
            DimensionDescriptionLabel="Referenced Segment Number",
        ),
        _dataset(
            DimensionIndexPointer=0x00200032,  # Image Position (Patient)
            FunctionalGroupPointer=0x00209113,  # Plane Position Sequence
            DimensionOrganizationUID=dimension_uid,
            DimensionDescriptionLabel="Image Position Patient",
        ),
    ]
    header.DimensionOrganizationSequence = [_dataset(DimensionOrganizationUID=dimension_uid)]
    shared = _dataset(PlaneOrientationSequence=orientation, PixelMeasuresSequence=measures)
    if n_segments == 1:
        shared.SegmentIdentificationSequence = [_dataset(ReferencedSegmentNumber=1)]
        included = [p for p in range(n_planes) if present[0, p]]  # input order, as highdicom
        if len(included) > 1:
            spacing, _ = get_volume_positions(
                image_positions=positions[included], image_orientation=iop, sort=False
            )
            if spacing is not None and spacing > 0.0:
                header.DimensionOrganizationType = "3D"
    header.SharedFunctionalGroupsSequence = [shared]

    # Frames: (segment, plane) pairs in highdicom's order.
    frames = [(s, p) for s in range(1, n_segments + 1) for p in kept if present[s - 1, p]]
    header.NumberOfFrames = len(frames)
    uids = [
        (
            _ascii(_value(im, "SOPClassUID")),
            _ascii(_value(im, "SOPInstanceUID")),
            str(_value(im, "SeriesInstanceUID")),
        )
        for im in sources.images
    ]  # SOP class, SOP instance, series of each source image
    references_items = [_el(0x00081150, "UI", c) + _el(0x00081155, "UI", i) for c, i, _ in uids]
    raw = {
        0x00081115: _referenced_series(references_items, [series for _, _, series in uids]),
        0x00082112: _seq(0x00082112, references_items),
        0x00620002: _segment_sequence(
            descriptions, segments_key, header.get("SpecificCharacterSet", "iso8859")
        ),
        0x52009230: _per_frame_groups(frames, rank, position_texts, references, n_segments),
        0x7FE00010: _el(0x7FE00010, "OB", pixel_data),
    }
    return _file_bytes(header, raw)


# -- geometry as highdicom derives it -----------------------------------------------------------


def _classic_geometry(sources: SegSources):
    """Orientation, measures, per-plane position (text, values) and source reference of a
    classic stack: everything copied from the images (highdicom's "positions copied" case)."""
    import highdicom as hd

    first = sources.images[0]
    coords = hd.CoordinateSystemNames.PATIENT
    orientation = hd.PlaneOrientationSequence(
        coordinate_system=coords, image_orientation=first.ImageOrientationPatient
    )
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=first.PixelSpacing,
        slice_thickness=first.SliceThickness,
        spacing_between_slices=first.get("SpacingBetweenSlices", None),
    )
    positions = [_position(im) for im in sources.images]
    references = [
        (str(_value(im, "SOPClassUID")), str(_value(im, "SOPInstanceUID")), None) for im in sources.images
    ]
    return orientation, measures, positions, references


def _multiframe_geometry(sources: SegSources):
    """The same for one enhanced multi-frame view: its shared groups and, per plane, its frame
    (the view moves every frame the Volume does not use off the stack, so highdicom matches
    each plane to exactly that frame and copies the frame's position)."""
    import highdicom as hd

    view = sources.images[0]
    shared = view.SharedFunctionalGroupsSequence[0]
    orientation = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_orientation=shared.PlaneOrientationSequence[0].ImageOrientationPatient,
    )
    source_measures = shared.PixelMeasuresSequence[0]
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=source_measures.PixelSpacing,
        slice_thickness=source_measures.SliceThickness,
        spacing_between_slices=source_measures.get("SpacingBetweenSlices", None),
    )
    per_frame = view.PerFrameFunctionalGroupsSequence
    sop_class, sop_instance = str(view.SOPClassUID), str(view.SOPInstanceUID)
    positions, references = [], []
    for plane, frame in zip(sources.plane_positions or [], sources.frame_numbers or [], strict=True):
        position = _ds_text(plane[0].ImagePositionPatient)
        if _ds_text(per_frame[frame - 1].PlanePositionSequence[0].ImagePositionPatient) != position:
            raise ValueError(f"plane position and frame {frame} of the multi-frame source differ")
        positions.append(position)
        references.append((sop_class, sop_instance, frame))
    return orientation, measures, positions, references


# -- the parts encoded as bytes -----------------------------------------------------------------


def _per_frame_groups(frames, rank, position_texts, references, n_segments: int) -> bytes:
    """(5200,9230) Per-Frame Functional Groups Sequence: the per-plane parts encoded once."""
    from pydicom.sr.codedict import codes

    purpose = _seq(0x0040A170, [_code(codes.cid7202.SourceImageForImageProcessingOperation)])
    derivation_code = _seq(0x00089215, [_code(codes.cid7203.SegmentationImageDerivation)])
    derivation: dict[int, bytes] = {}
    position: dict[int, bytes] = {}
    identification = {
        s: _seq(0x0062000A, [_el(0x0062000B, "US", struct.pack("<H", s))]) if n_segments > 1 else b""
        for s in range(1, n_segments + 1)
    }
    items = []
    for s, p in frames:
        if p not in derivation:
            sop_class, sop_instance, frame = references[p]
            source = _el(0x00081150, "UI", _ascii(sop_class)) + _el(0x00081155, "UI", _ascii(sop_instance))
            if frame is not None:
                source += _el(0x00081160, "IS", str(frame).encode())
            source += _el(0x0028135A, "CS", b"YES") + purpose
            derivation[p] = _seq(0x00089124, [_seq(0x00082112, [source]) + derivation_code])
            position[p] = _seq(0x00209113, [_el(0x00200032, "DS", position_texts[p].encode())])
        content = _seq(0x00209111, [_el(0x00209157, "UL", struct.pack("<2I", s, rank[p]))])
        items.append(derivation[p] + content + position[p] + identification[s])
    return _seq(0x52009230, items)


def _masks(planes: np.ndarray, n_segments: int, sort_index) -> tuple[np.ndarray, bytes]:
    """(segment, plane) presence, and the pixel data: each segment's non-empty planes in sorted
    order (highdicom's frame order), bit-packed as one stream (LSB first, frames not padded to a
    byte each), zero bits to the last byte, padded to an even length. One comparison per
    segment, on the planes with any foreground only."""
    n, rows, columns = planes.shape
    flat = planes.reshape(n, rows * columns)
    order = np.asarray(sort_index, dtype=np.intp)
    order = order[flat.any(axis=1)[order]]
    sub = flat[order]  # the non-empty planes, sorted
    whole_bytes = (rows * columns) % 8 == 0  # frames end on a byte: pack each segment on its own
    present = np.zeros((n_segments, n), dtype=bool)
    parts = []
    for s in range(1, n_segments + 1):
        # One segment: the values are 0 and 1 already.
        mask = sub.view(np.bool_) if n_segments == 1 else sub == s
        here = mask.any(axis=1)
        present[s - 1, order[here]] = True
        frames = (mask if here.all() else mask[here]).reshape(-1)
        parts.append(np.packbits(frames, bitorder="little") if whole_bytes else frames)
    if whole_bytes:
        packed = np.concatenate(parts).tobytes()
    else:
        packed = np.packbits(np.concatenate(parts), bitorder="little").tobytes()
    return present, (packed + b"\x00" if len(packed) % 2 else packed)


def _referenced_series(items: list[bytes], series_uids: list[str]) -> bytes:
    """(0008,1115) Referenced Series Sequence: the sources' references grouped by series, first
    seen first."""
    series: dict[str, list[bytes]] = {}
    for item, uid in zip(items, series_uids, strict=True):
        series.setdefault(uid, []).append(item)
    grouped = [_seq(0x0008114A, refs) + _el(0x0020000E, "UI", _ascii(uid)) for uid, refs in series.items()]
    return _seq(0x00081115, grouped)


def _code(code) -> bytes:
    return (
        _el(0x00080100, "SH", code.value.encode())
        + _el(0x00080102, "SH", code.scheme_designator.encode())
        + _el(0x00080104, "LO", code.meaning.encode())
    )


# -- the rest: a small pydicom dataset ------------------------------------------------------------


def _header(first, descriptions, **kw: Any):
    """Everything but the per-frame groups, the source references and the pixels, as highdicom's
    Segmentation sets it (base SOP class, copied patient/study/specimen, equipment, image)."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    ds = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=kw["series_instance_uid"],
        series_number=kw["series_number"],
        sop_instance_uid=kw["sop_instance_uid"],
        instance_number=1,
        sop_class_uid=SEG_SOP_CLASS,
        manufacturer=kw["manufacturer"],
        modality="SEG",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=first.PatientID,
        # Copied from the source below with the patient module; passing it here would only make
        # highdicom log a name it finds odd (patient data in a log).
        patient_name=None,
        patient_birth_date=first.PatientBirthDate,
        patient_sex=first.PatientSex,
        accession_number=first.AccessionNumber,
        study_id=first.StudyID,
        study_date=first.StudyDate,
        study_time=first.StudyTime,
        referring_physician_name=first.get("ReferringPhysicianName"),
        manufacturer_model_name=kw["manufacturer_model_name"],
        device_serial_number=kw["device_serial_number"],
        software_versions=kw["software_versions"],
        series_description=kw["series_description"],
        specific_character_set=kw["specific_character_set"],
    )
    ds.copy_specimen_information(first)
    ds.copy_patient_and_study_information(first)
    ds._add_contributing_equipment(None, first)  # highdicom's own (acquisition + highdicom)
    ds.SegmentationType = "BINARY"
    ds.ContentLabel = f"{first.Modality}_SEG"
    ds.ContentDescription = None
    ds.SegmentsOverlap = "NO"  # one segment number per voxel
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", None)
    ds.BitsAllocated = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = first.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in first:
                ds.add(first[keyword])
    return ds


#: (segments key, character set) → the encoded (0062,0002) Segment Sequence, for a few models.
_SEGMENT_SEQUENCES: dict[tuple, bytes] = {}


def _segment_sequence(descriptions, key: tuple | None, encodings) -> bytes:
    """(0062,0002) Segment Sequence as pydicom writes it, remembered per ``key``."""
    from pydicom import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import correct_ambiguous_vr, write_data_element

    cache_key = None if key is None else (key, str(encodings))
    cached = _SEGMENT_SEQUENCES.get(cache_key) if cache_key is not None else None
    if cached is not None:
        return cached
    ds = Dataset()
    ds.SegmentSequence = list(descriptions)
    correct_ambiguous_vr(ds, True)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, ds[0x00620002], encodings)
    data = fp.getvalue()
    if cache_key is not None:
        if len(_SEGMENT_SEQUENCES) >= 16:
            _SEGMENT_SEQUENCES.clear()
        _SEGMENT_SEQUENCES[cache_key] = data
    return data


def _file_bytes(header, raw: dict[int, bytes]) -> bytes:
    """Preamble, file meta and the dataset: pydicom writes the header's elements (as its
    ``write_dataset`` does: ambiguous VRs resolved, the SEG's character set), in tag order
    between the pre-encoded ones."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, header.file_meta, enforce_standard=True)
    correct_ambiguous_vr(header, True)
    encodings = header.get("SpecificCharacterSet", "iso8859")
    pending = sorted(raw)
    for tag in sorted(header.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths are not written (as pydicom)
        while pending and pending[0] < tag:
            fp.write(raw[pending.pop(0)])
        if pending and pending[0] == tag:
            raise ValueError(f"the header already has {tag}")
        write_data_element(fp, header[tag], encodings)
    for tag in pending:
        fp.write(raw[tag])
    return fp.getvalue()


# -- Explicit VR Little Endian encoding -----------------------------------------------------------


def _el(tag: int, vr: str, value: bytes) -> bytes:
    """One data element; odd values padded (UI and OB with 0x00, text with a space)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _seq(tag: int, items: Sequence[bytes]) -> bytes:
    """A sequence of defined length whose items (already encoded contents) have defined lengths."""
    return _el(tag, "SQ", b"".join(_ITEM + struct.pack("<I", len(i)) + i for i in items))


def _ascii(value) -> bytes:
    return str(value).encode("ascii")


def _ds_text(values) -> tuple[str, list[float]]:
    """Decimal strings as highdicom writes them (``DS(value, auto_format=True)``: a valid
    original string kept, anything else formatted), joined, and their float values."""
    from pydicom.valuerep import DS, is_valid_ds

    texts, numbers = [], []
    for v in values:
        text = getattr(v, "original_string", None)
        if text is None or not is_valid_ds(text):
            v = DS(v, auto_format=True)
            text = v.original_string
        texts.append(text)
        numbers.append(float(v))
    return "\\".join(texts), numbers


def _same_series_key(image):
    """What highdicom requires all source images to share."""
    return tuple(
        _value(image, k)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "FrameOfReferenceUID")
    )


def _value(ds, keyword: str):
    """The element's value as pydicom gives it, read from the raw bytes where they are plain
    (:func:`edgeseg.dicom.elements.get`): a SEG reads a few values of every slice, and pydicom
    converts each element it is asked for."""
    from edgeseg.dicom import elements

    return elements.get(ds, keyword)


def _position(image) -> tuple[str, list[float]]:
    """Image Position (Patient) as :func:`_ds_text` gives it, from the raw bytes when they are
    plain decimal strings of valid DS length (pydicom would keep those strings as they are)."""
    from pydicom.dataelem import RawDataElement

    elem = image._dict.get(0x00200032)
    raw = elem.value if elem is not None and elem.__class__ is RawDataElement else None
    if raw and elem.VR in (None, "DS") and raw.isascii():
        texts = [part.strip(b" ") for part in raw.rstrip(b" \x00").split(b"\\")]
        if all(_PLAIN_DS.fullmatch(t) and len(t) <= 16 for t in texts):
            return "\\".join(t.decode() for t in texts), [float(t) for t in texts]
    return _ds_text(image.ImagePositionPatient)


def _floats(values):
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def _dataset(**values):
    from pydicom import Dataset

    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item
