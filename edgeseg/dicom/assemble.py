"""Assemble one series part (a :class:`SeriesRef`) into a :class:`Volume`.

Two passes over the files: the first takes the headers the scan parsed (with the per-frame
geometry it derived; files are read again only when the scan did not keep them) and decides
the slice order; the second decodes each instance once into a preallocated (z, y, x) array —
the caller's, if it gives one (``out=``: e.g. pinned memory the GPU reads in place). The pixel
data stays on disk until then (so memory holds one volume, not two); uncompressed pixel data
of a single-frame instance is read from the file straight into its slice of that array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom import elements as el
from edgeseg.dicom.frames import FrameInfo, frame_infos, is_enhanced, n_frames
from edgeseg.dicom.geometry import DUP_TOL_MM, GeometryError, orientation, same_orientation, stack_geometry
from edgeseg.dicom.mosaic import is_mosaic, load_mosaic
from edgeseg.dicom.pixels import (
    apply_modality_lut_sequence,
    check_pixel_length,
    decode_frames,
    has_modality_lut,
    target_dtype,
)
from edgeseg.dicom.scan import (
    DEFER_SIZE,
    SeriesRef,
    parse_file,
    quiet_dcmread,
    quiet_pydicom,
    read_header,
    unusable_reason,
)
from edgeseg.volume import Volume

# load_volume's ``out``: None, an array, or ``allocate(shape, dtype) -> array``.
PixelsOut = np.ndarray | Callable[[tuple[int, ...], np.dtype], np.ndarray] | None


@dataclass
class _Slice:
    file_index: int
    frame_index: int
    info: FrameInfo
    proj: float = 0.0


def _read(path: Path) -> Dataset:
    try:
        ds = parse_file(path)
    except Exception:
        # read_header raises the right DicomInputError (or returns a forced raw dataset).
        if read_header(path) is None:
            raise DicomInputError(path, "not a DICOM file") from None
        try:
            ds = quiet_dcmread(path, force=True, defer_size=DEFER_SIZE)
        except Exception:
            raise DicomInputError(
                path, "the file cannot be read completely; it is truncated or damaged"
            ) from None
    if not el.has(ds, "SOPInstanceUID"):
        # pydicom returns an empty dataset when the data runs out inside encapsulated pixel data.
        raise DicomInputError(path, "the file cannot be read completely; it is truncated or damaged")
    reason = unusable_reason(ds)
    if reason:
        raise DicomInputError(path, reason)
    return ds


def _where(files: list[Path]) -> Path:
    parents = {p.parent for p in files}
    return parents.pop() if len(parents) == 1 and len(files) > 1 else files[0]


def _geometry_of(
    slices: list[_Slice], files: list[Path], datasets: list[Dataset]
) -> tuple[np.ndarray, list[str]]:
    """Fill ``proj`` and return (iop, warnings); refuse mixed or missing geometry."""
    warnings: list[str] = []
    infos = [s.info for s in slices]
    iops = [i.iop for i in infos]
    if all(i is None for i in iops) and all(i.ipp is None for i in infos):
        if len(slices) > 1 and not (len(datasets) == 1 and is_enhanced(datasets[0])):
            raise DicomInputError(
                _where(files), "the images have no position or orientation, so they cannot be stacked"
            )
        if len(slices) > 1:
            warnings.append(
                "the multi-frame instance has no plane position or orientation: frames are stacked in "
                "file order with an assumed axis-aligned geometry"
            )
        else:
            warnings.append(
                "no patient position or orientation in the header: an axis-aligned geometry is assumed"
            )
        spacing = float(el.get(datasets[0], "SpacingBetweenSlices") or 0) or 1.0
        for k, s in enumerate(slices):
            s.info = FrameInfo(
                np.array([0.0, 0.0, k * spacing]),
                np.array([1.0, 0, 0, 0, 1, 0]),
                s.info.pixel_spacing,
                s.info.slice_thickness,
                s.info.slope,
                s.info.intercept,
            )
            s.proj = k * spacing
        return np.array([1.0, 0, 0, 0, 1, 0]), warnings
    for s in slices:
        if not same_orientation(s.info.iop, iops[0]):
            raise DicomInputError(
                files[s.file_index],
                "slices have different orientations (ImageOrientationPatient) and cannot be stacked",
            )
    iop = np.asarray(iops[0])
    try:
        _, _, normal = orientation(iop)
    except GeometryError as err:
        raise DicomInputError(files[0], str(err)) from None
    for s in slices:
        if s.info.ipp is None:
            if len(slices) > 1:
                raise DicomInputError(
                    files[s.file_index], "the slice has no ImagePositionPatient, so it cannot be placed"
                )
            warnings.append("no ImagePositionPatient in the header: the origin is assumed to be 0,0,0")
            s.info = FrameInfo(
                np.zeros(3), iop, s.info.pixel_spacing, s.info.slice_thickness, s.info.slope, s.info.intercept
            )
        s.proj = float(s.info.ipp @ normal)
    return iop, warnings


def load_volume(ref: SeriesRef, *, out: PixelsOut = None) -> Volume:
    """Decode and assemble one series part.

    Parameters
    ----------
    ref:
        A part found by :func:`find_series` (or built by hand from files of one series).
    out:
        Where the stored pixels go: ``None`` (a new array), an array of exactly the volume's
        shape and dtype, or a callable ``out(shape, dtype)`` returning one — e.g. a GPU
        segmenter's ``pixel_allocator``, so every decoded slice lands in pinned (on Jetson:
        GPU-mapped) memory that the kernels read without another copy. The values are the
        same whichever is used.

    Returns
    -------
    Volume
        ``stored`` (z, y, x) in the native stored dtype (int16/uint16), or float32 modality
        values when a Modality LUT Sequence, 32-bit data or a signed/unsigned mix requires it.

    Raises
    ------
    DicomInputError
        Naming the offending file (or the series folder for stack-level problems) with a
        one-sentence reason.
    """
    with quiet_pydicom():
        try:
            return _load(ref, out)
        except DicomInputError:
            raise
        except _FromOut as wrapped:
            raise wrapped.exc from None  # the caller's own allocator failed: not the file's fault
        except el.HeaderValueError as err:
            raise DicomInputError(_where_ref(ref), str(err)) from None
        except MemoryError as exc:
            raise DicomInputError(
                _where_ref(ref),
                f"there is not enough memory to load it ({exc or 'MemoryError'}); check its image size",
            ) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - safety net, native decoders raise BaseExceptions
            # The places that know which file failed map errors themselves; this catches the rest.
            raise DicomInputError(
                _where_ref(ref), f"the series cannot be assembled ({type(exc).__name__}); a file is damaged"
            ) from None


class _FromOut(Exception):
    """Carries an exception raised by the caller's ``out`` past the safety net unchanged."""

    def __init__(self, exc: Exception):
        super().__init__(str(exc))
        self.exc = exc


def _where_ref(ref: SeriesRef) -> Path | None:
    files = [p if isinstance(p, Path) else Path(p) for p in ref.files]
    return _where(files) if files else None


def _allocate(out: PixelsOut, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array the decoded pixels are written into (see ``load_volume``'s ``out``)."""
    if out is None:
        try:
            return np.empty(shape, dtype=dtype)
        except MemoryError:
            size = int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize / 2**20)
            raise MemoryError(f"{size} MiB for the pixels of {shape}") from None
    try:
        array = out(shape, dtype) if callable(out) else out
    except Exception as exc:
        raise _FromOut(exc) from exc
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        got = (getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__))
        bad = ValueError(f"'out' must give a {dtype} array of shape {shape} for this series, got {got}")
        raise _FromOut(bad)  # the caller's mistake, not the file's: keep it a ValueError
    if not array.flags.writeable:
        raise _FromOut(ValueError("'out' gave a read-only array"))
    return array


def _load(ref: SeriesRef, out: PixelsOut = None) -> Volume:
    files = [p if isinstance(p, Path) else Path(p) for p in ref.files]
    if not files:
        raise DicomInputError(None, f"series part '{ref.label}' has no files")
    # The scan parsed most headers already; an earlier load of this ref dropped their pixel data.
    datasets: list[Dataset] = []
    infos: list[list[FrameInfo]] = []
    for path in files:
        try:
            ds = ref.datasets.get(path)
            if ds is None or not el.has(ds, "PixelData"):
                ds = _read(path)
            known = ref.frame_infos.get(path)
            infos.append(known[1] if known is not None and known[0] is ds else frame_infos(ds))
            check_pixel_length(ds, path)
        except el.HeaderValueError as err:
            raise DicomInputError(path, str(err)) from None
        datasets.append(ds)
    if any(is_mosaic(ds) for ds in datasets):
        # A Siemens MOSAIC instance is a whole volume on its own (the scan gives each its part).
        if len(files) > 1:
            raise DicomInputError(
                _where(files), "a Siemens MOSAIC instance is a volume of its own; load one at a time"
            )
        return load_mosaic(files[0], datasets[0], lambda shape, dtype: _allocate(out, shape, dtype))
    rows0, cols0 = el.get(datasets[0], "Rows"), el.get(datasets[0], "Columns")
    shape = (int(rows0), int(cols0))
    series_uid = str(el.get(datasets[0], "SeriesInstanceUID", ""))
    slices: list[_Slice] = []
    for fi, (path, ds) in enumerate(zip(files, datasets, strict=True)):
        rows, cols = el.get(ds, "Rows"), el.get(ds, "Columns")
        if (int(rows), int(cols)) != shape:
            raise DicomInputError(
                path, f"its matrix {cols}x{rows} differs from the series' {shape[1]}x{shape[0]}"
            )
        if str(el.get(ds, "SeriesInstanceUID", "")) != series_uid:
            raise DicomInputError(path, "it belongs to a different series than the other files")
        slices.extend(_Slice(fi, k, info) for k, info in enumerate(infos[fi]))

    iop, warnings = _geometry_of(slices, files, datasets)
    slices.sort(key=lambda s: s.proj)

    # Pixel spacing must agree; without it, 1 mm is assumed (and said).
    spacings = {s.info.pixel_spacing for s in slices}
    if None in spacings:
        if len(spacings) > 1:
            raise DicomInputError(_where(files), "some slices have a pixel spacing and others do not")
        warnings.append("no pixel spacing in the header: 1 mm is assumed")
        pixel_spacing = (1.0, 1.0)
    else:
        arr = np.array(sorted(spacings))
        if np.max(np.abs(arr - arr[0])) > 1e-4 * max(1.0, float(arr[0].max())):
            raise DicomInputError(_where(files), "slices have different pixel spacings and cannot be stacked")
        pixel_spacing = tuple(float(v) for v in arr[0])

    # Duplicates: same position. Resolved after decoding (identical pixels -> keep one).
    unique: list[_Slice] = []
    dup_of: list[tuple[_Slice, int]] = []
    for s in slices:
        if unique and abs(s.proj - unique[-1].proj) < DUP_TOL_MM:
            dup_of.append((s, len(unique) - 1))
        else:
            unique.append(s)

    thickness = unique[0].info.slice_thickness or 1.0
    try:
        geom = stack_geometry(np.array([s.info.ipp for s in unique]), iop, pixel_spacing, thickness)
    except GeometryError as err:
        raise DicomInputError(_where(files), str(err)) from None
    warnings.extend(geom.warnings)

    use_lut = any(has_modality_lut(ds) for ds in datasets)
    if use_lut:
        dtype = np.dtype(np.float32)
    else:
        allocated = [int(el.get(ds, "BitsAllocated")) for ds in datasets]
        dtype = target_dtype(
            allocated,
            [int(el.get(ds, "PixelRepresentation", 0) or 0) == 1 for ds in datasets],
            [int(el.get(ds, "BitsStored", ba) or ba) for ds, ba in zip(datasets, allocated, strict=True)],
        )
    as_modality = dtype == np.float32
    stored = _allocate(out, (len(unique),) + shape, np.dtype(dtype))
    slot_of = {(s.file_index, s.frame_index): z for z, s in enumerate(unique)}
    dup_frames: dict[tuple[int, int], np.ndarray] = {}
    dup_keys = {(s.file_index, s.frame_index) for s, _ in dup_of}
    notes: set[str] = set()

    for fi, (path, ds) in enumerate(zip(files, datasets, strict=True)):
        slot = slot_of.get((fi, 0)) if len(infos[fi]) == 1 and not as_modality else None
        into = stored[slot : slot + 1] if slot is not None else None
        frames, file_notes = decode_frames(ds, path, into)
        notes.update(file_notes)
        if frames is not into:  # else it was decoded in place (one frame, the stored dtype)
            if as_modality:
                frames = _to_modality(ds, frames, path, [s.info for s in slices if s.file_index == fi])
            elif frames.dtype != dtype and frames.size:
                info = np.iinfo(dtype)
                if frames.min() < info.min or frames.max() > info.max:
                    raise DicomInputError(
                        path, f"its stored values do not fit the series' pixel type {dtype}"
                    )
            for k in range(frames.shape[0]):
                if (fi, k) in slot_of:
                    np.copyto(stored[slot_of[(fi, k)]], frames[k], casting="unsafe")
                elif (fi, k) in dup_keys:
                    dup_frames[(fi, k)] = frames[k].copy()
        del ds.PixelData  # headers are kept for SEG writing; the pixels are in `stored` now

    for s, z in dup_of:
        keep = unique[z]
        same_values = np.array_equal(dup_frames[(s.file_index, s.frame_index)], stored[z]) and (
            as_modality or (s.info.slope, s.info.intercept) == (keep.info.slope, keep.info.intercept)
        )
        if not same_values:
            raise DicomInputError(
                files[s.file_index],
                f"it lies at the same position as {files[keep.file_index].name} but its pixels differ "
                "(a repeated or 4D acquisition); refusing to choose one",
            )
        warnings.append(f"duplicate slice at {s.proj:.2f} mm with identical pixels dropped")

    if any(str(el.get(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1" for ds in datasets):
        # Modality values are correct as stored; MONOCHROME1 only says display inverts them.
        warnings.append("MONOCHROME1: values are kept as stored (modality values); only display is inverted")
    if any(str(el.get(ds, "LossyImageCompression", "")) == "01" for ds in datasets):
        warnings.append("the source was lossy compressed")
    warnings.extend(sorted(notes))

    first_use = list(dict.fromkeys(s.file_index for s in unique))
    sop_uids = [str(el.get(ds, "SOPInstanceUID")) for ds in datasets]
    numbered = [is_enhanced(ds) or n_frames(ds) > 1 for ds in datasets]
    return Volume(
        stored=stored,
        slope=np.ones(len(unique)) if as_modality else np.array([s.info.slope for s in unique]),
        intercept=np.zeros(len(unique)) if as_modality else np.array([s.info.intercept for s in unique]),
        spacing=geom.spacing,
        affine=geom.affine,
        sop_instance_uids=[sop_uids[s.file_index] for s in unique],
        frame_numbers=[s.frame_index + 1 if numbered[s.file_index] else None for s in unique],
        headers=[datasets[i] for i in first_use],
        series_instance_uid=series_uid,
        modality=str(el.get(datasets[0], "Modality", "") or ref.modality),
        warnings=warnings,
    )


def _to_modality(ds: Dataset, frames: np.ndarray, path: Path, infos: list[FrameInfo]) -> np.ndarray:
    """float32 modality values of one instance's frames (Modality LUT, else slope/intercept)."""
    if has_modality_lut(ds):
        return apply_modality_lut_sequence(ds, frames, path)
    out = frames.astype(np.float32)
    for k, info in enumerate(infos):
        out[k] *= np.float32(info.slope)
        out[k] += np.float32(info.intercept)
    return out
