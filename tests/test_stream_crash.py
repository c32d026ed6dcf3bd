"""Crash safety: the listener runs as its own process and is SIGKILLed in the middle of a transfer.

After a restart and a resend of what was not acknowledged, every acknowledged instance is in
the journal and every series is segmented exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from edgeseg.stream._log import uid_key
from edgeseg.stream.testing import send_files, wait_for

REPO = Path(__file__).resolve().parents[1]


class ListenerProcess:
    """``python -m edgeseg.stream`` in a subprocess, on a free loopback port."""

    def __init__(self, bundle: Path, out: Path, log: Path):
        self.log = log
        stdout = log.with_suffix(".stdout")
        stdout.write_bytes(b"")
        cmd = [
            sys.executable,
            "-m",
            "edgeseg.stream",
            str(bundle),
            "--listen",
            "127.0.0.1:0",
            "-o",
            str(out),
            "--series-timeout",
            "2",
            "--backend",
            "cpu",
            "--status-interval",
            "1",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=stdout.open("wb"),
            stderr=log.open("ab"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ok = wait_for(lambda: b"listening" in stdout.read_bytes() or self.proc.poll() is not None, 60)
        if not ok or self.proc.poll() is not None:
            self.kill()
            pytest.fail(f"listener did not start:\n{log.read_text()[-3000:]}")
        self.port = json.loads(stdout.read_bytes().splitlines()[0])["listening"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _journal(out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    db = sqlite3.connect(f"file:{out / '.spool' / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        series = {r["key"]: dict(r) for r in db.execute("SELECT * FROM series")}
        instances = {r["key"]: r["state"] for r in db.execute("SELECT key, state FROM instances")}
    finally:
        db.close()
    return series, instances


def _send_and_kill(files: list[Path], port: int, listener: ListenerProcess, kill_after: int) -> list[Path]:
    """Send ``files`` in one association; SIGKILL the listener while instance ``kill_after + 1``
    is on the wire. Returns the files whose C-STORE was acknowledged with Success."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(str(f)) for f in files]
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGESEG")
    assert assoc.is_established
    acked: list[Path] = []
    for i, (f, ds) in enumerate(zip(files, datasets)):
        if i == kill_after:
            # Kill from another thread a moment later: the next store is under way when it lands.
            threading.Timer(0.003, listener.kill).start()
        try:
            status = assoc.send_c_store(ds)
        except Exception:  # noqa: BLE001 (the peer is gone: this one was not acknowledged)
            break
        if getattr(status, "Status", None) == 0x0000:
            acked.append(f)
        else:
            break
    if assoc.is_established:
        assoc.abort()
    return acked


def test_sigkill_mid_transfer_loses_nothing_and_runs_each_series_once(brain_bundle, dicom_data, tmp_path):
    study = dicom_data / "tcia_brain_tumor_progression" / "PGBM-003_Study3"
    done_first = sorted((study / "37830-T2reg-78532").glob("*.dcm"))
    cut = sorted((dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag").glob("*.dcm"))
    out = tmp_path / "out"
    log = tmp_path / "listener.log"

    first = ListenerProcess(brain_bundle, out, log)
    try:
        # One series fully received and segmented before the crash.
        assert set(send_files(done_first, first.port)) == {0}
        key_done = uid_key(str(pydicom.dcmread(done_first[0], stop_before_pixels=True).SeriesInstanceUID))
        assert wait_for(lambda: _journal(out)[0].get(key_done, {}).get("state") == "delivered", 30), (
            log.read_text()
        )
        # The second is cut off by SIGKILL part-way.
        acked = _send_and_kill(cut, first.port, first, kill_after=12)
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    assert 12 <= len(acked) < len(cut), len(acked)

    series, instances = _journal(out)
    acked_keys = {uid_key(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) for f in acked}
    assert acked_keys <= set(instances), "an acknowledged instance is missing from the journal"
    key_cut = uid_key(str(pydicom.dcmread(cut[0], stop_before_pixels=True).SeriesInstanceUID))
    assert series[key_cut]["state"] == "receiving"

    second = ListenerProcess(brain_bundle, out, log)
    try:
        # The scanner resends what it did not get an acknowledgement for.
        rest = [f for f in cut if f not in acked]
        assert set(send_files(rest, second.port)) == {0}
        assert wait_for(lambda: _journal(out)[0][key_cut]["state"] == "delivered", 30), log.read_text()[
            -3000:
        ]
        time.sleep(0.5)
        assert second.terminate() == 0  # SIGTERM: graceful, exit code 0
    finally:
        second.kill()

    series, instances = _journal(out)
    assert set(series) == {key_done, key_cut}
    assert {k: s["runs"] for k, s in series.items()} == {key_done: 1, key_cut: 1}
    assert series[key_cut]["n_instances"] == len(cut) and series[key_done]["n_instances"] == len(done_first)
    assert len(instances) == len(cut) + len(done_first)
    assert sorted(p.name[:19] for p in out.glob("*_seg.dcm")) == sorted(f"series-{k[:12]}" for k in series)
    assert not list((out / ".spool" / "tmp").iterdir())
    text = log.read_text()
    assert "recovered" in text and "stopping" in text
    # No UIDs in the log: only hashed keys.
    assert str(pydicom.dcmread(cut[0], stop_before_pixels=True).SeriesInstanceUID) not in text
