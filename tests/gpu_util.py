"""GPU test helpers: skip cleanly, with the reason, where there is no usable NVIDIA GPU."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def gpu_skip_reason() -> str | None:
    """None when a CUDA device is usable, else why not."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        return f"cuda-bindings is not installed ({exc})"
    try:
        err, n = runtime.cudaGetDeviceCount()
    except Exception as exc:  # DynamicLibNotFoundError without a driver
        return f"no CUDA driver ({exc})"
    if int(err) != 0 or not n:
        return f"no CUDA device ({getattr(err, 'name', err)})"
    return None


def requires_gpu(fn):
    """Mark ``fn`` as a GPU test that skips with the reason when no GPU is present."""
    reason = gpu_skip_reason()
    fn = pytest.mark.gpu(fn)
    return pytest.mark.skipif(reason is not None, reason=f"needs an NVIDIA GPU: {reason}")(fn)
