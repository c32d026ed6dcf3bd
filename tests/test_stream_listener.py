"""The DICOM listener end to end: a real pynetdicom SCU sends real series over loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edgeseg.stream.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import count_processor, echo, free_port, send_datasets, send_files, wait_for

SAG = ("dcm_qa_decubitus", "HFS_t1_fl2d_sag")  # 35 slices, MR, Siemens
TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")  # 22 slices


def _series(dicom_data: Path, parts) -> list[Path]:
    files = sorted(dicom_data.joinpath(*parts).glob("*.dcm"))
    assert files, parts
    return files


@pytest.fixture
def service_factory(tmp_path):
    """Start in-process services on free loopback ports; all are stopped at teardown."""
    started: list[StreamService] = []

    def start(processor=count_processor, **kw) -> StreamService:
        kw.setdefault("series_timeout_s", 0.5)
        cfg = ServiceConfig(out_dir=tmp_path / "out", listen=("127.0.0.1", free_port()), **kw)
        svc = StreamService(cfg, processor)
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        if not svc._stop.is_set():
            svc.stop()


@pytest.fixture(scope="module")
def brain_segmenter(brain_bundle):
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.open(brain_bundle, backend="cpu")
    yield seg
    seg.close()


def _series_row(svc: StreamService) -> dict:
    rows = svc.journal.series_rows()
    assert len(rows) == 1, rows
    return rows[0]


def test_real_series_over_the_network_gives_the_same_seg_as_offline(
    service_factory, brain_segmenter, dicom_data, tmp_path
):
    from edgeseg.dicom import read_volume
    from edgeseg.outputs import read_seg_labels
    from edgeseg.run import process_series
    from edgeseg.stream.cli_support import segmenter_processor

    files = _series(dicom_data, SAG)
    svc = service_factory(segmenter_processor(brain_segmenter))
    assert echo(svc.listener.port) == SUCCESS
    assert send_files(files, svc.listener.port) == [SUCCESS] * len(files)
    assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 30)
    row = _series_row(svc)
    assert row["n_instances"] == len(files) and row["runs"] == 1 and row["latency_ms"] > 0
    seg_path = Path(json.loads(row["outputs"])["seg"])
    assert seg_path.parent == tmp_path / "out" and "series-" in seg_path.name
    svc.stop()

    offline = process_series(brain_segmenter, files, tmp_path / "offline")
    assert offline.status == "ok", offline.error
    volume = read_volume(files)
    got = read_seg_labels(seg_path, volume)
    want = read_seg_labels(offline.outputs["seg"], volume)
    assert got.shape == volume.stored.shape and got.any()
    np.testing.assert_array_equal(got, want)
    # The journal and the spool hold hashes, never UIDs.
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    spool = tmp_path / "out" / ".spool"
    assert all(uid not in p.name for p in spool.rglob("*"))
    assert uid.encode() not in (spool / "journal.sqlite").read_bytes()


def test_unknown_calling_ae_is_refused(service_factory, dicom_data):
    svc = service_factory(allow=["SCANNER", "CT2"])
    files = _series(dicom_data, TCIA)[:2]
    with pytest.raises(ConnectionError):
        send_files(files, svc.listener.port, calling_ae="INTRUDER")
    assert echo(svc.listener.port, calling_ae="INTRUDER") is None
    assert send_files(files, svc.listener.port, calling_ae="CT2") == [SUCCESS, SUCCESS]
    assert svc.journal.counts()["instances"] == 2


def test_spool_write_failure_answers_out_of_resources_then_recovers(service_factory, dicom_data, tmp_path):
    svc = service_factory()
    files = _series(dicom_data, TCIA)
    # A file where the spool's temp folder should be: every write fails (as root too).
    tmp_dir = tmp_path / "out" / ".spool" / "tmp"
    tmp_dir.rmdir()
    tmp_dir.write_bytes(b"not a folder")
    assert send_files(files[:3], svc.listener.port) == [OUT_OF_RESOURCES] * 3
    assert svc.journal.counts()["instances"] == 0  # nothing half-stored, nothing acknowledged
    tmp_dir.unlink()
    tmp_dir.mkdir()
    assert send_files(files, svc.listener.port) == [SUCCESS] * len(files)
    assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1)
    out = json.loads(Path(json.loads(_series_row(svc)["outputs"])["json"]).read_text())
    assert out == sorted(int(pydicom.dcmread(f).InstanceNumber) for f in files)


def test_full_disk_answers_out_of_resources(service_factory, dicom_data):
    svc = service_factory(min_free_bytes=1 << 62)  # more than any disk has: "full"
    assert send_files(_series(dicom_data, TCIA)[:2], svc.listener.port) == [OUT_OF_RESOURCES] * 2
    assert svc.journal.counts()["instances"] == 0


def test_late_instances_rerun_and_duplicates_do_not(service_factory, dicom_data):
    files = _series(dicom_data, TCIA)
    svc = service_factory()
    port = svc.listener.port
    assert set(send_files(files[:-4], port)) == {SUCCESS}
    assert wait_for(lambda: _series_row(svc)["state"] == "delivered")
    # The whole series again (a scanner resend): duplicates, no second run.
    assert set(send_files(files[:-4], port)) == {SUCCESS}
    assert not wait_for(lambda: _series_row(svc)["runs"] > 1, 1.5)
    # The missing four arrive late: a new generation, one more run over all files.
    assert set(send_files(files[-4:], port)) == {SUCCESS}
    assert wait_for(lambda: _series_row(svc)["runs"] == 2 and _series_row(svc)["state"] == "delivered")
    row = _series_row(svc)
    assert row["generation"] == 1 and row["n_instances"] == len(files)
    out = json.loads(Path(json.loads(row["outputs"])["json"]).read_text())
    assert len(out) == len(files)


def _as_mr(path: Path) -> pydicom.Dataset:
    # Broken files from other modalities are relabelled MR so that they get past association
    # negotiation: their content (truncated or undecodable pixel data) is what is under test.
    ds = pydicom.dcmread(str(path), force=True)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def test_broken_files_are_quarantined_and_the_listener_keeps_going(
    service_factory, brain_segmenter, dicom_data, tmp_path
):
    from edgeseg.stream.cli_support import segmenter_processor

    svc = service_factory(segmenter_processor(brain_segmenter))
    port = svc.listener.port
    broken = dicom_data / "pydicom" / "broken"
    # Truncated pixel data; two undecodable JPEGs of one (NM) series; an RT Dose object.
    names = ("MR_truncated.dcm", "JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "badVR.dcm")
    for name in names:
        statuses = send_datasets([_as_mr(broken / name)], port)
        assert statuses in ([SUCCESS], [CANNOT_UNDERSTAND]), (name, statuses)
    # A colour image (ultrasound RGB, relabelled MR): accepted, then refused by the pipeline.
    colour = dicom_data / "pydicom" / "us_color" / "SC_rgb_small_odd.dcm"
    send_datasets([_as_mr(colour)], port)
    assert wait_for(lambda: svc.journal.counts().get("series_quarantined", 0) == 4, 30)
    reasons = " | ".join(r["reason"] for r in svc.journal.series_rows())
    assert "truncated" in reasons and "colour" in reasons, reasons
    # Still up: a good series goes through.
    good = _series(dicom_data, TCIA)
    assert set(send_files(good, port)) == {SUCCESS}
    assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 30)
    assert not wait_for(lambda: svc.journal.counts().get("series_receiving", 0) > 0, 1.0)
    quarantine = tmp_path / "out" / ".spool" / "quarantine"
    for row in svc.journal.series_rows():
        if row["state"] == "quarantined":
            folder = quarantine / row["key"]
            assert (folder / "reason.txt").read_text().strip(), row
            assert list(folder.glob("*.dcm")), row
            assert str(tmp_path) not in row["reason"]  # errors name spool files by hash only
    c = svc.journal.counts()
    assert c["series_quarantined"] + c["series_delivered"] == len(svc.journal.series_rows())
