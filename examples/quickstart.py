"""Quickstart: a real pretrained model, a real brain image, DICOM in → DICOM SEG out, on the CPU.

1. deepbet's pretrained brain-mask network (TorchScript, inside the deepbet wheel) and nilearn's
   MNI152 T1 template + brain mask (inside the nilearn wheel): nothing is fetched at run time.
2. The template is written as an MR DICOM series with edgeseg's own writer.
3. ``edgeseg build-engine`` exports the model to ONNX, checks it against PyTorch on that series,
   and writes a bundle.
4. ``edgeseg run`` segments the series and writes DICOM SEG, NIfTI and a PNG montage.
5. The SEG is read back; Dice against the template's brain mask and a latency table are printed.

Run: ``python examples/quickstart.py [--out out/quickstart]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def deepbet_model() -> Path:
    """Path of deepbet's bbox_model.pt inside its installed wheel."""
    try:
        files = importlib.metadata.files("deepbet") or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit("deepbet is not installed: pip install --no-deps deepbet==1.0.2")
    for f in files:
        if f.name == "bbox_model.pt":
            return Path(f.locate()).resolve()
    sys.exit("deepbet is installed but its bbox_model.pt was not found in the wheel")


def template_as_dicom(out: Path):
    """Write nilearn's MNI152 T1 (1 mm) as an axial MR series; return (files, brain mask zyx)."""
    import nibabel as nib
    from nilearn import datasets

    from edgeseg.dicom import write_series

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    # View both in LPS index order (x→L, y→P, z→S), the usual axial DICOM layout.
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(t1.affine), nib.orientations.axcodes2ornt("LPS")
    )
    t1_lps, mask_lps = t1.as_reoriented(ornt), mask.as_reoriented(ornt)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ t1_lps.affine  # RAS → LPS world
    data = np.asarray(t1_lps.get_fdata(dtype=np.float32)).transpose(2, 1, 0) * 1000.0
    brain = (np.asarray(mask_lps.get_fdata()) > 0.5).transpose(2, 1, 0)
    zooms = t1_lps.header.get_zooms()[:3]
    files = write_series(
        np.ascontiguousarray(data),
        out,
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=affine,
        modality="MR",
        series_description="MNI152 T1 1mm (nilearn)",
        fsync=False,
    )
    return files, brain


def edgeseg_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgeseg", *args]
    print("$ edgeseg " + " ".join(args), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * float((a & b).sum()) / float(denom)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/quickstart", type=Path)
    ap.add_argument("--repeats", default=5, type=int, help="timed runs for the latency table")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    series_dir = out / "dicom"
    files, brain = template_as_dicom(series_dir)
    print(f"wrote {len(files)} DICOM slices to {series_dir} ({time.perf_counter() - t0:.1f} s)")

    bundle = out / "brain.edgeseg"
    r = edgeseg_cli(
        "build-engine",
        str(deepbet_model()),
        "-o",
        str(bundle),
        "--spec",
        str(HERE / "brain_extraction" / "spec.json"),
        "--name",
        "deepbet-brain-mask",
        "--description",
        "deepbet bbox model (MIT), coarse brain mask at 128^3",
        "--parity-input",
        str(series_dir),
    )
    print(r.stdout + r.stderr)
    if r.returncode != 0:
        return r.returncode

    result_dir = out / "result"
    r = edgeseg_cli(
        "run", str(bundle), str(series_dir), "-o", str(result_dir), "--format", "seg,nifti,png", "--json"
    )
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        return r.returncode
    doc = json.loads(r.stdout)
    outcome = doc["outcomes"][0]
    print(f"outputs: {json.dumps(outcome['outputs'], indent=2)}")

    # Read the SEG back exactly as a PACS would get it and score it against the template's mask.
    from edgeseg.dicom import read_volume
    from edgeseg.outputs import read_seg_labels
    from edgeseg.segmenter import Segmenter

    volume = read_volume(series_dir)
    labels = read_seg_labels(outcome["outputs"]["seg"], volume)
    d = dice(labels == 1, brain)

    # Latency: the same Segmenter, warm, several runs (first-run costs are in the CLI's numbers).
    stages: dict[str, list[float]] = {}
    with Segmenter.open(bundle, backend="cpu") as seg:
        for _ in range(args.repeats):
            res = seg.segment(volume)
            for k, v in res.timings.items():
                stages.setdefault(k, []).append(v)
        backend = seg.describe()
    print()
    print(f"Dice (edgeseg SEG vs MNI152 brain mask): {d:.4f}")
    print(
        f"backend: {backend['backend']} {backend.get('precision', '')}, {backend.get('threads', '?')} threads"
    )
    print("| stage | first run (CLI) ms | warm median ms |")
    print("|---|---|---|")
    for stage in ("read", "preprocess", "infer", "postprocess", "write"):
        first = outcome["timings_ms"].get(stage)
        warm = statistics.median(stages[stage]) if stage in stages else None
        print(
            f"| {stage} | {first if first is not None else '-'} | {f'{warm:.1f}' if warm is not None else '-'} |"
        )
    total_warm = sum(statistics.median(v) for v in stages.values())
    print(f"| total | {sum(outcome['timings_ms'].values()):.1f} | {total_warm:.1f} (segment only) |")
    return 0 if d > 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
