"""Structured, PHI-free log lines for the stream service.

Every line is ``event key=value ...``: easy to grep, easy to parse, and the only values ever
logged are hashed UIDs, counts, states, AE titles and timings, never patient names or IDs.
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger("edgeseg.stream")


def uid_key(uid: str) -> str:
    """A 16-hex-digit key for a DICOM UID: stable, file-name safe, and not the UID itself.

    The series key is also the first 12 digits used by :func:`edgeseg.run.series_stem`, so a
    journal row and the SEG file written for it share a visible prefix.
    """
    return hashlib.sha256(uid.strip().encode()).hexdigest()[:16]


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one structured line ``name k=v k=v`` (values with spaces are quoted)."""
    if not log.isEnabledFor(level):
        return
    parts = [name]
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if " " in text or not text:
            text = '"' + text.replace('"', "'") + '"'
        parts.append(f"{key}={text}")
    log.log(level, " ".join(parts))
