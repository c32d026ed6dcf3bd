"""``edgeseg run``: segment files, folders, or a live DICOM stream."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeseg.cli._common import echo_json, parse_list, table
from edgeseg.cli.triton import BACKEND

FORMATS = ("seg", "nifti", "png")
STAGES = ("read", "preprocess", "h2d", "infer", "postprocess", "d2h", "write")


@click.command("run")
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option(
    "-o", "--output", "out_dir", default="edgeseg-out", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--format", "formats", default="seg", show_default=True, help="Comma list of seg, nifti, png.")
@click.option(
    "--backend",
    type=BACKEND,
    default="auto",
    show_default=True,
    help="A local engine, or triton://HOST:PORT/MODEL: segment through a Triton server (edgeseg export-triton).",
)
@click.option("--no-tta", is_flag=True, help="Skip test-time mirroring (one network pass per window).")
@click.option("--precision", default=None, help="Override the bundle's recorded precision choice.")
@click.option("--threads", type=int, default=None, help="CPU inference threads (default: all cores).")
@click.option("--confidence", is_flag=True, help="Also compute per-voxel confidence.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with every outcome.")
@click.option("--listen", default=None, metavar="[HOST:]PORT", help="Run a DICOM listener (C-STORE SCP).")
@click.option("--ae-title", default="EDGESEG", show_default=True)
@click.option("--allow", default=None, help="Comma list of calling AE titles allowed (default: any).")
@click.option("--forward", default=None, metavar="AE@HOST:PORT", help="C-STORE results to PACS.")
@click.option(
    "--tls-cert",
    default=None,
    type=click.Path(dir_okay=False),
    help="This box's certificate (PEM): DICOM TLS on the listener and the forwarder.",
)
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="Its private key (PEM).")
@click.option(
    "--tls-ca",
    default=None,
    type=click.Path(dir_okay=False),
    help="CA certificate(s) (PEM): the listener requires client certificates signed by them "
    "(mutual TLS); the forwarder verifies PACS against them (default: the system's store).",
)
@click.option("--watch", default=None, type=click.Path(file_okay=False), help="Watch a folder for new DICOM.")
@click.option(
    "--series-timeout", default=5.0, show_default=True, help="Quiet seconds that complete a series."
)
@click.option(
    "--spool", default=None, type=click.Path(file_okay=False), help="Spool folder (default: OUT/.spool)."
)
@click.option("--once", is_flag=True, help="With --listen/--watch: process what is complete, then exit.")
@click.option(
    "--series-time-limit",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="With --listen/--watch: seconds one series may take before its process is stopped and the "
    "series set aside (default: max(120, 2 per instance)).",
)
@click.option(
    "--no-isolate",
    is_flag=True,
    help="With --listen/--watch: decode and segment in the service's own process, not in a child "
    "(a crashing decoder then stops the service).",
)
@click.option(
    "--frames",
    default=None,
    metavar="SOURCE",
    help="Segment a frame stream: multi-frame cine DICOM (replayed at its frame rate), a video "
    "file, or a capture device number; latest frame wins.",
)
def run(
    bundle,
    inputs,
    out_dir,
    formats,
    backend,
    no_tta,
    precision,
    threads,
    confidence,
    as_json,
    listen,
    ae_title,
    allow,
    forward,
    tls_cert,
    tls_key,
    tls_ca,
    watch,
    series_timeout,
    spool,
    once,
    series_time_limit,
    no_isolate,
    frames,
):
    """Segment INPUTS (DICOM files, folders, DICOMDIR, NIfTI) with BUNDLE.

    Every series is processed even when others fail; one line per failure names the file and the
    reason. Exit code 0 when all succeeded, 1 when any failed.
    """
    fmt = parse_list(formats, FORMATS, "--format") or ["seg"]
    if frames:
        from edgeseg.stream.cli_support import serve_frames

        sys.exit(serve_frames(bundle, frames, out_dir=out_dir, backend=backend))
    if (tls_cert or tls_key or tls_ca) and not (listen or watch):
        raise click.UsageError(
            "'--tls-cert/--tls-key/--tls-ca' apply only to the listener and --forward (with --listen or --watch)"
        )
    if (series_time_limit is not None or no_isolate) and not (listen or watch):
        raise click.UsageError("'--series-time-limit/--no-isolate' apply only with --listen or --watch")
    if no_isolate and series_time_limit is not None:
        # Without a child there is nothing to stop: the limit would silently not apply.
        raise click.UsageError(
            "'--series-time-limit' needs isolation; it cannot be combined with --no-isolate"
        )
    if no_tta and (listen or watch or frames):
        raise click.UsageError(
            "'--no-tta' applies to folder and file runs (export a --no-tta model for Triton)"
        )
    if listen or watch:
        from edgeseg.stream.tls import TLSConfig

        try:
            tls = TLSConfig.from_options(tls_cert, tls_key, tls_ca)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        try:
            from edgeseg.stream.cli_support import serve  # type: ignore[import-not-found]
        except ImportError as exc:
            raise click.UsageError(f"streaming is not available in this build ({exc})") from None
        sys.exit(
            serve(
                bundle,
                listen=listen,
                ae_title=ae_title,
                out_dir=out_dir,
                allow=allow,
                forward=forward,
                watch=watch,
                series_timeout=series_timeout,
                once=once,
                spool=spool,
                formats=fmt,
                backend=backend,
                tls=tls,
                precision=precision,
                threads=threads,
                isolate=not no_isolate,
                series_time_limit=series_time_limit,
            )
        )
    if not inputs:
        raise click.UsageError("give INPUTS (files or folders), or --listen / --watch")
    from edgeseg.run import run_inputs
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.open(bundle, backend=backend, precision=precision, threads=threads, tta=not no_tta)
    failures: list[str] = []
    counter = {"n": 0}

    def report(outcome):
        counter["n"] += 1
        if outcome.status == "skipped":
            if not as_json:
                click.echo(f"[{counter['n']}] skipped {outcome.error}")
        elif outcome.status != "ok":
            failures.append(outcome.error or outcome.source)
            if not as_json:
                click.echo(f"[{counter['n']}] FAILED {outcome.error}", err=True)
        elif not as_json:
            ms = sum(outcome.timings.values())
            click.echo(
                f"[{counter['n']}] ok {outcome.source} → {', '.join(outcome.outputs.values())} ({ms:.0f} ms)"
            )
            for w in outcome.warnings:
                click.echo(f"       warning: {w}", err=True)

    outcomes = run_inputs(
        seg, inputs, Path(out_dir), formats=fmt, on_outcome=report, with_confidence=confidence
    )
    ok = [o for o in outcomes if o.status == "ok"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    n_failed = len(outcomes) - len(ok) - len(skipped)
    if as_json:
        echo_json(
            {
                "backend": seg.describe(),
                "outcomes": [o.to_dict() for o in outcomes],
                "succeeded": len(ok),
                "failed": n_failed,
                "skipped": len(skipped),
            }
        )
    else:
        if ok:
            rows = []
            for stage in STAGES:
                vals = [o.timings[stage] for o in ok if stage in o.timings]
                if vals:
                    rows.append([stage, f"{sum(vals) / len(vals):.1f}"])
            rows.append(["total", f"{sum(sum(o.timings.values()) for o in ok) / len(ok):.1f}"])
            click.echo(table(rows, ["stage", "mean ms / series"]))
        d = seg.describe()
        where = ", ".join(str(d[k]) for k in ("model", "backend", "precision", "device") if d.get(k))
        threads = f", {d['threads']} threads" if d.get("threads") else ""
        tail = f", {len(skipped)} non-image object(s) skipped" if skipped else ""
        click.echo(f"{len(ok)} series succeeded, {n_failed} failed{tail} ({where}{threads})")
    seg.close()
    sys.exit(1 if failures or not ok else 0)
