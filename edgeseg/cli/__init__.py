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
    # Every command module is part of the runtime and imports only runtime dependencies at
    # module level (build-time ones inside the command). A module that fails to import is a
    # broken install: say so, naming it, instead of letting its command vanish from --help.
    import importlib

    for module, attr in (
        ("build_engine", "build_engine"),
        ("run", "run"),
        ("info", "info"),
        ("validate", "command"),
        ("bench", "command"),
        ("doctor", "command"),
        ("triton", "export_triton"),
        ("triton", "triton"),
    ):
        try:
            mod = importlib.import_module(f"edgeseg.cli.{module}")
        except ImportError as exc:
            raise ImportError(
                f"edgeseg's '{module}' command cannot be loaded ({exc}); the installation is "
                "incomplete: reinstall edgeseg (pip install --force-reinstall edgeseg)"
            ) from exc
        main.add_command(getattr(mod, attr))


_register()
