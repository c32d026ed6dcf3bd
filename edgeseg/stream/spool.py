"""The spool: received instances on disk, durably, before anyone is told they arrived.

Layout (every name is a hash, never a UID or patient data)::

    SPOOL/journal.sqlite                      the journal (edgeseg.stream.journal)
    SPOOL/tmp/                                partial writes; emptied at start-up
    SPOOL/incoming/<series>/<sop>.dcm         spooled instances, as received (Part 10 files)
    SPOOL/quarantine/<series>/<sop>.dcm       a quarantined series' files, plus reason.txt
    SPOOL/status.json                         the latest metrics (edgeseg.stream.service)

An instance is stored as: write to ``tmp/``, fsync, rename into ``incoming/``, fsync the folder,
commit its journal row. Only then may the caller acknowledge it. A crash before the commit
leaves at most a file that start-up recovery adds to the journal (or a temp file it deletes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgeseg.atomic import _fsync_dir, write_bytes_atomic
from edgeseg.stream._log import event
from edgeseg.stream.journal import Journal


@dataclass(frozen=True)
class Stored:
    """What storing one instance did: ``outcome`` is the journal's word (new, late, duplicate,
    resent) or ``quarantined`` for an instance whose header could not be read."""

    outcome: str
    series_key: str
    sop_key: str


class Spool:
    """A spool folder with its journal.

    Parameters
    ----------
    root:
        The spool folder (created when missing).
    min_free_bytes:
        Refuse to store (``OSError`` ENOSPC, so the sender is told to retry) when the
        filesystem has less free space than this: a full disk must never corrupt the journal.
    """

    def __init__(self, root: str | Path, *, min_free_bytes: int = 64 << 20):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        for sub in ("tmp", "incoming", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.root / "journal.sqlite")
        # Held for rename + journal row, and for quarantine moves: a file never lands in a
        # series folder that is being moved away.
        self._lock = threading.Lock()

    def close(self) -> None:
        self.journal.close()

    # -- paths ---------------------------------------------------------------------------------
    def incoming_path(self, series_key: str, sop_key: str) -> Path:
        return self.root / "incoming" / series_key / f"{sop_key}.dcm"

    def quarantine_dir(self, series_key: str) -> Path:
        return self.root / "quarantine" / series_key

    def files(self, series_key: str, sop_keys: list[str]) -> list[Path]:
        """The spooled files of these instances (in instance-key order)."""
        return [self.incoming_path(series_key, k) for k in sop_keys]

    # -- storing -------------------------------------------------------------------------------
    def _check_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise OSError(
                errno.ENOSPC,
                f"spool has {free >> 20} MiB free, below the {self.min_free_bytes >> 20} MiB floor",
            )

    def _write_tmp(self, data: bytes) -> Path:
        fd, tmp = tempfile.mkstemp(suffix=".part", dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Path(tmp)

    def store(
        self,
        data: bytes,
        series_key: str,
        sop_key: str,
        *,
        source: str,
        expected: int | None = None,
    ) -> Stored:
        """Durably store one Part 10 file and journal it; return only once both are on disk.

        Raises
        ------
        OSError
            The file or the journal could not be written (disk full, read-only, ...): the
            instance is not stored and must not be acknowledged.
        sqlite3.Error
            The journal could not be committed.
        """
        target = self.incoming_path(series_key, sop_key)
        # A resend of an instance already spooled is acknowledged without writing it again.
        if self.journal.instance_state(sop_key) == "spooled" and target.exists():
            return Stored("duplicate", series_key, sop_key)
        self._check_space()
        tmp = self._write_tmp(data)
        try:
            with self._lock:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                _fsync_dir(target.parent)
                outcome = self.journal.add_instance(sop_key, series_key, source=source, expected=expected)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Stored(outcome, series_key, sop_key)

    def store_unreadable(self, data: bytes, key: str, reason: str, *, source: str) -> Stored:
        """Keep an instance whose header cannot be read in its own quarantine folder."""
        series_key = f"unreadable-{key}"
        folder = self.quarantine_dir(series_key)
        self._check_space()
        write_bytes_atomic(folder / f"{key}.dcm", data)
        write_bytes_atomic(folder / "reason.txt", (reason + "\n").encode())
        with self._lock:
            self.journal.add_instance(key, series_key, source=source)
            self.journal.quarantine(series_key, reason)
        return Stored("quarantined", series_key, key)

    # -- quarantine ----------------------------------------------------------------------------
    def quarantine(self, series_key: str, reason: str, *, generation: int | None = None) -> bool:
        """Quarantine a series: journal first, then move its files and write reason.txt.

        Returns False (nothing moved) when the series moved on to a new generation meanwhile.
        """
        with self._lock:
            if not self.journal.quarantine(series_key, reason, generation=generation):
                return False
            self._move_to_quarantine(series_key, reason)
        event("quarantined", series=series_key[:12], reason=reason)
        return True

    def _move_to_quarantine(self, series_key: str, reason: str) -> None:
        src = self.root / "incoming" / series_key
        dst = self.quarantine_dir(series_key)
        dst.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            for f in src.iterdir():
                os.replace(f, dst / f.name)
            with contextlib.suppress(OSError):
                src.rmdir()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(dst / "reason.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {reason}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(dst)

    # -- restart -------------------------------------------------------------------------------
    def recover(self, read_keys) -> dict[str, int]:
        """Bring spool and journal back in step after a crash.

        ``read_keys(path) -> (series_key, sop_key) | None`` reads a spooled file's header
        (edgeseg.stream.ingest.keys_of_file). Returns what was done, for the start-up line.
        """
        removed = 0
        for tmp in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
        requeued = self.journal.recover()
        # Files renamed into place whose journal row was never committed (never acknowledged,
        # but we have them): journal them now rather than lose them.
        known = self.journal.known_instances()
        adopted = 0
        for series_dir in (self.root / "incoming").iterdir():
            for f in series_dir.glob("*.dcm"):
                if f.stem in known:
                    continue
                keys = read_keys(f)
                if keys is None or keys != (series_dir.name, f.stem):
                    continue
                self.journal.add_instance(f.stem, series_dir.name, source="recovered")
                adopted += 1
        # A crash between journaling a quarantine and moving its files: finish the move.
        moved = 0
        for row in self.journal.series_rows():
            if row["state"] == "quarantined" and (self.root / "incoming" / row["key"]).is_dir():
                self._move_to_quarantine(row["key"], row["reason"] or "quarantined before a restart")
                moved += 1
        return {"temp_removed": removed, "requeued": len(requeued), "adopted": adopted, "moved": moved}
