"""Time ``edgeseg.dicom.read_volume`` against the naive pydicom read, per real series.

The naive read is what a user writes without edgeseg: ``pydicom.dcmread`` every file, sort
along the slice normal, ``np.stack`` the ``pixel_array`` of each. edgeseg does more (it
groups and validates every header, checks spacing, gaps, duplicates and tilt, keeps the
headers for SEG writing), and should still not be slower.

Both are run interleaved (naive, edgeseg, naive, edgeseg, ...) after one warm-up each, so
machine noise hits both alike; the table gives the median and the ratio edgeseg / naive. Each
run starts after a full garbage collection (untimed) and ends with a young-generation one
(timed), so collector work a run leaves behind is charged to that run, not to the next.

Usage::

    .venv/bin/python benchmarks/bench_dicom_read.py [--repeats 30] [--series tcia_hcrop,ct3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))
DICOM = SHARED / "data" / "dicom"

# key -> glob under DICOM
SERIES = {
    "tcia_hcrop": "tcia_brain_tumor_progression/*/11_HCropVolume/*.dcm",
    "decubitus_t1": "dcm_qa_decubitus/HFS_t1_fl2d_sag/*.dcm",
    "ct3slice": "dcmqi_ct3slice_seg/0[1-3].dcm",
    "tcia_t1post": "tcia_brain_tumor_progression/*/11-T1post-18670/*.dcm",
    "gantry_tilt": "dicom2nifti_headers_random_pixels/ct_siemens_gantry_tilt/*.dcm",
}


def naive_read(files: list[Path]) -> np.ndarray:
    dss = [pydicom.dcmread(str(f)) for f in files]
    row, col = (np.array(v, dtype=float) for v in np.reshape(dss[0].ImageOrientationPatient, (2, 3)))
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    return np.stack([d.pixel_array for d in dss])


def edgeseg_read(files: list[Path]) -> np.ndarray:
    from edgeseg.dicom import read_volume

    return read_volume(files).stored


def _time(fn: Callable[[list[Path]], np.ndarray], files: list[Path]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    result = fn(files)
    gc.collect(0)
    elapsed = (time.perf_counter() - t0) * 1e3
    del result
    return elapsed


def bench(files: list[Path], repeats: int) -> tuple[float, float]:
    # Same result first: the comparison is meaningless if they read different things.
    a, b = naive_read(files), edgeseg_read(files)
    if a.shape != b.shape or not np.array_equal(a, b):
        raise SystemExit(f"edgeseg and naive reads differ on {files[0].parent}")
    naive, ours = [], []
    for _ in range(repeats):
        naive.append(_time(naive_read, files))
        ours.append(_time(edgeseg_read, files))
    return statistics.median(naive), statistics.median(ours)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="interleaved runs per series (default 30)")
    ap.add_argument("--series", default=",".join(SERIES), help=f"comma-separated keys of {list(SERIES)}")
    args = ap.parse_args(argv)

    print("| series | files | KiB/file | naive pydicom ms | edgeseg read_volume ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in args.series.split(","):
        files = sorted(DICOM.glob(SERIES[key]))
        if not files:
            print(f"| {key} | (not found under {DICOM}) | | | | |")
            continue
        kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        naive, ours = bench(files, args.repeats)
        print(f"| {key} | {len(files)} | {kib:.0f} | {naive:.1f} | {ours:.1f} | {ours / naive:.2f} |")


if __name__ == "__main__":
    main()
