"""``python -m edgeseg.stream BUNDLE --listen PORT -o OUT``: the stream service without click.

Same options as ``edgeseg run --listen``; used by the crash tests to run it as its own process.
"""

from __future__ import annotations

import argparse
import sys

from edgeseg.stream.cli_support import serve


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
    p.add_argument("--status-interval", type=float, default=10.0)
    p.add_argument("--once", action="store_true")
    p.add_argument("--frames", default=None, metavar="SOURCE", help="cine DICOM, video file or device number")
    a = p.parse_args(argv)
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
    )


if __name__ == "__main__":
    sys.exit(main())
