"""Stream, events and memory: device buffers, pinned host buffers, mapped (zero-copy) host buffers.

Each object owns one CUDA resource and frees it in :meth:`close` (also on garbage collection),
so the pipeline can allocate once per shape and reuse. :class:`PinnedPool` hands out pinned
numpy arrays whose memory lives as long as the arrays do (loaders decode into them directly).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from edgeseg.cuda._api import check, handle, runtime_module

log = logging.getLogger("edgeseg")

# Frees requested on a thread while it captures a CUDA graph (a finalizer run by the garbage
# collector, a buffer replaced mid-program): cudaFree/cudaFreeHost there are prohibited and
# would invalidate the capture, so they wait until the capture ends.
_local = threading.local()
_deferred: list[tuple[Callable[[int], object], int, str]] = []
_deferred_lock = threading.Lock()


def capturing_here() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextmanager
def capture_scope() -> Iterator[None]:
    """Mark this thread as capturing a graph; deferred frees run when the outermost scope ends."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0:
            with _deferred_lock:
                pending = _deferred[:]
                _deferred.clear()
            for free, ptr, what in pending:
                _release(free, ptr, what)


def _release(free: Callable[[int], object], ptr: int, what: str) -> None:
    """Free ``ptr`` now, or after the capture this thread is in; a failure is logged (leaked
    memory must not pass silently), never raised from a finalizer."""
    if capturing_here():
        with _deferred_lock:
            _deferred.append((free, ptr, what))
        return
    try:
        result = free(ptr)
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            log.warning("%s of %#x failed (%s): the memory may leak", what, ptr, getattr(err, "name", err))
    except Exception as exc:  # interpreter shutdown, a driver gone: report, do not raise
        log.warning("%s of %#x failed (%s): the memory may leak", what, ptr, exc)


class Stream:
    """A non-blocking stream (TensorRT inserts extra syncs on the legacy default stream)."""

    def __init__(self) -> None:
        self._rt = runtime_module()
        self.stream = check(
            self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )
        # Set by GraphRunner while a capture is open: events must then become graph nodes.
        self.capturing = False

    @property
    def handle(self) -> int:
        return handle(self.stream)

    def synchronize(self) -> None:
        """Wait for the stream's work, sleeping rather than spinning: cudaStreamSynchronize
        busy-waits a CPU core by default, which on a Jetson is the core the reader needs. A
        blocking-sync event recorded at the tail gives the same wait without the spin."""
        rt = self._rt
        done = getattr(self, "_done", None)
        if done is None:
            flags = rt.cudaEventBlockingSync | rt.cudaEventDisableTiming
            done = self._done = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        check(rt.cudaEventRecord(done, self.stream), "cudaEventRecord")
        check(rt.cudaEventSynchronize(done), "cudaEventSynchronize")

    def wait_for(self, other: int) -> None:
        """Order later work on this stream after everything queued so far on stream ``other``
        (a handle; 1 and 2 are the legacy and per-thread default streams), without blocking
        the host. This is what a producer's ``__cuda_array_interface__["stream"]`` asks for."""
        rt = self._rt
        ev = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        try:
            check(rt.cudaEventRecord(ev, int(other)), "cudaEventRecord on the producer's stream")
            check(rt.cudaStreamWaitEvent(self.stream, ev, 0), "cudaStreamWaitEvent")
        finally:
            rt.cudaEventDestroy(ev)  # released once the wait is satisfied

    def close(self) -> None:
        if getattr(self, "_done", None) is not None:
            self._rt.cudaEventDestroy(self._done)
            self._done = None
        if getattr(self, "stream", None) is not None:
            self._rt.cudaStreamDestroy(self.stream)
            self.stream = None

    __del__ = close


class Event:
    """A timing event."""

    def __init__(self) -> None:
        self._rt = runtime_module()
        # Blocking sync: elapsed_ms waits on it without spinning a core (timing still works).
        self.event = check(
            self._rt.cudaEventCreateWithFlags(self._rt.cudaEventBlockingSync), "cudaEventCreateWithFlags"
        )

    def record(self, stream: Stream) -> None:
        """Record on ``stream``. Inside a stream capture a plain record only orders work within
        the capture and leaves the event unusable for timing (cudaErrorCapturedEvent), so there
        it becomes an event-record node of the graph (``cudaEventRecordExternal``, which is
        invalid outside a capture), recorded at every replay."""
        rt = self._rt
        if getattr(stream, "capturing", False):
            check(
                rt.cudaEventRecordWithFlags(self.event, stream.stream, rt.cudaEventRecordExternal),
                "cudaEventRecordWithFlags",
            )
        else:
            check(rt.cudaEventRecord(self.event, stream.stream), "cudaEventRecord")

    @property
    def handle(self) -> int:
        return handle(self.event)

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
            _release(self._rt.cudaFree, self.ptr, "cudaFree")
            self.ptr = 0

    __del__ = close


def copy_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Async device-to-device copy of ``nbytes`` on ``stream``."""
    rt = runtime_module()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check(rt.cudaMemcpyAsync(int(dst), int(src), int(nbytes), kind, stream.stream), "D2D copy")


class PinnedBuffer:
    """Page-locked host memory as a numpy array; ``mapped`` also maps it into the device's
    address space (on integrated GPUs the kernels then read it in place: zero copy).

    ``close`` frees the memory even if views of :attr:`array` are still around: hand arrays to
    other code through :class:`PinnedPool`, whose arrays own their memory."""

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
            _release(self._rt.cudaFreeHost, self.ptr, "cudaFreeHost")
            self.ptr = 0

    __del__ = close


class _PoolArrayOwner:
    """The ``base`` of a :class:`PinnedPool` array: holds the buffer while any view lives."""

    def __init__(self, buf, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.buffer = buf
        self.__array_interface__ = {"shape": tuple(shape), "typestr": dtype.str, "data": (buf.ptr, False),
                                    "version": 3}  # fmt: skip


class PinnedPool:
    """Pinned (on integrated GPUs: mapped) host arrays for producers such as the DICOM loader.

    :meth:`allocate` returns a writable, C-contiguous numpy array in page-locked memory. The
    memory stays valid as long as that array or any view of it lives (its ``base`` owns it);
    then it goes back to the pool (at most ``keep`` idle buffers, the rest are freed) and is
    reused by the next allocation it fits. :meth:`lookup` tells the GPU pipeline that an array
    lies in such memory, so it needs no staging copy (and, when mapped, no copy at all).

    ``factory(nbytes, mapped)`` makes a buffer with ``ptr``, ``nbytes``, ``device_ptr`` and
    ``close()``; the default is :class:`PinnedBuffer`. Thread-safe: a reader thread allocates
    while the pipeline looks up.
    """

    def __init__(
        self,
        *,
        mapped: bool = False,
        device_index: int | None = None,
        keep: int = 2,
        factory: Callable[[int, bool], object] | None = None,
    ) -> None:
        self.mapped = mapped
        self.keep = keep
        self._device_index = device_index
        self._factory = factory or (lambda n, m: PinnedBuffer((n,), np.uint8, mapped=m))
        self._lock = threading.Lock()
        self._idle: list = []
        self._live: dict[int, object] = {}  # host address → buffer, while an array uses it
        self._closed = False

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            if self._closed:
                raise RuntimeError("the pinned pool is closed")
            fits = [b for b in self._idle if b.nbytes >= nbytes]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._idle.remove(buf)
        if buf is None:
            if self._device_index is not None:  # the calling thread may be a reader thread
                check(runtime_module().cudaSetDevice(self._device_index), "cudaSetDevice")
            buf = self._factory(max(nbytes, 1), self.mapped)
        owner = _PoolArrayOwner(buf, shape, dtype)
        with self._lock:
            self._live[buf.ptr] = buf
        finalizer = weakref.finalize(owner, self._release, buf)
        finalizer.atexit = False  # the process exit frees page-locked memory anyway
        return np.asarray(owner)

    __call__ = allocate  # a pool is the ``out=`` allocator of edgeseg.dicom.load_volume

    def lookup(self, array: np.ndarray):
        """The pool buffer holding all of ``array``'s bytes, or None."""
        if not isinstance(array, np.ndarray) or array.nbytes == 0:
            return None
        start = array.__array_interface__["data"][0]
        with self._lock:
            for buf in self._live.values():
                if buf.ptr <= start and start + array.nbytes <= buf.ptr + buf.nbytes:
                    return buf
        return None

    def _release(self, buf) -> None:
        with self._lock:
            self._live.pop(buf.ptr, None)
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append(buf)
                return
        buf.close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Free the idle buffers; buffers still used by arrays are freed when those die."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for buf in idle:
            buf.close()


def memory_info() -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(runtime_module().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)
