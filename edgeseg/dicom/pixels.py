"""Pixel decoding: one instance's frames as a native-endian (frames, rows, cols) array.

pydicom 3 (with the pylibjpeg plugins) already does the fiddly parts, checked against the
shared test files: unused high bits are masked for unsigned data and the sign is extended
from HighBit for signed data (``dcm_qa_12bit/12bitSigned_0x0F0F.dcm`` gives −241 and −1, as its
README documents), big-endian data is returned byte-swapped-aware, and JPEG / JPEG-LS /
JPEG 2000 / RLE / deflate are decoded. What stays here: turning any decoder failure into a
:class:`DicomInputError`, fixing byte order, and the Modality LUT Sequence.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom.frames import n_frames


def decode_frames(ds: Dataset, path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Decode every frame of ``ds``.

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
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = ts.name if ts is not None else "unknown transfer syntax"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = ds.pixel_array
        except NotImplementedError:
            raise DicomInputError(
                path, f"no installed decoder handles {ts_name} (install the pylibjpeg plugins)"
            ) from None
        except Exception as exc:  # pydicom/plugins raise many types for damaged data
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


def has_modality_lut(ds: Dataset) -> bool:
    return bool(ds.get("ModalityLUTSequence"))


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
