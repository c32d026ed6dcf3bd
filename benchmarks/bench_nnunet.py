"""edgeseg vs ``nnUNetv2_predict`` on the same nnU-Net model, cases and CPU: time and agreement.

The model is the repository's real nnU-Net v2 asset (scripts/make_nnunet_asset.py: nnU-Net's own
planning and training on MSD hippocampus, 2 folds, 2d and 3d_fullres); the cases are the ones it
held out of training (tests/assets/nnunet/held_out.json), read in place from ../shared/data/seg.

Both sides run as a user runs them, end to end from a shell (interpreter start, model load,
reading NIfTI, writing NIfTI labels), one after the other:

* ``nnUNetv2_predict -d … -c CONFIG -f FOLDS -device cpu -npp 1 -nps 1`` (one reader and one
  writer process: its fastest setting on 2 cores; sequential ``-npp 0`` is slower here), with
  and without ``--disable_tta``;
* ``edgeseg run BUNDLE IN --format nifti --backend auto`` on a bundle that ``edgeseg build-engine
  FOLDER`` made with no flags (and ``--no-tta``); ``--int8`` adds a bundle built with
  ``--precision int8`` calibrated on training cases and gated against fp32.

Agreement is the pooled Dice of edgeseg's labels vs nnU-Net's, per label, over all cases.

    python benchmarks/bench_nnunet.py                    # 2d + 3d_fullres, 20 cases; ≈ 10 min on 2 cores
    python benchmarks/bench_nnunet.py --configs 2d --cases 5 --int8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared")).resolve()
SRC = SHARED / "data" / "seg" / "msd_task04_hippocampus"
ASSET = REPO / "tests" / "assets" / "nnunet"
DATASET = "Dataset904_Hippocampus"
TRAINER, PLANS = "nnUNetTrainer_edgesegShort", "nnUNetPlansEdgesegSmall"
BIN = Path(sys.executable).parent


def _folder(config: str) -> Path:
    return ASSET / DATASET / f"{TRAINER}__{PLANS}__{config}"


def _install_trainer() -> None:
    # nnUNetv2_predict finds the trainer class in nnU-Net's own trainer folder.
    import nnunetv2

    src = ASSET / f"{TRAINER}.py"
    dest = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / src.name
    if not dest.exists() or dest.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dest)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall


def _read_labels(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj).astype(np.uint8)


def nnunet_predict(work: Path, config: str, folds: str, tta: bool) -> tuple[float, dict[str, np.ndarray]]:
    out = work / f"nnunet-{config}-{folds.replace(',', '')}-{'tta' if tta else 'plain'}"
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    env.update(nnUNet_results=str(work / "results"), nnUNet_raw=str(work / "raw"))
    env.update(nnUNet_preprocessed=str(work / "preprocessed"))
    cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(work / "in"), "-o", str(out), "-d", DATASET]
    cmd += ["-c", config, "-tr", TRAINER, "-p", PLANS, "-f", *folds.split(","), "-device", "cpu"]
    cmd += ["-npp", "1", "-nps", "1", "--disable_progress_bar"] + ([] if tta else ["--disable_tta"])
    wall = _run(cmd, env)
    return wall, {p.name[: -len(".nii.gz")]: _read_labels(p) for p in out.glob("*.nii.gz")}


def edgeseg_run(
    work: Path, bundle: Path, tta: bool, precision: str | None
) -> tuple[float, dict[str, np.ndarray]]:
    out = work / f"edgeseg-{bundle.stem}-{'tta' if tta else 'plain'}"
    cmd = [str(BIN / "edgeseg"), "run", str(bundle), str(work / "in"), "-o", str(out)]
    cmd += ["--format", "nifti", "--backend", "auto", "--json"] + ([] if tta else ["--no-tta"])
    cmd += ["--precision", precision] if precision else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"edgeseg run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    labels = {}
    for o in json.loads(proc.stdout)["outcomes"]:
        case = Path(o["source"]).name[: -len("_0000.nii.gz")]
        labels[case] = _read_labels(Path(o["outputs"]["nifti"]))
    return wall, labels


def pooled_dice(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], label: int) -> float:
    inter = total = 0
    for case, b in ref.items():
        a = ours[case]
        if a.shape != b.shape:
            sys.exit(f"{case}: edgeseg labels {a.shape} vs nnU-Net {b.shape}")
        inter += int(np.count_nonzero((a == label) & (b == label)))
        total += int(np.count_nonzero(a == label)) + int(np.count_nonzero(b == label))
    return 1.0 if total == 0 else 2.0 * inter / total


def build(work: Path, config: str, folds: str, int8: bool, calib_cases: list[str]) -> Path:
    out = work / f"{config}-{folds.replace(',', '')}{'-int8' if int8 else ''}.edgeseg"
    cmd = [str(BIN / "edgeseg"), "build-engine", str(_folder(config)), "-o", str(out)]
    if folds != "0,1":  # the default is every fold present
        cmd += ["--folds", folds]
    if int8:
        calib = work / "calib"
        if not calib.exists():
            (calib / "images").mkdir(parents=True)
            (calib / "labels").mkdir()
            for c in calib_cases:
                (calib / "images" / f"{c}.nii.gz").symlink_to(SRC / "imagesTr" / f"{c}.nii.gz")
                (calib / "labels" / f"{c}.nii.gz").symlink_to(SRC / "labelsTr" / f"{c}.nii.gz")
        cmd += [
            "--precision",
            "int8",
            "--calib",
            str(calib / "images"),
            "--calib-labels",
            str(calib / "labels"),
        ]
    _run(cmd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="2d,3d_fullres")
    ap.add_argument("--cases", type=int, default=0, help="first N held-out cases (default: all)")
    ap.add_argument("--int8", action="store_true", help="also an int8 bundle (2d), gated and compared")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    args = ap.parse_args()
    if not SRC.is_dir():
        sys.exit(f"{SRC} is not here (shared data)")
    _install_trainer()
    held = json.loads((ASSET / "held_out.json").read_text())
    cases = held[: args.cases] if args.cases else held
    train = sorted(p.name[: -len(".nii.gz")] for p in (SRC / "imagesTr").glob("hippocampus_*.nii.gz"))
    calib_cases = [c for c in train if c not in held][:24]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-nnunet-") as tmp:
        work = Path(tmp)
        shutil.copytree(ASSET / DATASET, work / "results" / DATASET)
        (work / "in").mkdir()
        for c in cases:
            (work / "in" / f"{c}_0000.nii.gz").symlink_to(SRC / "imagesTr" / f"{c}.nii.gz")
        for config in args.configs.split(","):
            settings = [("0", True, False), ("0", False, False)]
            if (_folder(config) / "fold_1").is_dir():  # a 2-fold ensemble where there are 2
                settings.append(("0,1", True, False))
            if args.int8 and config == "2d":
                settings.append(("0", True, True))
            for folds, tta, int8 in settings:
                bundle = build(work, config, folds, int8, calib_cases)
                t_nn, ref = nnunet_predict(work, config, folds, tta)
                t_es, ours = edgeseg_run(work, bundle, tta, "int8" if int8 else None)
                labels = sorted({int(v) for r in ref.values() for v in np.unique(r)} - {0})
                dice = {lab: pooled_dice(ours, ref, lab) for lab in labels}
                rows.append(
                    dict(config=config, folds=folds, tta=tta, precision="int8" if int8 else "auto",
                         cases=len(cases), nnunet_s=t_nn, edgeseg_s=t_es, dice=dice)
                )  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)

    lines = [
        f"nnU-Net asset ({DATASET}), {len(cases)} held-out cases, {os.cpu_count()} CPUs; wall seconds "
        "of the whole command (start, model load, read, segment, write NIfTI)",
        "",
        "| config | folds | TTA | edgeseg precision | nnUNetv2_predict | edgeseg run | speed-up | Dice per label |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dice = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice"].items())
        lines.append(
            f"| {r['config']} | {r['folds']} | {'yes' if r['tta'] else 'no'} | {r['precision']} | "
            f"{r['nnunet_s']:.1f} s | {r['edgeseg_s']:.1f} s | {r['nnunet_s'] / r['edgeseg_s']:.2f}× | {dice} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nnunet.md").write_text(table + "\n")
    (args.out / "nnunet.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
