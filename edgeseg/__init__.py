"""edgeseg: medical image segmentation at the edge.

DICOM in, DICOM SEG out, on ONNX Runtime (CPU) or TensorRT (GPU), from one bundle file.
Importing edgeseg loads numpy and pydicom at most; torch, onnx and tensorrt are never imported
by the runtime.
"""

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

__all__ = [
    "AccuracyGateError",
    "BackendError",
    "BundleError",
    "CalibrationError",
    "DicomInputError",
    "EdgesegError",
    "EngineMismatchError",
    "ExportError",
    "Label",
    "ModelSpec",
    "SpecError",
    "Volume",
    "__version__",
]
