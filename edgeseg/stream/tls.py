"""DICOM TLS (PS3.15 Annex B, BCP 195) for the listener and the forwarder.

One certificate and key identify this box on both sides: the listener presents them to scanners,
the forwarder presents them to PACS as its client certificate. The CA file, when given, makes
the listener require client certificates signed by it (mutual TLS) and is what the forwarder
verifies PACS against; without it the forwarder trusts the system's certificate store.

The listener's TLS handshake runs in the association's own thread, not in the thread that
accepts connections: a peer that connects and stays silent (or handshakes slowly) then holds
only its own connection, never the port.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from edgeseg.stream._log import event

# A peer gets this long to finish its handshake before the connection is dropped.
HANDSHAKE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TLSConfig:
    """Certificate, key and CA (PEM files) for DICOM TLS.

    Attributes
    ----------
    cert, key:
        This box's certificate (chain) and private key, unencrypted PEM.
    ca:
        CA certificate(s): the listener then requires and verifies client certificates, and the
        forwarder verifies PACS against them. None: listener without client certificates,
        forwarder verifying against the system's trust store.
    """

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def from_options(
        cls, cert: str | Path | None, key: str | Path | None, ca: str | Path | None = None
    ) -> TLSConfig | None:
        """The ``--tls-cert/--tls-key/--tls-ca`` options → a checked config, or None for no TLS.

        Raises
        ------
        ValueError
            One sentence naming the option or file at fault (missing, unreadable, key not
            matching the certificate, CA not a certificate).
        """
        if cert is None and key is None and ca is None:
            return None
        if cert is None or key is None:
            raise ValueError(
                "DICOM TLS needs both '--tls-cert' and '--tls-key' (this box's certificate and "
                "private key, PEM); '--tls-ca' alone is not enough"
            )
        config = cls(Path(cert), Path(key), Path(ca) if ca is not None else None)
        config.server_context()  # load everything now: a bad file fails at start-up, not later
        config.client_context()
        return config

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: TLS 1.2+, client certificates required when ``ca`` is set."""
        ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_identity(ctx)
        if self.ca is not None:
            self._load_ca(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The forwarder's context: verifies the PACS certificate and host name, presents ours."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            self._load_ca(ctx)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        self._load_identity(ctx)
        return ctx

    def describe(self) -> str:
        return "mutual TLS (client certificates required)" if self.ca is not None else "TLS"

    def _load_identity(self, ctx: ssl.SSLContext) -> None:
        for option, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            _check_readable(option, path)
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except ssl.SSLError as exc:
            raise ValueError(
                f"TLS certificate {self.cert} and key {self.key} cannot be used together: they are "
                f"not PEM, the key is encrypted, or it does not belong to the certificate ({_reason(exc)})"
            ) from None

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        assert self.ca is not None
        _check_readable("--tls-ca", self.ca)
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except ssl.SSLError as exc:
            raise ValueError(
                f"'--tls-ca' {self.ca} holds no usable PEM CA certificate ({_reason(exc)})"
            ) from None


def _check_readable(option: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"'{option}' {path} does not exist or is not a file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ValueError(f"'{option}' {path} cannot be read ({exc.strerror})") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets handshake later, in :func:`handshake_on_open`.

    pynetdicom wraps each accepted socket in its accept loop; a handshake there would let one
    silent peer block every other connection.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        if server_side:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, *args, **kwargs)


def handshake_on_open(evt) -> None:
    """``EVT_CONN_OPEN`` handler of a TLS listener: finish the handshake in this connection's
    thread; a peer that fails it (no certificate, untrusted, wrong protocol) is logged in one
    line and disconnected before any DICOM is read."""
    sock = getattr(getattr(evt.assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return
    address = evt.address[0] if evt.address else None
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:
        event("tls_refused", logging.WARNING, address=address, why=_reason(exc))
        try:
            sock.close()  # pynetdicom then sees a closed transport and ends quietly
        except OSError:
            pass
        # The acceptor would wait its ACSE timeout for an A-ASSOCIATE-RQ that cannot come,
        # holding one of the listener's association slots meanwhile.
        evt.assoc.acse_timeout = 0.1
        return
    peer = sock.getpeercert() or {}
    event("tls_established", logging.DEBUG, address=address, version=sock.version(), client_cert=bool(peer))


def probe(host: str, port: int, ctx: ssl.SSLContext, timeout_s: float = 10.0) -> str | None:
    """Why a TLS connection to ``host:port`` fails (one short phrase), or None when it works.

    pynetdicom only says that no association was made; this names the TLS reason for the
    forwarder's retry log.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
    except (OSError, ValueError) as exc:
        return _reason(exc)


class _NoTraceback(logging.Filter):
    """pynetdicom logs a TLS failure with its traceback; edgeseg reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


_FILTER = _NoTraceback()


def quiet_pynetdicom_tracebacks() -> None:
    """Keep pynetdicom's log lines but drop the tracebacks it attaches to TLS errors."""
    for name in ("pynetdicom.transport", "pynetdicom.dul", "pynetdicom.association"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
