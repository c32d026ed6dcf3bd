"""Orthanc as the PACS for --forward: started here on loopback, checked through its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest

from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import free_port, send_files, wait_for

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def _up(port: int) -> bool:
    try:
        return "Version" in _get(port, "/system")
    except OSError:
        return False


@pytest.fixture
def orthanc(tmp_path):
    """A throwaway Orthanc: DICOM and HTTP on free loopback ports, storage in tmp."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "edgeseg-test",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
    }
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [ORTHANC, str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path
    )
    try:
        if (
            not wait_for(lambda: _up(http_port) or proc.poll() is not None, 20, 0.1)
            or proc.poll() is not None
        ):
            pytest.fail(f"Orthanc did not come up (exit code {proc.poll()})")
        yield dicom_port, http_port
    finally:
        proc.terminate()  # SIGTERM: Orthanc closes its database cleanly
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def brain_processor(brain_bundle):
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.cli_support import segmenter_processor

    seg = Segmenter.open(brain_bundle, backend="cpu")
    yield segmenter_processor(seg)
    seg.close()


def test_seg_forwarded_to_orthanc_is_stored_and_references_the_source(
    tmp_path, dicom_data, orthanc, brain_processor
):
    dicom_port, http_port = orthanc
    files = sorted(dicom_data.joinpath(*TCIA).glob("*.dcm"))
    assert files
    cfg = ServiceConfig(
        out_dir=tmp_path / "out",
        listen=("127.0.0.1", free_port()),
        forward=[f"ORTHANC@127.0.0.1:{dicom_port}"],
        series_timeout_s=0.3,
        forward_base_delay_s=0.2,
        forward_max_delay_s=0.5,
    )
    svc = StreamService(cfg, brain_processor)
    svc.start()
    try:
        assert set(send_files(files, svc.listener.port)) == {0}
        assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 30), (
            svc.journal.series_rows()
        )
    finally:
        svc.stop()
    instances = _get(http_port, "/instances")
    assert len(instances) == 1, instances
    tags = _get(http_port, f"/instances/{instances[0]}/tags?simplify")
    assert tags["SOPClassUID"] == SEG_STORAGE
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    refs = [item["SeriesInstanceUID"] for item in tags["ReferencedSeriesSequence"]]
    assert refs == [str(src.SeriesInstanceUID)]
    referenced = {
        i["ReferencedSOPInstanceUID"]
        for i in tags["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"]
    }
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert tags["StudyInstanceUID"] == str(src.StudyInstanceUID)
