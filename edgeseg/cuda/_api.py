"""cuda-python imports and the one error-checking helper.

cuda-bindings ≥12.6 exposes ``cuda.bindings.{runtime, driver, nvrtc}``; cuda-python 12.x on
JetPack 6 may only have the old ``cuda.{cudart, cuda, nvrtc}`` names (removed in 13). Every
call returns ``(err, *results)``; :func:`check` unpacks it and turns failures into
:class:`~edgeseg.BackendError` naming the call. Imported lazily: ``import edgeseg`` never loads CUDA.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from edgeseg._exceptions import BackendError
from edgeseg._optional import require

_FEATURE = "The CUDA GPU path"


def runtime_module() -> ModuleType:
    """``cuda.bindings.runtime`` (or ``cuda.cudart`` on old cuda-python)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        return require("cuda.cudart", extra="gpu", feature=_FEATURE)


def driver_module() -> ModuleType:
    """``cuda.bindings.driver`` (or ``cuda.cuda`` on old cuda-python)."""
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        return require("cuda.cuda", extra="gpu", feature=_FEATURE)


def nvrtc_module() -> ModuleType:
    """``cuda.bindings.nvrtc`` (or ``cuda.nvrtc`` on old cuda-python)."""
    try:
        from cuda.bindings import nvrtc

        return nvrtc
    except ImportError:
        return require("cuda.nvrtc", extra="gpu", feature=_FEATURE)


def _error_name(err: Any) -> str:
    return getattr(err, "name", str(err))


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *results)`` tuple: raise on error, else return the results.

    Returns ``None`` for no result, the value for one, a tuple for several.
    """
    if not isinstance(result, tuple):
        result = (result,)
    err, *rest = result
    if int(err) != 0:
        hint = ""
        if "InsufficientDriver" in _error_name(err) or "NoDevice" in _error_name(err):
            hint = " (no usable NVIDIA GPU or driver on this machine)"
        raise BackendError(f"CUDA {what} failed: {_error_name(err)}{hint}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def handle(obj: Any) -> int:
    """The integer value of a cuda-python handle (stream, event, pointer) for C ``size_t`` APIs.

    cuda-bindings 13 prefers ``cuda.bindings.utils.get_cuda_native_handle`` over ``int(obj)``.
    """
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(obj))
    except (ImportError, TypeError):
        return int(obj)
