"""Build a TensorRT engine from ONNX: strongly typed, one code path for TensorRT 10.3+ and 11.x.

Precision is a property of the ONNX (fp16 casts or explicit Q/DQ), never a builder flag: the
network is created strongly typed (``1 << STRONGLY_TYPED`` on 10.x, where it is opt-in; 11.x is
always strongly typed and ignores the flag). No FP16/INT8 builder flags, calibrators,
EXPLICIT_BATCH or ``platform_has_*`` — they are gone in TensorRT 11.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeseg._exceptions import BackendError
from edgeseg._optional import require
from edgeseg.atomic import write_bytes_atomic
from edgeseg.spec import ModelSpec

log = logging.getLogger("edgeseg")

# Without a fixed target shape, 2D slices and whole-volume 3D models get this spatial range per
# axis. The maximum sizes the execution context's memory: 512³ would ask for tens of GB of
# activations from a 3D U-Net (out of memory on an Orin), so whole volumes stop at 256³; a
# larger one is refused at bind time with a sentence (give the spec a target shape, or a patch).
DYNAMIC_RANGE = (32, 256, 512)
DYNAMIC_RANGE_3D = (32, 128, 256)


def _pad(n: int, spec: ModelSpec, patch: int | None = None) -> int:
    n = max(n, patch or 0)
    return -(-n // spec.divisible_by) * spec.divisible_by


def profile_shapes(
    spec: ModelSpec, onnx_shape: tuple[int | str | None, ...] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes for the optimization profile, from the spec.

    3D sliding window: (1..batch, C, *patch). With ``target_shape``: the padded target grid.
    Otherwise static ONNX dims are kept and dynamic ones get :data:`DYNAMIC_RANGE`
    (rounded to ``divisible_by``). 2D models batch slices: (1..batch_size, C, H, W).
    """
    c, bs = spec.in_channels, spec.batch_size
    nsp = 3 if spec.dims == 3 else 2
    if spec.patch_size is not None:
        sp = tuple(int(p) for p in spec.patch_size)
        return (1, c, *sp), (bs, c, *sp), (bs, c, *sp)
    static = [None] * nsp
    if onnx_shape is not None and len(onnx_shape) == nsp + 2:
        static = [d if isinstance(d, int) and d > 0 else None for d in onnx_shape[2:]]
    if spec.target_shape is not None:
        static = [_pad(int(n), spec) for n in tuple(spec.target_shape)[-nsp:]]
    ranges = DYNAMIC_RANGE_3D if spec.dims == 3 else DYNAMIC_RANGE
    lo, mid, hi = ([s if s else _pad(r, spec) for s in static] for r in ranges)
    if spec.dims == 3:  # whole volume: batch of one
        return (1, c, *lo), (1, c, *mid), (1, c, *hi)
    return (1, c, *lo), (bs, c, *mid), (bs, c, *hi)


def parser_error_sentence(parser) -> str:
    """The ONNX parser's first error as one sentence naming the node and operator."""
    if parser.num_errors == 0:
        return "the TensorRT ONNX parser failed without reporting an error"
    err = parser.get_error(0)
    node, op = err.node_name() or f"#{err.node()}", err.node_operator() or "?"
    more = f" ({parser.num_errors - 1} more error(s))" if parser.num_errors > 1 else ""
    return f"TensorRT cannot parse ONNX node '{node}' (operator {op}): {err.desc()}{more}"


def _progress_monitor(trt, echo: Callable[[str], None]):
    """An IProgressMonitor (TensorRT ≥10.0) that prints phases, or None where absent."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                echo(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self._steps.pop(phase_name, None)

    return Monitor()


class _Spinner:
    """A heartbeat on stderr while a long call runs (when no IProgressMonitor exists)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        for ch in itertools.cycle("|/-\\"):
            if self._stop.wait(0.5):
                break
            sys.stderr.write(f"\r{self.message} {ch} {time.monotonic() - t0:.0f}s")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def __enter__(self) -> _Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_engine(
    onnx_bytes: bytes,
    spec: ModelSpec,
    *,
    workspace_mb: int | None = None,
    timing_cache: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> bytes:
    """Build a serialized, strongly typed engine for ``onnx_bytes``.

    Parameters
    ----------
    workspace_mb:
        workspace memory pool limit (Jetson shares memory with the CPU: keep it modest).
    timing_cache:
        file of a saved timing cache; read when present, written back after the build.
    echo:
        where progress lines go (default: stderr).
    """
    trt = require("tensorrt", extra="gpu", feature="Building a TensorRT engine")
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise BackendError(parser_error_sentence(parser))
    if network.num_inputs != 1:
        raise BackendError(f"the model must have exactly one input, it has {network.num_inputs}")
    inp = network.get_input(0)
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    lo, opt, hi = profile_shapes(spec, tuple(int(d) for d in inp.shape))
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    saved = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(saved), True)
    monitor = _progress_monitor(trt, echo)
    if monitor is not None:
        config.progress_monitor = monitor
    echo(f"building the TensorRT engine (TensorRT {trt.__version__}, input {inp.name} {lo} … {hi}); "
         "this happens once per GPU and can take minutes")  # fmt: skip
    t0 = time.monotonic()
    if monitor is None:
        with _Spinner("  building"):
            plan = builder.build_serialized_network(network, config)
    else:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError("TensorRT failed to build the engine (see the TensorRT log above)")
    echo(f"engine built in {time.monotonic() - t0:.0f} s")
    if cache_path is not None:
        try:
            write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        except OSError as exc:
            log.warning("could not save the timing cache to %s: %s", cache_path, exc)
    return bytes(plan)
