"""Benchmark the DICOM listener: concurrent associations, each sending a real MR series.

The listener runs as its own process (``python -m edgeseg.stream``) with the real Segmenter;
senders are pynetdicom SCUs in threads of this process. Each round sends one series per
association at once, with fresh UIDs so that every round is new data (not duplicates).

Prints a table: instances/s received, series/s segmented, p50/p99 latency from the last
instance of a series to its SEG written, and the listener's peak RSS.

Usage::

    .venv/bin/python benchmarks/bench_listener.py [--bundle B.edgeseg] [--assoc 4] [--rounds 3]

Without ``--bundle`` a bundle is built from deepbet's pretrained model (needs torch + deepbet).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))
SERIES = [
    "dicom/dcm_qa_decubitus/HFS_t1_fl2d_sag",
    "dicom/tcia_brain_tumor_progression/PGBM-003_Study3/26401-T1prereg-52906",
    "dicom/tcia_brain_tumor_progression/PGBM-003_Study3/36468-FLAIRreg-58706",
    "dicom/tcia_brain_tumor_progression/PGBM-003_Study3/37830-T2reg-78532",
]


def _build_bundle(dst: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import BRAIN_SPEC, deepbet_model_path

    from edgeseg.export.build import build_bundle
    from edgeseg.spec import load_spec

    model = deepbet_model_path()
    if model is None:
        sys.exit("no --bundle given and deepbet is not installed")
    build_bundle(model, load_spec(str(BRAIN_SPEC)), dst, name="deepbet-brain-mask", version="1.0.2")
    return dst


def _fresh(datasets: list[pydicom.Dataset], tag: str) -> list[pydicom.Dataset]:
    # New Series/SOP Instance UIDs per round: the listener sees new series, not resends.
    series = generate_uid(entropy_srcs=[tag, "series"])
    out = []
    for i, ds in enumerate(datasets):
        ds = ds.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--assoc", type=int, default=4, help="concurrent associations (one series each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--series-timeout", type=float, default=1.0)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()

    from edgeseg.stream.testing import send_datasets, wait_for

    work = Path(tempfile.mkdtemp(prefix="bench-listener-"))
    bundle = args.bundle or _build_bundle(work / "brain.edgeseg")
    sources = [sorted((SHARED / "data" / s).glob("*.dcm")) for s in SERIES]
    base = [[pydicom.dcmread(str(f)) for f in files] for files in sources]
    out = work / "out"
    log = (work / "listener.log").open("wb")
    stdout = work / "listener.stdout"
    cmd = [sys.executable, "-m", "edgeseg.stream", str(bundle), "--listen", "127.0.0.1:0", "-o", str(out)]
    cmd += ["--series-timeout", str(args.series_timeout), "--backend", args.backend]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout.open("wb"), stderr=log)
    try:
        if not wait_for(lambda: b"listening" in stdout.read_bytes() or proc.poll() is not None, 60):
            sys.exit("listener did not start")
        port = json.loads(stdout.read_bytes().splitlines()[0])["listening"]
        n_instances = 0
        t_first = time.perf_counter()
        send_s = 0.0
        for r in range(args.rounds):
            batches = [_fresh(base[a % len(base)], f"r{r}a{a}") for a in range(args.assoc)]
            n_instances += sum(len(b) for b in batches)
            errors: list[str] = []

            def send(batch: list[pydicom.Dataset], errors: list[str] = errors) -> None:
                statuses = send_datasets(batch, port)
                if set(statuses) != {0}:
                    errors.append(str(set(statuses)))

            t = time.perf_counter()
            threads = [threading.Thread(target=send, args=(b,)) for b in batches]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            send_s += time.perf_counter() - t
            if errors:
                sys.exit(f"round {r}: non-success statuses {errors}")
        n_series = args.assoc * args.rounds
        db = f"file:{out / '.spool' / 'journal.sqlite'}?mode=ro"

        def delivered() -> int:
            with sqlite3.connect(db, uri=True) as c:
                return c.execute("SELECT COUNT(*) FROM series WHERE state='delivered'").fetchone()[0]

        if not wait_for(lambda: delivered() >= n_series, 600, 0.2):
            sys.exit(f"only {delivered()} of {n_series} series delivered")
        total_s = time.perf_counter() - t_first
        with sqlite3.connect(db, uri=True) as c:
            lat = [r[0] for r in c.execute("SELECT latency_ms FROM series WHERE latency_ms IS NOT NULL")]
            runs = c.execute("SELECT SUM(runs) FROM series").fetchone()[0]
        rss = _peak_rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    rows = [
        ("associations x rounds", f"{args.assoc} x {args.rounds}"),
        ("instances sent", str(n_instances)),
        ("series segmented (runs)", f"{n_series} ({runs})"),
        ("instances/s received", f"{n_instances / send_s:.1f}"),
        ("series/s segmented", f"{n_series / total_s:.2f}"),
        ("latency p50 ms (last instance -> SEG)", f"{np.percentile(lat, 50):.0f}"),
        ("latency p99 ms", f"{np.percentile(lat, 99):.0f}"),
        ("series timeout s (included in latency)", f"{args.series_timeout:g}"),
        ("listener peak RSS MiB", f"{rss:.0f}"),
        ("CPU cores", str(os.cpu_count())),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(w)}  value")
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
