"""The thin cuda-python layer of the GPU path: device, stream, buffers, NVRTC kernels, graphs.

Nothing here imports cuda-python at module import (``import edgeseg`` stays light); the
functions import it when called. Modules:

* :mod:`._api` — cuda-python imports (new and old names) and the ``check`` helper;
* :mod:`.device` — device discovery (count, compute capability, integrated or discrete);
* :mod:`.memory` — stream, events, device / pinned / mapped host buffers;
* :mod:`.nvrtc` — kernel compilation with a cubin cache; :mod:`.module` — loading and launching;
* :mod:`.graph` — CUDA graph capture with a plain-launch fallback;
* :mod:`.interop` — zero-copy views of ``__cuda_array_interface__`` / DLPack arrays;
* :mod:`.plan`, :mod:`.reference` — kernel launch parameters and their numpy references;
* :mod:`.pipeline` — raw pixels → labels on the GPU with TensorRT.
"""

from __future__ import annotations


def device_count() -> int:
    """Number of visible CUDA devices; 0 without a driver (never raises for a missing GPU)."""
    from edgeseg.cuda.device import device_count as _count

    return _count()
