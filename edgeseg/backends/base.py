"""The backend contract: a batch of preprocessed input in, the network's raw output out.

A backend knows nothing about DICOM or the spec; the Segmenter owns both. Backends allocate
their buffers once per shape and reuse them, so the hot path does no per-call allocation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]  # None or a string for dynamic dims
    dtype: np.dtype


V = TypeVar("V")


class ShapeCache(Generic[V]):
    """What a backend keeps per input shape (output buffers, bound requests), for the few most
    recently used shapes: a sliding window meets two (full and short batch), but a whole-volume
    model meets a new grid per series, and a listener must not keep one per series forever."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[tuple[int, ...], V] = OrderedDict()

    def get(self, key: tuple[int, ...]) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[int, ...], value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


class Backend(ABC):
    """One inference backend (ONNX Runtime CPU, TensorRT…).

    Use as a context manager, or call :meth:`close`. ``infer`` takes a float32 (N, C, *spatial)
    array and returns a float32 (N, K, *spatial) array that stays valid until the next call
    (it may be a reused buffer: copy it if you keep it).
    """

    name: str = "base"
    # Set by subclasses when they open the model.
    _input: TensorInfo
    _output: TensorInfo

    @property
    def input(self) -> TensorInfo:
        return self._input

    @property
    def output(self) -> TensorInfo:
        return self._output

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and buffers."""

    def describe(self) -> dict:
        """What runs: backend name, provider/device, precision, threads. For reports and --json."""
        return {"backend": self.name}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_batch(self, batch: np.ndarray) -> None:
        want = self.input
        if batch.dtype != np.float32:
            raise TypeError(f"{self.name}: input must be float32, got {batch.dtype}")
        if batch.ndim != len(want.shape):
            raise ValueError(
                f"{self.name}: input '{want.name}' expects {len(want.shape)} dims {want.shape}, "
                f"got shape {batch.shape}"
            )
        for got, exp in zip(batch.shape, want.shape):
            if isinstance(exp, int) and exp > 0 and got != exp:
                raise ValueError(
                    f"{self.name}: input '{want.name}' expects shape {want.shape}, got {batch.shape}"
                )
