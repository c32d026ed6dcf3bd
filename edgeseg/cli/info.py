"""``edgeseg info``: what a bundle holds."""

from __future__ import annotations

import click

from edgeseg.cli._common import echo_json, table


@click.command("info")
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--ranges", is_flag=True, help="Show the calibration ranges per tensor (int8 bundles).")
def info(bundle: str, as_json: bool, ranges: bool) -> None:
    """Describe BUNDLE: model, labels, spec, precisions, accuracy, provenance."""
    from edgeseg.bundle import Bundle

    b = Bundle.open(bundle)
    d = b.describe()
    d["runs"] = what_runs(b.spec)
    if not ranges:
        d.get("provenance", {}).pop("ranges", None)
    if as_json:
        echo_json(d)
        return
    m = d["model"]
    click.echo(f"{m.get('name')} {m.get('version')}  ({b.path})")
    if m.get("description"):
        click.echo(f"  {m['description']}")
    spec = b.spec
    geom = spec.patch_size or spec.target_shape or spec.target_spacing
    click.echo(
        f"  {spec.dims}D, {spec.in_channels} input channel(s), orientation {spec.orientation or 'scanner'}, "
        f"grid {list(geom) if geom else 'native'}"
    )
    click.echo("  labels: " + ", ".join(f"{lab.value}={lab.name}" for lab in spec.labels))
    for line in runs_lines(d["runs"]):
        click.echo(f"  {line}")
    export = (d.get("provenance") or {}).get("export")
    if export:
        why = f" ({export['fallback_reason']})" if export.get("fallback_reason") else ""
        click.echo(f"  ONNX exported through {export['exporter']}{why}")
    rows = [
        [p, f"{d['artifact_bytes'].get(p, 0) / 1e6:.1f} MB", "yes" if p == d["cpu_precision"] else ""]
        for p in d["precisions"]
    ]
    click.echo(table(rows, ["precision", "size", "CPU choice"]))
    acc = d.get("accuracy") or {}
    if acc:
        click.echo("accuracy gate:")
        for prec, rep in acc.items():
            if isinstance(rep, dict):
                click.echo(
                    f"  {prec}: mean Dice vs fp32 {rep.get('mean_dice_vs_fp32', 'n/a')}, "
                    f"min {rep.get('min_dice_vs_fp32', 'n/a')}, passed={rep.get('passed')}"
                )
                if rep.get("dice_lower_bound_95") is not None:
                    click.echo(
                        f"    decided on the {rep.get('decided_on', 'pooled')} Dice over {rep.get('n_series')} "
                        f"held-out series; 95% lower confidence bound on per-series Dice "
                        f"{rep['dice_lower_bound_95']} (gate {rep.get('min_dice')})"
                    )
                auto = rep.get("auto_kept_fp32")
                if auto:
                    click.echo(f"    kept fp32 automatically ({len(auto)}): {', '.join(auto)}")
                history = rep.get("auto_keep_rounds") or []
                if len(history) > 1:
                    rounds = ", ".join(f"{r['kept_fp32']} → {r['min_dice_vs_fp32']}" for r in history)
                    click.echo(f"    auto-keep rounds (layers kept fp32 → min Dice vs fp32): {rounds}")
    cpu_ms = (d.get("runtime") or b.manifest.get("runtime") or {}).get("cpu_ms") or {}
    if cpu_ms:
        click.echo(
            "CPU timing at build (ms per batch): " + ", ".join(f"{p} {ms:g}" for p, ms in cpu_ms.items())
        )
    _engine_table(b, d)
    tuning = d.get("provenance", {}).get("quantization", {}).get("int8_cpu_tuning")
    if tuning:
        click.echo(
            f"int8_cpu shaped for this CPU: {len(tuning.get('phase_conv', []))} ConvTranspose(s) as phase "
            f"convolutions, {len(tuning.get('kept_fp32', []))} layer(s) kept fp32"
        )
    parity = d.get("provenance", {}).get("parity")
    if parity:
        click.echo(
            f"parity vs PyTorch ({parity.get('exporter') or 'torchscript'} export): "
            f"max rel error {parity['max_rel']:.2e}, "
            f"label agreement {parity['label_agreement']:.4%} on {parity['n_inputs']} input(s)"
        )
    if ranges:
        rng = d.get("provenance", {}).get("ranges") or {}
        if not rng:
            click.echo("no calibration ranges in this bundle")
        for name, r in rng.items():
            click.echo(f"  {name}: {r}")
    if d["engines"]:
        click.echo("engines: " + ", ".join(d["engines"]))


def _engine_table(b, d: dict) -> None:
    """The build's CPU engines × precisions: ms per batch, acceptance check, what ``cpu`` picks."""
    rec = d.get("cpu_engines") or {}
    rows = rec.get("rows") or []
    if d.get("acceptance_inputs"):
        from edgeseg.backends.choice import min_dice

        click.echo(
            f"acceptance set: {d['acceptance_inputs']} input(s); every engine compiled on a device must "
            f"reach worst-label Dice vs fp32 >= {min_dice(b)} on it before first use"
        )
    if not rows:
        return
    host = rec.get("host", {})
    choice = rec.get("choice") or {}
    out = []
    for r in rows:
        acc = r.get("acceptance") or {}
        check = (
            f"{acc['min_dice_vs_fp32']:.4f}"
            if acc
            else ("build gate" if r["engine"] == "onnxruntime" else "")
        )
        pick = (r["engine"], r["precision"]) == (choice.get("engine"), choice.get("precision"))
        ms = f"{r['ms']:g}" if "ms" in r else ""
        status = "ok" if r.get("status") == "ok" else str(r.get("status", ""))[:90]
        out.append([r["engine"], r["precision"], ms, check, status, "yes" if pick else ""])
    click.echo(
        f"CPU engines at build on {host.get('model', '?')} ({', '.join(host.get('isa', []))}; "
        f"{host.get('threads', '?')} threads), ms per batch:"
    )
    click.echo(table(out, ["engine", "precision", "ms", "check", "status", "cpu choice"]))


def what_runs(spec) -> dict:
    """What one segmentation does beyond the network, from the spec: mirrors, ensemble,
    resampling, cropping, windows (running without TTA drops the mirrors)."""
    axes = list(spec.mirror_axes or [])
    return {
        "mirror_axes": axes,
        "passes_per_window": 2 ** len(axes),
        "ensemble": spec.ensemble,
        "crop_nonzero": spec.crop_nonzero,
        "intensity_before_resampling": spec.intensity_before_resampling,
        "resampling": {
            "image": spec.interpolation,
            "output": "linear on the network output, then argmax"
            if spec.output_interpolation == "linear"
            else "nearest on the labels",
            "separate_lowres_axis": spec.anisotropy_threshold if spec.separate_lowres_axis else None,
            "target_spacing": list(spec.target_spacing) if spec.target_spacing else None,
        },
        "sliding_window": None
        if spec.patch_size is None
        else {
            "patch": list(spec.patch_size),
            "overlap": spec.overlap,
            "weights": spec.window_weights,
            "padding": spec.window_padding,
        },
    }


def runs_lines(r: dict) -> list[str]:
    """``what_runs`` in words, a line per topic."""
    n = r["passes_per_window"]
    if r["mirror_axes"]:
        tta = f"mirrors axes {r['mirror_axes']}: {n} passes per window ({n - 1} mirrored; without TTA: 1)"
    else:
        tta = "no test-time mirroring: 1 pass per window"
    models = r["ensemble"]
    lines = [
        f"runs: {tta}" + (f", x {models} models averaged in one graph (folds)" if models > 1 else ""),
    ]
    res = r["resampling"]
    if res["target_spacing"]:
        sep = res["separate_lowres_axis"]
        lines.append(
            f"resampling to {res['target_spacing']} mm: image {res['image']}"
            + (" (order 3, as nnU-Net)" if res["image"] == "cubic" else "")
            + f", back {res['output']}"
            + (f"; an axis anisotropic beyond {sep:g}x goes nearest (nnU-Net's separate z)" if sep else "")
            + ("; intensity steps before resampling" if r["intensity_before_resampling"] else "")
        )
    win = r["sliding_window"]
    crop = "crop to the nonzero box first" if r["crop_nonzero"] else "no cropping"
    if win:
        lines.append(
            f"sliding window {win['patch']}, overlap {win['overlap']}, {win['weights']} weights, "
            f"{win['padding']} padding; {crop}"
        )
    else:
        lines.append(f"whole image at once; {crop}")
    return lines
