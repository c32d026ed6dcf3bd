"""ONNX Runtime's CUDA execution provider behind the device-resident backend contract.

A second GPU engine that installs from PyPI (``onnxruntime-gpu``; never next to ``onnxruntime``:
both install the same module), so the whole GPU pipeline runs on any NVIDIA machine where
TensorRT is absent. It offers what :class:`~edgeseg.backends.tensorrt.TensorRTBackend` offers
the CUDA pipeline — ``stream``, ``bind(shape, in_ptr, out_ptr)``, ``enqueue(stream)`` — through
ORT's IOBinding on the pipeline's own device buffers: no host round trip. ORT runs on the
backend's stream (the provider's ``user_compute_stream``), so the preprocessing kernel that
writes the input is ordered before it without a host synchronisation; ``run_with_iobinding``
returns once the outputs are written. ORT allocates and synchronises inside a run, so its runs
cannot be captured into a CUDA graph: ``capturable`` is False and the pipeline launches plainly.

``device="cpu"`` binds host pointers to the CPU provider instead: the same binding code, for
checking it where no GPU is.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import require
from edgeseg.backends.base import Backend, TensorInfo

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtCudaBackend(Backend):
    """Runs an ONNX model with ONNX Runtime's CUDA execution provider on device buffers."""

    name = "onnxruntime-cuda"
    capturable = False

    def __init__(
        self,
        model: bytes | str | os.PathLike,
        *,
        precision: str = "fp32",
        device_id: int = 0,
        device: str = "cuda",
        stream: Any = None,
    ) -> None:
        ort = require("onnxruntime", extra="gpu", feature="The ONNX Runtime CUDA backend")
        self._ort, self.precision, self.device_id, self.device = ort, precision, device_id, device
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "ONNX Runtime's CUDA provider is not available: install onnxruntime-gpu in place "
                    "of onnxruntime (pip uninstall -y onnxruntime && pip install onnxruntime-gpu)"
                )
            if stream is None:
                from edgeseg.cuda.memory import Stream

                stream = Stream()
            self.stream = stream
            options = {
                "device_id": str(device_id),
                "has_user_compute_stream": "1",
                "user_compute_stream": str(int(stream.handle)),
            }
            providers: list[Any] = [("CUDAExecutionProvider", options)]
        elif device == "cpu":
            self.stream = stream
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, bytes) else os.fspath(model)
        try:
            self._session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT's own error types
            raise BackendError(f"ONNX Runtime ({device}) cannot load the {precision} model: {exc}") from None
        inp, out = self._session.get_inputs(), self._session.get_outputs()
        if len(inp) != 1 or len(out) < 1:
            raise BackendError(f"the model must have exactly one input, it has {len(inp)}")
        for t in (inp[0], out[0]):
            if t.type not in _ORT_TYPES:
                raise BackendError(f"the model's tensor '{t.name}' is {t.type}; float32 or float16 is needed")
        self._input = TensorInfo(
            inp[0].name, tuple(_dim(d) for d in inp[0].shape), np.dtype(_ORT_TYPES[inp[0].type])
        )
        self._output = TensorInfo(
            out[0].name, tuple(_dim(d) for d in out[0].shape), np.dtype(_ORT_TYPES[out[0].type])
        )
        self._binding = self._session.io_binding()

    # -- device-resident path (used by GpuPipeline) ------------------------------------------
    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, K, *spatial) for a fully convolutional segmenter: the input's batch and spatial
        size with the model's class count (which must be static)."""
        k = self._output.shape[1] if len(self._output.shape) > 1 else None
        if not isinstance(k, int) or len(self._output.shape) != len(input_shape):
            raise BackendError(
                f"the model's output {self._output.shape} does not say its class count; "
                "export it with a static channel dimension"
            )
        return (int(input_shape[0]), k, *(int(n) for n in input_shape[2:]))

    def bind(
        self, input_shape: tuple[int, ...], input_ptr: int, output_ptr: int | None = None
    ) -> tuple[int, ...]:
        """Bind the input (and output) device addresses for ``input_shape``; return the output
        shape. Call with ``output_ptr=None`` first to learn it, allocate, then bind both."""
        shape = tuple(int(n) for n in input_shape)
        out_shape = self.output_shape(shape)
        io = self._binding
        io.bind_input(
            self._input.name, self.device, self.device_id, self._input.dtype, list(shape), int(input_ptr)
        )
        if output_ptr is not None:
            io.bind_output(
                self._output.name,
                self.device,
                self.device_id,
                self._output.dtype,
                list(out_shape),
                int(output_ptr),
            )
        return out_shape

    def enqueue(self, stream_handle: int) -> None:
        """Run on the bound buffers. ORT runs on this backend's stream, so work the caller
        queued there before (the preprocessing kernel) comes first."""
        if self.stream is not None and int(stream_handle) != int(self.stream.handle):
            raise BackendError(
                "the ONNX Runtime CUDA session runs on its own stream; enqueue on backend.stream"
            )
        try:
            self._session.run_with_iobinding(self._binding)
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime ({self.device}) failed to run: {str(exc).splitlines()[0]}"
            ) from None

    # -- host path (Backend contract; the acceptance check uses it) ----------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        x = np.ascontiguousarray(batch.astype(self._input.dtype, copy=False))
        out = self._session.run([self._output.name], {self._input.name: x})[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision, "device": f"{self.device}:{self.device_id}",
                "onnxruntime": self._ort.__version__}  # fmt: skip

    def close(self) -> None:
        self._binding = None
        self._session = None


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None
