"""The Segmenter: the embeddable API. Volume(s) in, uint8 labels on the source grid out.

One Segmenter serves both paths: the CPU path below (numpy preprocessing + ONNX Runtime) and
the GPU path (:mod:`edgeseg.cuda.pipeline`: CUDA kernels + TensorRT), chosen when opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import available
from edgeseg.backends.base import Backend
from edgeseg.bundle import Bundle
from edgeseg.preprocess import (
    Prepared,
    Preprocessor,
    gaussian_importance,
    labels_to_source,
    to_labels,
    window_starts,
)
from edgeseg.result import SegmentationResult
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

log = logging.getLogger("edgeseg")
BACKENDS = ("auto", "cpu", "openvino", "onnxruntime", "tensorrt")


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - t0) * 1e3
        return now


class Segmenter:
    """Segment volumes with a bundle's model.

    Parameters
    ----------
    spec:
        the model spec (from the bundle).
    backend:
        an opened :class:`~edgeseg.backends.Backend` (CPU path).

    Most users call :meth:`open`.
    """

    def __init__(self, spec: ModelSpec, backend: Backend, *, bundle: Bundle | None = None):
        self.spec = spec
        self.backend = backend
        self.bundle = bundle
        self._pre = Preprocessor(spec)
        self._batch: np.ndarray | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bundle: str | Path | Bundle,
        *,
        backend: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
    ) -> Segmenter:
        """Open a bundle on the best (``"auto"``) or the named backend.

        ``backend``: ``"auto"`` (TensorRT when a GPU and TensorRT are present, else ``"cpu"``),
        ``"cpu"`` (the fastest CPU engine × precision that passed the gate: the build's record
        when this host matches it, else measured here once and cached), ``"openvino"``,
        ``"onnxruntime"`` or ``"tensorrt"``. Naming a backend that cannot start raises
        :class:`BackendError` with the reason. ``precision`` defaults to the fastest one that
        passed the gate on the chosen engine.
        """
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "tensorrt" or (backend == "auto" and gpu_available()):
            try:
                from edgeseg.cuda.pipeline import GpuSegmenter

                return GpuSegmenter.open(b, precision=precision)  # type: ignore[return-value]
            except (BackendError, ImportError) as exc:
                if backend == "tensorrt":
                    raise BackendError(f"the TensorRT backend cannot start: {exc}") from None
                log.warning("TensorRT unavailable (%s); using the fastest CPU engine", exc)
        from edgeseg.backends.choice import choose, open_cpu_backend

        if backend == "onnxruntime":
            # ONNX Runtime is the build's own gate engine: its recorded precision needs no measuring.
            engine, prec = "onnxruntime", precision or b.cpu_precision
        else:
            named = backend if backend == "openvino" else None
            engine, prec, source = choose(b, threads, engine=named, precision=precision)
            log.info("CPU engine: %s %s (%s)", engine, prec, source)
        try:
            cpu_backend = open_cpu_backend(b, engine, prec, threads)
        except BackendError as exc:
            if backend not in ("auto", "cpu") or engine == "onnxruntime":
                raise
            # A chosen engine that cannot start here after all: ONNX Runtime is the universal fallback.
            log.warning("%s; using ONNX Runtime", exc)
            cpu_backend = open_cpu_backend(b, "onnxruntime", precision or b.cpu_precision, threads)
        return cls(b.spec, cpu_backend, bundle=b)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        d = self.backend.describe()
        if self.bundle is not None:
            d["model"] = f"{self.bundle.name} {self.bundle.version}"
        return d

    # -- the work -------------------------------------------------------------------------
    def segment(
        self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False
    ) -> SegmentationResult:
        """Segment one series (or several co-registered series as input channels).

        Returns labels aligned to the first volume's (z, y, x) grid.
        """
        timer = _Timer()
        t = time.perf_counter()
        prepared = self._pre(volumes)
        t = timer.add("preprocess", t)
        if self.spec.dims == 2:
            grid_labels, grid_conf = self._run_2d(prepared, timer, with_confidence)
        elif self.spec.patch_size is None:
            grid_labels, grid_conf = self._run_3d_whole(prepared, timer, with_confidence)
        else:
            grid_labels, grid_conf = self._run_3d_sliding(prepared, timer, with_confidence)
        t = time.perf_counter()
        labels = labels_to_source(grid_labels, prepared)
        conf = labels_to_source(grid_conf, prepared) if grid_conf is not None else None
        timer.add("postprocess", t)
        return SegmentationResult(labels, conf, timer.ms)

    def _crop(self, a: np.ndarray, prepared: Prepared) -> np.ndarray:
        d, h, w = prepared.grid
        return a[:d, :h, :w]

    def _run_2d(self, prepared: Prepared, timer: _Timer, conf: bool):
        x = prepared.array  # (D, C, H, W): slices are the batch
        n = x.shape[0]
        bs = self.spec.batch_size
        labels = np.empty((n, *x.shape[2:]), dtype=np.uint8)
        confidence = np.empty_like(labels) if conf else None
        for s in range(0, n, bs):
            e = min(s + bs, n)
            t = time.perf_counter()
            out = self.backend.infer(x[s:e])
            t = timer.add("infer", t)
            lab, c = to_labels(out, self.spec, with_confidence=conf)
            labels[s:e] = lab
            if confidence is not None:
                confidence[s:e] = c
            timer.add("postprocess", t)
        crop = self._crop(labels, prepared)
        return crop, (self._crop(confidence, prepared) if confidence is not None else None)

    def _run_3d_whole(self, prepared: Prepared, timer: _Timer, conf: bool):
        t = time.perf_counter()
        out = self.backend.infer(prepared.array[None])
        t = timer.add("infer", t)
        lab, c = to_labels(out, self.spec, with_confidence=conf)
        timer.add("postprocess", t)
        return self._crop(lab[0], prepared), (self._crop(c[0], prepared) if c is not None else None)

    def _run_3d_sliding(self, prepared: Prepared, timer: _Timer, conf: bool):
        spec = self.spec
        x = prepared.array  # (C, D, H, W), padded to ≥ patch
        patch = tuple(int(p) for p in spec.patch_size)  # type: ignore[union-attr]
        size = x.shape[1:]
        starts = [
            (a, b, c)
            for a in window_starts(size[0], patch[0], spec.overlap)
            for b in window_starts(size[1], patch[1], spec.overlap)
            for c in window_starts(size[2], patch[2], spec.overlap)
        ]
        weight = gaussian_importance(patch)
        acc: np.ndarray | None = None
        wsum = np.zeros(size, dtype=np.float32)
        bs = spec.batch_size
        if self._batch is None or self._batch.shape[1:] != (x.shape[0], *patch) or self._batch.shape[0] < bs:
            self._batch = np.empty((bs, x.shape[0], *patch), dtype=np.float32)
        for i in range(0, len(starts), bs):
            group = starts[i : i + bs]
            t = time.perf_counter()
            for j, (a, b, c) in enumerate(group):
                self._batch[j] = x[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]]
            t = timer.add("preprocess", t)
            out = self.backend.infer(self._batch[: len(group)])
            t = timer.add("infer", t)
            if acc is None:
                acc = np.zeros((out.shape[1], *size), dtype=np.float32)
            for j, (a, b, c) in enumerate(group):
                region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                acc[(slice(None), *region)] += out[j] * weight
                wsum[region] += weight
            timer.add("postprocess", t)
        t = time.perf_counter()
        acc /= wsum[None]
        lab, c = to_labels(acc[None], spec, with_confidence=conf)
        timer.add("postprocess", t)
        return self._crop(lab[0], prepared), (self._crop(c[0], prepared) if c is not None else None)


def gpu_available() -> bool:
    """True when TensorRT and cuda-python import and a CUDA device is visible (no import of
    either at ``import edgeseg`` time)."""
    if not (available("tensorrt") and available("cuda")):
        return False
    try:
        from edgeseg.cuda import device_count  # type: ignore[attr-defined]

        return device_count() > 0
    except Exception:  # no driver, no device, or the CUDA layer is not usable here
        return False
