"""From received bytes to a spooled instance: the one path both sources (listener, watched
folder) take, so they share the spool and journal semantics exactly."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from edgeseg.stream._log import uid_key
from edgeseg.stream.spool import Spool, Stored


@dataclass(frozen=True)
class Header:
    """The few header values the spool needs; never logged as such (keys are hashes)."""

    series_key: str
    sop_key: str
    expected: int | None


def header_of(ds) -> Header:
    """Keys and expected count from a pydicom Dataset (pixel data not needed).

    The expected count is (0020,1002) 'Images in Acquisition' when the sender filled it in;
    without it the quiet period alone completes the series.

    Raises
    ------
    ValueError
        (0008,0018) 'SOP Instance UID' or (0020,000E) 'Series Instance UID' is missing.
    """
    from edgeseg.dicom.scan import quiet_pydicom

    # pydicom converts values on access and its validation warnings quote them: a damaged
    # length makes a UID swallow the elements after it, patient name included, into the log.
    with quiet_pydicom():
        sop = str(ds.get("SOPInstanceUID", "") or "").strip()
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if not sop or not series:
            missing = "(0008,0018) 'SOP Instance UID'" if not sop else "(0020,000E) 'Series Instance UID'"
            raise ValueError(f"the header has no {missing}")
        expected = None
        try:
            n = int(ds.get("ImagesInAcquisition", 0) or 0)
            expected = n if n > 0 else None
        except (TypeError, ValueError):
            expected = None
    return Header(uid_key(series), uid_key(sop), expected)


def read_header(data: bytes) -> Header:
    """Parse a Part 10 byte string's header (stops before the pixel data)."""
    import pydicom

    from edgeseg.dicom.scan import quiet_pydicom

    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return header_of(ds)


def keys_of_file(path: Path) -> tuple[str, str] | None:
    """(series_key, sop_key) of a spooled file, None when unreadable (start-up recovery)."""
    try:
        h = read_header(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 (any parse failure means: not adoptable)
        return None
    return h.series_key, h.sop_key


def ingest(spool: Spool, data: bytes, *, source: str, ds=None) -> Stored:
    """Store one received Part 10 file in the spool.

    ``ds`` is the already decoded dataset when the caller has one (pynetdicom), else the
    header is parsed from ``data``. An instance whose header cannot be read is kept in its own
    quarantine folder (outcome ``quarantined``), never dropped.

    Raises
    ------
    OSError, sqlite3.Error
        Not stored: the caller must report a failure (the sender will retry).
    """
    try:
        header = header_of(ds) if ds is not None else read_header(data)
    except Exception as exc:  # noqa: BLE001 (a broken header is data, not a crash)
        key = hashlib.sha256(data).hexdigest()[:16]
        reason = f"unreadable DICOM header ({type(exc).__name__}: {_first_line(exc)})"
        return spool.store_unreadable(data, key, reason, source=source)
    return spool.store(data, header.series_key, header.sop_key, source=source, expected=header.expected)


def _first_line(exc: BaseException) -> str:
    # pydicom messages can quote element values; keep only the first line, cut short.
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:160]
