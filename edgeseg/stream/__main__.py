"""``python -m edgeseg.stream BUNDLE --listen PORT -o OUT``: the stream service without click.

Same options as ``edgeseg run --listen``; used by the crash tests to run it as its own process.
"""

from __future__ import annotations

import argparse
import sys

from edgeseg._exceptions import EdgesegError
from edgeseg.stream.cli_support import serve


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds; got {text!r}") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds; got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeseg.stream", description=__doc__)
    p.add_argument("bundle")
    p.add_argument("--listen", default=None, metavar="[HOST:]PORT")
    p.add_argument("--ae-title", default="EDGESEG")
    p.add_argument("-o", "--output", dest="out_dir", default="edgeseg-out")
    p.add_argument("--allow", default=None)
    p.add_argument("--forward", action="append", default=None, metavar="AE@HOST:PORT")
    p.add_argument("--watch", default=None)
    p.add_argument("--series-timeout", type=float, default=5.0)
    p.add_argument("--spool", default=None)
    p.add_argument("--format", dest="formats", default="seg")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default=None, help="override the bundle's recorded precision choice")
    p.add_argument("--threads", type=int, default=None, help="CPU inference threads (default: all cores)")
    p.add_argument(
        "--series-time-limit",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds one series may take before its process is stopped and the series set aside "
        "(default: max(120, 2 per instance))",
    )
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="decode and segment in this process, not in a child (a crashing decoder then stops the service)",
    )
    p.add_argument("--status-interval", type=float, default=10.0)
    p.add_argument("--once", action="store_true")
    p.add_argument("--frames", default=None, metavar="SOURCE", help="cine DICOM, video file or device number")
    a = p.parse_args(argv)
    if a.no_isolate and a.series_time_limit is not None:
        # Without a child there is nothing to stop: the limit would silently not apply.
        p.error("--series-time-limit needs isolation; it cannot be combined with --no-isolate")
    try:
        return _run(a)
    except EdgesegError as exc:  # a bundle or option it cannot use: one line, as `edgeseg run` says it
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    if a.frames:
        from edgeseg.stream.cli_support import serve_frames

        return serve_frames(a.bundle, a.frames, out_dir=a.out_dir, backend=a.backend)
    return serve(
        a.bundle,
        listen=a.listen,
        ae_title=a.ae_title,
        out_dir=a.out_dir,
        allow=a.allow,
        forward=a.forward,
        watch=a.watch,
        series_timeout=a.series_timeout,
        once=a.once,
        spool=a.spool,
        formats=[f.strip() for f in a.formats.split(",") if f.strip()],
        backend=a.backend,
        status_interval=a.status_interval,
        precision=a.precision,
        threads=a.threads,
        isolate=not a.no_isolate,
        series_time_limit=a.series_time_limit,
    )


if __name__ == "__main__":
    sys.exit(main())
