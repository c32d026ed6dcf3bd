"""``build-engine``: model + spec (+ real inputs) → a verified bundle.

Steps, each a plain function: export to ONNX fp32 and check it against PyTorch, then (when asked)
derive fp16 / int8 variants in ONNX space from a calibration set and gate them on Dice against
fp32 (see :mod:`edgeseg.calib`), then write the bundle atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import ExportError
from edgeseg.preprocess import Preprocessor
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

log = logging.getLogger("edgeseg.export")


@dataclass
class BuildReport:
    """What a build did, for the CLI's table and --json."""

    bundle: str
    precisions: list[str]
    parity: dict[str, Any] | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cpu_precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def model_inputs_from_volume(
    volume: Volume | Sequence[Volume], spec: ModelSpec, n: int = 2
) -> list[np.ndarray]:
    """Real model inputs from a real image: preprocessed exactly as the runtime will.

    3D: the whole (padded) volume or up to ``n`` patches around the centre; 2D: ``n`` batches of
    slices spread over the volume.
    """
    prepared = Preprocessor(spec)(volume)
    x = prepared.array
    if spec.dims == 2:
        depth = x.shape[0]
        bs = min(spec.batch_size, depth)
        starts = np.linspace(0, max(depth - bs, 0), num=min(n, depth)).astype(int)
        return [x[s : s + bs].copy() for s in sorted(set(starts.tolist()))]
    if spec.patch_size is None:
        return [x[None].copy()]
    patch = [int(p) for p in spec.patch_size]
    out = []
    size = x.shape[1:]
    for k in range(n):
        frac = 0.5 if n == 1 else 0.3 + 0.4 * k / (n - 1)
        s = [max(0, min(int(frac * size[i] - patch[i] / 2), size[i] - patch[i])) for i in range(3)]
        out.append(x[None, :, s[0] : s[0] + patch[0], s[1] : s[1] + patch[1], s[2] : s[2] + patch[2]].copy())
    return out


ACCEPTANCE_MAX_INPUTS = 4
ACCEPTANCE_MAX_BYTES = 24 << 20  # float16 inputs: a few whole 3D volumes at most


def acceptance_inputs(
    spec: ModelSpec, parity_inputs: Sequence[np.ndarray], calibration: Any
) -> list[np.ndarray]:
    """Model batches for the bundle's acceptance set: one per held-out calibration series (never
    calibrated on), else the parity inputs; capped in count and size."""
    pool: list[np.ndarray] = []
    for h in getattr(calibration, "holdout", None) or []:
        batches = model_inputs_from_volume(h.volume, spec, n=3)
        pool.append(batches[len(batches) // 2])  # the middle of the series: most foreground
    if not pool:
        pool = list(parity_inputs)
    out: list[np.ndarray] = []
    size = 0
    for x in pool[:ACCEPTANCE_MAX_INPUTS]:
        size += x.size * 2
        if out and size > ACCEPTANCE_MAX_BYTES:
            break
        out.append(np.ascontiguousarray(x, dtype=np.float32))
    return out


def record_cpu_engines(bundle_path: str | Path, threads: int | None = None) -> dict[str, Any]:
    """Every CPU engine × gated precision of the written bundle, opened, checked and timed here."""
    from edgeseg.backends.choice import best, measure
    from edgeseg.backends.host import host_cpu
    from edgeseg.bundle import Bundle

    b = Bundle.open(bundle_path)
    rows = measure(b, threads)
    pick = best(rows)
    choice = {"engine": pick[0], "precision": pick[1]} if pick else None
    return {"host": host_cpu(threads).to_dict(), "rows": rows, "choice": choice}


def build_bundle(
    model: Any,
    spec: ModelSpec,
    output: str | Path,
    *,
    name: str,
    version: str = "1",
    description: str = "",
    parity_volumes: Sequence[Volume] | None = None,
    parity_tolerance: float = 1e-2,
    opset: int = 17,
    exporter: str = "auto",
    precisions: Sequence[str] = ("fp32",),
    calibration: Any = None,
    gate: dict[str, Any] | None = None,
    force: bool = False,
    progress=None,
    measure_engines: bool = True,
) -> BuildReport:
    """Export, check, optionally quantize and gate, and write the bundle.

    Parameters
    ----------
    model:
        ``nn.Module``, TorchScript path, or ONNX path.
    parity_volumes:
        real images used for the PyTorch ↔ ONNX parity check (each one is preprocessed with the
        spec). Without them the check runs on a deterministic random input and the report says so.
    precisions:
        which variants to build beyond fp32 ("fp16", "int8", or "auto" for all that pass the gate).
    calibration:
        a calibration set (see :mod:`edgeseg.calib`) — required for int8 and for the gate.
    measure_engines:
        open, check and time every CPU engine × gated precision on this host and record the
        table (``runtime.cpu_engines``) that ``--backend cpu|auto`` chooses from.
    """
    import time

    from edgeseg.export.bundle_writer import write_bundle as _write
    from edgeseg.export.onnx_export import (
        example_shape,
        export_checked,
        load_torch_model,
        onnx_from_file,
    )

    timings: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    is_onnx = isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx")
    inputs: list[np.ndarray] = []
    if parity_volumes:
        for vol in parity_volumes:
            inputs.extend(model_inputs_from_volume(vol, spec))
    if is_onnx:
        fp32 = onnx_from_file(model)
        parity = None
    else:
        if inputs:
            example = inputs[0]
        else:
            rng = np.random.default_rng(0)
            example = rng.standard_normal(example_shape(spec)).astype(np.float32)
            inputs = [example]
            warnings.append(
                "parity checked on a random input: pass real images (--parity-input) for a real check"
            )
        model = load_torch_model(model)
        result = export_checked(
            model, example, inputs, spec, opset=opset, exporter=exporter, tolerance=parity_tolerance
        )
        fp32, report = result.onnx, result.parity
        timings["export_and_parity"] = time.perf_counter() - t0
        parity = report.to_dict()
        export_record = {"exporter": result.exporter, "requested": exporter}
        if result.fallback_reason:
            export_record["fallback_reason"] = result.fallback_reason
        if result.scripted:
            export_record["fallback_reason"] = "a TorchScript model: torch.export cannot take it"
        if progress:
            how = "torch.export (dynamo)" if result.exporter == "dynamo" else "the TorchScript exporter"
            why = export_record.get("fallback_reason")
            progress(f"ONNX exported through {how}" + (f" ({why})" if why else ""))
        if result.fallback_reason:  # dynamo was tried and not kept: worth a warning
            warnings.append(f"exported with TorchScript, not torch.export: {result.fallback_reason}")
        if not report.passed:
            raise ExportError(
                f"the ONNX model disagrees with PyTorch: max relative error {report.max_rel:.2e} "
                f"(tolerance {parity_tolerance:.0e}), label agreement {report.label_agreement:.4%} "
                f"(minimum {report.min_label_agreement:.1%})"
            )
    models = {"fp32": fp32}
    accuracy: dict[str, Any] = {}
    runtime = {"cpu_precision": "fp32"}
    provenance: dict[str, Any] = {"parity": parity, "source": "onnx" if is_onnx else "torch"}
    if not is_onnx:
        provenance["export"] = export_record
    wanted = [p for p in precisions if p != "fp32"]
    if wanted:
        try:
            from edgeseg.calib.precision import build_precisions
        except ImportError as exc:
            raise ExportError(f"precision variants need edgeseg.calib ({exc})") from None
        extra = build_precisions(
            fp32, spec, wanted, calibration=calibration, gate=gate or {}, force=force, progress=progress
        )
        models.update(extra.models)
        accuracy = extra.accuracy
        runtime.update(extra.runtime)
        provenance.update(extra.provenance)
        warnings.extend(extra.warnings)
        timings.update(extra.timings)
    from edgeseg.export.trt_onnx_support import check_bundle_models

    # Said now, on the build machine, rather than at the first engine build on a Jetson.
    warnings.extend(check_bundle_models(models))
    t2 = time.perf_counter()
    extra: dict[str, bytes] = {}
    accept = acceptance_inputs(spec, inputs, calibration)
    if accept:
        from edgeseg.backends.acceptance import MEMBER, build_acceptance
        from edgeseg.backends.onnxruntime import OrtBackend

        with OrtBackend(fp32) as ref:
            extra[MEMBER] = build_acceptance(ref, accept, spec).to_bytes()
        provenance["acceptance"] = {
            "n_inputs": len(accept),
            "source": "held-out calibration series" if calibration is not None else "parity inputs",
        }

    def write() -> None:
        _write(
            output,
            spec=spec,
            models=models,
            name=name,
            version=version,
            description=description,
            provenance=provenance,
            accuracy=accuracy,
            runtime=runtime,
            extra_members=extra,
        )

    write()
    timings["write"] = time.perf_counter() - t2
    if measure_engines:
        t3 = time.perf_counter()
        runtime["cpu_engines"] = record_cpu_engines(output)
        write()  # the same members, with the engine table in the manifest
        timings["cpu_engines"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return BuildReport(
        bundle=str(output),
        precisions=list(models),
        parity=parity,
        accuracy=accuracy,
        timings_s=timings,
        warnings=warnings,
        cpu_precision=runtime["cpu_precision"],
    )
