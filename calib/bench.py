"""Timing ONNX variants on this host (ORT CPU), for the runtime's CPU precision choice."""

from __future__ import annotations

import time

import numpy as np


def time_model(
    model: bytes, batch: np.ndarray, *, runs: int = 5, min_seconds: float = 0.3, threads: int | None = None
) -> float:
    """Median milliseconds over at least ``runs`` inferences (and ``min_seconds``) on ``batch``,
    after one warm-up run: tiny models need more runs for a stable median."""
    from edgeseg.backends.onnxruntime import OrtBackend

    backend = OrtBackend(model, threads=threads)
    try:
        backend.infer(batch)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 200):
            t = time.perf_counter()
            backend.infer(batch)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        backend.close()
    return float(np.median(times))


def time_models(models: dict[str, bytes], batch: np.ndarray, *, runs: int = 5) -> dict[str, float]:
    """``{precision: median ms}`` for each model on the same batch."""
    return {p: round(time_model(m, batch, runs=runs), 3) for p, m in models.items()}


def fastest(times: dict[str, float], candidates: list[str], *, margin: float = 0.05) -> str:
    """The fastest of ``candidates``; fp32 wins unless another is faster by more than ``margin``
    (timing noise must not switch the runtime to a quantized model)."""
    ok = [p for p in candidates if p in times and p != "fp32"]
    if "fp32" not in times or not ok:
        return "fp32"
    best = min(ok, key=lambda p: times[p])
    return best if times[best] < times["fp32"] * (1.0 - margin) else "fp32"
