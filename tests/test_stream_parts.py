"""The listener with a series that splits into parts: one SEG per part, every one forwarded-ready
in the journal, and a part that cannot be segmented recorded with its reason, not quarantined."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
from tiny_bundle import threshold_bundle

from edgeseg.stream.scp import SUCCESS
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import free_port, send_datasets, wait_for

pytest.importorskip("onnx")
pytest.importorskip("pynetdicom")

TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")  # 22 axial slices
LOCALIZER = ("pydicom", "dicomdir_series", "98892003", "MR2")  # real 3-plane localizers


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.open(threshold_bundle(tmp_path_factory.mktemp("bundle")), backend="onnxruntime")
    yield seg
    seg.close()


@pytest.fixture
def service(tmp_path, segmenter):
    from edgeseg.stream.cli_support import segmenter_processor

    cfg = ServiceConfig(out_dir=tmp_path / "out", listen=("127.0.0.1", free_port()), series_timeout_s=0.5)
    svc = StreamService(cfg, segmenter_processor(segmenter))
    svc.start()
    yield svc
    if not svc._stop.is_set():
        svc.stop()


def _one_row(svc: StreamService) -> dict:
    rows = svc.journal.series_rows()
    assert len(rows) == 1, rows
    return rows[0]


def test_a_series_with_a_localizer_part_gets_one_seg_per_part(service, dicom_data, tmp_path):
    files = sorted(dicom_data.joinpath(*TCIA).glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    # One slice re-sent as a coronal localizer of the same series (as scanners do), and one more,
    # sagittal, whose pixel data was cut short on the way: three parts of one SeriesInstanceUID.
    localizer = copy.deepcopy(datasets[10])
    localizer.SOPInstanceUID = pydicom.uid.generate_uid()
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    localizer.InstanceNumber = 100
    broken = copy.deepcopy(datasets[11])
    broken.SOPInstanceUID = pydicom.uid.generate_uid()
    broken.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    broken.InstanceNumber = 101
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    sent = [*datasets, localizer, broken]
    assert send_datasets(sent, service.listener.port) == [SUCCESS] * len(sent)
    assert wait_for(lambda: service.journal.counts().get("series_delivered") == 1, 60), (
        service.journal.counts()
    )

    row = _one_row(service)
    assert row["state"] == "delivered" and row["n_instances"] == len(sent)
    outputs = json.loads(row["outputs"])
    segs = {k: Path(v) for k, v in outputs.items() if k.startswith("seg@")}
    errors = {k: v for k, v in outputs.items() if k.startswith("error@")}
    assert len(segs) == 2 and len(set(segs.values())) == 2, outputs  # the volume and the localizer
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in segs.values())
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.dcm")) == sorted(
        p.name for p in segs.values()
    )
    # The part that cannot be segmented: one sentence naming why, in the journal, nothing else lost.
    (reason,) = errors.values()
    assert "part " in reason and "pixel data" in reason and "\n" not in reason
    assert str(service.spool.root) not in reason

    from edgeseg.dicom import find_series

    frames = sorted(int(pydicom.dcmread(p, stop_before_pixels=True).NumberOfFrames) for p in segs.values())
    assert frames[0] == 1 and frames[1] > 1  # the localizer alone; the volume, never merged with it
    assert {p.name.split("_")[0].rsplit("-", 1)[1] for p in segs.values()} == {k[4:] for k in segs}
    assert len(find_series(list(segs.values())).series) == 0  # SEGs, not images


def test_every_part_of_a_real_localizer_is_segmented_and_queued_for_pacs(tmp_path, segmenter, dicom_data):
    from edgeseg.dicom import find_series
    from edgeseg.stream.cli_support import segmenter_processor

    folder = dicom_data.joinpath(*LOCALIZER)
    refs = find_series([folder]).series
    uid = max(
        {r.series_instance_uid for r in refs}, key=lambda u: sum(r.series_instance_uid == u for r in refs)
    )
    files = [f for r in refs if r.series_instance_uid == uid for f in r.files]
    n_parts = sum(r.series_instance_uid == uid for r in refs)
    assert n_parts == 3
    # A PACS that is not there: the forwards stay pending in the outbox, one per part.
    cfg = ServiceConfig(
        out_dir=tmp_path / "out",
        listen=("127.0.0.1", free_port()),
        series_timeout_s=0.5,
        forward=[f"PACS@127.0.0.1:{free_port()}"],
        forward_base_delay_s=60,
    )
    svc = StreamService(cfg, segmenter_processor(segmenter))
    svc.start()
    try:
        sent = [pydicom.dcmread(f) for f in files]
        assert send_datasets(sent, svc.listener.port) == [SUCCESS] * len(sent)
        assert wait_for(lambda: svc.journal.counts().get("series_segmented") == 1, 60), svc.journal.counts()
        row = _one_row(svc)
        outputs = json.loads(row["outputs"])
        segs = sorted(v for k, v in outputs.items() if k.startswith("seg@"))
        assert len(segs) == n_parts == len(set(segs)) and not any(k.startswith("error@") for k in outputs)
        assert sorted(r["path"] for r in svc.journal.outbox_rows()) == segs
    finally:
        svc.stop()
