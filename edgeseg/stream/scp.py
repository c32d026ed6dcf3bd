"""The DICOM listener: a pynetdicom Storage SCP (+ Verification) whose C-STORE handler only
spools and answers.

The handler runs in pynetdicom's association thread, so it does nothing slow but the durable
write: no decoding of pixel data, no inference. Its status tells the sender the truth:

- ``0x0000`` Success: the instance is on disk and journaled (or was already).
- ``0xA700`` Out of Resources: it could not be stored (disk full, I/O error) or the backlog is
  over its bound; the sender keeps it and retries later.
- ``0xC000`` Cannot understand: the header cannot be read; the bytes are kept in quarantine.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

from edgeseg.stream._log import event
from edgeseg.stream.ingest import ingest
from edgeseg.stream.spool import Spool
from edgeseg.stream.tls import TLSConfig, handshake_on_open, quiet_pynetdicom_tracebacks

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def storage_classes() -> list[str]:
    """CT and MR storage SOP classes accepted: classic, enhanced and legacy-converted."""
    from pynetdicom import sop_class as sc

    return [
        sc.CTImageStorage,
        sc.EnhancedCTImageStorage,
        sc.LegacyConvertedEnhancedCTImageStorage,
        sc.MRImageStorage,
        sc.EnhancedMRImageStorage,
        sc.LegacyConvertedEnhancedMRImageStorage,
    ]


def transfer_syntaxes() -> list[str]:
    """Uncompressed first (preferred), then the common lossless and lossy compressed syntaxes."""
    from pydicom import uid

    return [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.JPEGLosslessSV1,
        uid.JPEGLossless,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
    ]


def make_store_handler(
    spool: Spool,
    *,
    admit: Callable[[], bool] = lambda: True,
    on_stored: Callable[[str], None] | None = None,
) -> Callable:
    """The ``EVT_C_STORE`` handler: spool durably, then answer.

    Parameters
    ----------
    spool:
        Where instances go.
    admit:
        Called first; False means the service is over its backlog bound and the instance is
        refused with 0xA700 (back-pressure: the scanner holds it and retries).
    on_stored:
        Called with the journal outcome (new, late, duplicate, ...) after a success; counts
        for the metrics. Must be quick.
    """

    def handle_store(evt) -> int:
        caller = evt.assoc.requestor.ae_title
        if not admit():
            event("refused", logging.WARNING, caller=caller, why="backlog")
            return OUT_OF_RESOURCES
        try:
            data = evt.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 (a malformed request must not kill the thread)
            event("store_failed", logging.WARNING, caller=caller, error=type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            ds = evt.dataset
        except Exception:  # noqa: BLE001 (ingest() quarantines what it cannot parse)
            ds = None
        try:
            stored = ingest(spool, data, source=f"scp:{caller}", ds=ds)
        except (OSError, sqlite3.Error) as exc:
            event("store_failed", logging.ERROR, caller=caller, status="0xA700", error=_errtext(exc))
            return OUT_OF_RESOURCES
        if on_stored is not None:
            on_stored(stored.outcome)
        if stored.outcome == "quarantined":
            event("store_unreadable", logging.WARNING, caller=caller, key=stored.sop_key[:12])
            return CANNOT_UNDERSTAND
        event(
            "stored",
            logging.DEBUG,
            caller=caller,
            series=stored.series_key[:12],
            sop=stored.sop_key[:12],
            outcome=stored.outcome,
        )
        return SUCCESS

    return handle_store


def _errtext(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def make_ae(ae_title: str, *, allow: Sequence[str] = ()):
    """A pynetdicom AE with the storage and verification contexts and the caller allow-list."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    syntaxes = transfer_syntaxes()
    for cls in storage_classes():
        ae.add_supported_context(cls, syntaxes)
    ae.add_supported_context(Verification)
    if allow:
        # pynetdicom rejects other calling AE titles at association time (reason 3).
        ae.require_calling_aet = list(allow)
    ae.maximum_associations = 8
    ae.network_timeout = 30
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    return ae


class Listener:
    """A running Storage SCP; ``stop()`` closes the port and ends open associations.

    Parameters
    ----------
    spool:
        Where instances go.
    host, port:
        Address to bind (``port=0`` picks a free one; see ``.port``).
    ae_title:
        Our AE title.
    allow:
        Calling AE titles allowed; empty allows any. Refused callers are logged.
    admit, on_stored:
        See :func:`make_store_handler`.
    tls:
        DICOM TLS on the port (None: plain TCP); with a CA, client certificates are required.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        host: str = "0.0.0.0",
        port: int = 11112,
        ae_title: str = "EDGESEG",
        allow: Sequence[str] = (),
        admit: Callable[[], bool] = lambda: True,
        on_stored: Callable[[str], None] | None = None,
        tls: TLSConfig | None = None,
    ):
        from pynetdicom import evt

        self.ae = make_ae(ae_title, allow=allow)
        handlers = [
            (evt.EVT_C_STORE, make_store_handler(spool, admit=admit, on_stored=on_stored)),
            (evt.EVT_C_ECHO, lambda e: SUCCESS),
            (evt.EVT_REJECTED, _log_rejected),
        ]
        ssl_context = None
        if tls is not None:
            ssl_context = tls.server_context()
            handlers.append((evt.EVT_CONN_OPEN, handshake_on_open))
            quiet_pynetdicom_tracebacks()
        self.server = self.ae.start_server(
            (host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        self.host = host
        self.port = int(self.server.server_address[1])
        event(
            "listening",
            host=host,
            port=self.port,
            ae=ae_title,
            allow=",".join(allow) or "any",
            tls=tls.describe() if tls is not None else "off",
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let open associations finish for ``grace_s``, then abort them.

        An aborted association loses nothing acknowledged: the sender resends the rest.
        """
        self.server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.ae.shutdown()
        event("listener_stopped", port=self.port)


def _log_rejected(evt) -> None:
    # Only the AE title and address are logged: who tried, not what they carried.
    requestor = evt.assoc.requestor
    event("association_rejected", logging.WARNING, caller=requestor.ae_title, address=requestor.address)
