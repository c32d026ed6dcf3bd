"""Corrupt instances by the hundred over the network, then a good series that must come out.

The service is the real one, ``python -m edgeseg.stream`` in its own process with its default
isolation (each series decoded and segmented in a spawn child that may die). The corrupt
instances are made by the seeded mutation fuzzer of ``benchmarks/fuzz_dicom.py`` from the real
files in ../shared/data/dicom and pydicom's test files: each of ``N_SERIES`` series takes one
seed, gives it a series UID, per-instance UIDs and positions and a sentinel patient name/ID,
and every one of its ``PER_SERIES`` instances gets one to three stacked mutations (byte flips,
truncations, bad length fields, deleted or duplicated spans, a broken transfer syntax or VR).
Non-CT/MR seeds are relabelled MR first, so that they get past association negotiation and
their content is what is under test.

The instances are sent as they are, byte for byte (pynetdicom's chunked send of a file: no
decoding or re-encoding on the sending side), one association per series like a scanner.
What pynetdicom cannot send at all (file meta it cannot parse, a UID it will not put on the
wire) or the listener refuses at negotiation (a transfer syntax it does not accept) is counted,
not skipped silently. Then one good real series is sent and must come out as a DICOM SEG,
every corrupt series must end segmented or quarantined with a one-line reason that names no
patient, and the journal must account for every instance the listener acknowledged.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from conftest import REPO

from edgeseg.stream._log import uid_key
from edgeseg.stream.testing import echo, send_files, wait_for

N_SERIES = 30
PER_SERIES = 10
MASTER = os.environ.get("EDGESEG_NET_FUZZ_SEED", "0")  # fixed in CI: the same instances every run
MAX_SEED_BYTES = 300_000  # 300 instances of at most this much: a bounded transfer
SENTINEL_NAME = "Fuzzpatient^Quirinus"
SENTINEL_ID = "FZPHI48151623"
GOOD = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _fuzzer():
    name = "fuzz_dicom"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "fuzz_dicom.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


# -- the corrupt instances ------------------------------------------------------------------------


@dataclass
class Corrupt:
    path: Path
    series: int
    seed: str
    steps: list[str]
    outcome: str = ""  # filled in by the sender


@dataclass
class Sent:
    cases: list[Corrupt] = field(default_factory=list)

    def count(self) -> Counter:
        return Counter(c.outcome for c in self.cases)


def _base_dataset(path: Path) -> pydicom.Dataset | None:
    """The seed as an instance the listener would accept unmutated, or None (not usable)."""
    from edgeseg.stream.scp import transfer_syntaxes

    try:
        ds = pydicom.dcmread(str(path))
        ts = str(ds.file_meta.TransferSyntaxUID)
        if "PixelData" not in ds or ts not in transfer_syntaxes():
            return None
        if str(ds.get("SOPClassUID", "")) not in (MR, CT):
            ds.SOPClassUID = MR
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        _encode(ds)  # a seed pydicom cannot write back is no seed here
    except Exception:  # noqa: BLE001 (seeds include broken files: they are simply not used)
        return None
    return ds


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_corrupt(folder: Path, *, n_series: int = N_SERIES, per_series: int = PER_SERIES) -> list[Corrupt]:
    """Write the corrupt instances (deterministic for a given MASTER) and return them."""
    fz = _fuzzer()
    pool = [
        s.path for s in fz.collect_seeds() if s.kind == "file" and s.path.stat().st_size <= MAX_SEED_BYTES
    ]
    assert len(pool) > 100, f"only {len(pool)} seed files: is ../shared/data/dicom complete?"
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Corrupt] = []
    for i in range(n_series):
        rng = random.Random(f"net:{MASTER}:{i}")
        base = None
        while base is None:
            seed = rng.choice(pool)
            base = _base_dataset(seed)
        series_uid = pydicom.uid.generate_uid(entropy_srcs=["edgeseg-net-fuzz", MASTER, str(i)])
        ipp, normal = _geometry(base)
        for k in range(per_series):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid(
                entropy_srcs=["edgeseg-net-fuzz", MASTER, str(i), str(k)]
            )
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.PatientName, ds.PatientID = SENTINEL_NAME, SENTINEL_ID
            if ipp is not None:
                ds.ImagePositionPatient = [round(p + k * n, 4) for p, n in zip(ipp, normal)]
            data, steps = fz.mutate(random.Random(f"net:{MASTER}:{i}:{k}"), _encode(ds))
            path = folder / f"s{i:02d}-{k:02d}.dcm"
            path.write_bytes(data)
            cases.append(Corrupt(path, i, seed.name, steps))
    return cases


def _geometry(ds: pydicom.Dataset) -> tuple[list[float] | None, list[float]]:
    """Start position and one slice step along the normal, so each series stacks as a volume."""
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        iop = [float(v) for v in ds.ImageOrientationPatient]
        step = float(ds.get("SliceThickness", 0) or 0) or 1.0
    except Exception:  # noqa: BLE001 (no geometry: the instances keep the seed's)
        return None, [0.0, 0.0, 0.0]
    r, c = iop[:3], iop[3:]
    n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    return ipp, [step * v for v in n]


def send_corrupt(cases: list[Corrupt], port: int) -> None:
    """Send every case as its bytes, one association per series; set each case's outcome.

    Outcomes: ``stored`` (0x0000), ``unreadable`` (0xC000: the listener kept it in quarantine),
    ``status:0x....`` (any other answer), ``no-answer``, ``unsendable`` (pynetdicom will not
    send it: unparseable file meta or an invalid UID), ``refused`` (no presentation context
    accepted for it: the listener refused its SOP class or transfer syntax at negotiation).
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    by_series: dict[int, list[Corrupt]] = {}
    for c in cases:
        by_series.setdefault(c.series, []).append(c)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoded dataset
    try:
        for group in by_series.values():
            ae = AE(ae_title="SCANNER")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            sendable = []
            for c in group:
                try:
                    meta, _ = split_dataset(c.path)
                    context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
                    uids = (*context, str(meta.MediaStorageSOPInstanceUID))
                    if not all(pydicom.uid.UID(u).is_valid for u in uids):
                        # pynetdicom would fail to encode the association request (its
                        # reactor thread dies and the association times out): not sendable.
                        raise ValueError("invalid UID in the file meta")
                    if context not in [
                        (x.abstract_syntax, x.transfer_syntax[0]) for x in ae.requested_contexts
                    ]:
                        ae.add_requested_context(*context)
                    sendable.append(c)
                except Exception:  # noqa: BLE001 (pynetdicom refuses it before anything is sent)
                    c.outcome = "unsendable"
            _send_group(ae, sendable, port)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def _send_group(ae, group: list[Corrupt], port: int) -> None:
    assoc = None
    for c in group:
        if assoc is None or not assoc.is_established:  # the listener may abort a broken transfer
            assoc = ae.associate("127.0.0.1", port, ae_title="EDGESEG")
            if not assoc.is_established:
                c.outcome = "refused"
                continue
        try:
            status = assoc.send_c_store(c.path)
        except ValueError as exc:
            # "No presentation context ... accepted" is the listener's refusal at negotiation;
            # anything else pynetdicom cannot put on the wire.
            c.outcome = "refused" if "presentation context" in str(exc) else "unsendable"
            continue
        except (AttributeError, TypeError, KeyError, OSError):
            c.outcome = "unsendable"
            continue
        code = getattr(status, "Status", None)
        c.outcome = {0x0000: "stored", 0xC000: "unreadable", None: "no-answer"}.get(
            code, f"status:{code:#06x}"
        )
    if assoc is not None and assoc.is_established:
        assoc.release()


# -- the service, as its own process ------------------------------------------------------------


class ServiceProcess:
    """``python -m edgeseg.stream`` (isolation on, as by default) on a free loopback port or a
    watched folder; its log and stdout go to files next to ``out``."""

    def __init__(self, bundle: Path, out: Path, *args: str, ready: bytes):
        self.out = out
        self.log = out.parent / "service.log"
        self.stdout = out.parent / "service.stdout"
        self.stdout.write_bytes(b"")
        cmd = [sys.executable, "-m", "edgeseg.stream", str(bundle), "-o", str(out), "--backend", "cpu"]
        cmd += ["--series-timeout", "0.5", "--status-interval", "1", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self.stdout.open("wb"),
            stderr=self.log.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        up = wait_for(lambda: ready in self.text() or self.proc.poll() is not None, 90)
        if not up or self.proc.poll() is not None:
            self.kill()
            pytest.fail(f"the service did not start:\n{self.text()[-3000:]}")
        self.port = None
        if ready == b"listening":
            self.port = json.loads(self.stdout.read_bytes().splitlines()[0])["listening"]

    def text(self) -> bytes:
        return self.stdout.read_bytes() + self.log.read_bytes()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _query(out: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{out / '.spool' / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _states(out: Path) -> Counter:
    return Counter(dict(_query(out, "SELECT state, COUNT(*) FROM series GROUP BY state")))


def _settled(out: Path) -> bool:
    """Every series received so far is done with (segmented/delivered or quarantined)."""
    states = _states(out)
    return bool(states) and not ({"receiving", "complete", "processing"} & set(states))


def _rows(out: Path, table: str) -> list[dict]:
    db = sqlite3.connect(f"file:{out / '.spool' / 'journal.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]
    finally:
        db.close()


def _good_series(dicom_data: Path) -> tuple[list[Path], str]:
    files = sorted(dicom_data.joinpath(*GOOD).glob("*.dcm"))
    assert files, GOOD
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _check_outcome(out: Path, service: ServiceProcess, good_uid: str, received: int) -> dict:
    """What must hold once the service has stopped; returns the figures for the report."""
    spool = out / ".spool"
    series, instances = _rows(out, "series"), _rows(out, "instances")
    by_key = {r["key"]: r for r in series}
    good = by_key.get(uid_key(good_uid))
    assert good is not None and good["state"] == "delivered", good
    seg = pydicom.dcmread(json.loads(good["outputs"])["seg"])
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == good_uid

    # Nothing lost: every acknowledged instance is journaled, every series ended, and each
    # instance file is where its state says.
    assert len(instances) == received, (len(instances), received)
    assert sum(r["n_instances"] for r in series) == len(instances)
    states = Counter(r["state"] for r in series)
    assert set(states) <= {"delivered", "quarantined"}, states
    assert states["delivered"] + states["quarantined"] == len(series)
    for inst in instances:
        where = "incoming" if inst["state"] == "spooled" else "quarantine"
        assert (spool / where / inst["series_key"] / f"{inst['key']}.dcm").is_file(), inst
        assert by_key[inst["series_key"]]["state"] == ("delivered" if where == "incoming" else "quarantined")

    # Every corrupt series: segmented with its outputs on disk, or quarantined with one line.
    reasons = []
    for row in series:
        if row["state"] == "delivered":
            outputs = json.loads(row["outputs"])
            # A split series records a part it could not segment as "error@<part>": a reason, not a file.
            files = [p for k, p in outputs.items() if not k.startswith("error@")]
            assert files and all(Path(p).is_file() for p in files), row
            reasons += [r for k, r in outputs.items() if k.startswith("error@")]
            continue
        reason = row["reason"] or ""
        reasons.append(reason)
        assert reason.strip() and "\n" not in reason and "Traceback" not in reason, reason
        assert "internal error" not in reason, reason  # the reader's contract: a named input error
        assert str(out) not in reason, reason  # spool files are named by their hash only
        assert (spool / "quarantine" / row["key"] / "reason.txt").read_text().strip(), row
    # No patient identifier anywhere the service writes words: reasons, log, stdout, file names.
    names = "\n".join(str(p.relative_to(out)) for p in out.rglob("*"))
    for text in (*reasons, service.text().decode("utf-8", "replace"), names):
        assert SENTINEL_NAME not in text and SENTINEL_ID not in text
        assert "Fuzzpatient" not in text and "Quirinus" not in text
    assert "series_process_started" in service.text().decode()  # isolated, as by default
    crashed = sum("crashed" in r or "exited unexpectedly" in r for r in reasons)
    return {
        "series": len(series) - 1,
        "segmented": states["delivered"] - 1,
        "quarantined": states["quarantined"],
        "of which unreadable header": sum(r["key"].startswith("unreadable-") for r in series),
        "of which child crashed": crashed,
        "of which over the time limit": sum("limit" in r for r in reasons),
    }


def _check_cases(cases: list[Corrupt]) -> None:
    # Not vacuous: the identifiers the PHI check looks for were in what was sent.
    with_phi = sum(SENTINEL_ID.encode() in c.path.read_bytes() for c in cases)
    assert with_phi >= 0.8 * len(cases), with_phi
    assert all(c.steps for c in cases)  # every instance was mutated


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_instances_over_the_network_then_a_good_series(brain_bundle, dicom_data, tmp_path):
    t0 = time.perf_counter()
    cases = make_corrupt(tmp_path / "corrupt")
    _check_cases(cases)
    out = tmp_path / "out"
    # A series may take 30 s at most here (the default is 120): a hang costs half a minute.
    service = ServiceProcess(
        brain_bundle, out, "--listen", "127.0.0.1:0", "--series-time-limit", "30", ready=b"listening"
    )
    try:
        send_corrupt(cases, service.port)
        sent = Counter(c.outcome for c in cases)
        # The listener acknowledged most of them: the content, not the negotiation, is under test.
        assert sent["stored"] + sent["unreadable"] >= 0.6 * len(cases), sent
        assert set(sent) <= {"stored", "unreadable", "refused", "unsendable"}, sent
        assert wait_for(lambda: _settled(out), 90, 0.2), (_states(out), service.text()[-2000:])
        assert service.alive() and echo(service.port) == 0x0000
        good, good_uid = _good_series(dicom_data)
        assert send_files(good, service.port) == [0x0000] * len(good)
        key = uid_key(good_uid)
        delivered = wait_for(
            lambda: _query(out, f"SELECT state FROM series WHERE key='{key}'") == [("delivered",)], 60
        )
        assert delivered, (_states(out), service.text()[-2000:])
        assert service.alive()
    finally:
        rc = service.terminate() if service.alive() else service.proc.wait(10)
    assert rc == 0, service.text()[-2000:]
    figures = _check_outcome(out, service, good_uid, sent["stored"] + sent["unreadable"] + len(good))
    print(f"\nnetwork fuzz: {len(cases)} corrupt instances in {N_SERIES} series sent: {dict(sent)};")
    print(f"  journaled series: {figures}; {time.perf_counter() - t0:.1f} s")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_same_corrupt_instances_in_a_watched_folder_then_a_good_series(
    brain_bundle, dicom_data, tmp_path
):
    """The watched folder reads every file, including those pynetdicom could not send; files
    that are not Part 10 (no 'DICM' at byte 128) are not DICOM to it and are left alone."""
    t0 = time.perf_counter()
    cases = make_corrupt(tmp_path / "corrupt")
    part10 = [c for c in cases if c.path.read_bytes()[128:132] == b"DICM"]
    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    service = ServiceProcess(
        brain_bundle, out, "--watch", str(drop), "--series-time-limit", "30", ready=b"watching"
    )
    try:
        for c in cases:
            os.link(c.path, drop / c.path.name)
        n = len(part10)
        assert wait_for(lambda: _query(out, "SELECT COUNT(*) FROM instances") == [(n,)], 60), service.text()[
            -2000:
        ]
        assert wait_for(lambda: _settled(out), 90, 0.2), (_states(out), service.text()[-2000:])
        assert service.alive()
        good, good_uid = _good_series(dicom_data)
        for f in good:
            os.link(f, drop / f"good-{f.name}")
        key = uid_key(good_uid)
        delivered = wait_for(
            lambda: _query(out, f"SELECT state FROM series WHERE key='{key}'") == [("delivered",)], 60
        )
        assert delivered, (_states(out), service.text()[-2000:])
    finally:
        rc = service.terminate() if service.alive() else service.proc.wait(10)
    assert rc == 0, service.text()[-2000:]
    figures = _check_outcome(out, service, good_uid, len(part10) + len(good))
    print(f"\nwatch fuzz: {len(cases)} corrupt files, {len(part10)} of them Part 10;")
    print(f"  journaled series: {figures}; {time.perf_counter() - t0:.1f} s")
