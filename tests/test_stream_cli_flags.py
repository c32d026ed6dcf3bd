"""``--series-time-limit`` and ``--no-isolate`` reach ``serve()`` from both command lines.

``python -m edgeseg.stream`` and ``edgeseg run --listen/--watch`` run for real, as their own
processes with the real model, on a real series (sent over loopback with pynetdicom, or
dropped in a watched folder): with ``--no-isolate`` the SEG comes out and no series process is
started; with a time limit no series can meet, the series is stopped, set aside with that
reason, and the service lives on.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from conftest import REPO

from edgeseg.stream._log import uid_key
from edgeseg.stream.testing import echo, send_files, wait_for

GOOD = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")
MODULE = [sys.executable, "-m", "edgeseg.stream"]
CLI = [sys.executable, "-m", "edgeseg", "run"]
# Far below what reading and segmenting a 22-slice series takes: the child is always stopped.
TOO_SHORT = "0.01"


def _good(dicom_data: Path) -> tuple[list[Path], str]:
    files = sorted(dicom_data.joinpath(*GOOD).glob("*.dcm"))
    assert files, GOOD
    return files, uid_key(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))


def _series(out: Path) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{out / '.spool' / 'journal.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in db.execute("SELECT * FROM series")}
    finally:
        db.close()


def _state(out: Path, key: str) -> str | None:
    try:
        return _series(out).get(key, {}).get("state")
    except sqlite3.Error:
        return None  # the journal is not there yet


def _common(bundle: Path, out: Path) -> list[str]:
    return [str(bundle), "-o", str(out), "--backend", "cpu", "--series-timeout", "0.5"]


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


class Listening:
    """A listener command line run as its own process until :meth:`stop`."""

    def __init__(self, cmd: list[str], tmp: Path):
        self.stdout, self.log = tmp / "service.stdout", tmp / "service.log"
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.stdout.open("wb"),
            stderr=self.log.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        up = wait_for(lambda: b"listening" in self.stdout.read_bytes() or self.proc.poll() is not None, 90)
        if not up or self.proc.poll() is not None:
            self.stop()
            pytest.fail(f"the listener did not start:\n{self.text()[-3000:]}")
        self.port = json.loads(self.stdout.read_bytes().splitlines()[0])["listening"]

    def text(self) -> str:
        return (self.stdout.read_bytes() + self.log.read_bytes()).decode("utf-8", "replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _run_once(cmd: list[str], drop: Path, files: list[Path]) -> subprocess.CompletedProcess:
    drop.mkdir()
    for f in files:
        os.link(f, drop / f.name)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


# -- python -m edgeseg.stream ---------------------------------------------------------------------


def test_module_no_isolate_listens_and_segments_in_its_own_process(brain_bundle, dicom_data, tmp_path):
    out = tmp_path / "out"
    files, key = _good(dicom_data)
    service = Listening(
        [*MODULE, *_common(brain_bundle, out), "--listen", "127.0.0.1:0", "--no-isolate"], tmp_path
    )
    try:
        assert send_files(files, service.port) == [0x0000] * len(files)
        assert wait_for(lambda: _state(out, key) == "delivered", 60), service.text()[-2000:]
        # No series process: the segmenter runs in the service itself.
        assert _children(service.proc.pid) == []
    finally:
        rc = service.stop()
    assert rc == 0, service.text()[-2000:]
    seg = pydicom.dcmread(json.loads(_series(out)[key]["outputs"])["seg"])
    assert seg.Modality == "SEG"
    assert "series_process_started" not in service.text()


def test_module_series_time_limit_stops_the_series_process(brain_bundle, dicom_data, tmp_path):
    out = tmp_path / "out"
    files, key = _good(dicom_data)
    cmd = [*MODULE, *_common(brain_bundle, out), "--watch", str(tmp_path / "drop"), "--once"]
    r = _run_once([*cmd, "--series-time-limit", TOO_SHORT], tmp_path / "drop", files)
    assert r.returncode == 1, r.stderr[-2000:]  # --once: a quarantined series
    row = _series(out)[key]
    assert row["state"] == "quarantined", row
    assert "longer than the" in row["reason"] and "limit" in row["reason"], row["reason"]
    assert "series_process_started" in r.stderr  # isolated, as by default


def test_module_passes_precision_on_and_reports_a_bad_one_in_one_line(brain_bundle, tmp_path):
    # The bundle has fp32 only: an int8 request must reach Segmenter.open in the child and fail there.
    (tmp_path / "drop").mkdir()
    cmd = [*MODULE, *_common(brain_bundle, tmp_path / "out"), "--watch", str(tmp_path / "drop"), "--once"]
    r = subprocess.run([*cmd, "--precision", "int8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no int8 model in this bundle" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_module_rejects_bad_flag_combinations(capsys):
    from edgeseg.stream.__main__ import main

    for argv, says in (
        (["b.edgeseg", "--watch", "d", "--no-isolate", "--series-time-limit", "5"], "needs isolation"),
        (["b.edgeseg", "--watch", "d", "--series-time-limit", "0"], "more than 0 seconds"),
        (["b.edgeseg", "--watch", "d", "--series-time-limit", "nan"], "more than 0 seconds"),
        (["b.edgeseg", "--watch", "d", "--series-time-limit", "soon"], "number of seconds"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
        assert says in capsys.readouterr().err, argv


# -- edgeseg run --listen/--watch -----------------------------------------------------------------


def test_cli_series_time_limit_on_the_listener_sets_the_series_aside(brain_bundle, dicom_data, tmp_path):
    out = tmp_path / "out"
    files, key = _good(dicom_data)
    cmd = [*CLI, *_common(brain_bundle, out), "--listen", "127.0.0.1:0", "--series-time-limit", TOO_SHORT]
    service = Listening(cmd, tmp_path)
    try:
        assert send_files(files, service.port) == [0x0000] * len(files)
        assert wait_for(lambda: _state(out, key) == "quarantined", 60), service.text()[-2000:]
        # The series process was stopped, not the service.
        assert service.proc.poll() is None and echo(service.port) == 0x0000
    finally:
        rc = service.stop()
    assert rc == 0, service.text()[-2000:]
    reason = _series(out)[key]["reason"]
    assert "longer than the" in reason and "limit" in reason, reason


def test_cli_no_isolate_on_the_watched_folder_segments(brain_bundle, dicom_data, tmp_path):
    out = tmp_path / "out"
    files, key = _good(dicom_data)
    cmd = [*CLI, *_common(brain_bundle, out), "--watch", str(tmp_path / "drop"), "--once", "--no-isolate"]
    r = _run_once(cmd, tmp_path / "drop", files)
    assert r.returncode == 0, r.stderr[-2000:]
    row = _series(out)[key]
    assert row["state"] == "delivered", row
    assert pydicom.dcmread(json.loads(row["outputs"])["seg"]).Modality == "SEG"
    assert "series_process_started" not in r.stderr


def test_cli_rejects_bad_flag_combinations(tmp_path):
    from edgeseg.cli import main

    for args, says in (
        (["--watch", "d", "--no-isolate", "--series-time-limit", "5"], "needs isolation"),
        (["--watch", "d", "--series-time-limit", "0"], "--series-time-limit"),
        (["--no-isolate"], "only with --listen or --watch"),
        (["--series-time-limit", "5"], "only with --listen or --watch"),
    ):
        r = CliRunner().invoke(main, ["run", str(tmp_path / "b.edgeseg"), *args])
        assert r.exit_code == 2, (args, r.output)
        assert says in r.output, (args, r.output)
