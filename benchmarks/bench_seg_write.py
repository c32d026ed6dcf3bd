"""Time edgeseg's DICOM SEG writers against each other: the fast writer (edgeseg.outputs.seg_fast)
and highdicom's ``Segmentation``, through ``write_seg(..., writer=...)`` on the same labels.

Cases: the real 40-slice TCIA hippocampus crop (MR, ~51×35) with labels shaped like the model's
(two segments on 24 slices), and a 176×256×256 MR-sized series written here with
``edgeseg.dicom.write_series`` (two ellipsoids spanning ~60 % of the slices). The writers are
alternated (fast, highdicom, fast, …) after one warm-up each, each on a freshly read Volume (as
for a new series); the table gives best and median of N and the ratio of the bests. Each run
includes the atomic write with fsync, as in production.

Usage::

    .venv/bin/python benchmarks/bench_seg_write.py [--repeats 15] [--mr-repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))
HIPPOCAMPUS = SHARED / "data" / "dicom" / "tcia_brain_tumor_progression"

from edgeseg.dicom import read_volume, write_series  # noqa: E402
from edgeseg.outputs import write_seg  # noqa: E402
from edgeseg.spec import Label  # noqa: E402

SPEC = [Label(1, "anterior", (255, 0, 0)), Label(2, "posterior", (0, 255, 0))]
ALGO = {"algorithm_name": "bench", "algorithm_version": "1"}


def hippocampus_case():
    files = sorted(HIPPOCAMPUS.glob("*/11_HCropVolume/*.dcm"))
    if not files:
        raise SystemExit(f"hippocampus series not found under {HIPPOCAMPUS} (set EDGESEG_SHARED)")
    volume = read_volume(files)
    nz, ny, nx = volume.shape
    labels = np.zeros(volume.shape, np.uint8)
    labels[8:32, ny // 4 : ny // 2, nx // 4 : nx // 2] = 1
    labels[8:30, ny // 2 : ny * 3 // 4, nx // 2 : nx * 3 // 4] = 2
    return f"hippocampus MR 40×{ny}×{nx} (real)", lambda: read_volume(files), labels


def mr_case(folder: Path):
    shape = (176, 256, 256)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, size=shape, dtype=np.int16)
    files = write_series(image, folder, spacing=(1.0, 1.0, 1.0), modality="MR", fsync=False)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[((z - 88) / 50.0) ** 2 + ((y - 110) / 60.0) ** 2 + ((x - 100) / 50.0) ** 2 <= 1] = 1
    labels[((z - 90) / 40.0) ** 2 + ((y - 150) / 30.0) ** 2 + ((x - 170) / 40.0) ** 2 <= 1] = 2
    return "MR 176×256×256 (synthetic series)", lambda: read_volume(files), labels


def timed_write(writer: str, load, labels, out: Path) -> float:
    """One write of a freshly read Volume (as for a new series: no header element converted yet)."""
    volume = load()
    gc.collect()
    t = time.perf_counter()
    write_seg(labels, volume, SPEC, out / f"{writer}.dcm", writer=writer, **ALGO)
    return (time.perf_counter() - t) * 1e3


def run(name, load, labels, repeats: int, out: Path) -> str:
    writers = ("fast", "highdicom")
    runs = {w: [] for w in writers}
    for w in writers:  # warm-up
        timed_write(w, load, labels, out)
    for _ in range(repeats):
        for w in writers:
            runs[w].append(timed_write(w, load, labels, out))
    fast, hd = min(runs["fast"]), min(runs["highdicom"])
    frames = {w: (out / f"{w}.dcm").stat().st_size for w in writers}
    return (
        f"| {name} | {fast:.1f} / {statistics.median(runs['fast']):.1f} | "
        f"{hd:.1f} / {statistics.median(runs['highdicom']):.1f} | {hd / fast:.1f}× | "
        f"{frames['fast'] / 1e3:.0f} / {frames['highdicom'] / 1e3:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="alternated runs per writer, small case")
    ap.add_argument("--mr-repeats", type=int, default=5, help="alternated runs per writer, 176-slice case")
    args = ap.parse_args()
    print("| case | fast ms (best / median) | highdicom ms (best / median) | × | file kB fast / highdicom |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="edgeseg-bench-seg-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        print(run(*hippocampus_case(), args.repeats, tmp), flush=True)
        (tmp / "mr").mkdir()
        print(run(*mr_case(tmp / "mr"), args.mr_repeats, tmp), flush=True)


if __name__ == "__main__":
    main()
