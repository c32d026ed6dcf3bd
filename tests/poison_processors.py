"""Test-only processors for tests/test_poison_isolation.py, loaded in the child by file path.

Never imported by edgeseg: the CLI cannot reach them. A file whose ImageComments says
``edgeseg-test:segfault``/``abort``/``hang`` makes the processor do exactly that, for real.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import pydicom


def _marker(files: list[Path]) -> str:
    ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    return str(ds.get("ImageComments", ""))


def make(bundle: str | None = None):
    """The real processor (Segmenter when ``bundle``, else count_processor) behind the hooks."""
    if bundle is not None:
        from edgeseg.stream.isolation import segmenter_factory

        inner = segmenter_factory(bundle, backend="cpu")
    else:
        from edgeseg.stream.testing import count_processor as inner

    def process(files: list[Path], out_dir: Path):
        marker = _marker(files)
        if marker == "edgeseg-test:segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        elif marker == "edgeseg-test:abort":
            os.abort()
        elif marker == "edgeseg-test:hang":
            time.sleep(3600)
        return inner(files, out_dir)

    return process
