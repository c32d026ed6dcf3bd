"""Real DICOM peers for tests, benchmarks and site checks: a sending SCU and a PACS stand-in.

Nothing here is mocked: both sides speak DICOM over TCP through pynetdicom.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_datasets(
    datasets: Iterable,
    port: int,
    *,
    host: str = "127.0.0.1",
    called_ae: str = "EDGESEG",
    calling_ae: str = "SCANNER",
    contexts: Sequence[tuple[str, str]] | None = None,
    stop_after: int | None = None,
) -> list[int | None]:
    """C-STORE pydicom datasets in one association; returns each status (None: no answer).

    ``contexts`` defaults to each dataset's (SOP class, transfer syntax). ``stop_after`` aborts
    the association after that many stores (a sender that disappears mid-transfer).

    Raises
    ------
    ConnectionError
        The association was not established (refused, rejected or nothing listening).
    """
    from pynetdicom import AE

    datasets = list(datasets)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    wanted = contexts or sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
    for cls, ts in wanted:
        ae.add_requested_context(cls, ts)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_ae}@{host}:{port} not established")
    statuses: list[int | None] = []
    try:
        for i, ds in enumerate(datasets):
            if stop_after is not None and i >= stop_after:
                assoc.abort()
                return statuses
            status = assoc.send_c_store(ds)
            statuses.append(getattr(status, "Status", None))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def send_files(files: Iterable[str | Path], port: int, **kwargs) -> list[int | None]:
    """Read ``files`` with pydicom and :func:`send_datasets` them."""
    import pydicom

    return send_datasets([pydicom.dcmread(str(f)) for f in files], port, **kwargs)


def echo(
    port: int, *, host: str = "127.0.0.1", called_ae: str = "EDGESEG", calling_ae: str = "SCANNER"
) -> int | None:
    """C-ECHO; returns the status, or None when no association was made."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return getattr(status, "Status", None)
    finally:
        assoc.release()


class PacsStub:
    """A Storage SCP standing in for PACS: accepts any storage class, keeps what it receives.

    Use as a context manager; ``received`` lists (SOP class UID, Part 10 bytes).
    """

    def __init__(self, port: int, *, ae_title: str = "PACS", host: str = "127.0.0.1"):
        self.port = port
        self.host = host
        self.ae_title = ae_title
        self.received: list[tuple[str, bytes]] = []
        self.arrived = threading.Event()
        self._server = None

    def __enter__(self) -> PacsStub:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event) -> int:
            self.received.append((str(event.request.AffectedSOPClassUID), event.encoded_dataset()))
            self.arrived.set()
            return 0x0000

        self._ae = ae
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._ae.shutdown()


def wait_for(condition, timeout_s: float = 20.0, poll_s: float = 0.05) -> bool:
    """Poll ``condition()`` until true or ``timeout_s`` passes; returns its last value."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


def count_processor(files: list[Path], out_dir: Path):
    """A processor doing real, checkable work without a model: it reads every file's header
    and pixel data and writes ``<series>.json`` with the instance numbers it found."""
    import json

    import pydicom

    from edgeseg.run import SeriesOutcome

    numbers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            _ = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            return SeriesOutcome(str(f.parent), "failed", error=f"{f.name}: {type(exc).__name__}")
        numbers.append(int(ds.get("InstanceNumber", 0) or 0))
    out = Path(out_dir) / f"{Path(files[0]).parent.name}.json"
    out.write_text(json.dumps(sorted(numbers)))
    return SeriesOutcome(str(Path(files[0]).parent), "ok", outputs={"json": out})
