"""Which CPU engine and precision run a bundle here: measured, never assumed.

Every CPU engine (ONNX Runtime, OpenVINO) × every precision in the bundle that passed the gate
is opened, checked (OpenVINO against the bundle's acceptance set) and timed on one model batch.
A compile failure or a failed check is a row that says "not available" with the reason, never a
crash. The build records this table with its host; on a device ``cpu``/``auto`` take the
recorded choice when the host matches (CPU model, ISA flags, threads) and otherwise measure once
and cache the table per bundle and host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import available
from edgeseg.atomic import write_bytes_atomic
from edgeseg.backends.base import Backend

log = logging.getLogger("edgeseg")

CPU_ENGINES = ("openvino", "onnxruntime")
# A quantized variant or another engine must beat the reference by this much to be chosen:
# timing noise must not switch a device to int8.
MARGIN = 0.05


def installed_engines() -> list[str]:
    return [e for e in CPU_ENGINES if available(e)]


def gated_precisions(bundle) -> list[str]:
    """The bundle's precisions that passed the build's gate (fp32 always)."""
    acc = bundle.manifest.get("accuracy") or {}
    return [p for p in bundle.precisions if p == "fp32" or (acc.get(p) or {}).get("passed", False)]


def min_dice(bundle) -> float:
    """The bundle's gate: the build's ``min_dice`` (0.99 when it recorded none)."""
    from edgeseg.backends.acceptance import DEFAULT_MIN_DICE

    for rep in (bundle.manifest.get("accuracy") or {}).values():
        if isinstance(rep, dict) and "min_dice" in rep:
            return float(rep["min_dice"])
    return float(bundle.manifest.get("acceptance", {}).get("min_dice", DEFAULT_MIN_DICE))


def open_cpu_backend(bundle, engine: str, precision: str, threads: int | None = None) -> Backend:
    """Open ``engine`` on the bundle's ``precision`` model; OpenVINO only after its acceptance
    check passed (cached per engine). Raises :class:`BackendError` with the reason otherwise."""
    if engine == "onnxruntime":
        from edgeseg.backends.onnxruntime import OrtBackend

        return OrtBackend(bundle.onnx(precision), threads=threads, precision=precision)
    if engine != "openvino":
        raise ValueError(f"not a CPU engine: {engine!r} (one of {', '.join(CPU_ENGINES)})")
    from edgeseg.backends.acceptance import cached_check, refusal
    from edgeseg.backends.openvino import OpenVinoBackend, openvino_cache_dir

    acc = bundle.acceptance
    if acc is None and precision != "fp32":
        raise BackendError(
            f"{bundle.path}: OpenVINO {precision} cannot be checked before use: the bundle has no "
            "acceptance set (rebuild it with this edgeseg, or use --backend onnxruntime)"
        )
    backend = OpenVinoBackend(bundle.onnx(precision), threads=threads, precision=precision)
    if acc is None:
        log.warning("%s has no acceptance set: OpenVINO fp32 runs unchecked", bundle.path)
        return backend
    engine_id = backend.engine_id(bundle.sha256(bundle.artifacts[precision]))
    try:
        result = cached_check(
            backend,
            acc,
            bundle.spec,
            min_dice(bundle),
            record=openvino_cache_dir() / "checks" / f"{engine_id}.json",
            engine_id=engine_id,
        )
    except BackendError:
        backend.close()
        raise
    backend.acceptance = result  # type: ignore[attr-defined]
    if not result["passed"]:
        backend.close()
        raise BackendError(f"{bundle.path}: " + refusal("OpenVINO", precision, result))
    return backend


def probe_batch(bundle) -> np.ndarray:
    """One model batch to time on: the first acceptance input, or zeros of the build's batch."""
    acc = bundle.acceptance
    if acc is not None:
        return acc.inputs[0]
    shape = (bundle.manifest.get("runtime") or {}).get("cpu_batch")
    if shape:
        return np.zeros(shape, dtype=np.float32)
    spec = bundle.spec
    grid = spec.patch_size or spec.target_shape
    if grid is None:
        # Whole-image models take the image's own size; the engines' ranking hardly depends on
        # it, so time them on a typical one (a 256² slice, a 96³ volume) rounded for the model.
        k = spec.divisible_by
        side = -(-(256 if spec.dims == 2 else 96) // k) * k
        grid = (side,) * spec.dims
    n = spec.batch_size if (spec.dims == 2 or spec.patch_size) else 1
    dims = [int(g) for g in grid][-spec.dims :]
    return np.zeros((n, spec.in_channels, *dims), dtype=np.float32)


def time_backend(backend: Backend, batch: np.ndarray, *, runs: int = 3, min_seconds: float = 0.3) -> float:
    """Median ms over at least ``runs`` inferences and ``min_seconds``, after one warm-up."""
    backend.infer(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def measure(
    bundle,
    threads: int | None = None,
    *,
    engines: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per engine × precision: ``{"engine", "precision", "ms"}`` or ``"status"`` with
    the reason it is not available here; OpenVINO rows carry their acceptance result."""
    batch = probe_batch(bundle)
    rows: list[dict[str, Any]] = []
    engines = list(engines or installed_engines())
    for precision in precisions or gated_precisions(bundle):
        for engine in engines:
            row: dict[str, Any] = {"engine": engine, "precision": precision}
            try:
                backend = open_cpu_backend(bundle, engine, precision, threads)
            except BackendError as exc:
                row["status"] = f"not available: {exc}"
                rows.append(row)
                continue
            try:
                row["ms"] = round(time_backend(backend, batch), 3)
                if getattr(backend, "acceptance", None):
                    row["acceptance"] = {k: v for k, v in backend.acceptance.items() if k != "cached"}  # type: ignore[attr-defined]
                row["status"] = "ok"
            except Exception as exc:  # an engine that compiles but cannot run this batch
                row["status"] = f"not available: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            finally:
                backend.close()
            rows.append(row)
    return rows


def best(rows: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """The fastest usable row; ONNX Runtime fp32 (the universal fallback) unless another row is
    faster by more than :data:`MARGIN`."""
    ok = [r for r in rows if r.get("status") == "ok" and "ms" in r]
    if not ok:
        return None
    fastest = min(ok, key=lambda r: r["ms"])
    ref = next((r for r in ok if (r["engine"], r["precision"]) == ("onnxruntime", "fp32")), None)
    if ref is not None and fastest is not ref and fastest["ms"] >= ref["ms"] * (1.0 - MARGIN):
        fastest = ref
    return fastest["engine"], fastest["precision"]


def bundle_id(bundle) -> str:
    """16 hex digits naming the bundle's exact members (its manifest's member hashes)."""
    members = json.dumps(bundle.manifest.get("sha256", {}), sort_keys=True)
    return hashlib.sha256(members.encode()).hexdigest()[:16]


def _cache_path(bundle, host) -> Path:
    from edgeseg.backends.host import cache_root

    return cache_root() / "choices" / f"{bundle_id(bundle)}-{host.slug}-t{host.threads}.json"


def engine_table(bundle, threads: int | None = None, *, measure_now: bool = True) -> tuple[list[dict], str]:
    """The engine × precision table for this host and where it came from: ``"bundle"`` (the
    build's, same host), ``"cache"`` (measured here before) or ``"measured"`` (now)."""
    from edgeseg.backends.host import host_cpu

    host = host_cpu(threads)
    recorded = (bundle.manifest.get("runtime") or {}).get("cpu_engines") or {}
    theirs = recorded.get("host", {})
    if (theirs.get("slug"), theirs.get("threads")) == (host.slug, host.threads):
        return list(recorded.get("rows", [])), "bundle"
    path = _cache_path(bundle, host)
    try:
        cached = json.loads(path.read_text())
        if set(cached.get("engines", [])) == set(installed_engines()):
            return list(cached["rows"]), "cache"
    except (OSError, ValueError, KeyError):
        pass
    if not measure_now:
        return list(recorded.get("rows", [])), "bundle (other host)"
    log.info("measuring the CPU engines for %s on this host once (cached at %s)", bundle.name, path)
    rows = measure(bundle, threads)
    doc = {"host": host.to_dict(), "engines": installed_engines(), "rows": rows}
    write_bytes_atomic(path, json.dumps(doc, indent=2).encode())
    return rows, "measured"


def choose(
    bundle, threads: int | None = None, *, engine: str | None = None, precision: str | None = None
) -> tuple[str, str, str]:
    """``(engine, precision, source)``: the fastest usable engine × precision here, optionally
    restricted to one engine or one precision; falls back to ONNX Runtime at the bundle's
    recorded CPU precision when nothing in the table fits."""
    rows, source = engine_table(bundle, threads)
    fit = [
        r
        for r in rows
        if (engine is None or r["engine"] == engine)
        and (precision is None or r["precision"] == precision)
        and r["engine"] in installed_engines()
    ]
    pick = best(fit)
    if pick is not None:
        return pick[0], pick[1], source
    fallback_engine = engine or "onnxruntime"
    fallback_precision = precision or (bundle.cpu_precision if fallback_engine == "onnxruntime" else "fp32")
    return fallback_engine, fallback_precision, "default"
