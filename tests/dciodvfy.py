"""Run dicom3tools' ``dciodvfy`` (Debian package ``dicom3tools``) on a file and keep its errors.

``dciodvfy`` checks a file against its IOD (modules, conditions, value representations). Its
warnings are fine (most are about the source data the SEG copies, such as retired person-name
forms); its errors are not. Tests call :func:`dciodvfy_errors` and skip with the reason where
the tool is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DCIODVFY = shutil.which("dciodvfy")

#: Skip marker for tests that need the validator.
requires_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy is not installed (Debian package dicom3tools)"
)


def dciodvfy_errors(path: str | Path, *, iod: str | None = "Segmentation") -> list[str]:
    """``dciodvfy``'s error lines for ``path`` (``Error - …`` and ``Abort - …``); [] when valid.

    ``iod``: the IOD dciodvfy must recognise the file as (it prints the IOD's name on a line of
    its own); a file it takes for another IOD, or for none, gives an error line too. Skips the calling test when
    ``dciodvfy`` is not installed.
    """
    if DCIODVFY is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, timeout=120)
    # It quotes values in the file's own character set: decode leniently.
    lines = (run.stdout + b"\n" + run.stderr).decode("utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    if iod is not None:
        named = [
            line.strip()
            for line in lines
            if line.strip() and not line.startswith(("Error", "Warning", "Abort"))
        ]
        if iod not in named:
            errors.append(f"dciodvfy did not recognise the file as {iod} (it named {named[:2]})")
    return errors
