"""``serve()``: what ``edgeseg run --listen/--watch`` calls. Also ``python -m edgeseg.stream``."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from edgeseg.stream._log import event, log
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.tls import TLSConfig
from edgeseg.stream.worker import Processor


def parse_listen(text: str | int) -> tuple[str, int]:
    """``[HOST:]PORT`` → (host, port); the host defaults to every interface."""
    text = str(text).strip()
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(
            f"'--listen' must be [HOST:]PORT (e.g. 11112 or 127.0.0.1:11112); got {text!r}"
        ) from None
    if not 0 <= number <= 65535:
        raise ValueError(f"'--listen' port must be 0..65535; got {number}")
    return host or "0.0.0.0", number


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for item in value for v in _as_list(item)]


def segmenter_processor(segmenter, formats: Sequence[str] = ("seg",)) -> Processor:
    """The production processor: :func:`edgeseg.run.process_series` with an open Segmenter."""
    from edgeseg.run import process_series

    fmt = tuple(formats)

    def process(files: list[Path], out_dir: Path):
        return process_series(segmenter, files, out_dir, formats=fmt)

    return process


def _configure_logging() -> None:
    # The CLI logs warnings only; the service's structured lines (INFO) are its status output.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def serve(
    bundle: str | Path | None,
    *,
    listen: str | int | None = None,
    ae_title: str = "EDGESEG",
    out_dir: str | Path = "edgeseg-out",
    allow: str | Sequence[str] | None = None,
    forward: str | Sequence[str] | None = None,
    watch: str | Path | None = None,
    series_timeout: float = 5.0,
    once: bool = False,
    spool: str | Path | None = None,
    formats: Sequence[str] = ("seg",),
    backend: str = "auto",
    processor: Processor | None = None,
    status_interval: float = 10.0,
    stop_event: threading.Event | None = None,
    tls: TLSConfig | None = None,
    precision: str | None = None,
    threads: int | None = None,
    isolate: bool = True,
    series_time_limit: float | None = None,
) -> int:
    """Run the stream service until SIGTERM/SIGINT (or, with ``once``, until the spool is done).

    Parameters
    ----------
    bundle:
        The model bundle (opened with ``Segmenter.open(bundle, backend=backend)``); may be None
        when ``processor`` is given.
    listen:
        ``[HOST:]PORT`` of the DICOM listener (None: no listener).
    ae_title:
        Our AE title.
    out_dir:
        Output folder.
    allow:
        Calling AE titles allowed (comma string or list); None allows any.
    forward:
        ``AE@HOST:PORT`` destination(s) for the DICOM SEG (comma string or list).
    watch:
        Folder to ingest exported files from.
    series_timeout:
        Quiet seconds after which a series is complete.
    once:
        Process what is in the spool and the watched folder, try the outbox, exit; the port
        is not opened.
    spool:
        Spool folder (default ``OUT/.spool``).
    formats:
        Output formats (seg, nifti, png).
    backend:
        Segmenter backend.
    processor:
        Replaces the Segmenter (tests, custom pipelines): ``processor(files, out_dir)``.
    status_interval:
        Seconds between status lines.
    stop_event:
        Set it to stop (embedding, tests); SIGTERM/SIGINT set it when run in the main thread.
    tls:
        DICOM TLS for the listener and the forwarder (:meth:`TLSConfig.from_options`).
    precision, threads:
        Passed to ``Segmenter.open``.
    isolate:
        Read, decode and segment each series in a child process (the default), so a decoder
        that panics, crashes or hangs costs that series only; False runs them in this process.
        A given ``processor`` runs as given (wrap it in ``IsolatedProcessor`` to isolate it).
    series_time_limit:
        Seconds one series may take in the child before it is stopped and set aside
        (default: max(120, 2 per instance)).

    Returns
    -------
    int
        Exit code: 0, or 1 when ``once`` left quarantined series or undelivered results.
    """
    _configure_logging()
    config = ServiceConfig(
        out_dir=Path(out_dir),
        spool=Path(spool) if spool else None,
        listen=None if (listen is None or once) else parse_listen(listen),
        ae_title=ae_title,
        allow=_as_list(allow),
        forward=_as_list(forward),
        watch=Path(watch) if watch else None,
        series_timeout_s=float(series_timeout),
        status_interval_s=status_interval,
        tls=tls,
    )
    segmenter = None
    isolated = None
    if processor is None:
        if bundle is None:
            raise ValueError("serve() needs a 'bundle' or a 'processor'")
        if isolate:
            from edgeseg.stream.isolation import IsolatedProcessor

            kwargs = {"bundle": str(bundle), "backend": backend, "precision": precision, "threads": threads}
            isolated = IsolatedProcessor(
                "edgeseg.stream.isolation:segmenter_factory",
                {**kwargs, "formats": list(formats)},
                time_limit_s=series_time_limit,
            )
            isolated.start()  # a bundle that cannot open fails here, before the port opens
            processor = isolated
        else:
            from edgeseg.segmenter import Segmenter

            segmenter = Segmenter.open(bundle, backend=backend, precision=precision, threads=threads)
            processor = segmenter_processor(segmenter, formats)
    service = StreamService(config, processor)
    try:
        if once:
            before = service.journal.counts().get("series_quarantined", 0)
            metrics = service.run_once()
            print(json.dumps(metrics), flush=True)
            bad = metrics["series_quarantined"] > before or metrics["outbox_pending"] > 0
            return 1 if bad else 0
        return _serve_forever(service, stop_event or threading.Event())
    finally:
        if segmenter is not None:
            segmenter.close()
        if isolated is not None:
            isolated.close()


def _serve_forever(service: StreamService, stop: threading.Event) -> int:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        service.start()
        if service.listener is not None:
            # One machine-readable line so scripts (and tests) learn the bound port.
            print(json.dumps({"listening": service.listener.port}), flush=True)
        while not stop.wait(0.5):
            pass
        event("stopping", why="signal or stop request")
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def serve_frames(
    bundle: str | Path,
    source: str,
    *,
    out_dir: str | Path = "edgeseg-out",
    backend: str = "auto",
    realtime: bool = True,
) -> int:
    """``--frames SOURCE``: segment a frame stream (multi-frame DICOM file, video file, or a
    capture device number) frame by frame, latest frame wins; overlays to ``OUT/frames``.

    Prints one JSON line with frames read/segmented/dropped and latency p50/p99 (ms).
    """
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.frames import dicom_cine, run_frames, segmenter_frame_fn, video

    _configure_logging()
    if source.isdigit():
        frames = video(int(source))
    elif source.lower().endswith((".dcm", ".dicom")) or _is_part10(Path(source)):
        frames = dicom_cine(source, realtime=realtime)
    else:
        frames = video(source)
    try:
        with Segmenter.open(bundle, backend=backend) as seg:
            report = run_frames(frames, segmenter_frame_fn(seg), Path(out_dir) / "frames")
    except ValueError as exc:  # unreadable or unsupported source: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "frames_read": report.read,
        "frames_segmented": report.segmented,
        "frames_dropped": report.dropped,
        "latency_ms_p50": report.p50_ms,
        "latency_ms_p99": report.p99_ms,
    }
    print(json.dumps(summary), flush=True)
    return 0 if report.segmented else 1


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False
