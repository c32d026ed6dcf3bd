"""`import edgeseg`: the embedder's names, no engine imported until one is used, typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edgeseg

NAMES = ("Segmenter", "SegmentationResult", "Bundle", "read_volume", "write_seg", "Volume", "BackendError")


def test_import_edgeseg_loads_no_engine_and_the_names_resolve_on_use():
    code = (
        "import sys, edgeseg\n"
        "heavy = ('onnxruntime', 'openvino', 'tensorrt', 'torch', 'onnx', 'edgeseg.segmenter', 'highdicom')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "edgeseg.Segmenter; edgeseg.read_volume\n"
        "print(sorted(m for m in ('onnxruntime', 'openvino') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]  # even the Segmenter class loads no engine until it opens one


def test_every_public_name_is_listed_and_real():
    for name in NAMES:
        assert name in edgeseg.__all__ and name in dir(edgeseg)
        assert getattr(edgeseg, name) is not None
    from edgeseg.segmenter import Segmenter

    assert edgeseg.Segmenter is Segmenter
    try:
        edgeseg.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown attribute did not raise")


def test_package_ships_py_typed():
    assert (Path(edgeseg.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"edgeseg" = ["py.typed"]' in pyproject
