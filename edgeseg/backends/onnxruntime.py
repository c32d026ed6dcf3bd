"""ONNX Runtime CPU backend: the embedded default.

Inputs are bound without a copy (the numpy buffer is handed to ORT through IOBinding) and the
output is written into a preallocated buffer per input shape, so the steady state allocates
nothing per call.
"""

from __future__ import annotations

import os

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import require
from edgeseg.backends.base import Backend, ShapeCache, TensorInfo

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def default_threads() -> int:
    """Intra-op threads: every core this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend(Backend):
    """Runs an ONNX model with ONNX Runtime's CPU execution provider.

    Parameters
    ----------
    model:
        ONNX bytes or a path.
    threads:
        intra-op threads (default: all usable cores).
    precision:
        label for reports ("fp32", "int8"…); the ONNX itself decides what runs.
    spinning:
        let ORT's worker threads spin between calls (lower latency, more idle CPU). Off on
        shared edge boxes by default.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: bytes | str | os.PathLike,
        *,
        threads: int | None = None,
        precision: str = "fp32",
        spinning: bool = False,
    ):
        ort = require("onnxruntime", extra="", feature="The ONNX Runtime backend")
        opts = ort.SessionOptions()
        self.threads = threads or default_threads()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.log_severity_level = 3
        source = model if isinstance(model, bytes) else os.fspath(model)
        try:
            self._session = ort.InferenceSession(
                source, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"ONNX Runtime cannot load the {precision} model: {exc}") from None
        self._ort = ort
        self.precision = precision
        inp = self._session.get_inputs()
        out = self._session.get_outputs()
        if len(inp) != 1:
            raise BackendError(
                f"the model must have exactly one input, it has {len(inp)}: {[i.name for i in inp]}"
            )
        self._input = TensorInfo(
            inp[0].name, tuple(inp[0].shape), np.dtype(_ORT_TYPES.get(inp[0].type, np.float32))
        )
        self._output = TensorInfo(
            out[0].name, tuple(out[0].shape), np.dtype(_ORT_TYPES.get(out[0].type, np.float32))
        )
        if self._input.dtype != np.float32:
            raise BackendError(
                f"the model input '{self._input.name}' is {inp[0].type}; edgeseg feeds float32 "
                "(keep I/O in fp32 when converting to fp16)"
            )
        self._binding = self._session.io_binding()
        self._outputs: ShapeCache[tuple[np.ndarray, object]] = ShapeCache()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        batch = np.ascontiguousarray(batch)
        b = self._binding
        b.bind_cpu_input(self._input.name, batch)
        key = batch.shape
        cached = self._outputs.get(key)
        if cached is None:
            # First call for this shape: let ORT allocate, learn the output shape, then keep a
            # buffer of that shape for every later call.
            b.bind_output(self._output.name, "cpu")
            self._session.run_with_iobinding(b)
            result = b.copy_outputs_to_cpu()[0]
            if result.dtype != np.float32:
                result = result.astype(np.float32)
            host = np.empty_like(result)
            value = self._ort.OrtValue.ortvalue_from_numpy(host)
            self._outputs.put(key, (host, value))
            b.clear_binding_outputs()
            np.copyto(host, result)
            return host
        host, value = cached
        b.bind_ortvalue_output(self._output.name, value)
        self._session.run_with_iobinding(b)
        return host

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": "CPUExecutionProvider",
            "precision": self.precision,
            "threads": self.threads,
            "onnxruntime": self._ort.__version__,
        }

    def close(self) -> None:
        self._outputs.clear()
        self._session = None  # type: ignore[assignment]
