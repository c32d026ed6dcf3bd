"""Results back to PACS: C-STORE from the durable outbox, with retries and back-off."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edgeseg.stream._log import event
from edgeseg.stream._polling import PollingThread
from edgeseg.stream.journal import Journal
from edgeseg.stream.tls import TLSConfig, probe, quiet_pynetdicom_tracebacks

_DEST = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer, written ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST.match(text.strip())
        if m is None:
            raise ValueError(
                f"'--forward' must look like AE@HOST:PORT (e.g. PACS@10.0.0.5:104); got {text!r}"
            )
        return cls(m["ae"], m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class ForwardError(Exception):
    """A C-STORE to the destination did not succeed (refused, down, or a failure status)."""


def c_store_file(
    path: str | Path,
    dest: Destination,
    *,
    ae_title: str = "EDGESEG",
    timeout_s: float = 30,
    tls: TLSConfig | None = None,
    tls_context=None,
) -> None:
    """Send one Part 10 file to ``dest`` in its own association.

    With ``tls`` (or a ready ``tls_context`` from :meth:`TLSConfig.client_context`), the
    association runs over TLS: PACS's certificate and host name are verified, ours presented.

    Raises
    ------
    ForwardError
        With a one-line reason (no association, rejected, or a non-success status).
    """
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(str(path))
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    if tls_context is None and tls is not None:
        tls_context = tls.client_context()
    tls_args = (tls_context, dest.host) if tls_context is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = probe(dest.host, dest.port, tls_context, timeout_s) if tls_context is not None else None
        if why is not None:
            raise ForwardError(f"TLS with {dest} failed: {why}")
        raise ForwardError(f"no association with {dest} (down, or it refused us)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    # Success, or a warning (0xB000, 0xB007, 0xB006): the peer keeps the object.
    if code is None:
        raise ForwardError(f"{dest} did not answer the C-STORE")
    if code != 0x0000 and (code & 0xF000) != 0xB000:
        raise ForwardError(f"{dest} answered C-STORE status 0x{code:04X}")


class Forwarder(PollingThread):
    """A thread that drains the journal's outbox.

    Parameters
    ----------
    journal:
        Source of due items; records sent/retry.
    ae_title:
        Our calling AE title.
    base_delay_s, max_delay_s:
        Back-off after the n-th failure is ``min(max_delay_s, base_delay_s * 2**(n-1))``.
    poll_s:
        How often the outbox is looked at.
    tls:
        Send over DICOM TLS (None: plain TCP).
    """

    def __init__(
        self,
        journal: Journal,
        *,
        ae_title: str = "EDGESEG",
        base_delay_s: float = 2.0,
        max_delay_s: float = 300.0,
        poll_s: float = 0.5,
        tls: TLSConfig | None = None,
    ):
        self.journal = journal
        # One context for every send: certificates are read once, at start-up.
        self.tls_context = tls.client_context() if tls is not None else None
        if tls is not None:
            quiet_pynetdicom_tracebacks()
        self.ae_title = ae_title
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.sent = 0
        self._init_polling("edgeseg-forward", poll_s)

    def poll(self) -> int:
        return self.drain_once()

    def drain_once(self) -> int:
        """Try every due item once; returns how many were sent."""
        sent = 0
        for item in self.journal.due_outbox(time.time()):
            if self._stop.is_set():
                break
            dest = Destination.parse(item.dest)
            try:
                c_store_file(item.path, dest, ae_title=self.ae_title, tls_context=self.tls_context)
            except Exception as exc:  # noqa: BLE001 (every failure is retried, none is fatal)
                delay = min(self.max_delay_s, self.base_delay_s * 2**item.attempts)
                self.journal.outbox_retry(item.id, _one_line(exc), time.time() + delay)
                event(
                    "forward_retry",
                    logging.WARNING,
                    series=item.series_key[:12],
                    dest=str(dest),
                    attempt=item.attempts + 1,
                    retry_in_s=round(delay, 1),
                    error=_one_line(exc),
                )
                continue
            self.journal.outbox_sent(item.id)
            self.sent += 1
            sent += 1
            event("forwarded", series=item.series_key[:12], dest=str(dest), attempt=item.attempts + 1)
        return sent


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
