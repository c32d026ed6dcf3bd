"""INT8 in ONNX space: ORT ``quantize_static`` in QDQ format, calibrated once, two variants.

- ``int8``: what TensorRT accepts (s8/s8, symmetric, zero point 0, per-channel weights on
  Conv axis 0 / ConvTranspose axis 1, per-tensor activations, FP weights behind Q→DQ).
- ``int8_cpu``: what ONNX Runtime's x86 CPU kernels prefer (u8 activations, s8 weights,
  int32 bias, 7-bit weights on CPUs without VNNI).

Both come from the same tensor ranges: the calibration pass runs once and its ranges are
reused through ORT's calibration cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import CalibrationError
from edgeseg.calib.methods import calibrator_options, make_reader, ort_method

log = logging.getLogger("edgeseg.calib")

TRT_EXTRA_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "AddQDQPairToWeight": True,
    "DedicatedQDQPair": False,
    "QuantizeBias": False,  # TensorRT quantizes the bias itself; keep it float
    "ForceQuantizeNoInputCheck": True,
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
}


@dataclass
class QuantResult:
    """Quantized variants, the ranges they were built from, and the settings used."""

    models: dict[str, bytes]
    ranges: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def cpu_has_vnni() -> bool:
    """True when the x86 CPU has VNNI (u8×s8 dot products without the 7-bit weight trick)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: assume a modern CPU, full-range weights
    return "avx512_vnni" in flags or "avx_vnni" in flags or "asimddp" in flags


def resolve_keep(model: Any, keep: Sequence[str]) -> list[str]:
    """Node names matched by ``keep`` (node names or op types); unknown entries are an error."""
    names: list[str] = []
    for item in keep:
        hits = [n.name for n in model.graph.node if n.name == item or n.op_type == item]
        if not hits:
            ops = sorted({n.op_type for n in model.graph.node})
            raise CalibrationError(
                f"--keep-fp32 entry {item!r} matches no node name or op type of the model (op types: {', '.join(ops)})"
            )
        names.extend(hits)
    return sorted(set(names))


def name_nodes(model: Any) -> Any:
    """Give every unnamed node a stable name (exclusion and error messages need names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def quantize_int8(
    fp32: bytes,
    batches: Sequence[np.ndarray],
    input_name: str,
    *,
    method: str = "percentile",
    variants: Sequence[str] = ("int8", "int8_cpu"),
    keep_fp32: Sequence[str] = (),
    tune_cpu: bool = True,
    tune_budget_s: float = 60.0,
    cpu_tuning: dict[str, Any] | None = None,
    calibration_cache: str | Path | None = None,
) -> QuantResult:
    """Calibrate ``fp32`` on ``batches`` once and write the requested Q/DQ variants.

    Parameters
    ----------
    fp32:
        the fp32 ONNX model (bytes).
    batches:
        calibration inputs, (N, C, *spatial) float32, preprocessed as at run time.
    method:
        "minmax", "percentile" or "entropy".
    variants:
        any of "int8" (TensorRT rules) and "int8_cpu" (ORT x86 CPU).
    keep_fp32:
        node names or op types left unquantized.
    tune_cpu:
        shape ``int8_cpu`` by timings on this host (phase convolutions for ConvTranspose,
        few-channel convs kept float: :mod:`edgeseg.calib.cpu_tuning`); off: plain Q/DQ.
    cpu_tuning:
        the ``int8_cpu_tuning`` settings of an earlier call on this model: its choice is built
        again without timing (auto-keep rounds).
    calibration_cache:
        a JSON file of ORT tensor ranges. When it exists, its ranges are used and no
        calibration pass runs (re-quantizing with more layers kept fp32: the ranges must come
        from an earlier call on the same model, same method, with a subset of ``keep_fp32``);
        when it does not, the ranges of this call's calibration are written there.
    """
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import load_tensors_data

    if not batches:
        raise CalibrationError("the calibration set is empty: nothing to compute ranges from")
    model = name_nodes(onnx.load_from_string(fp32))
    vnni = cpu_has_vnni()
    configs = {
        "int8": dict(
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=False,
            extra_options=dict(TRT_EXTRA_OPTIONS),
        ),
        "int8_cpu": dict(
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=not vnni,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        ),
    }
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="edgeseg-quant-") as tmp, _quiet():
        src = Path(tmp) / "fp32.onnx"
        onnx.save_model(model, str(src))
        src = prepare_for_quantization(src, Path(tmp) / "fp32.pre.onnx")
        # Names are resolved on the graph that is quantized (BatchNorm folded away by now).
        excluded = resolve_keep(onnx.load(str(src)), keep_fp32)
        cache = Path(tmp) / "ranges.json"
        calib_src = src
        if "int8_cpu" in variants and tune_cpu:
            # Calibrate the graph with every ConvTranspose as phase convolutions: it computes
            # the same tensors as the original plus the phase outputs, so one calibration
            # serves the TensorRT graph and every CPU variant the tuning tries.
            calib_src = _with_phase_convs(src, Path(tmp) / "fp32.phase.onnx", keep=excluded)
        if calibration_cache is not None and Path(calibration_cache).is_file():
            shutil.copyfile(calibration_cache, cache)
        else:
            _calibrate(calib_src, tmp, cache, batches, input_name, method)
            if calibration_cache is not None:
                shutil.copyfile(cache, calibration_cache)

        def quantize(graph: Path | Any, variant: str, nodes_to_exclude: Sequence[str]) -> bytes:
            if not isinstance(graph, Path):
                path = Path(tmp) / f"{variant}.in.onnx"
                onnx.save_model(graph, str(path))
                graph = path
            return _quantize_static(
                graph,
                Path(tmp) / f"{variant}.onnx",
                configs[variant],
                variant,
                method,
                nodes_to_exclude,
                cache,
            )

        tuning: dict[str, Any] = {}
        for variant in variants:
            if variant == "int8_cpu" and tune_cpu:
                from edgeseg.calib.cpu_tuning import tune_cpu_int8

                choice = tune_cpu_int8(
                    onnx.load(str(src)),
                    lambda g, ex: quantize(g, "int8_cpu", ex),
                    np.ascontiguousarray(batches[0][:4], dtype=np.float32),
                    keep=excluded,
                    budget_s=tune_budget_s,
                    replay=cpu_tuning,
                )
                out[variant] = choice.model
                tuning = choice.record()
            else:
                out[variant] = quantize(src, variant, excluded)
        ranges = _ranges(load_tensors_data(cache))
    settings = {
        "method": method,
        "producer": "onnxruntime.quantization.quantize_static (QDQ)",
        "int8": "s8/s8 symmetric, zero point 0, per-channel weights (Conv axis 0, ConvTranspose axis 1)",
        "int8_cpu": f"u8 activations / s8 weights, reduce_range={not vnni} (VNNI: {vnni})",
        "n_batches": len(batches),
        "n_samples": int(sum(b.shape[0] for b in batches)),
    }
    if tuning:
        settings["int8_cpu_tuning"] = tuning
    return QuantResult(out, ranges, settings, excluded)


def _calibrate(
    src: Path, tmp: str, cache: Path, batches: Sequence[np.ndarray], input_name: str, method: str
) -> None:
    """Run the calibration pass once and write the tensor ranges to ``cache``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    try:
        calibrator = create_calibrator(
            src,
            None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=ort_method(method),
            extra_options=calibrator_options(method),
        )
        calibrator.collect_data(make_reader(batches, input_name))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"calibration ({method}) failed when running the model: {first}") from None


def _quantize_static(
    src: Path,
    dst: Path,
    cfg: dict[str, Any],
    variant: str,
    method: str,
    excluded: Sequence[str],
    cache: Path,
) -> bytes:
    """One Q/DQ variant of ``src`` from the ranges in ``cache``."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    try:
        quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=cfg["activation_type"],
            weight_type=cfg["weight_type"],
            reduce_range=cfg["reduce_range"],
            nodes_to_exclude=list(excluded),
            calibrate_method=ort_method(method),
            calibration_cache_path=str(cache),
            extra_options=dict(cfg["extra_options"]),
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"ONNX Runtime could not quantize the model ({variant}): {first}") from None
    return dst.read_bytes()


def _with_phase_convs(src: Path, dst: Path, *, keep: Sequence[str]) -> Path:
    """``src`` with every rewritable ConvTranspose (not in ``keep``) as phase convolutions."""
    import onnx

    from edgeseg.export.phase_conv import rewrite_conv_transpose

    model = onnx.load(str(src))
    wanted = {n.name for n in model.graph.node if n.op_type == "ConvTranspose" and n.name not in keep}
    model, replaced = rewrite_conv_transpose(model, only=wanted)
    if not replaced:
        return src
    onnx.save_model(model, str(dst))
    return dst


def prepare_for_quantization(src: Path, dst: Path) -> Path:
    """ORT's quantization pre-processing: fold BatchNorm into Conv, constant-fold, infer shapes.

    Unfolded BatchNorm would be quantized on its own (an extra requantization per layer, and
    per-channel axis warnings). Symbolic shape inference is skipped: it fails on dynamic 3D
    graphs (facts file, section 2). Falls back to the model as exported if ORT cannot do it.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # sympy missing, or an optimizer limitation: quantize as exported
        log.warning("quantization pre-processing skipped (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        return src
    return dst


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer prints to stdout and warns on the root logger; keep the CLI readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _ranges(data: Any) -> dict[str, list[float]]:
    """{tensor: [low, high]} from ORT's TensorsData, JSON-friendly."""
    out: dict[str, list[float]] = {}
    for name, td in data.data.items():
        try:
            lo, hi = td.range_value
        except AttributeError:
            continue
        out[name] = [round(float(np.asarray(lo).min()), 6), round(float(np.asarray(hi).max()), 6)]
    return out


def ranges_json(ranges: dict[str, list[float]]) -> str:
    return json.dumps(ranges, indent=1, sort_keys=True)
