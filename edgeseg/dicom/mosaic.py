"""Siemens MOSAIC: a whole 3D volume tiled into one 2D image, un-tiled into a Volume.

Siemens scanners before XA store an EPI volume (fMRI, DWI) as one instance whose pixel data is a
square grid of ``ceil(sqrt(n))`` × ``ceil(sqrt(n))`` tiles, ``n`` = NumberOfImagesInMosaic from the
CSA Image Header (0029,xx10). The standard header describes the mosaic as if it were one large
slice, so three facts come from the CSA header and the tile size:

* the slices are the first ``n`` tiles, row by row, stored in the order of the CSA
  SliceNormalVector (which may point against ``row × column``);
* ImagePositionPatient is the top-left pixel of the *whole mosaic*, computed by the scanner
  from the centre of the first slice with the mosaic's size, so the first tile's corner is
  ``IPP + row·dx·(C − c)/2 + col·dy·(R − r)/2`` (mosaic R×C, tile r×c pixels);
* slice k lies at ``first + k · spacing · SliceNormalVector``, spacing from
  SpacingBetweenSlices (centre to centre), else SliceThickness.

Each MOSAIC instance is one 3D volume: a MOSAIC series of an fMRI run or a DWI acquisition
(one instance per time point or diffusion direction) is split by the scan into one part per
instance, as classic 4D series are split into one part per repetition.

The CSA header is parsed here (both the "SV10" format and the older one without the magic),
with bounds checks on every length, so a damaged header is a one-sentence reason, never a
struct.error.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom import elements as el
from edgeseg.dicom.frames import frame_infos, n_frames
from edgeseg.dicom.geometry import GeometryError, orientation, stack_geometry
from edgeseg.dicom.pixels import apply_modality_lut_sequence, decode_frames, has_modality_lut, target_dtype
from edgeseg.volume import Volume

CSA_CREATOR = "SIEMENS CSA HEADER"
MR_HEADER_CREATOR = "SIEMENS MR HEADER"
# Sanity bounds from the format descriptions (real image headers hold about a hundred tags).
_MAX_TAGS = 1000
_MAX_ITEMS = 1000
_TAG_HEAD = struct.Struct("<64si4s3i")  # name, vm, vr, syngodt, n_items, xx (77 or 205)
_ITEM_HEAD = struct.Struct("<4i")
#: More slices than any scanner tiles into one image: a larger count is a damaged header.
MAX_IMAGES = 4096
#: |cos| between SliceNormalVector and row × column below which the header contradicts itself.
NORMAL_COS_MIN = 0.999


class CsaError(ValueError):
    """A CSA header cannot be parsed; ``str()`` is one sentence."""


def is_mosaic(ds: Dataset) -> bool:
    """True when ImageType says MOSAIC (Siemens' tiled volume)."""
    image_type = el.get(ds, "ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(v).strip().upper() == "MOSAIC" for v in image_type)


# -- CSA header ---------------------------------------------------------------------------


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("latin-1").strip()


def parse_csa(data: bytes) -> dict[str, list[str]]:
    """Tag name -> its non-empty values (as text) of a Siemens CSA header.

    Both layouts share the tag records (name, VM, VR, SyngoDT, item count); they differ in the
    8-byte "SV10" prefix and in how an item gives its length: the second of its four leading
    int32 in SV10, the first minus the first tag's item count in the old layout (as SPM reads
    it). Values are padded to 4 bytes.

    Raises
    ------
    CsaError
        When a count or length is out of bounds or the data ends inside a record.
    """
    data = bytes(data)
    sv10 = data[:4] == b"SV10"
    pos = 8 if sv10 else 0
    if len(data) < pos + 8:
        raise CsaError("the CSA header is too short to hold a tag count")
    n_tags = struct.unpack_from("<I", data, pos)[0]
    pos += 8  # tag count, then an unused word (77)
    if not 0 < n_tags <= _MAX_TAGS:
        raise CsaError(f"the CSA header claims {n_tags} tags")
    tags: dict[str, list[str]] = {}
    first_n_items: int | None = None
    for _ in range(n_tags):
        if pos + _TAG_HEAD.size > len(data):
            raise CsaError("the CSA header ends inside a tag record")
        name, vm, _vr, _dt, n_items, _xx = _TAG_HEAD.unpack_from(data, pos)
        pos += _TAG_HEAD.size
        if not 0 <= n_items <= _MAX_ITEMS or vm < 0:
            raise CsaError(f"a CSA tag claims {n_items} items")
        if first_n_items is None:
            first_n_items = n_items
        values: list[str] = []
        for index in range(n_items):
            if pos + _ITEM_HEAD.size > len(data):
                raise CsaError("the CSA header ends inside an item record")
            x0, x1, _x2, _x3 = _ITEM_HEAD.unpack_from(data, pos)
            pos += _ITEM_HEAD.size
            length = x1 if sv10 else x0 - first_n_items
            if length < 0 or pos + length > len(data):
                if not sv10:
                    break  # the old layout ends a tag's items this way (SPM does the same)
                raise CsaError("a CSA item is longer than the header")
            text = _cstr(data[pos : pos + length])
            pos += length + (-length) % 4
            if text and (vm == 0 or index < vm):
                values.append(text)
        tags[_cstr(name)] = values
    return tags


def _private_value(ds: Dataset, group: int, creator: str, offset: int):
    try:
        return ds.private_block(group, creator)[offset].value
    except Exception:  # absent, or a damaged private element: treated alike (no CSA facts)
        return None


def csa_image_header(ds: Dataset) -> dict[str, list[str]] | None:
    """The parsed CSA Image Header Info (0029,xx10), or None when the instance has none.

    Raises
    ------
    CsaError
        When it is present but cannot be parsed.
    """
    value = _private_value(ds, 0x0029, CSA_CREATOR, 0x10)
    if not isinstance(value, (bytes, bytearray)) or not value:
        return None
    return parse_csa(value)


# -- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MosaicLayout:
    """How one MOSAIC instance is tiled and where its slices lie."""

    n_images: int
    grid: int  # tiles per mosaic row and per mosaic column
    tile_rows: int
    tile_cols: int
    positions: np.ndarray  # (n_images, 3) LPS centre of each slice's first pixel, in stored order
    iop: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x)
    spacing: float  # centre-to-centre distance of adjacent slices, mm
    notes: tuple[str, ...] = ()


def _number(values: list[str] | None) -> float | None:
    if not values:
        return None
    try:
        out = float(values[0])
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _n_images(ds: Dataset, csa: dict[str, list[str]] | None) -> int | None:
    count = _number(csa.get("NumberOfImagesInMosaic")) if csa else None
    if count is None:
        # The same number in the Siemens MR private group, for headers whose CSA lacks it.
        value = _private_value(ds, 0x0019, MR_HEADER_CREATOR, 0x0A)
        try:
            count = float(value) if value is not None and not isinstance(value, (bytes, bytearray)) else None
        except (TypeError, ValueError):
            count = None
    if count is None or count != int(count):
        return None
    return int(count)


def mosaic_layout(ds: Dataset) -> MosaicLayout:
    """The tiling and slice geometry of a MOSAIC instance (header only, no pixel data).

    Raises
    ------
    ValueError
        With one sentence when the header cannot describe the un-tiled volume.
    """
    try:
        count = n_frames(ds)
    except (TypeError, ValueError):
        raise ValueError("its NumberOfFrames is not a number") from None
    if count != 1:
        raise ValueError(f"it is a Siemens MOSAIC with {count} frames; only single-frame mosaics are known")
    try:
        csa = csa_image_header(ds)
    except CsaError as err:
        raise ValueError(f"it is a Siemens MOSAIC whose CSA image header is damaged ({err})") from None
    n = _n_images(ds, csa)
    if n is None or not 1 <= n <= MAX_IMAGES:
        raise ValueError(
            "it is a Siemens MOSAIC without a usable NumberOfImagesInMosaic in its CSA header, "
            "so it cannot be un-tiled"
        )
    grid = math.isqrt(n)
    grid += grid * grid < n
    rows, cols = int(el.get(ds, "Rows")), int(el.get(ds, "Columns"))
    if rows < grid or cols < grid or rows % grid or cols % grid:
        raise ValueError(
            f"it is a Siemens MOSAIC of {n} images whose {cols}x{rows} matrix does not split into "
            f"{grid}x{grid} tiles"
        )
    tile_rows, tile_cols = rows // grid, cols // grid

    info = frame_infos(ds)[0]
    if info.iop is None or info.ipp is None or info.pixel_spacing is None:
        raise ValueError(
            "it is a Siemens MOSAIC without ImageOrientationPatient, ImagePositionPatient or "
            "PixelSpacing, so its slices cannot be placed"
        )
    try:
        row, col, normal = orientation(info.iop)
    except GeometryError as err:
        raise ValueError(f"it is a Siemens MOSAIC whose {err}") from None
    dy, dx = info.pixel_spacing
    notes: list[str] = []
    snv = None
    if csa:
        values = csa.get("SliceNormalVector") or []
        try:
            snv = np.array([float(v) for v in values], dtype=np.float64) if len(values) == 3 else None
        except ValueError:
            snv = None
    if snv is None or not np.all(np.isfinite(snv)) or np.linalg.norm(snv) < 0.5:
        notes.append("MOSAIC without a CSA SliceNormalVector: slices assumed stored along row x column")
        snv = normal.copy()
    snv = snv / np.linalg.norm(snv)
    if abs(float(snv @ normal)) < NORMAL_COS_MIN:
        raise ValueError(
            "it is a Siemens MOSAIC whose CSA SliceNormalVector is not perpendicular to its "
            "ImageOrientationPatient, so the header contradicts itself"
        )
    spacing = _positive(el.get(ds, "SpacingBetweenSlices")) or _positive(info.slice_thickness)
    if spacing is None:
        notes.append("MOSAIC without SpacingBetweenSlices or SliceThickness: 1 mm between slices assumed")
        spacing = 1.0
    # The scanner placed IPP at the top-left of the whole mosaic as if it were one slice centred
    # on the first slice's centre: move it to the first tile's own top-left pixel.
    first = info.ipp + row * dx * (cols - tile_cols) / 2.0 + col * dy * (rows - tile_rows) / 2.0
    positions = first[None, :] + np.arange(n, dtype=np.float64)[:, None] * (spacing * snv)[None, :]
    return MosaicLayout(
        n_images=n,
        grid=grid,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        positions=positions,
        iop=np.asarray(info.iop, dtype=np.float64),
        pixel_spacing=(float(dy), float(dx)),
        spacing=float(spacing),
        notes=tuple(notes),
    )


def _positive(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def mosaic_reason(ds: Dataset) -> str | None:
    """Why a MOSAIC instance cannot be un-tiled, or None when it can."""
    try:
        mosaic_layout(ds)
    except ValueError as err:
        return str(err)
    return None


# -- un-tiling ------------------------------------------------------------------------------


def untile(mosaic: np.ndarray, layout: MosaicLayout, order: np.ndarray | None = None, out=None) -> np.ndarray:
    """(n, tile_rows, tile_cols) slices of a (rows, cols) mosaic, tile k = grid cell (k // g, k % g).

    ``order``: which tile goes to output slice i (default: tile i); ``out``: where to write.
    """
    g, tr, tc = layout.grid, layout.tile_rows, layout.tile_cols
    # (g, tr, g, tc) view -> (g*g, tr, tc): cell (i, j) is tile i*g + j; no copy until `out`.
    cells = mosaic.reshape(g, tr, g, tc).transpose(0, 2, 1, 3).reshape(g * g, tr, tc)
    picked = cells[: layout.n_images] if order is None else cells[order]
    if out is None:
        return np.ascontiguousarray(picked)
    np.copyto(out, picked, casting="unsafe")
    return out


def load_mosaic(
    path: Path, ds: Dataset, allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray]
) -> Volume:
    """Decode one MOSAIC instance (its dataset ``ds`` read from ``path``) into a Volume.

    ``allocate(shape, dtype)`` gives the array the slices are written into (see
    :func:`edgeseg.dicom.load_volume`'s ``out``). Slices are ordered along row × column like
    every other Volume, so a mosaic stored against that normal is reversed.

    Raises
    ------
    DicomInputError
        Naming ``path``, when the header cannot be un-tiled or the pixels cannot be decoded.
    """
    try:
        layout = mosaic_layout(ds)
    except ValueError as err:
        raise DicomInputError(path, str(err)) from None
    _, _, normal = orientation(layout.iop)
    order = np.argsort(layout.positions @ normal, kind="stable")
    positions = layout.positions[order]
    try:
        geom = stack_geometry(positions, layout.iop, layout.pixel_spacing, layout.spacing)
    except GeometryError as err:
        raise DicomInputError(path, str(err)) from None

    info = frame_infos(ds)[0]
    bits = int(el.get(ds, "BitsAllocated"))
    signed = int(el.get(ds, "PixelRepresentation", 0) or 0) == 1
    use_lut = has_modality_lut(ds)
    dtype = (
        np.dtype(np.float32)
        if use_lut
        else target_dtype([bits], [signed], [int(el.get(ds, "BitsStored") or bits)])
    )
    as_modality = dtype == np.float32
    frames, notes = decode_frames(ds, path)
    slab = frames[0]
    if as_modality:
        slab = (
            apply_modality_lut_sequence(ds, frames, path)[0]
            if use_lut
            else slab.astype(np.float32) * np.float32(info.slope) + np.float32(info.intercept)
        )
    stored = allocate((layout.n_images, layout.tile_rows, layout.tile_cols), dtype)
    untile(slab, layout, order, out=stored)
    del ds.PixelData  # the header is kept for SEG writing; the pixels are in `stored` now

    warnings = list(layout.notes) + list(geom.warnings)
    if str(el.get(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        warnings.append("MONOCHROME1: values are kept as stored (modality values); only display is inverted")
    if str(el.get(ds, "LossyImageCompression", "")) == "01":
        warnings.append("the source was lossy compressed")
    warnings.extend(sorted(notes))
    n = layout.n_images
    return Volume(
        stored=stored,
        slope=np.ones(n) if as_modality else np.full(n, info.slope),
        intercept=np.zeros(n) if as_modality else np.full(n, info.intercept),
        spacing=geom.spacing,
        affine=geom.affine,
        sop_instance_uids=[str(el.get(ds, "SOPInstanceUID"))] * n,
        frame_numbers=[None] * n,
        headers=[ds],
        series_instance_uid=str(el.get(ds, "SeriesInstanceUID", "")),
        modality=str(el.get(ds, "Modality", "") or "MR"),
        warnings=warnings,
    )
