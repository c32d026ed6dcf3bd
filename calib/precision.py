"""fp16 / int8 variants of an fp32 ONNX, gated by Dice against fp32: what ``build-engine
--precision`` calls (:func:`build_precisions`).

Order: check the model against the spec → fp16 (overflow check on calibration samples) → int8
for TensorRT and int8_cpu for ORT from one calibration pass → TensorRT Q/DQ rules → the gate on
held-out series → layer sensitivity for failing int8 → CPU benchmark → the runtime's choice.
Nothing is written here; the caller writes the bundle only after this returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeseg._exceptions import AccuracyGateError, CalibrationError, SpecError
from edgeseg.spec import ModelSpec

log = logging.getLogger("edgeseg.calib")

CANDIDATES = ("fp16", "int8", "int8_cpu")


@dataclass
class PrecisionBuild:
    """What :func:`build_precisions` hands back to the bundle writer."""

    models: dict[str, bytes] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def expand(wanted: Sequence[str]) -> list[str]:
    """Requested precisions → candidates: "int8" brings its CPU twin, "auto" brings all."""
    out: list[str] = []
    for p in wanted:
        p = p.strip().lower()
        if p == "auto":
            out.extend(CANDIDATES)
        elif p == "int8":
            out.extend(["int8", "int8_cpu"])
        elif p in CANDIDATES:
            out.append(p)
        elif p != "fp32":
            raise ValueError(f"unknown precision {p!r}; choose from fp32, fp16, int8, int8_cpu, auto")
    return [p for p in CANDIDATES if p in out]


def check_model_vs_spec(fp32: bytes, spec: ModelSpec, sample_shape: Sequence[int] | None) -> None:
    """Raise :class:`SpecError` in one sentence when the spec cannot feed this model."""
    import onnx

    m = onnx.load_from_string(fp32)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise SpecError(f"the model has {len(inputs)} inputs; edgeseg feeds exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != spec.dims + 2:
        raise SpecError(
            f"the spec says {spec.dims}D (input rank {spec.dims + 2}) but the model input '{inputs[0].name}' "
            f"has rank {len(dims)} {dims}"
        )
    if dims[1] is not None and dims[1] != spec.in_channels:
        raise SpecError(f"the spec has {spec.in_channels} input channel(s) but the model expects {dims[1]}")
    if sample_shape is not None:
        want = [d for d in dims[2:]]
        got = list(sample_shape[2:])
        if any(w is not None and w != g for w, g in zip(want, got)):
            raise SpecError(
                f"the spec's preprocessing gives inputs of spatial size {got} but the model expects {want}; "
                "fix 'target_shape'/'patch_size'/'divisible_by' in the spec"
            )
    out_dims = [
        d.dim_value if d.HasField("dim_value") else None for d in m.graph.output[0].type.tensor_type.shape.dim
    ]
    if spec.output == "argmax" and len(out_dims) > 1 and out_dims[1] not in (None, spec.num_classes):
        raise SpecError(
            f"the spec's labels need {spec.num_classes} output channels (argmax) but the model gives {out_dims[1]}"
        )


def _say(progress: Callable[[str], Any] | None, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)


def _split_keep(fp32: bytes, keep: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--keep-fp32`` entries → (op types, node names)."""
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(fp32).graph.node}
    return [k for k in keep if k in ops], [k for k in keep if k not in ops]


def _probe_batches(
    spec: ModelSpec, calibration: Any, fp32: bytes, *, n_series: int = 2, keep: int = 16
) -> list[np.ndarray]:
    """A few held-out inputs where fp32 finds the most foreground (for layer sensitivity and the
    benchmark): an all-background probe would rate every layer harmless."""
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.calib.dataset import sample_volume
    from edgeseg.preprocess import Preprocessor, to_labels

    pre = Preprocessor(spec)
    rng = np.random.default_rng(1)
    pool: list[np.ndarray] = []
    for h in calibration.holdout[:n_series]:
        pool.extend(sample_volume(pre, h.volume, 64 if spec.dims == 2 else 8, rng))
    if not pool:
        pool = list(calibration.samples[: 2 * keep])
    backend = OrtBackend(fp32)
    try:
        scores = [int(np.count_nonzero(to_labels(backend.infer(x[None]), spec)[0])) for x in pool]
    finally:
        backend.close()
    order = np.argsort(scores)[::-1][: (keep if spec.dims == 2 else max(1, keep // 8))]
    chosen = [pool[i] for i in sorted(order.tolist())]
    bs = spec.batch_size if spec.dims == 2 else 1
    return [np.stack(chosen[i : i + bs]) for i in range(0, len(chosen), bs)]


def build_precisions(
    fp32: bytes,
    spec: ModelSpec,
    wanted: Sequence[str],
    *,
    calibration: Any = None,
    gate: dict[str, Any] | None = None,
    force: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> PrecisionBuild:
    """Build, validate and gate the requested precision variants of ``fp32``.

    Parameters
    ----------
    fp32:
        the exported fp32 ONNX (bytes).
    wanted:
        any of "fp16", "int8" (adds "int8_cpu"), "int8_cpu", "auto" (all of them).
    calibration:
        a :class:`~edgeseg.calib.dataset.CalibrationSet`; required for int8 and for the gate.
    gate:
        ``{"min_dice": 0.99, "method": "percentile", "keep_fp32": [names or op types]}``.
    force:
        keep candidates that fail the gate (with a warning) instead of dropping/refusing them.

    Raises
    ------
    SpecError
        the spec does not fit the model's input.
    CalibrationError
        no calibration set for int8, or a Q/DQ graph TensorRT would reject.
    AccuracyGateError
        every candidate failed the gate and ``force`` is off (``.report`` holds the figures).
    """
    gate = dict(gate or {})
    min_dice = float(gate.get("min_dice", 0.99))
    method = str(gate.get("method", "percentile"))
    keep = [k for k in gate.get("keep_fp32", []) if k]
    cands = expand(wanted)
    out = PrecisionBuild(runtime={"cpu_precision": "fp32"})
    if not cands:
        return out
    if calibration is None or len(calibration) == 0:
        if any(p.startswith("int8") for p in cands):
            raise CalibrationError("int8 needs a calibration set of real images (--calib DIR)")
        out.warnings.append("fp16 built without a calibration set: no overflow check and no accuracy gate")
    sample_shape = calibration.samples[0].shape if calibration is not None and len(calibration) else None
    check_model_vs_spec(fp32, spec, (1, *sample_shape) if sample_shape is not None else None)
    batches = calibration.batches(8) if calibration is not None and len(calibration) else []
    keep_ops, keep_nodes = _split_keep(fp32, keep)
    prov: dict[str, Any] = {}
    if calibration is not None:
        prov["calibration"] = dict(calibration.summary, method=method)

    if "fp16" in cands:
        t = time.perf_counter()
        _say(progress, "fp16: overflow check and conversion")
        from edgeseg.calib.fp16 import FRAGILE_OPS, convert_fp16

        r16 = convert_fp16(
            fp32, batches[:2], spec.input_name, keep_ops=FRAGILE_OPS + keep_ops, keep_nodes=keep_nodes
        )
        out.models["fp16"] = r16.model
        prov["fp16"] = {
            "kept_fp32_ops": r16.kept_ops,
            "kept_fp32_nodes": r16.kept_nodes,
            "overflow": r16.overflow,
        }
        for o in r16.overflow:
            out.warnings.append(
                f"fp16: {o['tensor']} reaches {o['max_abs']:.3g} on the calibration set; node '{o['node']}' kept fp32"
            )
        out.timings["fp16"] = time.perf_counter() - t

    int8_variants = [p for p in cands if p.startswith("int8")]
    if int8_variants:
        t = time.perf_counter()
        _say(progress, f"int8: calibrating ({method}) on {len(calibration)} samples")
        from edgeseg.calib.qdq_rules import check_qdq
        from edgeseg.calib.quantize import quantize_int8

        q = quantize_int8(
            fp32, batches, spec.input_name, method=method, variants=int8_variants, keep_fp32=keep
        )
        if "int8" in q.models:
            prov["qdq_check"] = check_qdq(q.models["int8"])  # before anything is written
        out.models.update(q.models)
        prov["ranges"] = q.ranges
        prov["quantization"] = dict(q.settings, kept_fp32=q.excluded)
        out.timings["calibrate_int8"] = time.perf_counter() - t

    built = [p for p in cands if p in out.models]
    if calibration is None or not calibration.holdout:
        if calibration is not None:
            msg = "the calibration set has no held-out series, so the accuracy gate cannot run (give ≥ 2 series)"
            if not force:
                raise CalibrationError(msg)
            out.warnings.append(msg + "; --force: variants written ungated")
        out.provenance = prov
        return out

    t = time.perf_counter()
    _say(
        progress,
        f"gate: segmenting {len(calibration.holdout)} held-out series with fp32 and {', '.join(built)}",
    )
    from edgeseg.calib.gate import run_gate

    report = run_gate(
        {"fp32": fp32, **{p: out.models[p] for p in built}}, spec, calibration.holdout, min_dice=min_dice
    )
    out.timings["gate"] = time.perf_counter() - t
    failed = [p for p in built if not report[p]["passed"]]
    fail_int8 = [p for p in failed if p.startswith("int8")]
    if fail_int8:
        t = time.perf_counter()
        _say(progress, "gate failed for int8: ranking layers by the Dice they cost")
        from edgeseg.calib.sensitivity import rank_layers

        probe = _probe_batches(spec, calibration, fp32)
        worst = rank_layers(fp32, out.models[fail_int8[0]], probe, spec)
        for p in fail_int8:
            report[p]["sensitivity"] = worst
        out.timings["sensitivity"] = time.perf_counter() - t
    for p in failed:
        rep = report[p]
        hint = ""
        if rep.get("sensitivity"):
            hint = "; layers that hurt most: " + ", ".join(
                f"{r['node']} ({r['op']}, +{r['gain']:.3f})" for r in rep["sensitivity"][:3]
            )
            hint += " (try --keep-fp32 with them)"
        line = f"{p} fails the gate: min Dice vs fp32 {rep['min_dice_vs_fp32']:.4f} < {min_dice}{hint}"
        out.warnings.append(line + ("; kept (--force)" if force else "; dropped"))
    if failed and len(failed) == len(built) and not force:
        raise AccuracyGateError(
            "every candidate failed the accuracy gate ("
            + "; ".join(f"{p}: min Dice vs fp32 {report[p]['min_dice_vs_fp32']:.4f}" for p in failed)
            + f" < {min_dice}); use a larger, more varied calibration set, --keep-fp32, or --force",
            report=report,
        )
    if not force:
        for p in failed:
            del out.models[p]
    out.accuracy = report

    t = time.perf_counter()
    _say(progress, "benchmarking the variants on this CPU")
    from edgeseg.calib.bench import fastest, time_models

    probe = _probe_batches(spec, calibration, fp32, n_series=1, keep=spec.batch_size)[0]
    times = time_models({"fp32": fp32, **out.models}, probe)
    passing = [p for p in out.models if report[p]["passed"]]
    out.runtime = {"cpu_precision": fastest(times, passing), "cpu_ms": times, "cpu_batch": list(probe.shape)}
    out.timings["benchmark"] = time.perf_counter() - t
    prov["benchmark"] = {"ms_per_batch": times, "batch_shape": list(probe.shape)}
    out.provenance = prov
    return out
