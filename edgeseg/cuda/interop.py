"""Zero-copy views of device arrays from other libraries (CuPy, PyTorch, Numba, JAX…).

Reads the pointer, shape, dtype and strides from ``__cuda_array_interface__`` (v2/v3) or from a
DLPack capsule (``__dlpack__``), never copying and never importing the producer. The view keeps
the producer object (or the capsule, whose deleter frees the DLPack tensor) alive.

Stream order: the producer may still be writing the array on its own stream. A CAI v3
``"stream"`` entry names that stream and the consumer must wait for it (the view carries it in
``stream``; :meth:`edgeseg.cuda.memory.Stream.wait_for` does the wait). DLPack instead takes the
consumer's stream in ``__dlpack__(stream=...)`` and the producer orders its work before it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

# DLPack device types that a CUDA kernel can read.
_DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 2, 3, 13
_DL_CODES = {0: "i", 1: "u", 2: "f"}


@dataclass
class DeviceArrayView:
    """A device (or CUDA-visible host) array somebody else owns."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    strides: tuple[int, ...]  # in elements
    on_device: bool
    owner: Any
    stream: int | None = None  # producer stream to wait for before reading (CAI v3), None: none

    @property
    def is_c_contiguous(self) -> bool:
        expect, step = [], 1
        for n in reversed(self.shape):
            expect.append(step)
            step *= n
        return all(s == e or n == 1 for s, e, n in zip(self.strides, reversed(expect), self.shape))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def from_cuda_array_interface(obj: Any) -> DeviceArrayView:
    cai = obj.__cuda_array_interface__
    shape = tuple(int(n) for n in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    ptr = int(cai["data"][0] or 0)
    strides = cai.get("strides")
    if strides is None:
        el = _contiguous(shape)
    else:
        if any(s % dtype.itemsize for s in strides):
            raise ValueError("strides that are not a multiple of the item size are not supported")
        el = tuple(int(s) // dtype.itemsize for s in strides)
    if "stream" in cai:
        stream = cai["stream"]
    else:
        # Version 2 carries no stream (PyTorch still exports v2): the producer's writes may
        # be pending on the legacy default stream, which a non-blocking stream does not wait
        # for by itself. Order after it (handle 1 = cudaStreamLegacy).
        stream = 1
    if stream is not None and int(stream) == 0:
        raise ValueError("__cuda_array_interface__ stream 0 is not allowed (ambiguous; see CAI v3)")
    return DeviceArrayView(ptr, shape, dtype, el, True, obj, None if stream is None else int(stream))


def from_dlpack(obj: Any, stream: int | None = None) -> DeviceArrayView:
    """A view of ``obj``'s DLPack tensor; ``stream`` is the consumer's CUDA stream handle, which
    the producer makes wait for its pending writes (DLPack's ``__dlpack__(stream=...)``)."""
    capsule = None
    if stream is not None:
        try:
            capsule = obj.__dlpack__(stream=int(stream))
        except TypeError:  # producers predating the stream argument
            capsule = None
    if capsule is None:
        capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    addr = get(capsule, b"dltensor")
    t = _DLTensor.from_address(addr)  # DLManagedTensor starts with its DLTensor
    if t.dtype.lanes != 1 or t.dtype.code not in _DL_CODES:
        raise ValueError(f"unsupported DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits)")
    dtype = np.dtype(f"{_DL_CODES[t.dtype.code]}{t.dtype.bits // 8}")
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = tuple(int(t.strides[i]) for i in range(t.ndim)) if t.strides else _contiguous(shape)
    ptr = int(t.data or 0) + int(t.byte_offset)
    on_device = t.device.device_type in (_DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED)
    # The capsule stays referenced by the view: its destructor calls the producer's deleter.
    return DeviceArrayView(ptr, shape, dtype, strides, on_device, (obj, capsule))


def as_device_view(obj: Any, stream: int | None = None) -> DeviceArrayView | None:
    """A :class:`DeviceArrayView` of ``obj`` if it exposes device memory, else ``None``.

    ``stream``: the consumer's stream handle, passed to ``__dlpack__`` (see the module doc)."""
    # DLPack first: ``__dlpack__(stream=ours)`` makes the producer order its pending writes
    # before our stream, which __cuda_array_interface__ (PyTorch's is version 2) cannot say.
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):
        device = getattr(obj, "__dlpack_device__", None)
        if device is not None and int(device()[0]) not in (_DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED):
            return None  # host memory: never ask a CPU producer to sync on a CUDA stream
        view = from_dlpack(obj, stream)
        return view if view.on_device else None
    if hasattr(obj, "__cuda_array_interface__"):
        return from_cuda_array_interface(obj)
    return None
