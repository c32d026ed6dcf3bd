"""TensorRT backend: a deserialized engine behind the :class:`Backend` interface, plus the
device-resident calls the GPU pipeline uses (bind device pointers, enqueue on its stream).

Only API common to TensorRT 10.3 (JetPack 6) and 11.x is used (see tests/api_surfaces):
``num_io_tensors``, ``get_tensor_*``, ``set_input_shape``, ``set_tensor_address`` and
``execute_async_v3`` on a non-default stream, checking every bool / None return.
"""

from __future__ import annotations

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import require
from edgeseg.backends.base import Backend, TensorInfo


def _trt():
    return require("tensorrt", extra="gpu", feature="The TensorRT backend")


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine.

    Parameters
    ----------
    engine:
        serialized engine (plan) bytes, built for this GPU and TensorRT version
        (:mod:`edgeseg.backends.engine_cache` checks that before calling this).
    precision:
        label for reports ("fp16", "int8"…).
    """

    name = "tensorrt"

    def __init__(self, engine: bytes, *, precision: str = "fp16") -> None:
        trt = _trt()
        from edgeseg.cuda.memory import Stream

        self._trt_mod = trt
        self.precision = precision
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            raise BackendError(
                "TensorRT could not deserialize the engine (built by another TensorRT version or for "
                "another GPU, or the file is damaged); delete it from the engine cache to rebuild it"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(
                f"the engine must have one input and one output; it has inputs {ins}, outputs {outs}"
            )
        self._input = self._info(ins[0])
        self._output = self._info(outs[0])
        self.stream = Stream()
        self._host: dict[tuple[int, ...], tuple] = {}

    def _info(self, name: str) -> TensorInfo:
        shape = tuple(int(d) if d >= 0 else None for d in self.engine.get_tensor_shape(name))
        kind = self.engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(self._trt_mod.nptype(kind))
        except TypeError:  # BF16, FP8, INT4: no numpy type (trt.nptype raises a bare TypeError)
            raise BackendError(
                f"the engine's tensor '{name}' is {getattr(kind, 'name', kind)}; edgeseg feeds and reads "
                "float32 or float16: export the model with float32 inputs and outputs"
            ) from None
        return TensorInfo(name, shape, dtype)

    # -- device-resident path (used by GpuPipeline) ------------------------------------------
    def bind(
        self, input_shape: tuple[int, ...], input_ptr: int, output_ptr: int | None = None
    ) -> tuple[int, ...]:
        """Set the input shape and addresses; return the output shape for that input shape.

        Call with ``output_ptr=None`` first to learn the output shape, allocate, then bind it.
        """
        ctx = self.context
        shape = tuple(int(n) for n in input_shape)
        # Shapes are set only when they change: inside a CUDA graph capture (the pipeline's
        # replayed programs bind the same shape every time) no shape work may happen.
        if shape != getattr(self, "_bound_shape", None):
            if not ctx.set_input_shape(self._input.name, shape):
                raise BackendError(
                    f"the engine does not accept input shape {shape} for '{self._input.name}' "
                    "(outside its optimization profile); rebuild the engine for this shape"
                )
            self._bound_shape = shape
        out_shape = tuple(int(n) for n in ctx.get_tensor_shape(self._output.name))
        if any(n < 0 for n in out_shape):
            raise BackendError(f"TensorRT could not infer the output shape for input {tuple(input_shape)}")
        if not ctx.set_tensor_address(self._input.name, int(input_ptr)):
            raise BackendError("TensorRT refused the input address")
        if output_ptr is not None and not ctx.set_tensor_address(self._output.name, int(output_ptr)):
            raise BackendError("TensorRT refused the output address")
        return out_shape

    def enqueue(self, stream_handle: int) -> None:
        """Enqueue one inference on ``stream_handle`` (an int, as TensorRT binds it)."""
        if not self.context.execute_async_v3(int(stream_handle)):
            raise BackendError("TensorRT failed to enqueue the inference (see the TensorRT log above)")

    # -- host path (Backend contract) -------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        from edgeseg.cuda.memory import DeviceBuffer

        self._check_batch(batch)
        batch = np.ascontiguousarray(batch.astype(self._input.dtype, copy=False))
        entry = self._host.get(batch.shape)
        if entry is None:
            d_in = DeviceBuffer(batch.nbytes)
            out_shape = self.bind(batch.shape, d_in.ptr)
            host_out = np.empty(out_shape, self._output.dtype)
            d_out = DeviceBuffer(host_out.nbytes)
            entry = self._host[batch.shape] = (d_in, d_out, host_out)
        d_in, d_out, host_out = entry
        self.bind(batch.shape, d_in.ptr, d_out.ptr)
        d_in.upload(batch, self.stream)
        self.enqueue(self.stream.handle)
        d_out.download(host_out, self.stream)
        self.stream.synchronize()
        return host_out if host_out.dtype == np.float32 else host_out.astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision, "tensorrt": self._trt_mod.__version__}

    def close(self) -> None:
        for d_in, d_out, _ in self._host.values():
            d_in.close()
            d_out.close()
        self._host.clear()
        # Context before engine before runtime (each needs the next); the stream last.
        self.context = None
        self.engine = None
        if getattr(self, "stream", None) is not None:
            self.stream.close()
