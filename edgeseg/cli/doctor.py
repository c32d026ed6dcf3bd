"""``edgeseg doctor``: what this machine can run, and what is missing for the rest."""

from __future__ import annotations

import click

from edgeseg.cli._common import echo_json


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
def command(as_json: bool) -> None:
    """What this machine can run: CPU features, engines, NVIDIA driver, CUDA, GPU, TensorRT,
    Jetson release and the engine cache; each missing piece with the line that installs it."""
    from edgeseg.doctor import diagnose

    report = diagnose()
    if as_json:
        echo_json(report.to_dict())
        return
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        mark = "ok " if c.ok else "-- "
        click.echo(f"{mark}{c.name:<{width}}  {c.detail}")
        if c.fix:
            click.echo(f"   {'':<{width}}  → {c.fix}")
    click.echo(f"engines usable here: {', '.join(report.engines) or 'none'}")
    click.echo(report.gpu_path)
