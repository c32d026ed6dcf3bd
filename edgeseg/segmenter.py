"""The Segmenter: the embeddable API. Volume(s) in, uint8 labels on the source grid out.

One Segmenter serves both paths: the CPU path below (numpy preprocessing + ONNX Runtime) and
the GPU path (:mod:`edgeseg.cuda.pipeline`: CUDA kernels + TensorRT), chosen when opened.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg._exceptions import BackendError
from edgeseg._optional import available
from edgeseg.backends.base import Backend
from edgeseg.bundle import Bundle
from edgeseg.geometry import take_axis
from edgeseg.parallel import plane_threads, split_rows
from edgeseg.preprocess import (
    Prepared,
    Preprocessor,
    labels_to_source,
    output_to_source_grid,
    source_planes,
    to_labels,
)
from edgeseg.result import SegmentationResult
from edgeseg.sliding_window import SlabBlender, WindowPlan, mirror_sets, window_weights
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

    def __init__(self, spec: ModelSpec, backend: Backend, *, bundle: Bundle | None = None, tta: bool = True):
        self.spec = spec
        self.backend = backend
        self.bundle = bundle
        self._batch: np.ndarray | None = None
        self.tta = tta
        self._window_plan: tuple[tuple, WindowPlan] | None = None  # the last grid's windows
        self._ring: np.ndarray | None = None  # the slab buffer, kept for the next volume
        # the engine's threads also split pre- and postprocessing (run while the engine is idle)
        self._threads = _engine_threads(backend)
        # sliding windows pad each window as they cut it: the image is kept unpadded
        self._pre = Preprocessor(spec, threads=self._threads, pad=spec.patch_size is None)
        # Every non-empty combination of the spec's mirror axes (array axes of (N, C, *spatial)),
        # in nnU-Net's order; the plain pass comes first.
        self._mirrors = mirror_sets(spec.mirror_axes, 2) if tta else []

    # -- construction -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bundle: str | Path | Bundle,
        *,
        backend: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        tta: bool = True,
    ) -> Segmenter:
        """Open a bundle on the best (``"auto"``) or the named backend.

        ``backend``: ``"auto"`` (TensorRT when a GPU and TensorRT are present, else ``"cpu"``),
        ``"cpu"`` (the fastest CPU engine × precision that passed the gate: the build's record
        when this host matches it, else measured here once and cached), ``"openvino"``,
        ``"onnxruntime"`` or ``"tensorrt"``. Naming a backend that cannot start raises
        :class:`BackendError` with the reason. ``precision`` defaults to the fastest one that
        passed the gate on the chosen engine. ``tta=False`` skips the spec's test-time mirroring
        (1 network pass per window instead of 2^len(mirror_axes)). ``"triton://HOST:PORT/MODEL"``
        segments through a Triton server serving this bundle (:mod:`edgeseg.triton.client`).
        """
        if backend.startswith("triton://"):
            from edgeseg.triton.client import TritonSegmenter

            return TritonSegmenter.open(backend, bundle, tta=tta)  # type: ignore[return-value]
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
        missing = gpu_unsupported(b.spec)
        if backend == "tensorrt" and missing:
            raise BackendError(f"the TensorRT path does not run {missing} yet; use backend 'cpu'")
        if not missing and (backend == "tensorrt" or (backend == "auto" and gpu_available())):
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
        return cls(b.spec, cpu_backend, bundle=b, tta=tta)

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
        d["mirrors"] = len(self._mirrors)
        d["ensemble"] = self.spec.ensemble
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
        box = None
        if self.spec.crop_nonzero:
            volumes, box, full = crop_to_nonzero(volumes)
        prepared = self._pre(volumes)
        t = timer.add("preprocess", t)
        if self.spec.patch_size is not None:
            grid_labels, grid_conf = self._run_windows(prepared, timer, with_confidence)
        elif self.spec.dims == 2:
            grid_labels, grid_conf = self._run_2d(prepared, timer, with_confidence)
        else:
            grid_labels, grid_conf = self._run_3d_whole(prepared, timer, with_confidence)
        t = time.perf_counter()
        labels = labels_to_source(grid_labels, prepared, self._threads)
        conf = labels_to_source(grid_conf, prepared, self._threads) if grid_conf is not None else None
        if box is not None:
            labels = _uncrop(labels, box, full)
            conf = _uncrop(conf, box, full) if conf is not None else None
        timer.add("postprocess", t)
        return SegmentationResult(labels, conf, timer.ms)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """The network on ``batch``, averaged over the spec's mirrors (unless TTA is off)."""
        out = self.backend.infer(batch)
        if not self._mirrors:
            return out
        acc = np.array(out, dtype=np.float32, copy=True)
        for axes in self._mirrors:
            y = self.backend.infer(np.ascontiguousarray(np.flip(batch, axes)))
            acc += np.flip(y, axes)
        acc *= np.float32(1.0 / (len(self._mirrors) + 1))
        return acc

    def _run_windows(self, prepared: Prepared, timer: _Timer, conf: bool):
        """Sliding window over the volume (3D) or over each slice (2D models), blended in slabs
        (:mod:`edgeseg.sliding_window`): memory of one slab of patch depth, whatever K and the
        volume. ``window_padding`` "center" pads an image smaller than the patch as nnU-Net does
        (half before, half after), "end" pads after it to the spec's padded shape. The image is
        the unpadded grid (the Preprocessor's ``pad=False``): each window is cut from it and its
        part outside the image filled with ``pad_value``, as a padded copy would give."""
        spec = self.spec
        patch = tuple(int(p) for p in spec.patch_size)  # type: ignore[union-attr]
        grid = prepared.grid
        two_d = len(patch) == 2
        # src: (C, D, H, W) for 3D; (D, C, H, W) for 2D, whose windows are (1, p1, p2) per slice
        src = prepared.array
        chan_axis = 1 if two_d else 0
        win = (1, *patch) if two_d else patch
        if spec.window_padding == "center":
            size = tuple(max(g, p) for g, p in zip(grid, win))
            off = tuple((P - g) // 2 for P, g in zip(size, grid))
        else:
            size, off = self._pre.padded_shape(grid), (0, 0, 0)
        # only the image is blended (the windows still cover the padding)
        plan = self._plan(size, win, tuple((o, o + g) for o, g in zip(off, grid)))
        c_in = src.shape[chan_axis]
        bs = spec.batch_size
        if self._batch is None or self._batch.shape[1:] != (c_in, *patch) or self._batch.shape[0] < bs:
            self._batch = np.empty((bs, c_in, *patch), dtype=np.float32)
        batch = self._batch
        # nnU-Net's order-1 return of the output needs all of it at once: those specs keep the
        # whole blended output; every other spec finishes labels (and confidence) per slab.
        whole = spec.output_interpolation == "linear"
        # Labels only on the grid rows the source takes back (84 → 35 slices: 35 rows).
        kept_rows = None if whole else source_planes(prepared)[0]
        rows = grid[0] if kept_rows is None else len(kept_rows)
        labels = np.empty((rows, *grid[1:]), dtype=np.uint8) if not whole else None
        confidence = np.empty_like(labels) if conf and not whole else None
        kept: list[np.ndarray] = []
        # Two classes, argmax alone: only the sign of (class 1 - class 0) matters, so that one
        # channel is blended instead of two (half the memory traffic of the blend). Ties go to
        # class 0 as with argmax; the sum of differences can differ from the difference of
        # sums by float rounding only, at voxels where the two classes are equal to ~1e-7.
        sign_only = not (whole or conf) and spec.output == "argmax"
        diff: list[bool] = []  # set once the output's channels are known

        def slab_labels(part: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            if diff:
                return np.greater(part[0], 0).view(np.uint8), None
            lab, c = to_labels(part[None], spec, with_confidence=conf)
            return lab[0], (c[0] if c is not None else None)

        def finish(lo: int, hi: int, slab: np.ndarray) -> None:
            # rows [lo, hi) of the windowed array, in-plane the image box: grid rows [r0, r1)
            r0, r1 = lo - off[0], hi - off[0]
            if labels is None:
                if not kept:
                    kept.append(np.empty((slab.shape[0], *grid), dtype=np.float32))
                kept[0][:, r0:r1] = slab
                return
            if kept_rows is None:

                def to_grid(y: slice) -> None:  # in-plane rows y of the slab
                    lab, c = slab_labels(slab[:, :, y])
                    labels[r0:r1, y] = lab
                    if confidence is not None:
                        confidence[r0:r1, y] = c

                split_rows(slab.shape[2], self._threads, to_grid, slab.size)
                return
            a, b = (int(i) for i in np.searchsorted(kept_rows, (r0, r1)))

            def to_rows(r: slice) -> None:  # kept rows a + r, one at a time
                for i in range(a + r.start, a + r.stop):
                    k = int(kept_rows[i]) - r0
                    lab, c = slab_labels(slab[:, k : k + 1])
                    labels[i] = lab[0]
                    if confidence is not None:
                        confidence[i] = c[0]  # type: ignore[index]

            split_rows(b - a, plane_threads(slab[:, 0].size, self._threads), to_rows, (b - a) * slab[:, 0].size)

        blender: SlabBlender | None = None
        for group in plan.batches(bs):
            t = time.perf_counter()

            def extract(y: slice, group: list[int] = group) -> None:  # window rows y (in-plane)
                for j, w in enumerate(group):
                    a, b, c = (st - o for st, o in zip(plan.starts[w], off))  # in the image
                    if two_d:
                        cut_window(src[a], (b + y.start, c), batch[j, :, y], spec.pad_value)
                    else:
                        cut_window(src, (a, b + y.start, c), batch[j, :, :, y], spec.pad_value)

            split_rows(patch[-2], self._threads, extract, len(group) * batch[0].size)
            t = timer.add("preprocess", t)
            out = self._infer(batch[: len(group)])
            t = timer.add("infer", t)
            if blender is None:
                diff.extend([True] if sign_only and out.shape[1] == 2 else [])
                # argmax alone needs no division by the weight sum: a positive scale keeps it
                normalize = conf or whole or spec.output != "argmax"
                blender = SlabBlender(
                    plan, 1 if diff else out.shape[1], finish, normalize=normalize, ring=self._ring,
                    threads=self._threads, difference=bool(diff),
                )  # fmt: skip
                self._ring = blender.ring
            for j, w in enumerate(group):
                blender.add(w, out[j][:, None] if two_d else out[j])
            timer.add("postprocess", t)
        assert blender is not None
        blender.close()
        if labels is not None:
            return labels, confidence
        t = time.perf_counter()
        vol = output_to_source_grid(kept[0][None], prepared, spec)  # on the oriented source grid
        lab, c = to_labels(vol, spec, with_confidence=conf)
        timer.add("postprocess", t)
        return lab[0], (c[0] if c is not None else None)

    def _plan(self, size: tuple[int, ...], window: tuple[int, ...], roi: tuple) -> WindowPlan:
        """The window plan for this grid, kept for the next volume of the same grid (a stream's
        volumes share it, with its weight sums and slab buffers)."""
        key = (size, window, self.spec.overlap, roi)
        if self._window_plan is None or self._window_plan[0] != key:
            patch = window[1:] if len(self.spec.patch_size or ()) == 2 else window  # type: ignore[arg-type]
            weight = window_weights(patch, self.spec.window_weights)
            self._window_plan = (key, WindowPlan(size, window, self.spec.overlap, weight, roi))
            self._ring = None
        return self._window_plan[1]

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
            out = self._infer(x[s:e])
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
        out = self._infer(prepared.array[None])
        t = timer.add("infer", t)
        d, h, w = prepared.grid
        out = out[:, :, :d, :h, :w]
        # Labels only where the source takes them back: a grid axis with more planes than the
        # source (128 → 35 slices) is read at the planes it keeps, not argmaxed whole.
        picks = source_planes(prepared)
        for axis in (1, 2):
            if picks[axis] is not None:
                out = take_axis(out, picks[axis], axis + 2, self._threads)
        planes = picks[0] if picks[0] is not None else np.arange(d)
        labels = np.empty((len(planes), *out.shape[3:]), dtype=np.uint8)
        confidence = np.empty_like(labels) if conf else None

        def rows(r: slice) -> None:
            for j in range(r.start, r.stop):
                i = int(planes[j])
                lab, c = to_labels(out[:, :, i : i + 1], self.spec, with_confidence=conf)
                labels[j] = lab[0, 0]
                if confidence is not None:
                    confidence[j] = c[0, 0]  # type: ignore[index]

        if picks[0] is None:  # every plane: whole-array passes
            lab, c = to_labels(out, self.spec, with_confidence=conf)
            labels, confidence = lab[0], (c[0] if c is not None else None)
        else:
            split_rows(len(planes), plane_threads(labels[0].size, self._threads), rows, labels.size)
        timer.add("postprocess", t)
        return labels, confidence


def cut_window(image: np.ndarray, start: Sequence[int], dst: np.ndarray, pad: float) -> None:
    """``dst[...] = image[..., start : start + window]`` over the last ``len(start)`` axes
    (the window's shape is ``dst``'s), with the part of the window outside the image set to
    ``pad``: what cutting it from a padded copy of the image would give."""
    n = len(start)
    inside, into = [], []
    for lo, size, width in zip(start, image.shape[-n:], dst.shape[-n:]):
        a, b = max(lo, 0), min(lo + width, size)
        if b <= a:  # wholly outside
            dst[...] = pad
            return
        inside.append(slice(a, b))
        into.append(slice(a - lo, b - lo))
    dst[(Ellipsis, *into)] = image[(Ellipsis, *inside)]
    for k, (part, width) in enumerate(zip(into, dst.shape[-n:])):
        for edge in (slice(0, part.start), slice(part.stop, width)):
            if edge.stop > edge.start:
                box = [slice(None)] * n
                box[k] = edge
                dst[(Ellipsis, *box)] = pad


def crop_to_nonzero(
    volumes: Volume | Sequence[Volume],
) -> tuple[list[Volume], tuple[slice, slice, slice], tuple[int, int, int]]:
    """Crop co-registered volumes to the bounding box of voxels ≠ 0 in any of them, as
    nnU-Net's ``crop_to_nonzero``; returns the crops, the box and the full shape.

    nnU-Net fills the mask's holes first; a hole is enclosed by the mask, so it never moves
    the box, and only the box is used here (masked normalisation is refused at build time)."""
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    full = vols[0].shape
    mask = np.zeros(full, dtype=bool)
    for v in vols:
        mask |= v.modality_values() != 0
    if not mask.any():
        box = tuple(slice(0, n) for n in full)
        return vols, box, full  # type: ignore[return-value]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, full)):
        return vols, tuple(box), full  # type: ignore[return-value]
    z, y, xs = box
    out = []
    for v in vols:
        affine = v.affine.copy()
        affine[:3, 3] = (v.affine @ np.array([xs.start, y.start, z.start, 1.0]))[:3]
        out.append(
            dataclasses.replace(
                v,
                stored=np.ascontiguousarray(v.stored[z, y, xs]),
                slope=v.slope[z],
                intercept=v.intercept[z],
                affine=affine,
                sop_instance_uids=list(v.sop_instance_uids[z]),
                frame_numbers=list(v.frame_numbers[z]),
            )
        )
    return out, tuple(box), full  # type: ignore[return-value]


def _uncrop(a: np.ndarray, box: tuple[slice, ...], full: tuple[int, int, int]) -> np.ndarray:
    if a.shape == tuple(full):
        return a
    out = np.zeros(full, dtype=a.dtype)
    out[box] = a
    return out


def _engine_threads(backend: Backend) -> int:
    try:
        return max(1, int(backend.describe().get("threads") or 1))
    except Exception:  # a backend that cannot say: one thread
        return 1


def gpu_unsupported(spec: ModelSpec) -> str | None:
    """What of ``spec`` the GPU pipeline does not implement yet (it would silently run without
    it), or None."""
    missing = []
    if spec.mirror_axes:
        missing.append("test-time mirroring (mirror_axes)")
    if spec.crop_nonzero:
        missing.append("crop_nonzero")
    if spec.patch_size is not None and (spec.dims == 2 or spec.window_padding != "end"):
        missing.append("nnU-Net-style sliding windows (2D patch_size / window_padding 'center')")
    if spec.window_weights != "gaussian":
        missing.append(f"window_weights {spec.window_weights!r}")
    if spec.interpolation == "cubic" or spec.separate_lowres_axis or spec.output_interpolation != "nearest":
        missing.append("nnU-Net's resampling (cubic, separate_lowres_axis, output_interpolation)")
    if spec.intensity_before_resampling:
        missing.append("intensity_before_resampling")
    return ", ".join(missing) or None


def gpu_available() -> bool:
    """True when cuda-python imports, a GPU engine is here (TensorRT, or ONNX Runtime with its
    CUDA provider: onnxruntime-gpu) and a CUDA device is visible (nothing of it is imported at
    ``import edgeseg`` time)."""
    if not available("cuda"):
        return False
    if not available("tensorrt"):
        try:
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return False
        except Exception:
            return False
    try:
        from edgeseg.cuda import device_count  # type: ignore[attr-defined]

        return device_count() > 0
    except Exception:  # no driver, no device, or the CUDA layer is not usable here
        return False
