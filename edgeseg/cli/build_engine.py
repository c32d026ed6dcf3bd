"""``edgeseg build-engine``: a trained model → a verified bundle (and TensorRT engines on a GPU)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from edgeseg.cli._common import echo_json, parse_list, table

PRECISIONS = ("fp32", "fp16", "int8", "auto")


def _resolve_model(model: str):
    """A file path, or ``package.module:attr`` naming an nn.Module or a factory returning one."""
    if Path(model).exists() or ":" not in model:
        return model
    mod_name, _, attr = model.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot import {model!r}: {exc}", param_hint="MODEL") from None
    return obj() if callable(obj) and not hasattr(obj, "forward") else obj


@click.command("build-engine")
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Bundle to write (.edgeseg)."
)
@click.option(
    "--spec",
    "spec_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Model spec JSON (not for an nnU-Net results folder: its spec comes from the plans).",
)
@click.option(
    "--folds",
    default=None,
    help="nnU-Net folder: comma list of folds to ensemble (default: every fold_* present, else all).",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["final", "best"]),
    default="final",
    show_default=True,
    help="nnU-Net folder: which checkpoint of each fold.",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    help="Comma list of fp32, fp16, int8, or 'auto' (build all, keep those that pass the gate).",
)
@click.option("--name", default=None, help="Model name (default: the model file's stem).")
@click.option("--model-version", "model_version", default="1", show_default=True)
@click.option("--description", default="")
@click.option(
    "--parity-input",
    "parity_inputs",
    multiple=True,
    type=click.Path(exists=True),
    help="Real image(s) (DICOM folder/file or NIfTI) for the PyTorch↔ONNX parity check.",
)
@click.option(
    "--parity-tolerance",
    default=1e-2,
    show_default=True,
    help="Max error vs PyTorch, relative to the output range.",
)
@click.option(
    "--calib",
    "calib_dirs",
    multiple=True,
    type=click.Path(exists=True),
    help="Calibration images: folders of DICOM series or NIfTI files (int8 and the gate).",
)
@click.option(
    "--calib-labels",
    type=click.Path(exists=True),
    default=None,
    help="Ground truth for the calibration images: NIfTI label maps with the same names, or DICOM "
    "SEG files (matched to the DICOM series they reference).",
)
@click.option(
    "--calib-method",
    type=click.Choice(["minmax", "percentile", "entropy"]),
    default="percentile",
    show_default=True,
)
@click.option(
    "--calib-size", default=200, show_default=True, help="Max calibration samples (slices or patches)."
)
@click.option(
    "--min-dice", default=0.99, show_default=True, help="Accuracy gate: min Dice agreement with fp32."
)
@click.option(
    "--gate-on",
    type=click.Choice(["pooled", "lower-bound"]),
    default="pooled",
    show_default=True,
    help="What must reach --min-dice: the worst label's Dice pooled over the held-out series, or "
    "the one-sided 95%% lower confidence bound of the per-series worst-label Dice (stricter: "
    "'passed at 0.99' then holds on unseen series too, given enough held-out series).",
)
@click.option(
    "--keep-fp32", default="", help="Comma list of node names or op types kept in fp32 when quantizing."
)
@click.option(
    "--auto-keep/--no-auto-keep",
    "auto_keep",
    default=True,
    show_default=True,
    help="When an int8 variant fails the gate, keep the layers that hurt most in fp32 (a few per "
    "round, bounded) and gate again; off: a failing int8 variant is dropped as calibrated.",
)
@click.option("--force", is_flag=True, help="Write candidates that fail the accuracy gate anyway.")
@click.option("--opset", default=17, show_default=True)
@click.option(
    "--exporter",
    type=click.Choice(["auto", "dynamo", "torchscript"]),
    default="auto",
    show_default=True,
    help="auto: torch.export (dynamo) when it passes parity, else TorchScript (and for TorchScript files).",
)
@click.option("--engine/--no-engine", default=False, help="Also build TensorRT engines now (needs a GPU).")
@click.option("--workspace-mb", default=1024, show_default=True, help="TensorRT workspace limit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
def build_engine(
    model,
    output,
    spec_path,
    folds,
    checkpoint,
    precision,
    name,
    model_version,
    description,
    parity_inputs,
    parity_tolerance,
    calib_dirs,
    calib_labels,
    calib_method,
    calib_size,
    min_dice,
    gate_on,
    keep_fp32,
    auto_keep,
    force,
    opset,
    exporter,
    engine,
    workspace_mb,
    as_json,
):
    """Export MODEL (TorchScript file, ONNX file, module:attr, or an nnU-Net v2 results folder
    ``…/DatasetXXX_Name/<Trainer>__<Plans>__<config>``) to a bundle.

    An nnU-Net folder needs no spec: preprocessing, sliding window, mirroring and the fold
    ensemble come from its plans, dataset.json and checkpoints (pickles: only folders you trust).
    The ONNX is checked against PyTorch on real inputs; fp16/int8 variants are made in ONNX space
    from a calibration set and refused if their Dice against fp32 falls below --min-dice.
    """
    from edgeseg.export.build import build_bundle
    from edgeseg.export.nnunet.folder import is_nnunet_folder
    from edgeseg.run import read_any
    from edgeseg.spec import load_spec

    precisions = parse_list(precision, PRECISIONS, "--precision") or ["fp32"]
    if "auto" in precisions:
        precisions = ["fp32", "fp16", "int8"]
    gate = {
        "min_dice": min_dice,
        "method": calib_method,
        "keep_fp32": [s for s in keep_fp32.split(",") if s],
        "auto_keep": auto_keep,
        "decide_on": gate_on.replace("-", "_"),
    }

    def _calibration(spec):
        from edgeseg.calib.dataset import CalibrationSet

        return CalibrationSet.from_paths(
            calib_dirs,
            spec,
            labels=calib_labels,
            max_samples=calib_size,
            cache_dir=Path(output).parent / ".calib-cache",
        )

    nnunet = is_nnunet_folder(model)
    if nnunet:
        if spec_path is not None:
            raise click.UsageError("an nnU-Net results folder brings its own spec: drop --spec")
        if any(p == "int8" for p in precisions) and not calib_dirs:
            raise click.UsageError("int8 needs a calibration set: pass --calib DIR (real images)")
        from edgeseg.export.nnunet import build_from_nnunet

        report = build_from_nnunet(
            model,
            output,
            folds=[f.strip() for f in folds.split(",") if f.strip()] if folds else None,
            checkpoint=checkpoint,
            progress=None if as_json else (lambda msg: click.echo(f"... {msg}", err=True)),
            name=name,
            version=model_version,
            description=description,
            parity_tolerance=parity_tolerance,
            opset=opset,
            exporter=exporter,
            precisions=precisions,
            # the calibration set is preprocessed with the spec the folder's plans give
            calibration=(lambda spec: _calibration(spec)) if calib_dirs else None,
            gate=gate,
            force=force,
        )
        _report(report, output, engine, workspace_mb, as_json)
        return
    if spec_path is None:
        raise click.UsageError("--spec is required (except for an nnU-Net results folder)")
    if folds is not None:
        raise click.UsageError("--folds is for nnU-Net results folders")
    spec = load_spec(spec_path)
    resolved = _resolve_model(model)
    parity_volumes = [read_any(p) for p in parity_inputs]
    calibration = None
    if calib_dirs:
        calibration = _calibration(spec)
    elif any(p == "int8" for p in precisions):
        raise click.UsageError("int8 needs a calibration set: pass --calib DIR (real images)")
    report = build_bundle(
        resolved,
        spec,
        output,
        name=name or Path(str(model)).stem.split(":")[-1],
        version=model_version,
        description=description,
        parity_volumes=parity_volumes or None,
        parity_tolerance=parity_tolerance,
        opset=opset,
        exporter=exporter,
        precisions=precisions,
        calibration=calibration,
        gate=gate,
        force=force,
        progress=None if as_json else (lambda msg: click.echo(f"... {msg}", err=True)),
    )
    _report(report, output, engine, workspace_mb, as_json)


def _report(report, output, engine: bool, workspace_mb: int, as_json: bool) -> None:
    if engine:
        from edgeseg.backends.engine_cache import build_engines_for_bundle

        report.warnings.extend(build_engines_for_bundle(output, workspace_mb=workspace_mb))
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(f"wrote {report.bundle} ({', '.join(report.precisions)}; CPU choice: {report.cpu_precision})")
    if report.parity:
        p = report.parity
        click.echo(
            f"parity vs PyTorch ({p.get('exporter') or 'torchscript'} export): "
            f"max abs {p['max_abs']:.2e}, max rel {p['max_rel']:.2e}, "
            f"label agreement {p['label_agreement']:.4%} on {p['n_inputs']} input(s)"
        )
    for prec, rep in (report.accuracy or {}).items():
        if isinstance(rep, dict) and "mean_dice_vs_fp32" in rep:
            auto = rep.get("auto_kept_fp32")
            extra = (
                f" ({len(auto)} layer(s) kept fp32 automatically, round {rep['auto_keep_round']})"
                if auto and rep.get("passed")
                else ""
            )
            click.echo(
                f"{prec}: Dice vs fp32 {rep['mean_dice_vs_fp32']:.4f} → "
                f"{'kept' if rep.get('passed') else 'REFUSED'}{extra}"
            )
    rows = [[k, f"{v:.2f}"] for k, v in report.timings_s.items()]
    click.echo(table(rows, ["stage", "seconds"]))
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
