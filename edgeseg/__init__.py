"""edgeseg: medical image segmentation at the edge.

DICOM in, DICOM SEG out, on OpenVINO or ONNX Runtime (CPU) or TensorRT (GPU), from one bundle
file. The names an embedder needs are here::

    import edgeseg

    volume = edgeseg.read_volume("study/series_3/")
    with edgeseg.Segmenter.open("model.edgeseg") as seg:
        result = seg.segment(volume)

Importing edgeseg loads numpy and pydicom at most: ``Segmenter``, ``Bundle``, ``read_volume``
and ``write_seg`` are imported on first use (no inference engine is loaded until a Segmenter
opens one), and torch, onnx and tensorrt are never imported by the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgeseg._exceptions import (
    AccuracyGateError,
    BackendError,
    BundleError,
    CalibrationError,
    DicomInputError,
    EdgesegError,
    EngineMismatchError,
    ExportError,
    SpecError,
)
from edgeseg.spec import Label, ModelSpec
from edgeseg.volume import Volume

__version__ = "0.1.0"

# name → module: imported when first touched (PEP 562), so `import edgeseg` stays light.
_LAZY = {
    "Segmenter": "edgeseg.segmenter",
    "SegmentationResult": "edgeseg.result",
    "Bundle": "edgeseg.bundle",
    "read_volume": "edgeseg.dicom",
    "write_seg": "edgeseg.outputs",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from edgeseg.bundle import Bundle
    from edgeseg.dicom import read_volume
    from edgeseg.outputs import write_seg
    from edgeseg.segmenter import SegmentationResult, Segmenter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AccuracyGateError",
    "BackendError",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "DicomInputError",
    "EdgesegError",
    "EngineMismatchError",
    "ExportError",
    "Label",
    "ModelSpec",
    "SegmentationResult",
    "Segmenter",
    "SpecError",
    "Volume",
    "__version__",
    "read_volume",
    "write_seg",
]
