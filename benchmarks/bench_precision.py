"""fp32 vs fp16 vs int8 on this CPU (ONNX Runtime), and the time of a whole precision build.

Two models:

- the hippocampus example's 2D U-Net (``tests/assets/hippocampus/unet2d.state.pt``, trained),
  batches of 16 slices of 64×48, calibrated on 200 real slices;
- a plain conv/BN MONAI UNet (ReLU, no residual units) at 512×512, batch 1, calibrated on 32
  real hippocampus slices resampled to 512×512 (its weights are random: speed only);
- a plain 8-conv/BN/ReLU stack, 64 channels at 256×256 (the shape of net where INT8 pays most).

    .venv/bin/python benchmarks/bench_precision.py [--data ../shared/data/seg/msd_task04_hippocampus]

Prints a table; nothing is asserted (this is not a timed test).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _bench_common as common  # the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
DATA = (
    Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared")) / "data" / "seg" / "msd_task04_hippocampus"
)


def _build(model, spec, data: Path, n_samples: int, max_holdout: int, workdir: Path):
    """The whole build (export, parity, calibration set, fp16, int8, gate, benchmark, write)."""
    from edgeseg.bundle import Bundle
    from edgeseg.calib.dataset import CalibrationSet
    from edgeseg.export.build import build_bundle

    t0 = time.perf_counter()
    calib = CalibrationSet.from_paths(
        data / "imagesTr", spec, labels=data / "labelsTr", max_samples=n_samples, max_holdout=max_holdout
    )
    t_calib = time.perf_counter() - t0
    out = workdir / "bench.edgeseg"
    report = build_bundle(
        model,
        spec,
        out,
        name="bench",
        precisions=["fp32", "fp16", "int8"],
        calibration=calib,
        gate={"min_dice": 0.0, "method": "percentile"},
    )
    total = time.perf_counter() - t0
    return Bundle.open(out), report, t_calib, total, len(calib)


def _time(bundle, batch, runs: int) -> dict[str, float]:
    from edgeseg.calib.bench import time_model

    return {p: time_model(bundle.onnx(p), batch, runs=runs, min_seconds=1.0) for p in bundle.precisions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip-512", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import torch

    from edgeseg.spec import Label, ModelSpec, ZScore

    torch.set_num_threads(os.cpu_count() or 1)
    ex = common.hippocampus_example()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        net = ex.make_model(2)
        net.load_state_dict(torch.load(REPO / "tests/assets/hippocampus/unet2d.state.pt", map_location="cpu"))
        spec = ex.load_spec(2)
        b, rep, t_cal, total, n = _build(net.eval(), spec, args.data, 200, 8, Path(tmp))
        batch = np.random.default_rng(0).standard_normal((16, 1, 64, 48)).astype(np.float32)
        rows.append(("hippocampus 2D U-Net, 16×64×48", b, _time(b, batch, args.runs), rep, t_cal, total, n))
        if not args.skip_512:
            from monai.networks.nets import UNet

            torch.manual_seed(0)
            big = UNet(
                2,
                1,
                3,
                channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2),
                num_res_units=0,
                norm="batch",
                act="relu",
            ).eval()
            labels = [Label(1, "anterior"), Label(2, "posterior")]
            spec512 = ModelSpec(
                dims=2, labels=labels, intensity=[ZScore()], target_shape=(512, 512), batch_size=1
            )
            b, rep, t_cal, total, n = _build(big, spec512, args.data, 32, 1, Path(tmp) / "512")
            batch = np.random.default_rng(0).standard_normal((1, 1, 512, 512)).astype(np.float32)
            rows.append(
                ("MONAI UNet conv/BN/ReLU, 1×512×512", b, _time(b, batch, args.runs), rep, t_cal, total, n)
            )
            # Where INT8 can pay off on a CPU: every op a conv (no float ConvTranspose in between).
            layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU()]
            for _ in range(6):
                layers += [torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
            plain = torch.nn.Sequential(*layers, torch.nn.Conv2d(64, 3, 1)).eval()
            spec256 = ModelSpec(
                dims=2, labels=labels, intensity=[ZScore()], target_shape=(256, 256), batch_size=1
            )
            b, rep, t_cal, total, n = _build(plain, spec256, args.data, 32, 1, Path(tmp) / "256")
            batch = np.random.default_rng(0).standard_normal((1, 1, 256, 256)).astype(np.float32)
            rows.append(
                (
                    "plain 8-conv/BN/ReLU stack 64ch, 1×256×256",
                    b,
                    _time(b, batch, args.runs),
                    rep,
                    t_cal,
                    total,
                    n,
                )
            )
    print(f"ONNX Runtime CPU, {os.cpu_count()} cores; median ms per batch\n")
    print("| model | fp32 | fp16 | int8 (TRT Q/DQ) | int8_cpu (u8/s8) | int8_cpu speed-up | CPU choice |")
    print("|---|---|---|---|---|---|---|")
    for name, _b, t, rep, *_ in rows:
        sp = t["fp32"] / t["int8_cpu"]
        print(
            f"| {name} | {t['fp32']:.1f} | {t['fp16']:.1f} | {t['int8']:.1f} | {t['int8_cpu']:.1f} | "
            f"{sp:.2f}× | {rep.cpu_precision} |"
        )
    print(
        "\n| model | calibration samples | read+sample s | whole build s | export | calibrate int8 | gate |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _b, _t, rep, t_cal, total, n in rows:
        ts = rep.timings_s
        print(
            f"| {name} | {n} | {t_cal:.1f} | {total:.1f} | {ts.get('export', 0):.1f} | "
            f"{ts.get('calibrate_int8', 0):.1f} | {ts.get('gate', 0):.1f} |"
        )


if __name__ == "__main__":
    main()
