"""Which GPU is this: count, name, compute capability, integrated (Jetson) or discrete."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeseg._exceptions import BackendError
from edgeseg.cuda._api import check, runtime_module


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    major: int
    minor: int
    integrated: bool  # shares memory with the CPU (Jetson): mapped pinned memory is zero-copy
    total_memory: int

    @property
    def sm(self) -> str:
        """``"sm_87"`` — the NVRTC arch and the engine-cache key."""
        return f"sm_{self.major}{self.minor}"

    @property
    def slug(self) -> str:
        """The device name as a path component, e.g. ``"nvidia-jetson-agx-orin"``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"


def device_count() -> int:
    """Visible CUDA devices; 0 when cuda-python, the driver or a GPU is missing."""
    try:
        rt = runtime_module()
        err, n = rt.cudaGetDeviceCount()
    except Exception:  # ImportError, BackendError, DynamicLibNotFoundError without a driver
        return 0
    return int(n) if int(err) == 0 and n else 0


def device_info(index: int = 0) -> DeviceInfo:
    """Make ``index`` current (primary context) and describe it."""
    rt = runtime_module()
    if device_count() <= index:
        raise BackendError(f"no CUDA device {index} on this machine (found {device_count()})")
    check(rt.cudaSetDevice(index), "cudaSetDevice")
    check(rt.cudaFree(0), "context initialisation")  # creates the primary context for the driver API
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    integrated = check(
        rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrIntegrated, index), "cudaDeviceGetAttribute"
    )
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return DeviceInfo(
        index, name, int(props.major), int(props.minor), bool(integrated), int(props.totalGlobalMem)
    )
