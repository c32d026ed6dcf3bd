#!/usr/bin/env python3
"""Make the small nnU-Net v2 model that tests/test_nnunet_import.py compares edgeseg against.

Everything is done with nnU-Net's own code: the MSD Task04 hippocampus cases in
../shared/data/seg become an nnU-Net raw dataset (symlinks, the data stay where they are),
``nnUNetv2_plan_and_preprocess`` plans and preprocesses the 2d and 3d_fullres configurations,
a plans variant with fewer features per stage (2d: half, batch 32, folds 0 and 1; 3d_fullres:
an eighth, batch 4, fold 0) keeps the checkpoints at a few MB, and ``nnUNetv2_train`` runs a
short AdamW trainer (tests/assets/nnunet/nnUNetTrainer_edgesegShort.py). Only what inference
needs is copied to tests/assets/nnunet/: dataset.json, plans.json, dataset_fingerprint.json and,
per fold, the checkpoint stripped to its weights and the keys prediction reads. The last
HELD_OUT cases are never seen by planning or training.

Rerunnable: ``nice -n 10 .venv/bin/python scripts/make_nnunet_asset.py [--work DIR]
[--configs 2d,3d_fullres]`` (about 10 minutes a configuration on 2 cores). Needs nnunetv2
installed as scripts/setup.sh does it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT.parent / "shared" / "data" / "seg" / "msd_task04_hippocampus"
ASSET = ROOT / "tests" / "assets" / "nnunet"
TRAINER_FILE = ASSET / "nnUNetTrainer_edgesegShort.py"
DATASET_ID = 904
DATASET = f"Dataset{DATASET_ID:03d}_Hippocampus"
TRAINER = "nnUNetTrainer_edgesegShort"
PLANS = "nnUNetPlansEdgesegSmall"
HELD_OUT = 20
# Per configuration: features per stage divided by, batch size, folds trained.
CONFIGS = {
    "2d": {"divide_features": 2, "batch_size": 32, "folds": (0, 1)},
    "3d_fullres": {"divide_features": 8, "batch_size": 4, "folds": (0,)},
}
# The keys nnUNetPredictor.initialize_from_trained_model_folder reads from a checkpoint.
KEEP_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes")


def install_trainer() -> Path:
    """Copy the short trainer to the top level of nnU-Net's trainer folder (idempotent)."""
    import nnunetv2

    dest = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / TRAINER_FILE.name
    if not dest.exists() or dest.read_bytes() != TRAINER_FILE.read_bytes():
        shutil.copyfile(TRAINER_FILE, dest)
    return dest


def cases() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (SRC / "imagesTr").glob("*.nii.gz"))


def held_out_cases() -> list[str]:
    return cases()[-HELD_OUT:]


def write_raw(raw: Path) -> None:
    ds = raw / DATASET
    if ds.exists():
        shutil.rmtree(ds)
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    train = cases()[:-HELD_OUT]
    for c in train:
        (ds / "imagesTr" / f"{c}_0000.nii.gz").symlink_to(SRC / "imagesTr" / f"{c}.nii.gz")
        (ds / "labelsTr" / f"{c}.nii.gz").symlink_to(SRC / "labelsTr" / f"{c}.nii.gz")
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": "Hippocampus",
        "licence": "CC-BY-SA 4.0 (Medical Segmentation Decathlon Task04)",
    }
    (ds / "dataset.json").write_text(json.dumps(meta, indent=1))


def write_small_plans(pre: Path) -> None:
    plans = json.loads((pre / DATASET / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    for name, small in CONFIGS.items():
        cfg = plans["configurations"][name]
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [max(4, f // small["divide_features"]) for f in kw["features_per_stage"]]
        cfg["batch_size"] = small["batch_size"]
    # data_identifier unchanged: the preprocessed data do not depend on the network width.
    (pre / DATASET / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "10", *cmd], env=env, check=True)


def strip_checkpoint(src: Path, dest: Path) -> None:
    import torch

    # Our own freshly trained checkpoint: a full pickle (it holds a torch.device).
    ck = torch.load(src, map_location="cpu", weights_only=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: ck[k] for k in KEEP_KEYS if k in ck}, dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeseg_nnunet_work"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations to train")
    ap.add_argument(
        "--skip-preprocess", action="store_true", help="reuse the work folder's preprocessed data"
    )
    args = ap.parse_args(argv)
    work: Path = args.work.resolve()
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    for d in (raw, pre, res):
        d.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(raw),
        nnUNet_preprocessed=str(pre),
        nnUNet_results=str(res),
        # planning calls torch.set_num_threads(nnUNet_n_proc_DA): 2 there, 0 (augmentation in
        # the main process) for training, so that no step uses more than 2 threads.
        nnUNet_n_proc_DA="2",
        nnUNet_compile="f",
        OMP_NUM_THREADS="2",
        MKL_NUM_THREADS="2",
    )
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    install_trainer()
    if not args.skip_preprocess:
        write_raw(raw)
        run(
            [str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", *configs]
            + ["-np", "2", "-npfp", "2"],
            env,
        )
    write_small_plans(pre)
    env["nnUNet_n_proc_DA"] = "0"
    for config in configs:
        export_config(config, bindir, env, res)
    (ASSET / "held_out.json").write_text(json.dumps(held_out_cases(), indent=1) + "\n")
    return 0


def export_config(config: str, bindir: Path, env: dict[str, str], res: Path) -> None:
    """Train ``config``'s folds and copy what inference needs into the asset."""
    folds = CONFIGS[config]["folds"]
    for f in folds:
        run(
            [str(bindir / "nnUNetv2_train"), str(DATASET_ID), config, str(f)]
            + ["-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
            env,
        )
    model = res / DATASET / f"{TRAINER}__{PLANS}__{config}"
    out = ASSET / DATASET / model.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copyfile(model / name, out / name)
    for f in folds:
        strip_checkpoint(
            model / f"fold_{f}" / "checkpoint_final.pth", out / f"fold_{f}" / "checkpoint_final.pth"
        )
        log = sorted((model / f"fold_{f}").glob("training_log_*.txt"))
        if log:
            tail = [ln for ln in log[-1].read_text().splitlines() if "Pseudo dice" in ln]
            print(f"{config} fold {f}: {tail[-1].strip() if tail else 'no pseudo dice logged'}")
    print("asset written to", out)


if __name__ == "__main__":
    raise SystemExit(main())
