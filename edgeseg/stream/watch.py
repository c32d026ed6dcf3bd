"""The watched folder: a second source, for scanners that export files instead of sending them.

A file counts as arrived once its size and modification time have not changed for
``stable_s`` seconds (the exporter has finished writing it). It is then copied into the spool
through the same path as a C-STORE (:func:`edgeseg.stream.ingest.ingest`); the source file is
left where it is. Files already spooled are recognised by their SOP Instance UID and cost one
header read after a restart.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from edgeseg.stream._log import event
from edgeseg.stream._polling import PollingThread
from edgeseg.stream.ingest import ingest
from edgeseg.stream.spool import Spool


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


class Watcher(PollingThread):
    """Polls ``folder`` (recursively) and ingests stable files.

    Parameters
    ----------
    spool:
        Where files go.
    folder:
        The folder the scanner exports into.
    stable_s:
        Seconds a file's size and mtime must stay unchanged before it is read.
    poll_s:
        Seconds between scans.
    max_per_scan:
        Files ingested per scan at most, so one huge export cannot starve the rest.
    """

    def __init__(
        self,
        spool: Spool,
        folder: str | Path,
        *,
        stable_s: float = 1.0,
        poll_s: float = 0.5,
        max_per_scan: int = 256,
    ):
        self.spool = spool
        self.folder = Path(folder)
        self.stable_s = stable_s
        self.max_per_scan = max_per_scan
        self.ingested = 0
        # path -> (size, mtime_ns, since): when the file was last seen to change.
        self._seen: dict[Path, tuple[int, int, float]] = {}
        self._done: dict[Path, tuple[int, int]] = {}
        self._init_polling("edgeseg-watch", poll_s)

    def start(self) -> None:
        event("watching", folder=str(self.folder))
        super().start()

    def poll(self) -> int:
        return self.scan()

    def scan(self, *, now: float | None = None) -> int:
        """One pass: note changing files, ingest stable ones; returns how many were ingested."""
        now = time.monotonic() if now is None else now
        if not self.folder.is_dir():
            return 0
        n = 0
        for path in sorted(self.folder.rglob("*")):
            if n >= self.max_per_scan or self._stop.is_set():
                break
            if path.name.startswith(".") or path.name.endswith((".part", ".tmp")) or not path.is_file():
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if self._done.get(path) == sig:
                continue
            prev = self._seen.get(path)
            if prev is None or prev[:2] != sig:
                self._seen[path] = (*sig, now)
                continue
            if now - prev[2] < self.stable_s:
                continue
            if self._ingest(path):
                self._done[path] = sig
                self._seen.pop(path, None)
                n += 1
        return n

    def _ingest(self, path: Path) -> bool:
        try:
            data = path.read_bytes()
        except OSError:
            return False  # vanished or unreadable for now: try again next scan
        if not _is_dicom(data):
            event("watch_skipped", logging.DEBUG, why="not a DICOM Part 10 file")
            return True
        try:
            stored = ingest(self.spool, data, source="watch")
        except (OSError, sqlite3.Error) as exc:
            event("watch_store_failed", logging.ERROR, error=type(exc).__name__)
            return False  # the file stays in the folder: retried next scan
        self.ingested += 1
        event("watch_stored", logging.DEBUG, series=stored.series_key[:12], outcome=stored.outcome)
        return True
