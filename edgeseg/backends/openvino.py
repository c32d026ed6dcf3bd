"""OpenVINO CPU backend: reads the bundle's ONNX (fp32, fp16 or Q/DQ int8) as it is.

The input and output are OpenVINO tensors that share memory with numpy arrays: the caller's
batch is wrapped (no copy) and the output is written into one preallocated buffer per input
shape, so the steady state allocates nothing per call. Threads and the latency hint come from
the caller; the compiled model is cached on disk (:func:`openvino_cache_dir`,
one folder per OpenVINO version and CPU; OpenVINO names each blob by a hash of the model and the
compile options), so the compile cost is paid once per model on a device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import require
from edgeseg.backends.base import Backend, ShapeCache, TensorInfo
from edgeseg.backends.host import cache_root, host_cpu
from edgeseg.backends.onnxruntime import default_threads

DEVICE = "CPU"


def openvino_version() -> str:
    """The installed OpenVINO release ("2026.4.1"), or raise :class:`BackendError`."""
    ov = require("openvino", extra="", feature="The OpenVINO backend")
    return str(ov.__version__).split("-")[0]


class OpenVinoBackend(Backend):
    """Runs an ONNX model with OpenVINO on the CPU.

    Parameters
    ----------
    model:
        ONNX bytes or a path.
    threads:
        inference threads (default: all usable cores).
    precision:
        label for reports ("fp32", "int8"…); the ONNX itself decides what runs.
    cache_dir:
        where OpenVINO keeps compiled models (default: the per-user engine cache; ``False``
        turns caching off).
    """

    name = "openvino"

    def __init__(
        self,
        model: bytes | str | os.PathLike,
        *,
        threads: int | None = None,
        precision: str = "fp32",
        cache_dir: str | os.PathLike | bool | None = None,
    ):
        ov = require("openvino", extra="", feature="The OpenVINO backend")
        self._ov = ov
        self.threads = threads or default_threads()
        self.precision = precision
        core = ov.Core()
        if cache_dir is None:
            cache_dir = openvino_cache_dir()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        config: dict[str, object] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if precision == "fp32":
            # CPUs with AMX/AVX512-BF16 would otherwise run an fp32 model in bf16: fp32 means fp32.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self._config = dict(config)
        try:
            graph = core.read_model(model if isinstance(model, bytes) else os.fspath(model))
            self._compiled = core.compile_model(graph, DEVICE, config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace
            first = str(exc).strip().splitlines()
            reason = next((ln.strip() for ln in first if "Exception from" not in ln and ln.strip()), "")
            raise BackendError(
                f"OpenVINO cannot compile the {precision} model on this CPU: {reason[:300] or type(exc).__name__}"
            ) from None
        inputs, outputs = self._compiled.inputs, self._compiled.outputs
        if len(inputs) != 1:
            raise BackendError(f"the model must have exactly one input, it has {len(inputs)}")
        self._input = _info(inputs[0])
        self._output = _info(outputs[0])
        if self._input.dtype != np.float32:
            raise BackendError(
                f"the model input '{self._input.name}' is {self._input.dtype}; edgeseg feeds float32 "
                "(keep I/O in fp32 when converting to fp16)"
            )
        self._request = self._compiled.create_infer_request()
        # input shape → (its infer request, the host output buffer bound to it). One request per
        # shape: a request whose output is a host buffer cannot grow it for a larger batch
        # (a short last batch first, a full one next). With one stream they share the graph.
        self._outputs: ShapeCache[tuple[object, np.ndarray]] = ShapeCache()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        batch = np.ascontiguousarray(batch)
        key = batch.shape
        if self._output.dtype != np.float32:  # an fp16 output: converted, cannot be shared
            req = self._request
            req.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
            req.infer()
            return np.asarray(req.get_output_tensor().data).astype(np.float32)
        cached = self._outputs.get(key)
        if cached is None:
            # First call for this shape: a fresh request lets OpenVINO allocate and tells the
            # output shape; a host buffer of that shape is its output tensor from then on.
            req = self._compiled.create_infer_request()
            req.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
            req.infer()
            host = np.array(req.get_output_tensor().data, dtype=np.float32, copy=True)
            req.set_output_tensor(self._ov.Tensor(host, shared_memory=True))
            self._outputs.put(key, (req, host))
            return host
        req, host = cached
        req.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
        req.infer()
        return host

    def engine_id(self, onnx_sha256: str) -> str:
        """What the compiled engine is a function of: the ONNX, OpenVINO's version, the CPU and
        the compile options (OpenVINO's own blobs are not byte-reproducible, so they cannot be
        hashed instead). An acceptance result is valid for exactly this id."""
        import hashlib

        parts = [
            onnx_sha256,
            openvino_version(),
            host_cpu().slug,
            self.precision,
            repr(sorted(self._config.items())),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": DEVICE,
            "precision": self.precision,
            "threads": self.threads,
            "openvino": openvino_version(),
        }

    def close(self) -> None:
        self._outputs.clear()
        self._request = None  # type: ignore[assignment]
        self._compiled = None  # type: ignore[assignment]


def _info(port) -> TensorInfo:
    dims = tuple(int(d.get_length()) if d.is_static else None for d in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype())
    try:
        name = port.get_any_name()
    except RuntimeError:  # an unnamed port
        name = "input"
    return TensorInfo(name, dims, dtype)


def openvino_cache_dir(root: Path | None = None) -> Path:
    """``<cache>/openvino/<openvino-version>/<cpu-slug>/``: OpenVINO's compiled-model blobs (it
    names each by a hash of the model and compile options) and edgeseg's acceptance records."""
    return (root or cache_root()) / "openvino" / openvino_version() / host_cpu().slug
