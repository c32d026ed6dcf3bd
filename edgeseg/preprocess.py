"""The numpy reference implementation of the preprocessing and postprocessing spec.

This is what runs on the CPU path, and the reference every CUDA kernel is tested against.
Order (see :mod:`edgeseg.spec` and :mod:`edgeseg.geometry`): reorient → modality rescale →
resample to the model grid → intensity steps (statistics over the whole resampled volume) →
pad → write into the model's input layout. Postprocessing turns network output into uint8
labels and maps them back onto the source grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeseg._exceptions import SpecError
from edgeseg.geometry import (
    Orientation,
    image_lowres_axis,
    nearest_indices,
    orientation_for,
    output_lowres_axis,
    resample,
    resample_image,
    spacing_to_shape,
    stride_of,
    take_axis,
)
from edgeseg.intensity import apply_intensity, gaussian_filter, gaussian_kernel, percentiles  # noqa: F401 (public here)
from edgeseg.intensity_lut import intensity_by_lut, lut_applies, needs_statistics
from edgeseg.parallel import split_rows
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class Prepared:
    """A preprocessed input and what is needed to map the output back.

    ``array`` is (C, D, H, W) for 3D models and (D, C, H, W) for 2D models (slices are the
    batch), float32, padded (unpadded from a ``Preprocessor(pad=False)``). ``grid`` is the (D, H, W) model grid before padding; ``oriented``
    the source shape in model axes before resampling.
    """

    array: np.ndarray
    grid: tuple[int, int, int]
    oriented: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    orientation: Orientation
    spacing: tuple[float, float, float] | None = None  # the source's, in model axes


class Preprocessor:
    """Runs a spec's preprocessing, reusing its output buffer across calls of the same shape.

    The buffer is the returned ``Prepared.array``: read it, do not write it (its padding is
    written once per grid, and the next call overwrites the rest).

    ``pad=False`` leaves the grid unpadded (``Prepared.array`` is then (C, *grid), or
    (D, C, H, W) of the grid): for sliding windows, which pad each window as they cut it, so
    the image is written in one contiguous block, by the resampling itself where it can."""

    def __init__(self, spec: ModelSpec, threads: int = 1, *, pad: bool = True):
        self.spec = spec
        self.pad = pad
        self.threads = threads  # splits resampling and the intensity lookup (same values)
        self._buffer: np.ndarray | None = None
        self._padded: tuple[int, int, int] | None = None  # the grid whose padding the buffer holds

    def plan(self, volume: Volume) -> tuple[Orientation, tuple[int, int, int], tuple[int, int, int]]:
        """(orientation, oriented shape, model grid) for ``volume`` under this spec."""
        spec = self.spec
        orient = orientation_for(volume.direction, spec.orientation)
        oriented = orient.model_shape(volume.shape)
        spacing = orient.model_spacing(volume.spacing)
        grid = list(oriented)
        if spec.target_shape is not None:
            target = tuple(spec.target_shape)
            if spec.dims == 2 or len(target) == 2:
                grid[1:] = target[-2:]
            else:
                grid = list(target)
        elif spec.target_spacing is not None:
            tsp = tuple(spec.target_spacing)
            if spec.dims == 2 or len(tsp) == 2:
                grid[1:] = spacing_to_shape(oriented[1:], spacing[1:], tsp[-2:])
            else:
                grid = list(spacing_to_shape(oriented, spacing, tsp))
        return orient, oriented, tuple(grid)  # type: ignore[return-value]

    def padded_shape(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        spec = self.spec
        out = list(grid)
        first = 1 if spec.dims == 2 else 0  # 2D models never pad the slice axis
        for i in range(first, 3):
            if spec.patch_size is not None:
                out[i] = max(out[i], int(spec.patch_size[i - 3 + len(spec.patch_size)]))  # 2D: (H, W)
            m = spec.divisible_by
            out[i] = -(-out[i] // m) * m
        return tuple(out)  # type: ignore[return-value]

    def __call__(self, volumes: Volume | Sequence[Volume]) -> Prepared:
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        spec = self.spec
        if len(vols) != spec.in_channels:
            raise SpecError(
                f"the model takes {spec.in_channels} co-registered series as input channels, got {len(vols)}"
            )
        if any(v.shape != vols[0].shape for v in vols[1:]):
            raise SpecError(
                "multimodal input series must share one grid; got shapes "
                + ", ".join(str(v.shape) for v in vols)
            )
        orient, oriented, grid = self.plan(vols[0])
        padded = self.padded_shape(grid) if self.pad else grid
        layout = (spec.in_channels, *padded) if spec.dims == 3 else (padded[0], spec.in_channels, *padded[1:])
        if self._buffer is None or self._buffer.shape != layout:
            self._buffer = np.empty(layout, dtype=np.float32)
            self._padded = None
        buf = self._buffer
        if self._padded != grid and padded != grid:  # the channels write the rest; nothing else does
            _fill_padding(buf, grid, spec.dims, spec.pad_value)
            self._padded = grid
        for c, vol in enumerate(vols):
            if spec.dims == 3:
                dest = buf[c, : grid[0], : grid[1], : grid[2]]
            else:
                dest = buf[: grid[0], c, : grid[1], : grid[2]]
            x = self._channel(vol, orient, grid, spec.intensity_for_channel(c), dest)
            if x is not dest:
                dest[...] = x
        return Prepared(buf, grid, oriented, vols[0].shape, orient, orient.model_spacing(vols[0].spacing))

    def _channel(
        self,
        vol: Volume,
        orient: Orientation,
        grid: tuple[int, int, int],
        steps: list[object],
        dest: np.ndarray | None = None,
    ) -> np.ndarray:
        """The channel on the model grid: ``dest`` itself where it could be written in place."""
        axes = (1, 2) if self.spec.dims == 2 else (0, 1, 2)
        out_shape = tuple(grid[a] for a in axes)
        mode = self.spec.interpolation
        low = image_lowres_axis(self.spec, orient.model_spacing(vol.spacing))  # nnU-Net's separate z
        if self.spec.intensity_before_resampling:  # nnU-Net's order: normalise, then resample
            x = apply_intensity(np.array(orient.to_model(vol.modality_values()), dtype=np.float32), steps)
            return np.asarray(resample_image(x, out_shape, mode, axes, low, self.threads), dtype=np.float32)
        uniform = bool(np.all(vol.slope == vol.slope[0]) and np.all(vol.intercept == vol.intercept[0]))
        if uniform and mode == "nearest":
            mapped = self._nearest_lut(vol, orient.to_model(vol.stored), out_shape, axes, steps, dest)
            if mapped is not None:
                return mapped
        if uniform:
            # Rescale is one affine map, which commutes with resampling: resample the stored
            # values (2 bytes a voxel, usually a smaller grid) and rescale only the result.
            # Linear floats go straight into a C-order destination (the unpadded buffer): no
            # copy, and the intensity steps run on one contiguous block.
            into = dest if mode == "linear" and dest is not None and dest.flags.c_contiguous else None
            x = resample_image(orient.to_model(vol.stored), out_shape, mode, axes, low, self.threads, out=into)
            if lut_applies(x, steps) and needs_statistics(steps):
                # still stored integers: the statistics and the steps run on their histogram
                slope, intercept = float(vol.slope[0]), float(vol.intercept[0])
                return intensity_by_lut(x, slope, intercept, steps, out=dest, threads=self.threads)
            if x is not into:
                x = _own_float32(x, vol.stored)
            if vol.slope[0] != 1.0:
                x *= np.float32(vol.slope[0])
            if vol.intercept[0] != 0.0:
                x += np.float32(vol.intercept[0])
        else:
            x = resample_image(
                orient.to_model(vol.modality_values()), out_shape, mode, axes, low, self.threads
            )
            x = _own_float32(x, vol.stored)
        return apply_intensity(x, steps)

    def _nearest_lut(
        self,
        vol: Volume,
        src: np.ndarray,
        out_shape: tuple[int, ...],
        axes: tuple[int, ...],
        steps: list[object],
        dest: np.ndarray | None,
    ) -> np.ndarray | None:
        """Histogram steps on a nearest grid that upsamples one axis: a per-value map commutes
        with nearest resampling, so map the grid before that axis grows (fewer voxels) with the
        statistics of the grown one, then repeat its planes; None where this does not apply."""
        grow = [i for i, a in enumerate(axes) if out_shape[i] > src.shape[a]]
        if len(grow) != 1 or not (lut_applies(src, steps) and needs_statistics(steps)):
            return None
        g, ga = grow[0], axes[grow[0]]
        shrunk = tuple(src.shape[a] if i == g else out_shape[i] for i, a in enumerate(axes))
        small = resample(src, shrunk, "nearest", axes, self.threads)
        index = nearest_indices(src.shape[ga], out_shape[g])
        times = np.bincount(index, minlength=src.shape[ga])
        slope, intercept = float(vol.slope[0]), float(vol.intercept[0])
        mapped = intensity_by_lut(small, slope, intercept, steps, threads=self.threads, repeats=(ga, times))
        full = list(small.shape)
        full[ga] = out_shape[g]
        if dest is not None and dest.flags.c_contiguous and dest.shape == tuple(full):
            return np.take(mapped, index, axis=ga, out=dest, mode="clip")
        return np.take(mapped, index, axis=ga)


def _own_float32(x: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 array the steps may modify in place: as it is when
    resampling already made a new one, else a copy (never the volume's own pixels)."""
    if (
        x.dtype == np.float32
        and x.flags.c_contiguous
        and x.flags.writeable
        and not np.may_share_memory(x, source)
    ):
        return x
    return np.array(x, dtype=np.float32, copy=True, order="C")


def _fill_padding(buf: np.ndarray, grid: tuple[int, int, int], dims: int, value: float) -> None:
    """Write ``value`` into the padding of a model input buffer: everything outside the
    (D, H, W) ``grid`` box of its spatial axes ((C, D, H, W) for 3D, (D, C, H, W) for 2D)."""
    g0, g1, g2 = grid
    if dims == 3:
        buf[:, g0:] = value
        buf[:, :g0, g1:] = value
        buf[:, :g0, :g1, g2:] = value
    else:
        buf[g0:] = value
        buf[:g0, :, g1:] = value
        buf[:g0, :, :g1, g2:] = value


# ---------------------------------------------------------------------------------------------
# Postprocessing


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    m = logits.max(axis=axis, keepdims=True)
    e = np.exp(logits - m)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def argmax_channels(output: np.ndarray) -> np.ndarray:
    """``np.argmax(output, axis=1)`` as uint8, by a running max over channels: contiguous passes
    instead of a strided reduction (several times faster for the few channels of a segmenter)."""
    if output.shape[1] == 2:  # one compare; ties go to channel 0, as with argmax
        return np.greater(output[:, 1], output[:, 0]).view(np.uint8)
    best = output[:, 0].copy()
    labels = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, output.shape[1]):
        better = output[:, k] > best
        labels[better] = k
        np.copyto(best, output[:, k], where=better)
    return labels


def to_labels(
    output: np.ndarray, spec: ModelSpec, *, with_confidence: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Network output (N, K, *spatial) → uint8 labels (N, *spatial) and optional uint8 confidence."""
    if spec.output == "argmax":
        if output.shape[1] == 1:
            raise SpecError(
                "the network returns 1 channel but the spec asks for 'argmax'; use output 'threshold'"
            )
        labels = argmax_channels(output)
        conf = None
        if with_confidence:
            probs = output if spec.activation == "softmax" else softmax(output, axis=1)
            conf = np.rint(probs.max(axis=1) * 255.0).astype(np.uint8)
        return labels, conf
    probs = output if spec.activation in ("softmax", "sigmoid") else 1.0 / (1.0 + np.exp(-output))
    labels = np.zeros((output.shape[0], *output.shape[2:]), dtype=np.uint8)
    for c, lab in enumerate(spec.labels[: output.shape[1]]):
        labels[probs[:, c] > spec.threshold] = lab.value
    conf = np.rint(probs.max(axis=1) * 255.0).astype(np.uint8) if with_confidence else None
    return labels, conf


def output_to_source_grid(output: np.ndarray, prepared: Prepared, spec: ModelSpec) -> np.ndarray:
    """(N, K, D, H, W) network output on the unpadded model grid → on the oriented source grid
    when the spec resamples the output linearly (nnU-Net's order 1 on its logits), else as is."""
    if spec.output_interpolation != "linear" or output.shape[2:] == tuple(prepared.oriented):
        return output
    low = output_lowres_axis(spec, prepared.spacing) if prepared.spacing is not None else None
    return resample_image(output, prepared.oriented, "linear", (2, 3, 4), None if low is None else low + 2)


def source_planes(prepared: Prepared) -> list[np.ndarray | None]:
    """Per model axis, the grid planes that the source grid takes back (nearest) where it takes
    fewer than the grid has, else None: labels are only needed there. Labels on those planes
    alone (that axis at its source length) map back through :func:`labels_to_source` as well."""
    return [
        nearest_indices(g, o) if o < g else None for g, o in zip(prepared.grid, prepared.oriented)
    ]


def labels_to_source(labels_grid: np.ndarray, prepared: Prepared, threads: int = 1) -> np.ndarray:
    """Map (D, H, W) labels on the (unpadded) model grid back to the source (z, y, x) grid; an
    axis may already be at its source length (the planes :func:`source_planes` keeps).

    The labels are gathered straight into source order: each source axis takes the nearest
    indices of its model axis (reversed where the orientation flips it), so no transposed copy
    of the full-size labels is made. Evenly spaced picks and flips are views and go first. A
    gather along the last axis moves single elements, one along another axis whole rows: so
    the other axes shrink first and the last axis grows first, each on the fewest elements.
    """
    orient = prepared.orientation
    inverse = [int(i) for i in np.argsort(orient.perm)]  # source axis j is model axis inverse[j]
    out = np.transpose(labels_grid, inverse)
    picks = []
    for j, m in enumerate(inverse):
        index = nearest_indices(labels_grid.shape[m], prepared.oriented[m])
        if orient.flips[m]:
            index = index[::-1]
        grows, last = prepared.oriented[m] > labels_grid.shape[m], j == 2
        rank = 0 if stride_of(index) else 1 + 2 * grows + (last != grows)
        picks.append((rank, j, index))
    for _, j, index in sorted(picks, key=lambda p: p[0]):
        out = take_axis(out, index, j, threads)
    if out.flags.c_contiguous:
        return out
    view, out = out, np.empty(out.shape, dtype=out.dtype)
    split_rows(view.shape[0], threads, lambda r: np.copyto(out[r], view[r]), out.size)
    return out


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weight map for sliding-window blending, max 1, no zeros (read-only: one map per
    patch size is computed once and shared, it cost a few ms per volume)."""
    return _gaussian_importance(tuple(int(n) for n in patch), float(sigma_scale))


@functools.lru_cache(maxsize=16)
def _gaussian_importance(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    grids = []
    for n in patch:
        t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        grids.append(np.exp(-0.5 * (t / sigma) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w /= w.max()
    w = np.maximum(w, w[w > 0].min() if np.any(w > 0) else 1.0)
    out = np.maximum(w, 1e-3).astype(np.float32)
    out.flags.writeable = False
    return out


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Patch start offsets along one axis covering ``size`` with the given overlap."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * (1.0 - overlap))) + 1
    return sorted({int(round(s)) for s in np.linspace(0, size - patch, n)})
