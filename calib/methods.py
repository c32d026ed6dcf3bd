"""Calibration methods and the data reader that feeds a calibration set to ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METHODS = ("minmax", "percentile", "entropy")


def ort_method(name: str) -> Any:
    """The ORT ``CalibrationMethod`` for ``name`` ("minmax", "percentile", "entropy")."""
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if name not in table:
        raise ValueError(f"unknown calibration method {name!r}; choose from {', '.join(METHODS)}")
    return table[name]


def calibrator_options(name: str) -> dict[str, Any]:
    """Options for ORT's ``create_calibrator`` (histogram size, percentile).

    Set here rather than through ``quantize_static``, which forwards only the percentile: with
    ORT's default 128 bins the entropy search has a single candidate and equals minmax.
    """
    if name == "percentile":
        # 99.99 rather than ORT's 99.999: a few hundred slices have few outliers to ignore.
        return {"num_bins": 2048, "percentile": 99.99}
    if name == "entropy":
        return {"num_bins": 2048, "num_quantized_bins": 128}
    return {}


def make_reader(batches: Sequence[np.ndarray], input_name: str) -> Any:
    """A ``CalibrationDataReader`` that yields ``{input_name: batch}`` for each batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = list(batches)
            self._i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._i >= len(self._items):
                return None
            item = self._items[self._i]
            self._i += 1
            return {input_name: np.ascontiguousarray(item, dtype=np.float32)}

        def rewind(self) -> None:
            self._i = 0

        def __len__(self) -> int:
            return len(self._items)

    return _Reader()
