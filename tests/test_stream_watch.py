"""Watched folder, ``--once``, journal rules and the CLI entry point, on real files."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from edgeseg.stream.cli_support import parse_listen, serve
from edgeseg.stream.journal import Journal
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import count_processor, wait_for
from edgeseg.stream.watch import Watcher

TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")


def test_parse_listen():
    assert parse_listen("11112") == ("0.0.0.0", 11112)
    assert parse_listen("127.0.0.1:104") == ("127.0.0.1", 104)
    with pytest.raises(ValueError, match="HOST"):
        parse_listen("localhost:dicom")


def test_journal_generations(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    assert j.add_instance("a", "s", source="t", now=1.0) == "new"
    assert j.add_instance("b", "s", source="t", expected=3, now=2.0) == "new"
    assert j.add_instance("a", "s", source="t", now=3.0) == "duplicate"
    assert j.mark_complete(now=2.5, quiet_s=1.0) == []  # neither quiet nor at its count
    assert j.add_instance("c", "s", source="t", now=3.0) == "new"
    assert j.mark_complete(now=3.1, quiet_s=10.0) == ["s"]  # expected count reached
    claim = j.claim("s")
    assert claim.instance_keys == ["a", "b", "c"] and j.claim("s") is None
    assert j.add_instance("d", "s", source="t", now=4.0) == "late"  # arrives during the run
    assert not j.finish_ok(claim, {"seg": "x"}, latency_ms=1.0)  # superseded, not recorded
    j.mark_complete(now=10.0, quiet_s=1.0)
    claim2 = j.claim("s")
    assert claim2.generation == 1 and len(claim2.instance_keys) == 4
    assert j.finish_ok(claim2, {"seg": "x"}, latency_ms=1.0, forward=[("x", "P@h:1")])
    (row,) = j.series_rows()
    assert row["state"] == "segmented" and row["runs"] == 1
    (item,) = j.due_outbox(now=1e12)
    j.outbox_sent(item.id)
    assert j.series_rows()[0]["state"] == "delivered"
    j.close()


def _copy_slowly(files: list[Path], dst: Path, stop: threading.Event) -> None:
    # Like an exporter: each file is written in two halves, with a pause in between.
    for f in files:
        data = f.read_bytes()
        target = dst / f"img{f.stem}.dcm"
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            stop.wait(0.02)
            fh.write(data[len(data) // 2 :])


def test_watched_folder_ingests_stable_files_only(tmp_path, dicom_data):
    files = sorted(dicom_data.joinpath(*TCIA).glob("*.dcm"))
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "notes.txt").write_text("not DICOM")
    cfg = ServiceConfig(out_dir=tmp_path / "out", watch=drop, series_timeout_s=0.5, watch_stable_s=0.3)
    svc = StreamService(cfg, count_processor)
    svc.start()
    stop = threading.Event()
    writer = threading.Thread(target=_copy_slowly, args=(files, drop, stop))
    try:
        writer.start()
        writer.join(30)
        assert wait_for(lambda: svc.journal.counts().get("series_delivered") == 1, 20)
        (row,) = svc.journal.series_rows()
        assert row["n_instances"] == len(files) and row["runs"] == 1
        assert len(json.loads(Path(json.loads(row["outputs"])["json"]).read_text())) == len(files)
    finally:
        stop.set()
        svc.stop()
    assert len(list(drop.glob("*.dcm"))) == len(files)  # sources are left in place


def test_once_processes_the_folder_and_exits(tmp_path, dicom_data, brain_bundle):
    """``serve(once=True)`` through the real Segmenter: a good series, a broken file, exit code."""
    drop = tmp_path / "drop"
    shutil.copytree(dicom_data.joinpath(*TCIA), drop / "t1")
    broken = dicom_data / "pydicom" / "broken" / "emri_small_jpeg_2k_lossless_too_short.dcm"
    shutil.copy(broken, drop / "broken.dcm")
    out = tmp_path / "out"
    code = serve(brain_bundle, watch=drop, out_dir=out, once=True, backend="cpu", series_timeout=30)
    assert code == 1  # one thing was quarantined
    segs = list(out.glob("series-*_seg.dcm"))
    assert len(segs) == 1
    status = json.loads((out / ".spool" / "status.json").read_text())
    assert status["series_delivered"] == 1 and status["series_quarantined"] == 1
    (q,) = (out / ".spool" / "quarantine").iterdir()
    assert "truncated" in (q / "reason.txt").read_text()
    # A second --once finds nothing new: nothing is processed twice.
    assert serve(brain_bundle, watch=drop, out_dir=out, once=True, backend="cpu") == 0
    assert json.loads((out / ".spool" / "status.json").read_text())["series_done_this_run"] == 0


def test_cli_run_listen_wires_to_serve(tmp_path, dicom_data):
    """``edgeseg run --watch --once`` reaches serve() (the CLI is a colleague's thin layer)."""
    from click.testing import CliRunner

    from edgeseg.cli import main

    drop = tmp_path / "drop"
    drop.mkdir()
    r = CliRunner().invoke(main, ["run", str(tmp_path / "none.edgeseg"), "--watch", str(drop), "--once"])
    # No bundle there: the Segmenter refuses to open it, which proves the stream path was taken.
    assert r.exit_code != 0
    assert "none.edgeseg" in (r.output + str(r.exception))


def test_watcher_skips_partial_files(tmp_path, dicom_data):
    from edgeseg.stream.spool import Spool

    f = sorted(dicom_data.joinpath(*TCIA).glob("*.dcm"))[0]
    drop = tmp_path / "drop"
    drop.mkdir()
    spool = Spool(tmp_path / "spool")
    w = Watcher(spool, drop, stable_s=10.0)
    (drop / "a.dcm").write_bytes(f.read_bytes())
    assert w.scan(now=0.0) == 0 and w.scan(now=5.0) == 0  # seen, not yet stable
    assert w.scan(now=11.0) == 1 and w.scan(now=20.0) == 0  # ingested once
    assert spool.journal.counts()["instances"] == 1
    spool.close()
