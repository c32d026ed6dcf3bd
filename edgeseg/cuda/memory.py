"""Stream, events and memory: device buffers, pinned host buffers, mapped (zero-copy) host buffers.

Each object owns one CUDA resource and frees it in :meth:`close` (also on garbage collection),
so the pipeline can allocate once per shape and reuse.
"""

from __future__ import annotations

import ctypes

import numpy as np

from edgeseg.cuda._api import check, handle, runtime_module


class Stream:
    """A non-blocking stream (TensorRT inserts extra syncs on the legacy default stream)."""

    def __init__(self) -> None:
        self._rt = runtime_module()
        self.stream = check(
            self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    @property
    def handle(self) -> int:
        return handle(self.stream)

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self._rt.cudaStreamDestroy(self.stream)
            self.stream = None

    __del__ = close


class Event:
    """A timing event."""

    def __init__(self) -> None:
        self._rt = runtime_module()
        self.event = check(self._rt.cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(self._rt.cudaEventRecord(self.event, stream.stream), "cudaEventRecord")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (synchronises on this event)."""
        check(self._rt.cudaEventSynchronize(self.event), "cudaEventSynchronize")
        return float(check(self._rt.cudaEventElapsedTime(start.event, self.event), "cudaEventElapsedTime"))

    def close(self) -> None:
        if getattr(self, "event", None) is not None:
            self._rt.cudaEventDestroy(self.event)
            self.event = None

    __del__ = close


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``)."""

    def __init__(self, nbytes: int) -> None:
        self._rt = runtime_module()
        self.nbytes = int(nbytes)
        self.ptr = int(check(self._rt.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes)"))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Async copy of a (preferably pinned) host array into this buffer."""
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte device buffer")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(
            self._rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream.stream),
            "H2D copy",
        )

    def download(self, out: np.ndarray, stream: Stream, nbytes: int | None = None) -> None:
        """Async copy into host array ``out`` (synchronise the stream before reading it)."""
        n = out.nbytes if nbytes is None else nbytes
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self._rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, n, kind, stream.stream), "D2H copy")

    def zero(self, stream: Stream) -> None:
        check(self._rt.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream.stream), "cudaMemsetAsync")

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            self._rt.cudaFree(self.ptr)
            self.ptr = 0

    __del__ = close


class PinnedBuffer:
    """Page-locked host memory as a numpy array; ``mapped`` also maps it into the device's
    address space (on integrated GPUs the kernels then read it in place: zero copy)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type, *, mapped: bool = False) -> None:
        self._rt = runtime_module()
        dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        flags = self._rt.cudaHostAllocMapped if mapped else self._rt.cudaHostAllocDefault
        self.ptr = int(check(self._rt.cudaHostAlloc(max(self.nbytes, 1), flags), "cudaHostAlloc"))
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(dtype).reshape(shape)
        self.device_ptr = (
            int(check(self._rt.cudaHostGetDevicePointer(self.ptr, 0), "cudaHostGetDevicePointer"))
            if mapped
            else 0
        )

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            self.array = None  # type: ignore[assignment]
            self._rt.cudaFreeHost(self.ptr)
            self.ptr = 0

    __del__ = close


def memory_info() -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(runtime_module().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)
