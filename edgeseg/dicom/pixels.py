"""Pixel decoding: one instance's frames as a native-endian (frames, rows, cols) array.

pydicom 3 (with the pylibjpeg plugins) already does the fiddly parts, checked against the
shared test files: unused high bits are masked for unsigned data and the sign is extended
from HighBit for signed data (``dcm_qa_12bit/12bitSigned_0x0F0F.dcm`` gives −241 and −1, as its
README documents), big-endian data is returned byte-swapped-aware, and JPEG / JPEG-LS /
JPEG 2000 / RLE / deflate are decoded. What stays here: turning any decoder failure into a
:class:`DicomInputError`, fixing byte order, and the Modality LUT Sequence.

Uncompressed grayscale pixel data — almost every CT and MR slice — does not need pydicom's
decoder machinery, whose per-call set-up costs more than the decode of a small slice:
:func:`native_frames` reads it with ``np.frombuffer`` (from the dataset, or straight from the
file when the value was left on disk) and applies pydicom's own rules — the dtype from
BitsAllocated / PixelRepresentation and the transfer syntax's byte order, then the unused
high bits shifted out (masking unsigned data, sign-extending signed data from BitsStored). It
only takes instances for which that is exactly what ``pixel_array`` returns (checked on every
uncompressed file of the shared test data, big-endian and 12-bit ones included); anything
else (compressed, deflated, 8-bit big endian, padding beyond one byte, missing or odd pixel
module values) goes to pydicom.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom import elements as el
from edgeseg.dicom.frames import n_frames

# Uncompressed transfer syntaxes whose pixel bytes are the stored values as they are (deflate
# is not one: its value offsets point into the inflated stream, not the file).
_NATIVE_ORDER = {ImplicitVRLittleEndian: "<", ExplicitVRLittleEndian: "<", ExplicitVRBigEndian: ">"}
_PIXEL_DATA = el.tag_of("PixelData")


def native_frames(ds: Dataset, into: np.ndarray | None = None) -> np.ndarray | None:
    """(n_frames, rows, cols) stored values of uncompressed pixel data in native byte order,
    bit-identical to ``ds.pixel_array``; None when pydicom must decode (see the module doc).

    ``into``: an array to decode into when it fits exactly (that shape, the stored dtype,
    C-contiguous); it is then what is returned, and a value left on disk is read straight into
    it. Otherwise the result may be a read-only view on the dataset's pixel bytes.
    """
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    order = _NATIVE_ORDER.get(ts) if isinstance(ts, str) else None
    elem = ds._dict.get(_PIXEL_DATA)
    if order is None or elem is None:
        return None
    try:
        rows, cols = int(el.get(ds, "Rows")), int(el.get(ds, "Columns"))
        bits, stored = int(el.get(ds, "BitsAllocated")), int(el.get(ds, "BitsStored"))
        signed = int(el.get(ds, "PixelRepresentation"))
        spp = int(el.get(ds, "SamplesPerPixel"))
        count = el.get(ds, "NumberOfFrames", 1)
        count = int(count) if isinstance(count, (int, str)) else -1
    except (TypeError, ValueError):
        return None
    photometric = el.get(ds, "PhotometricInterpretation")
    if (
        spp != 1
        or photometric not in ("MONOCHROME1", "MONOCHROME2")
        or bits not in (8, 16, 32)
        or not 1 <= stored <= bits
        or signed not in (0, 1)
        or rows < 1
        or cols < 1
        or count < 1
        or (order == ">" and bits == 8)  # pydicom swaps 8-bit big-endian OW pairwise
    ):
        return None
    shape = (count, rows, cols)
    expected = count * rows * cols * bits // 8
    src = np.dtype(f"{order}{'ui'[signed]}{bits // 8}")
    if into is not None and not (into.shape == shape and into.dtype == src and into.flags.c_contiguous):
        into = None  # (a big-endian source never fits: it is swapped on the way)
    value = elem.value
    if elem.__class__ is RawDataElement and value is None:  # left on disk by the scan
        arr = into if into is not None else np.empty(shape, src)
        if not _read_deferred(ds, elem, expected, memoryview(arr).cast("B")):
            return None  # pydicom reads it, and reports what is wrong
    else:
        if not isinstance(value, (bytes, bytearray)) or len(value) not in (expected, expected + expected % 2):
            return None  # pydicom reports it (short data) or strips it with a note (excess padding)
        arr = np.frombuffer(value, dtype=src, count=count * rows * cols).reshape(shape)
        if into is not None:
            np.copyto(into, arr)
            arr = into
    if not arr.dtype.isnative:
        arr = arr.astype(src.newbyteorder("="))
    if stored < bits:
        # As pydicom: shift the unused high bits out and back (masks unsigned, sign-extends signed).
        if not arr.flags.writeable:
            arr = arr.copy()
        np.left_shift(arr, bits - stored, out=arr)
        np.right_shift(arr, bits - stored, out=arr)
    return arr


def _read_deferred(ds: Dataset, elem: RawDataElement, expected: int, target: memoryview) -> bool:
    """Read a pixel value left on disk from its offset into ``target``; False when pydicom
    should read it instead (no file name, another length, the file changed or is short)."""
    filename = getattr(ds, "filename", None)
    if not isinstance(filename, str) or elem.length not in (expected, expected + expected % 2):
        return False
    try:
        with open(filename, "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_mtime != getattr(ds, "timestamp", None):
                return False  # changed since it was parsed: pydicom warns and re-checks the element
            fh.seek(elem.value_tell)
            got = 0
            while got < expected:
                n = fh.readinto(target[got:])
                if not n:
                    break
                got += n
            return got == expected
    except OSError:
        return False


def decode_frames(
    ds: Dataset, path: str | Path, into: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """Decode every frame of ``ds`` (into ``into`` where it fits, see :func:`native_frames`).

    Returns
    -------
    frames:
        (n_frames, rows, cols) array in native byte order, stored values (masked / sign
        extended to BitsStored).
    notes:
        decoder warnings worth passing on (e.g. a JPEG 2000 bit depth that disagrees with
        BitsStored).

    Raises
    ------
    DicomInputError
        When the pixel data is missing, truncated, or cannot be decoded.
    """
    if "PixelData" not in ds:
        raise DicomInputError(path, "the instance has no pixel data")
    arr = native_frames(ds, into)
    if arr is not None:
        return arr, []
    ts_name = _ts_name(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = ds.pixel_array
        except NotImplementedError:
            raise DicomInputError(
                path, f"no installed decoder handles {ts_name} (install the pylibjpeg plugins)"
            ) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pydicom/plugins raise many types for damaged
            # data, and native decoders BaseExceptions (pylibjpeg-rle: pyo3 PanicException)
            raise DicomInputError(
                path,
                f"the pixel data cannot be decoded ({ts_name}, {type(exc).__name__}); it may be truncated or corrupt",
            ) from None
    notes = sorted({str(w.message).splitlines()[0] for w in caught if "pixel" in str(w.message).lower()})
    count, rows, cols = n_frames(ds), int(ds.Rows), int(ds.Columns)
    if arr.size != count * rows * cols:
        raise DicomInputError(path, f"decoded {arr.size} pixels where {count}x{rows}x{cols} were expected")
    arr = arr.reshape(count, rows, cols)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, notes


def _ts_name(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = UID(ts).name if isinstance(ts, str) and ts else ""
    return name if name and name != ts else "an unknown transfer syntax"  # never a damaged value


def check_pixel_length(ds: Dataset, path: str | Path) -> None:
    """Refuse uncompressed pixel data shorter than Rows x Columns x frames x bits need, before
    any memory is set aside for it (a damaged Rows or NumberOfFrames could ask for gigabytes)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    elem = ds._dict.get(_PIXEL_DATA)
    if not isinstance(ts, str) or ts not in _NATIVE_ORDER or elem is None:
        return
    rows, cols = el.get_int(ds, "Rows"), el.get_int(ds, "Columns")
    bits, count = el.get_int(ds, "BitsAllocated"), el.get_int(ds, "NumberOfFrames", 1)
    if None in (rows, cols, bits, count):
        return  # unusable_reason has refused it already
    value = elem.value
    if elem.__class__ is RawDataElement and value is None:
        length = elem.length  # left on disk by the scan
    elif isinstance(value, (bytes, bytearray)):
        length = len(value)  # as read: shorter than the header's length when the file is truncated
    else:
        return
    expected = rows * cols * count * bits // 8
    if length == 0xFFFFFFFF or length < expected:
        raise DicomInputError(
            path,
            f"its pixel data holds {'an undefined number of' if length == 0xFFFFFFFF else length} bytes "
            f"where {cols}x{rows}x{count} pixels of {bits} bits need {expected}; the file is truncated or damaged",
        )


def has_modality_lut(ds: Dataset) -> bool:
    return bool(el.get(ds, "ModalityLUTSequence"))


def apply_modality_lut_sequence(ds: Dataset, frames: np.ndarray, path: str | Path) -> np.ndarray:
    """Map stored values through the instance's Modality LUT Sequence, as float32.

    Values below the first mapped entry take the first LUT value and values above the last
    take the last, as PS3.3 C.11.1 requires.
    """
    from pydicom.pixels import apply_modality_lut

    try:
        return np.asarray(apply_modality_lut(frames, ds), dtype=np.float32)
    except Exception:
        raise DicomInputError(path, "the Modality LUT Sequence cannot be applied") from None


def target_dtype(bits_allocated: list[int], signed: list[bool], bits_stored: list[int]) -> np.dtype:
    """The dtype a series' ``stored`` array gets, from every instance's pixel format.

    int16/uint16 when every instance agrees (8-bit data is widened so consumers see two bytes
    a voxel); int16 for a signed/unsigned mix whose unsigned values fit; float32 otherwise
    (then ``stored`` holds modality values, not stored values).
    """
    if max(bits_allocated) > 16:
        return np.dtype(np.float32)
    if all(signed):
        return np.dtype(np.int16)
    if not any(signed):
        return np.dtype(np.uint16)
    fits = all(s or b <= 15 for s, b in zip(signed, bits_stored, strict=True))
    return np.dtype(np.int16) if fits else np.dtype(np.float32)
