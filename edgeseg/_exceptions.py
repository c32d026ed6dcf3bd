"""Exceptions raised by edgeseg.

Every error a caller may want to catch derives from :class:`EdgesegError`::

    EdgesegError
    ├── DicomInputError      a file or series cannot be read, decoded or assembled
    ├── SpecError            a preprocessing spec is invalid or does not fit the model
    ├── BundleError          a bundle is missing, tampered with, or from a newer schema
    ├── BackendError         a backend cannot start or run (missing library, wrong GPU)
    │   ├── EngineMismatchError  a TensorRT engine was built for another GPU or version
    │   └── ServiceUnavailableError  a remote inference server (Triton) cannot be reached now
    ├── ExportError          PyTorch → ONNX export failed or disagrees with PyTorch
    ├── CalibrationError     no usable calibration data, or a bad Q/DQ graph
    └── AccuracyGateError    a candidate precision fell below the Dice threshold

Bad arguments raise plain ``ValueError``/``TypeError``. Messages say what failed, the values
involved, and how to fix it; they never contain patient names or IDs.
"""

from __future__ import annotations

from pathlib import Path


class EdgesegError(Exception):
    """Root of every edgeseg error."""


class DicomInputError(EdgesegError):
    """A DICOM file or series cannot be used.

    ``path`` names the file (or folder) and ``reason`` is one plain sentence; ``str()`` gives
    both, so a CLI can print one line per failure.
    """

    def __init__(self, path: str | Path | None, reason: str, *, not_an_image: bool = False):
        self.path = None if path is None else str(path)
        self.reason = reason
        # A valid DICOM object that is simply not an image (SEG, RTSTRUCT, SR…): callers may
        # skip it rather than count it as a failure.
        self.not_an_image = not_an_image
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class SpecError(EdgesegError):
    """A preprocessing/postprocessing spec is invalid or does not match the model."""


class BundleError(EdgesegError):
    """A bundle cannot be opened or written."""


class BackendError(EdgesegError):
    """An inference backend cannot start or run."""


class EngineMismatchError(BackendError):
    """A serialized TensorRT engine does not match this GPU or TensorRT version."""


class ServiceUnavailableError(BackendError):
    """A remote inference server cannot be reached now; the same request may succeed later.

    The listener keeps such a series in its journal and tries it again (without counting the
    attempt) instead of setting it aside."""

    transient = True


class ExportError(EdgesegError):
    """Export from PyTorch to ONNX failed or the ONNX disagrees with PyTorch."""


class CalibrationError(EdgesegError):
    """Calibration data is unusable, or a quantized graph breaks TensorRT's rules."""


class AccuracyGateError(EdgesegError):
    """A candidate precision fell below the accuracy gate.

    ``report`` holds the gate's per-label figures so callers can show them.
    """

    def __init__(self, message: str, report: dict | None = None):
        self.report = report or {}
        super().__init__(message)
