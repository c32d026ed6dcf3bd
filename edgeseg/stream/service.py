"""The stream service: spool + listener + watched folder + worker + outbox, started and stopped
as one, with a status line and JSON metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeseg.atomic import write_bytes_atomic
from edgeseg.stream._log import event
from edgeseg.stream.forward import Destination, Forwarder
from edgeseg.stream.ingest import keys_of_file
from edgeseg.stream.scp import Listener
from edgeseg.stream.spool import Spool
from edgeseg.stream.tls import TLSConfig
from edgeseg.stream.watch import Watcher
from edgeseg.stream.worker import Processor, Worker


@dataclass
class ServiceConfig:
    """Everything the service needs besides the processor.

    Attributes
    ----------
    out_dir:
        Output folder (SEG, NIfTI, PNG as the processor writes them).
    spool:
        Spool folder (default ``OUT/.spool``).
    listen:
        ``(host, port)`` for the DICOM listener, or None for no listener.
    ae_title, allow:
        Our AE title; the calling AE titles allowed (empty: any).
    forward:
        ``AE@HOST:PORT`` destinations the SEG of each series is C-STOREd to.
    watch:
        A folder to ingest files from, or None.
    series_timeout_s:
        Quiet period after which a series is complete.
    max_backlog:
        Complete-but-unprocessed series above which new instances are refused (0xA700).
    status_interval_s:
        Seconds between status lines (and ``status.json`` updates).
    forward_base_delay_s, forward_max_delay_s:
        Outbox back-off.
    watch_stable_s:
        Seconds a watched file must be unchanged before it is read.
    """

    out_dir: Path
    spool: Path | None = None
    listen: tuple[str, int] | None = None
    ae_title: str = "EDGESEG"
    allow: Sequence[str] = ()
    forward: Sequence[str] = ()
    watch: Path | None = None
    series_timeout_s: float = 5.0
    max_backlog: int = 64
    status_interval_s: float = 10.0
    forward_base_delay_s: float = 2.0
    forward_max_delay_s: float = 300.0
    watch_stable_s: float = 1.0
    min_free_bytes: int = 64 << 20
    tls: TLSConfig | None = None  # DICOM TLS for the listener and the forwarder (edgeseg.stream.tls)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.spool = Path(self.spool) if self.spool is not None else self.out_dir / ".spool"
        for dest in self.forward:
            Destination.parse(dest)  # fail at start-up, not at the first result
        if self.series_timeout_s < 0:
            raise ValueError(f"'series_timeout' must be >= 0 seconds; got {self.series_timeout_s}")


class StreamService:
    """The running service.

    Parameters
    ----------
    config:
        See :class:`ServiceConfig`.
    processor:
        ``processor(files, out_dir) -> outcome`` (status, outputs, error, timings), run by the
        worker thread for every complete series.

    Examples
    --------
    >>> svc = StreamService(ServiceConfig(out_dir="out", listen=("127.0.0.1", 11112)), proc)
    >>> svc.start()
    >>> ...  # until SIGTERM
    >>> svc.stop()
    """

    def __init__(self, config: ServiceConfig, processor: Processor):
        self.config = config
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(config.spool, min_free_bytes=config.min_free_bytes)  # type: ignore[arg-type]
        self.journal = self.spool.journal
        self.received = 0
        self._count_lock = threading.Lock()
        self.worker = Worker(
            self.spool,
            processor,
            config.out_dir,
            series_timeout_s=config.series_timeout_s,
            forward=config.forward,
        )
        self.forwarder = (
            Forwarder(
                self.journal,
                ae_title=config.ae_title,
                base_delay_s=config.forward_base_delay_s,
                max_delay_s=config.forward_max_delay_s,
                tls=config.tls,
            )
            if config.forward
            else None
        )
        self.listener: Listener | None = None
        self.watcher: Watcher | None = None
        self._started = time.time()
        self._stop = threading.Event()
        self._status_thread: threading.Thread | None = None
        self._backlog_cache = (0.0, 0)

    # -- life cycle ----------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Start-up recovery (temp files, interrupted runs, un-journaled files)."""
        done = self.spool.recover(keys_of_file)
        event("recovered", **done)
        return done

    def start(self) -> None:
        """Recover, then start worker, outbox, watcher and listener (the port opens last)."""
        self.recover()
        self.worker.start()
        if self.forwarder is not None:
            self.forwarder.start()
        if self.config.watch is not None:
            self.watcher = Watcher(self.spool, self.config.watch, stable_s=self.config.watch_stable_s)
            self.watcher.start()
        if self.config.listen is not None:
            host, port = self.config.listen
            self.listener = Listener(
                self.spool,
                host=host,
                port=port,
                ae_title=self.config.ae_title,
                allow=self.config.allow,
                admit=self._admit,
                on_stored=self._on_stored,
                tls=self.config.tls,
            )
        self._status_thread = threading.Thread(target=self._status_loop, name="edgeseg-status", daemon=True)
        self._status_thread.start()

    def stop(self) -> None:
        """Graceful stop: close the port first, then let the worker finish its series and the
        outbox its send; everything else is checkpointed in the journal for the next start."""
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        if self.watcher is not None:
            self.watcher.stop()
        self.worker.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self._status_thread is not None:
            self._status_thread.join(5)
        metrics = self.metrics()
        self.write_status(metrics)
        self.spool.close()
        event("stopped", **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def run_once(self, *, forward_window_s: float = 10.0) -> dict:
        """``--once``: ingest the watched folder, process every received series, try the outbox,
        and return the metrics. The listener is not opened: nothing more arrives, so every
        receiving series counts as complete."""
        self.recover()
        if self.config.watch is not None:
            watcher = Watcher(self.spool, self.config.watch, stable_s=0.0)
            # Two scans: the first notes sizes, the second ingests what did not change.
            for _ in range(2):
                watcher.scan()
            while watcher.scan():
                pass
        while self.worker.step(all_receiving=True):
            pass
        if self.forwarder is not None:
            deadline = time.monotonic() + forward_window_s
            while self.journal.counts()["outbox_pending"] and time.monotonic() < deadline:
                self.forwarder.drain_once()
                if self.journal.counts()["outbox_pending"]:
                    time.sleep(0.2)
        metrics = self.metrics()
        self.write_status(metrics)
        self.spool.close()
        return metrics

    # -- back-pressure and metrics ---------------------------------------------------------------
    def _admit(self) -> bool:
        # The backlog count is cached for half a second: a C-STORE must stay cheap.
        t, n = self._backlog_cache
        now = time.monotonic()
        if now - t > 0.5:
            c = self.journal.counts()
            n = c.get("series_complete", 0) + c.get("series_processing", 0)
            self._backlog_cache = (now, n)
        return n < self.config.max_backlog

    def _on_stored(self, outcome: str) -> None:
        with self._count_lock:
            self.received += 1

    def metrics(self) -> dict:
        """Figures for the status line and ``status.json``."""
        counts = self.journal.counts()
        lat = sorted(self.journal.latencies_ms())
        return {
            "uptime_s": round(time.time() - self._started, 1),
            "instances_received_this_run": self.received,
            "instances_journaled": counts.get("instances", 0),
            "series_receiving": counts.get("series_receiving", 0),
            "series_queued": counts.get("series_complete", 0),
            "series_processing": counts.get("series_processing", 0),
            "series_segmented": counts.get("series_segmented", 0),
            "series_delivered": counts.get("series_delivered", 0),
            "series_quarantined": counts.get("series_quarantined", 0),
            "outbox_pending": counts.get("outbox_pending", 0),
            "series_done_this_run": self.worker.done,
            "latency_ms_p50": _pct(lat, 50),
            "latency_ms_p99": _pct(lat, 99),
            "port": self.listener.port if self.listener is not None else None,
        }

    def write_status(self, metrics: dict | None = None) -> Path:
        path = Path(self.config.spool) / "status.json"  # type: ignore[arg-type]
        write_bytes_atomic(path, json.dumps(metrics or self.metrics(), indent=1).encode(), fsync=False)
        return path

    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.status_interval_s):
            m = self.metrics()
            self.write_status(m)
            event(
                "status",
                received=m["instances_received_this_run"],
                receiving=m["series_receiving"],
                queued=m["series_queued"],
                done=m["series_done_this_run"],
                quarantined=m["series_quarantined"],
                outbox=m["outbox_pending"],
                p50_ms=m["latency_ms_p50"],
                p99_ms=m["latency_ms_p99"],
            )


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(values, q)), 1)
