"""The ``edgeseg`` command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import logging
import sys

import click

from edgeseg import __version__
from edgeseg._exceptions import EdgesegError


class _Group(click.Group):
    """Turns edgeseg errors into one plain line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgesegError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """edgeseg: medical image segmentation at the edge (DICOM in, DICOM SEG out)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # pydicom logs decoder failures with tracebacks and quotes header values in its warnings;
    # edgeseg reports those files itself in one line, so pydicom only speaks at -vv.
    import pydicom.config  # noqa: F401  (it sets its logger's level on import: set ours after)

    logging.getLogger("pydicom").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def _register() -> None:
    from edgeseg.cli import build_engine, info, run

    main.add_command(build_engine.build_engine)
    main.add_command(run.run)
    main.add_command(info.info)
    for optional in ("validate", "bench", "calib_cmd"):
        try:
            mod = __import__(f"edgeseg.cli.{optional}", fromlist=["command"])
        except ImportError:
            continue
        main.add_command(mod.command)


_register()
