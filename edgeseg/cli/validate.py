"""``edgeseg validate``: per-label Dice and HD95 of every precision in a bundle against ground truth.

Pairs are NIfTI images and label maps with the same file names in two folders, or DICOM series
and the DICOM SEG files that reference them (matched by Series Instance UID).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgeseg.cli._common import echo_json, parse_list, table


@dataclass
class Pair:
    """One validation case: how to load its image and its ground truth."""

    name: str
    image: Any  # a NIfTI path or a DICOM SeriesRef
    labels: Path


def find_pairs(images: Path, labels: Path) -> list[Pair]:
    """NIfTI pairs by file name, then DICOM series paired with the SEG that references them.

    Raises :class:`~edgeseg.DicomInputError` (one line naming the file) for a SEG in ``labels``
    that references none of the DICOM series in ``images``.
    """
    from edgeseg.nifti_input import is_nifti
    from edgeseg.seg_input import find_seg_files, pair_with_series

    pairs = [
        Pair(p.name, p, labels / p.name)
        for p in sorted(images.iterdir())
        if p.is_file() and is_nifti(p) and (labels / p.name).is_file()
    ]
    segs = find_seg_files(labels)
    if segs:
        from edgeseg.dicom import find_series

        series = find_series([images]).series
        for ref, seg in pair_with_series(segs, series, str(images)):
            pairs.append(Pair(ref.label or seg.name, ref, seg))
    return pairs


def _load(pair: Pair, spec) -> tuple[Any, np.ndarray]:
    from edgeseg.nifti_input import nifti_labels, read_nifti

    if isinstance(pair.image, Path):
        vol = read_nifti(pair.image)
        truth = nifti_labels(pair.labels)
    else:
        from edgeseg.dicom import load_volume
        from edgeseg.seg_input import read_seg_truth

        vol = load_volume(pair.image)
        truth = read_seg_truth(pair.labels, vol, spec.labels)
    if truth.shape != vol.shape:
        raise click.ClickException(
            f"{pair.labels}: label shape {truth.shape} differs from the image {vol.shape}"
        )
    return vol, truth


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float | None:
    try:
        from edgeseg.calib.metrics import hd95
    except ImportError:  # scipy is a build-time extra
        return None
    return hd95(pred, truth, spacing)


def validate_bundle(
    bundle: str | Path,
    images: Path,
    labels: Path,
    *,
    precisions: list[str] | None = None,
    with_hd95: bool = True,
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """Segment every pair with every precision on ``backend`` (a CPU engine); per-label mean
    Dice/HD95 vs truth and Dice vs fp32 (the reference always runs on ONNX Runtime). A
    precision the engine refuses (compile failure, failed acceptance check) is a row saying so."""
    from edgeseg._exceptions import BackendError
    from edgeseg.backends.choice import open_cpu_backend
    from edgeseg.bundle import Bundle
    from edgeseg.segmenter import Segmenter

    b = Bundle.open(bundle)
    spec = b.spec
    pairs = find_pairs(Path(images), Path(labels))
    if not pairs:
        raise click.UsageError(
            f"no image/label pairs: NIfTI files need the same name in {images} and {labels}, "
            "DICOM series a SEG in the labels folder that references them"
        )
    cases = [(p.name, *_load(p, spec)) for p in pairs]
    precs = precisions or b.precisions
    missing = [p for p in precs if p not in b.precisions]
    if missing:
        raise click.UsageError(
            f"the bundle has no {', '.join(missing)} model (it has {', '.join(b.precisions)})"
        )
    names = {lab.value: lab.name for lab in spec.labels}
    reference: list[np.ndarray] = []
    result: dict[str, Any] = {
        "bundle": str(b.path),
        "backend": backend,
        "n_cases": len(cases),
        "precisions": {},
    }
    runs = [("onnxruntime", "fp32")] if "fp32" in b.precisions else []
    runs += [(backend, p) for p in precs if (backend, p) not in runs]
    for engine, prec in runs:
        reference_run = (engine, prec) == ("onnxruntime", "fp32")
        try:
            seg = Segmenter(spec, open_cpu_backend(b, engine, prec))
        except BackendError as exc:
            result["precisions"][prec] = {"not_available": str(exc)}
            continue
        per_label: dict[int, dict[str, list[float]]] = {
            k: {"dice": [], "hd95": [], "vs_fp32": []} for k in names
        }
        ms = []
        for i, (_, vol, truth) in enumerate(cases):
            res = seg.segment(vol)
            ms.append(sum(res.timings.values()))
            pred = res.labels
            if reference_run:
                reference.append(pred.copy())
            for k in names:
                p, t = pred == k, truth == k
                den = int(p.sum() + t.sum())
                per_label[k]["dice"].append(2 * int((p & t).sum()) / den if den else 1.0)
                if with_hd95:
                    h = _hd95(p, t, vol.spacing)
                    if h is not None:
                        per_label[k]["hd95"].append(h)
                if reference:
                    r = reference[i] == k
                    den = int(p.sum() + r.sum())
                    per_label[k]["vs_fp32"].append(2 * int((p & r).sum()) / den if den else 1.0)
        seg.close()
        if prec not in precs or (reference_run and engine != backend):
            continue  # fp32 ran only as the reference
        result["precisions"][prec] = {
            "ms_per_case": round(float(np.mean(ms)), 2),
            "labels": {
                names[k]: {
                    "dice": round(float(np.mean(v["dice"])), 4),
                    "hd95": _finite_mean(v["hd95"]),
                    "dice_vs_fp32": round(float(np.mean(v["vs_fp32"])), 4) if v["vs_fp32"] else None,
                }
                for k, v in per_label.items()
            },
        }
    return result


def _finite_mean(values: list[float]) -> float | None:
    vals = [v for v in values if np.isfinite(v)]
    return round(float(np.mean(vals)), 3) if vals else None


@click.command("validate")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="NIfTI images or DICOM series.",
)
@click.option(
    "--labels",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="NIfTI label maps or DICOM SEG.",
)
@click.option(
    "--precision", default="", help="Comma list of precisions to check (default: all in the bundle)."
)
@click.option("--hd95/--no-hd95", default=True, show_default=True, help="Also compute HD95 (mm).")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "openvino"]),
    default="onnxruntime",
    show_default=True,
    help="The CPU engine to validate (the fp32 reference always runs on ONNX Runtime).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def command(
    bundle: str, images: str, labels: str, precision: str, hd95: bool, backend: str, as_json: bool
) -> None:
    """Per-label Dice (and HD95) of every precision in BUNDLE against ground truth."""
    precs = parse_list(precision, ("fp32", "fp16", "int8", "int8_cpu"), "--precision") or None
    report = validate_bundle(
        bundle, Path(images), Path(labels), precisions=precs, with_hd95=hd95, backend=backend
    )
    if as_json:
        echo_json(report)
        return
    rows = []
    for prec, rep in report["precisions"].items():
        if "not_available" in rep:
            rows.append([prec, "not available", rep["not_available"], "", "", ""])
            continue
        for name, m in rep["labels"].items():
            rows.append(
                [
                    prec,
                    name,
                    f"{m['dice']:.4f}",
                    "n/a" if m["hd95"] is None else f"{m['hd95']:.2f}",
                    "n/a" if m["dice_vs_fp32"] is None else f"{m['dice_vs_fp32']:.4f}",
                    f"{rep['ms_per_case']:.1f}",
                ]
            )
    click.echo(f"{report['bundle']}: {report['n_cases']} case(s) on {report['backend']}")
    click.echo(table(rows, ["precision", "label", "Dice", "HD95 mm", "Dice vs fp32", "ms/case"]))
