"""The worker: completes series, runs the processor on each, records the result.

One thread, so the segmenter (one model, one device) is never entered twice at once. The
journal is the queue: complete series wait there, durably; the worker takes at most
``batch`` of them per look, oldest first, so memory stays bounded whatever the backlog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgeseg.stream._log import event
from edgeseg.stream._polling import PollingThread
from edgeseg.stream.journal import Claim
from edgeseg.stream.spool import Spool


class Outcome(Protocol):
    """What a processor returns (``edgeseg.run.SeriesOutcome`` fits)."""

    status: str  # "ok" | "failed"
    outputs: dict[str, Any]
    error: str | None
    timings: dict[str, float]


Processor = Callable[[list[Path], Path], Outcome]


class Worker(PollingThread):
    """Turns complete series into outputs.

    Parameters
    ----------
    spool:
        Spool and journal.
    processor:
        ``processor(files, out_dir) -> Outcome``; ``status == "failed"`` quarantines the
        series with ``error`` as the reason. A series that splits into parts (a localizer's
        planes, MOSAIC instances) has outputs keyed ``<format>@<part key>``, one per part, and
        ``error@<part key>`` for a part that could not be segmented (recorded, not
        quarantined). An exception is taken as transient (e.g. the device is busy) and retried
        with back-off, up to ``max_attempts``, then quarantined. An outcome marked ``transient``
        (its inference server is unreachable) waits in the journal and is retried without
        counting the attempt, however long the server is away.
    out_dir:
        Where outputs go.
    series_timeout_s:
        Quiet period that completes a receiving series.
    forward:
        Destinations (``AE@HOST:PORT``) each successful result's outputs are queued for.
    forward_formats:
        Which outputs are forwarded (DICOM SEG only: PACS takes DICOM); every part's.
    """

    def __init__(
        self,
        spool: Spool,
        processor: Processor,
        out_dir: str | Path,
        *,
        series_timeout_s: float = 5.0,
        forward: Sequence[str] = (),
        forward_formats: Sequence[str] = ("seg",),
        max_attempts: int = 3,
        poll_s: float = 0.1,
        batch: int = 4,
    ):
        self.spool = spool
        self.journal = spool.journal
        self.processor = processor
        self.out_dir = Path(out_dir)
        self.series_timeout_s = series_timeout_s
        self.forward = list(forward)
        self.forward_formats = tuple(forward_formats)
        self.max_attempts = max_attempts
        self.batch = batch
        self.done = 0
        self.failed = 0
        self.busy = False
        self._service_waits = 0  # consecutive series that found the inference server away
        self._init_polling("edgeseg-worker", poll_s)

    # Stopping finishes the series in hand (checkpointed in the journal either way).
    stop_timeout_s = 120.0

    def poll(self) -> int:
        try:
            return self.step()
        except Exception as exc:  # noqa: BLE001 (e.g. the journal's disk: the thread must live on)
            event("worker_error", logging.ERROR, error=_one_line(exc))
            self._stop.wait(1.0)
            return 0

    # -- one step --------------------------------------------------------------------------------
    def step(self, *, all_receiving: bool = False) -> int:
        """Complete what is due, then process up to ``batch`` ready series; returns how many ran."""
        now = time.time()
        for key in self.journal.mark_complete(now, self.series_timeout_s, all_receiving=all_receiving):
            event("series_complete", series=key[:12])
        ran = 0
        for key in self.journal.ready(now, self.batch):
            if self._stop.is_set():
                break
            claim = self.journal.claim(key)
            if claim is None:
                continue
            if claim.attempts > self.max_attempts:
                self._given_up(claim)
            else:
                self._run(claim)
            ran += 1
        return ran

    def _run(self, claim: Claim) -> None:
        files = self.spool.files(claim.series_key, claim.instance_keys)
        key = claim.series_key
        self.busy = True
        t0 = time.perf_counter()
        try:
            outcome = self.processor(files, self.out_dir)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 (a processor bug must not stop the service)
            self._transient(claim, _one_line(exc))
            return
        except BaseException as exc:  # noqa: BLE001 (a native panic: it will panic again)
            self.failed += 1
            reason = f"processing failed in native code ({_one_line(exc)})"
            self.spool.quarantine(key, reason, generation=claim.generation)
            return
        finally:
            self.busy = False
        ms = (time.perf_counter() - t0) * 1e3
        if getattr(outcome, "transient", False):
            # The inference server is unreachable: the series waits in the journal, uncounted.
            self._wait_for_service(claim, _scrub(outcome.error or "service unavailable", self.spool.root))
            return
        self._service_waits = 0
        if outcome.status != "ok":
            self.failed += 1
            reason = outcome.error or "the series could not be processed"
            self.spool.quarantine(key, _scrub(reason, self.spool.root), generation=claim.generation)
            return
        latency_ms = (time.time() - claim.last_received) * 1e3
        outputs = {k: str(v) for k, v in outcome.outputs.items()}
        for k in [k for k in outputs if k.startswith("error@")]:
            # One part of a split series could not be segmented: its reason stays in the journal.
            outputs[k] = _scrub(outputs[k], self.spool.root)
            event("part_failed", logging.WARNING, series=key[:12], part=k[6:], reason=outputs[k][:300])
        # A split series has one output per part ("seg@<part key>"): each of them goes to PACS.
        forward = [
            (path, d)
            for k, path in outputs.items()
            if k.split("@")[0] in self.forward_formats
            for d in self.forward
        ]
        if self.journal.finish_ok(claim, outputs, latency_ms=latency_ms, forward=forward):
            self.done += 1
            event(
                "segmented",
                series=key[:12],
                instances=len(files),
                run_ms=round(ms, 1),
                latency_ms=round(latency_ms, 1),
                outputs=",".join(sorted(outputs)),
                forwards=len(forward) or None,
            )
        else:
            # A late instance arrived while we ran: the new generation runs after its quiet period.
            event("series_superseded", series=key[:12])

    def _given_up(self, claim: Claim) -> None:
        # Earlier runs were claimed but never recorded: the process died with this series in
        # hand (killed for memory, a crash). Running it again would crash-loop the service.
        self.failed += 1
        self.spool.quarantine(
            claim.series_key,
            f"{claim.attempts - 1} runs of this series never finished (the service stopped or was"
            " killed while it ran, e.g. for lack of memory), so it is not tried again",
            generation=claim.generation,
        )

    def _wait_for_service(self, claim: Claim, reason: str) -> None:
        # Back-off over consecutive waits (any series), not this series' attempts: all of them
        # wait for the same server. Linear and capped, so a server that is back is used within 30 s.
        self._service_waits += 1
        delay = min(30.0, 2.0 * self._service_waits)
        self.journal.retry_later(claim, reason, delay, count_attempt=False)
        event(
            "series_waiting",
            logging.WARNING,
            series=claim.series_key[:12],
            retry_in_s=delay,
            reason=reason[:200],
        )

    def _transient(self, claim: Claim, reason: str) -> None:
        attempts = self.journal.attempts(claim.series_key)
        if attempts >= self.max_attempts:
            self.failed += 1
            self.spool.quarantine(
                claim.series_key,
                f"failed {attempts} times; last error: {reason}",
                generation=claim.generation,
            )
            return
        delay = min(60.0, 2.0**attempts)
        self.journal.retry_later(claim, reason, delay)
        event(
            "series_retry", logging.WARNING, series=claim.series_key[:12], attempt=attempts, retry_in_s=delay
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _scrub(reason: str, spool_root: Path) -> str:
    # Errors name the spooled file; make that relative to the spool (the name is a hash).
    return reason.replace(str(spool_root) + "/", "")
