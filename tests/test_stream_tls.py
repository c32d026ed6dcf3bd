"""DICOM TLS with real peers: DCMTK's storescu +tls as the scanner, storescp +tls as the PACS.

A throwaway CA, server and client certificates are made with the openssl binary in tmp.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import count_processor, free_port, wait_for
from edgeseg.stream.tls import TLSConfig

TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed (Debian packages dcmtk, openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(cwd: Path, name: str, ca: str, *, san: str | None = None) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca (trusted), server (127.0.0.1), client (signed by ca), rogue (self-signed other CA)."""
    _need("openssl")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogueca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=edgeseg test {ca}", cwd=d)  # fmt: skip
    _issue(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    _issue(d, "client", "ca")
    _issue(d, "rogue", "rogueca")
    return d


def _tcia(dicom_data: Path) -> list[Path]:
    files = sorted(dicom_data.joinpath(*TCIA).glob("*.dcm"))
    assert files
    return files


def _storescu(port: int, files, *tls: str) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-aec", "EDGESEG", "-aet", "SCANNER", "-to", "10", "-ta", "10", *tls,
           "127.0.0.1", str(port), *map(str, files)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def tls_service(tmp_path, pki):
    started: list[StreamService] = []

    def start(**kw) -> StreamService:
        tls = TLSConfig.from_options(pki / "server.crt", pki / "server.key", pki / "ca.crt")
        cfg = ServiceConfig(
            out_dir=tmp_path / "out", listen=("127.0.0.1", free_port()), series_timeout_s=0.3, tls=tls, **kw
        )
        svc = StreamService(cfg, count_processor)
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        if not svc._stop.is_set():
            svc.stop()


def test_storescu_over_mutual_tls_is_stored_and_bad_clients_are_refused(tls_service, pki, dicom_data):
    _need("storescu", "echoscu")
    files = _tcia(dicom_data)[:4]
    svc = tls_service()
    port = svc.listener.port
    good = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    # A client certificate from another CA, no certificate at all, and plain TCP: all refused,
    # nothing stored, and the listener keeps serving.
    rogue = ["+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "+cf", str(pki / "ca.crt")]
    for bad in (rogue, ["+tla", "+cf", str(pki / "ca.crt")], []):
        r = _storescu(port, files[:1], *bad)
        assert r.returncode != 0, (bad, r.stdout, r.stderr)
    assert svc.journal.counts().get("instances", 0) == 0
    # The client also checks us: trusting only the rogue CA, it refuses our certificate.
    r = _storescu(port, files[:1], "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf",
                  str(pki / "rogueca.crt"))  # fmt: skip
    assert r.returncode != 0
    r = subprocess.run(["echoscu", "-aec", "EDGESEG", *good, "127.0.0.1", str(port)], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _storescu(port, files, *good)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 20)
    assert svc.journal.series_rows()[0]["n_instances"] == len(files)
    # Refused peers do not hold association slots (the listener allows 8 at a time).
    assert wait_for(lambda: not svc.listener.ae.active_associations, 5)


def test_forwarder_over_tls_to_storescp(tmp_path, pki, dicom_data):
    """The SEG (here: a result file) goes to a storescp +tls PACS that requires our client cert."""
    _need("storescp")
    from edgeseg.stream.forward import Destination, ForwardError, c_store_file

    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), "+tls", str(pki / "server.key"),
         str(pki / "server.crt"), "+cf", str(pki / "ca.crt"), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        dest = Destination("PACS", "127.0.0.1", port)
        src = _tcia(dicom_data)[0]
        ours = TLSConfig.from_options(pki / "client.crt", pki / "client.key", pki / "ca.crt")
        sent = False
        for _ in range(50):  # storescp needs a moment to open its port
            try:
                c_store_file(src, dest, ae_title="EDGESEG", tls=ours, timeout_s=10)
                sent = True
                break
            except ForwardError as exc:
                if "refused" not in str(exc) and "connect" not in str(exc).lower():
                    raise
                wait_for(lambda: False, 0.1)
        assert sent, "storescp +tls never accepted the C-STORE"
        assert wait_for(lambda: any(pacs_dir.iterdir()), 10)
        # A forwarder whose certificate the PACS does not trust is refused, with a TLS reason.
        rogue = TLSConfig.from_options(pki / "rogue.crt", pki / "rogue.key", pki / "ca.crt")
        with pytest.raises(ForwardError):
            c_store_file(src, dest, tls=rogue, timeout_s=10)
        # And one that does not trust the PACS's CA refuses to send, naming the reason.
        distrust = TLSConfig.from_options(pki / "client.crt", pki / "client.key", pki / "rogueca.crt")
        with pytest.raises(ForwardError, match="TLS .*certificate verify failed"):
            c_store_file(src, dest, tls=distrust, timeout_s=10)
        assert len(list(pacs_dir.iterdir())) == 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_tls_options_give_one_sentence(pki, tmp_path):
    with pytest.raises(ValueError, match="both '--tls-cert' and '--tls-key'"):
        TLSConfig.from_options(None, None, pki / "ca.crt")
    with pytest.raises(ValueError, match="does not exist"):
        TLSConfig.from_options(tmp_path / "nope.crt", pki / "server.key")
    with pytest.raises(ValueError, match="cannot be used together"):
        TLSConfig.from_options(pki / "server.crt", pki / "client.key")
    with pytest.raises(ValueError, match="no usable PEM CA"):
        TLSConfig.from_options(pki / "server.crt", pki / "server.key", pki / "server.ext")
    assert TLSConfig.from_options(None, None, None) is None


def test_cli_tls_options_are_checked_before_anything_starts(pki, tmp_path):
    from click.testing import CliRunner

    from edgeseg.cli import main

    runner = CliRunner()
    r = runner.invoke(
        main, ["run", str(tmp_path / "b.edgeseg"), "--listen", "0", "--tls-ca", str(pki / "ca.crt")]
    )
    assert r.exit_code == 2 and "both '--tls-cert' and '--tls-key'" in r.output
    r = runner.invoke(main, ["run", str(tmp_path / "b.edgeseg"), "x.dcm", "--tls-cert", str(pki / "ca.crt")])
    assert r.exit_code == 2 and "apply only to the listener and --forward" in r.output


def test_scanner_to_pacs_all_over_tls(tmp_path, pki, dicom_data, brain_bundle):
    """storescu +tls → listener (mutual TLS) → SEG → forwarder over TLS → storescp +tls."""
    _need("storescu", "storescp")
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.cli_support import segmenter_processor

    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), "+tls", str(pki / "server.key"),
         str(pki / "server.crt"), "+cf", str(pki / "ca.crt"), str(pacs_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seg = Segmenter.open(brain_bundle, backend="cpu")
    # This box presents one certificate both ways (the test CA signed "server" for 127.0.0.1).
    tls = TLSConfig.from_options(pki / "server.crt", pki / "server.key", pki / "ca.crt")
    cfg = ServiceConfig(
        out_dir=tmp_path / "out",
        listen=("127.0.0.1", free_port()),
        forward=[f"PACS@127.0.0.1:{pacs_port}"],
        series_timeout_s=0.3,
        forward_base_delay_s=0.2,
        forward_max_delay_s=0.5,
        tls=tls,
    )
    svc = StreamService(cfg, segmenter_processor(seg))
    svc.start()
    try:
        files = _tcia(dicom_data)
        good = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
        r = _storescu(svc.listener.port, files, *good)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 30), (
            svc.journal.outbox_rows()
        )
        (received,) = list(pacs_dir.iterdir())
        import pydicom

        ds = pydicom.dcmread(received)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        src = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    finally:
        svc.stop()
        seg.close()
        pacs.terminate()
        try:
            pacs.wait(10)
        except subprocess.TimeoutExpired:
            pacs.kill()
            pacs.wait(5)
