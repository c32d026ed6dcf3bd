"""The journal: one sqlite file in the spool that says where every instance and series stands.

Series states::

    receiving ──quiet period / expected count──▶ complete ──claim──▶ processing
        ▲                                            ▲                 │
        │ late instance (new generation)             │ crash/restart   ├─ok──▶ segmented ──outbox sent──▶ delivered
        └────────────────────────────────────────────┴─────────────────┴─bad─▶ quarantined (reason)

Instances are keyed by a hash of the SOP Instance UID, series by a hash of the Series Instance
UID (:func:`edgeseg.stream._log.uid_key`): the journal holds no UIDs and no patient data.
Every change is one transaction committed with ``synchronous=FULL``, so what a method has
returned survives a power cut. One connection is shared by the service's threads behind a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    n_instances INTEGER NOT NULL DEFAULT 0,
    expected INTEGER,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    reason TEXT,
    outputs TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    key TEXT PRIMARY KEY,
    series_key TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_key);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_key TEXT NOT NULL,
    generation INTEGER NOT NULL,
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    sent REAL
);
"""

# States in which a series has been (or is being) processed: a new instance starts a re-run.
PROCESSED = ("processing", "segmented", "delivered", "quarantined")


@dataclass(frozen=True)
class Claim:
    """A series handed to the worker: its key, generation and instance keys at claim time."""

    series_key: str
    generation: int
    instance_keys: list[str]
    last_received: float
    # Runs of this generation started so far, this one included. Counted durably at claim
    # time: a run that took the whole process down (OOM kill, power cut) still counts.
    attempts: int = 1


@dataclass(frozen=True)
class OutboxItem:
    id: int
    series_key: str
    path: str
    dest: str
    attempts: int


class Journal:
    """The sqlite journal of a spool folder.

    Parameters
    ----------
    path:
        The sqlite file (created with its tables when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns; the C-STORE ack depends on it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- receiving ---------------------------------------------------------------------------
    def instance_state(self, key: str) -> str | None:
        """The state of an instance ('spooled' or 'quarantined'), None when never received."""
        with self._lock:
            row = self._db.execute("SELECT state FROM instances WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def series_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM series WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def add_instance(
        self,
        key: str,
        series_key: str,
        *,
        source: str,
        expected: int | None = None,
        now: float | None = None,
    ) -> str:
        """Record a durably spooled instance; returns what it meant for its series.

        Returns
        -------
        str
            ``"new"`` (first time seen), ``"late"`` (its series was already processed: a new
            generation starts, so the series is segmented again), ``"duplicate"`` (already
            spooled: nothing changes, so a resend never causes a second run) or ``"resent"``
            (a quarantined instance sent again: the series is retried).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT state FROM instances WHERE key=?", (key,)).fetchone()
            if row is not None and row[0] == "spooled":
                return "duplicate"
            if row is None:
                db.execute(
                    "INSERT INTO instances(key, series_key, state, source, received) VALUES (?,?,?,?,?)",
                    (key, series_key, "spooled", source, now),
                )
            else:
                db.execute("UPDATE instances SET state='spooled', received=? WHERE key=?", (now, key))
            srow = db.execute("SELECT state FROM series WHERE key=?", (series_key,)).fetchone()
            if srow is None:
                db.execute(
                    "INSERT INTO series(key, state, n_instances, expected, first_received, last_received,"
                    " updated) VALUES (?, 'receiving', 1, ?, ?, ?, ?)",
                    (series_key, expected, now, now, now),
                )
                return "new"
            state = srow[0]
            n = db.execute(
                "SELECT COUNT(*) FROM instances WHERE series_key=? AND state='spooled'", (series_key,)
            ).fetchone()[0]
            bump = 1 if state in PROCESSED else 0
            db.execute(
                "UPDATE series SET state='receiving', generation=generation+?, n_instances=?,"
                " expected=COALESCE(?, expected), last_received=?, attempts=0, not_before=0,"
                " reason=NULL, updated=? WHERE key=?",
                (bump, n, expected, now, now, series_key),
            )
            if row is not None:
                return "resent"
            return "late" if bump else "new"

    # -- completion ----------------------------------------------------------------------------
    def mark_complete(self, now: float, quiet_s: float, *, all_receiving: bool = False) -> list[str]:
        """Mark receiving series complete: quiet for ``quiet_s`` seconds or at their expected count.

        ``all_receiving`` completes every receiving series (nothing more can arrive: ``--once``).
        Returns the keys that changed.
        """
        with self._tx() as db:
            if all_receiving:
                where, args = "state='receiving'", ()
            else:
                where = (
                    "state='receiving' AND (last_received <= ? OR"
                    " (expected IS NOT NULL AND n_instances >= expected))"
                )
                args = (now - quiet_s,)
            keys = [r[0] for r in db.execute(f"SELECT key FROM series WHERE {where}", args)]
            for key in keys:
                db.execute("UPDATE series SET state='complete', updated=? WHERE key=?", (now, key))
        return keys

    def ready(self, now: float, limit: int) -> list[str]:
        """Complete series whose retry back-off has passed, oldest first, at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM series WHERE state='complete' AND not_before <= ?"
                " ORDER BY last_received LIMIT ?",
                (now, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def claim(self, series_key: str) -> Claim | None:
        """Move a complete series to processing and count the attempt (committed before any work
        starts); None when it is no longer complete."""
        with self._tx() as db:
            row = db.execute(
                "SELECT generation, last_received, attempts FROM series WHERE key=? AND state='complete'",
                (series_key,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state='processing', attempts=attempts+1, updated=? WHERE key=?",
                (time.time(), series_key),
            )
            keys = [
                r[0]
                for r in db.execute(
                    "SELECT key FROM instances WHERE series_key=? AND state='spooled' ORDER BY key",
                    (series_key,),
                )
            ]
        return Claim(series_key, row[0], keys, row[1], row[2] + 1)

    def finish_ok(
        self,
        claim: Claim,
        outputs: dict[str, str],
        *,
        latency_ms: float,
        forward: list[tuple[str, str]] = (),  # type: ignore[assignment]
    ) -> bool:
        """Record a successful run and queue its forwards in the same transaction.

        ``forward`` holds (path, destination) pairs for the outbox. The series becomes
        ``segmented`` (forwards pending) or ``delivered`` (none). Returns False, changing
        nothing, when a late instance started a new generation while the worker ran.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state=?, outputs=?, latency_ms=?, runs=runs+1, reason=NULL, updated=?"
                " WHERE key=? AND generation=? AND state='processing'",
                (
                    "segmented" if forward else "delivered",
                    json.dumps(outputs),
                    latency_ms,
                    now,
                    claim.series_key,
                    claim.generation,
                ),
            )
            if cur.rowcount == 0:
                return False
            for path, dest in forward:
                db.execute(
                    "INSERT INTO outbox(series_key, generation, path, dest, state, next_try, created)"
                    " VALUES (?,?,?,?,'pending',?,?)",
                    (claim.series_key, claim.generation, path, dest, now, now),
                )
        return True

    def quarantine(self, series_key: str, reason: str, *, generation: int | None = None) -> bool:
        """Mark a series and its spooled instances quarantined with a one-sentence reason.

        With ``generation``, only when the series is still at that generation (see finish_ok).
        """
        with self._tx() as db:
            sql = "UPDATE series SET state='quarantined', reason=?, updated=? WHERE key=?"
            args: tuple = (reason, time.time(), series_key)
            if generation is not None:
                sql += " AND generation=? AND state='processing'"
                args += (generation,)
            if db.execute(sql, args).rowcount == 0:
                return False
            db.execute(
                "UPDATE instances SET state='quarantined' WHERE series_key=? AND state='spooled'",
                (series_key,),
            )
        return True

    def retry_later(self, claim: Claim, reason: str, delay_s: float, *, count_attempt: bool = True) -> None:
        """Put a series whose run failed for a transient reason back to complete, after a delay.
        ``count_attempt=False``: the run never reached the model (its server is down), so it
        does not count towards the attempts that set a series aside."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET state='complete', reason=?, not_before=?, updated=?"
                + ("" if count_attempt else ", attempts=MAX(attempts-1, 0)")
                + " WHERE key=? AND generation=? AND state='processing'",
                (reason, time.time() + delay_s, time.time(), claim.series_key, claim.generation),
            )

    def attempts(self, series_key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT attempts FROM series WHERE key=?", (series_key,)).fetchone()
        return row[0] if row else 0

    # -- outbox --------------------------------------------------------------------------------
    def due_outbox(self, now: float, limit: int = 16) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, series_key, path, dest, attempts FROM outbox"
                " WHERE state='pending' AND next_try <= ? ORDER BY next_try LIMIT ?",
                (now, limit),
            ).fetchall()
        return [OutboxItem(*r) for r in rows]

    def outbox_sent(self, item_id: int) -> None:
        """Mark a forward sent; its series is delivered once none of its forwards is pending."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state='sent', sent=?, attempts=attempts+1 WHERE id=?", (now, item_id)
            )
            (series_key, generation) = db.execute(
                "SELECT series_key, generation FROM outbox WHERE id=?", (item_id,)
            ).fetchone()
            pending = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE series_key=? AND generation=? AND state='pending'",
                (series_key, generation),
            ).fetchone()[0]
            if pending == 0:
                db.execute(
                    "UPDATE series SET state='delivered', updated=? WHERE key=? AND generation=?"
                    " AND state='segmented'",
                    (now, series_key, generation),
                )

    def outbox_retry(self, item_id: int, error: str, next_try: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts=attempts+1, last_error=?, next_try=? WHERE id=?",
                (error, next_try, item_id),
            )

    # -- restart and reporting -----------------------------------------------------------------
    def recover(self) -> list[str]:
        """After a crash: series caught in processing go back to complete (they run again from
        their spooled files; outputs are written atomically, so a half run leaves nothing), and
        receiving series get a fresh quiet period."""
        with self._tx() as db:
            keys = [r[0] for r in db.execute("SELECT key FROM series WHERE state='processing'")]
            db.execute("UPDATE series SET state='complete', not_before=0 WHERE state='processing'")
            # A series cut off mid-transfer must not count as quiet because we were down: its
            # sender resends the rest after we are back, and the quiet period starts now.
            db.execute("UPDATE series SET last_received=? WHERE state='receiving'", (time.time(),))
        return keys

    def known_instances(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT key FROM instances")}

    def series_rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM series ORDER BY first_received")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def instance_rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM instances")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def outbox_rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM outbox ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        """Series per state, instances spooled, outbox pending: the figures of the status line."""
        with self._lock:
            out = {
                f"series_{s}": n
                for s, n in self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state")
            }
            out["instances"] = self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            out["outbox_pending"] = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE state='pending'"
            ).fetchone()[0]
        return out

    def latencies_ms(self) -> list[float]:
        with self._lock:
            return [
                r[0] for r in self._db.execute("SELECT latency_ms FROM series WHERE latency_ms IS NOT NULL")
            ]
