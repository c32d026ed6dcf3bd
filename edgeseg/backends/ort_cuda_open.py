"""Open a bundle on ONNX Runtime's CUDA provider (where TensorRT is absent), checked against the
bundle's acceptance set before first use, like every engine that runs on the device.

fp16 first, then fp32: the Q/DQ int8 model is shaped for TensorRT and runs on ORT's CUDA
provider mostly as dequantised float, slower than fp16, so it is not a candidate unless asked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgeseg._exceptions import BackendError
from edgeseg.backends.base import Backend


def open_ort_cuda_backend(bundle, precision: str | None = None, *, device_id: int = 0) -> Backend:
    """The first ORT CUDA session for ``bundle`` that passes its acceptance check."""
    from edgeseg.backends.acceptance import first_accepted
    from edgeseg.backends.choice import min_dice
    from edgeseg.backends.host import cache_root
    from edgeseg.backends.onnxruntime_cuda import OrtCudaBackend
    from edgeseg.cuda.device import device_info

    if precision is not None and precision not in bundle.artifacts:
        raise BackendError(f"{bundle.path}: the bundle has no {precision} model")
    candidates = [precision] if precision else [p for p in ("fp16", "fp32") if p in bundle.artifacts]
    gpu = device_info(device_id)

    def open_one(prec: str) -> tuple[Backend, Path, str]:
        backend = OrtCudaBackend(bundle.onnx(prec), precision=prec, device_id=device_id)
        sha = bundle.sha256(bundle.artifacts[prec])
        version = backend.describe()["onnxruntime"]
        # What the session's kernels are a function of: the model, ORT's version and the GPU.
        engine_id = hashlib.sha256(f"{sha}|{version}|{gpu.sm}|{gpu.slug}".encode()).hexdigest()
        record = (
            cache_root() / "onnxruntime-cuda" / version / f"{gpu.sm}_{gpu.slug}" / f"{sha}-{prec}.accept.json"
        )
        return backend, record, engine_id

    return first_accepted(bundle, candidates, open_one, "ONNX Runtime CUDA", min_dice(bundle))
