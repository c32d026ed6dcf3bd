"""Forwarding the SEG to PACS from the durable outbox, against a real Storage SCP on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest

from edgeseg.stream.forward import Destination
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import PacsStub, free_port, send_files, wait_for

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def brain_processor(brain_bundle):
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.cli_support import segmenter_processor

    seg = Segmenter.open(brain_bundle, backend="cpu")
    yield segmenter_processor(seg)
    seg.close()


def test_destination_parsing():
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    with pytest.raises(ValueError, match="AE@HOST:PORT"):
        Destination.parse("10.0.0.5:104")


def test_seg_reaches_pacs_after_pacs_comes_up(tmp_path, dicom_data, brain_processor):
    files = sorted(
        (dicom_data / "tcia_brain_tumor_progression" / "PGBM-003_Study3" / "26401-T1prereg-52906").glob(
            "*.dcm"
        )
    )
    pacs_port = free_port()
    cfg = ServiceConfig(
        out_dir=tmp_path / "out",
        listen=("127.0.0.1", free_port()),
        forward=[f"PACS@127.0.0.1:{pacs_port}"],
        series_timeout_s=0.3,
        forward_base_delay_s=0.2,
        forward_max_delay_s=0.5,
    )
    svc = StreamService(cfg, brain_processor)
    svc.start()
    try:
        assert set(send_files(files, svc.listener.port)) == {0}
        # PACS is down: the result waits in the outbox, retried with back-off.
        assert wait_for(lambda: any(r["attempts"] >= 2 for r in svc.journal.outbox_rows()), 20)
        row = svc.journal.series_rows()[0]
        assert row["state"] == "segmented"
        assert "no association" in svc.journal.outbox_rows()[0]["last_error"]
        with PacsStub(pacs_port) as pacs:
            assert pacs.arrived.wait(15), "the SEG never reached PACS"
            assert wait_for(lambda: svc.journal.series_rows()[0]["state"] == "delivered", 10)
            time.sleep(1.0)  # no second copy after delivery
            assert len(pacs.received) == 1
        sop_class, data = pacs.received[0]
        assert sop_class == SEG_STORAGE
        seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        sent = Path(json.loads(svc.journal.series_rows()[0]["outputs"])["seg"])
        assert seg.SOPInstanceUID == pydicom.dcmread(sent).SOPInstanceUID
        src = pydicom.dcmread(files[0], stop_before_pixels=True)
        refs = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
        assert refs == {src.SeriesInstanceUID}
        (item,) = svc.journal.outbox_rows()
        assert item["state"] == "sent" and item["attempts"] >= 3
    finally:
        svc.stop()


def test_outbox_survives_a_restart(tmp_path, dicom_data, brain_processor):
    """Segmented while PACS is down, service stopped; the next start delivers from the outbox."""
    files = sorted(
        (dicom_data / "tcia_brain_tumor_progression" / "PGBM-003_Study3" / "36468-FLAIRreg-58706").glob(
            "*.dcm"
        )
    )
    pacs_port = free_port()
    kw = dict(
        out_dir=tmp_path / "out",
        forward=[f"PACS@127.0.0.1:{pacs_port}"],
        series_timeout_s=0.3,
        forward_base_delay_s=0.2,
        forward_max_delay_s=0.3,
    )
    svc = StreamService(ServiceConfig(listen=("127.0.0.1", free_port()), **kw), brain_processor)
    svc.start()
    try:
        assert set(send_files(files, svc.listener.port)) == {0}
        assert wait_for(lambda: svc.journal.counts().get("outbox_pending") == 1 and svc.worker.done == 1, 20)
    finally:
        svc.stop()
    with PacsStub(pacs_port) as pacs:
        svc2 = StreamService(ServiceConfig(**kw), brain_processor)
        metrics = svc2.run_once(forward_window_s=10)
        assert metrics["series_delivered"] == 1 and metrics["outbox_pending"] == 0
        assert metrics["series_done_this_run"] == 0  # delivered, not segmented again
        assert len(pacs.received) == 1
