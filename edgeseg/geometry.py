"""Index-space geometry shared by the CPU and GPU paths: reorientation and resampling grids.

Conventions (the CUDA kernels implement exactly the same):

* reorientation is a permutation of the (z, y, x) array axes plus flips, chosen so that the
  model's axes (D, H, W) point along the spec's anatomical orientation;
* resampling is separable and edge-aligned (``align_corners=False``):
  ``src = (dst + 0.5) * n_in / n_out - 0.5`` clamped to ``[0, n_in - 1]`` for linear, and
  ``i = min(floor((dst + 0.5) * n_in / n_out), n_in - 1)`` for nearest ("nearest-exact");
  cubic (nnU-Net's order 3, :mod:`edgeseg.resample_spline`) samples its spline at the same
  ``src``, then clips to the input's range as skimage does; nearest is also scipy's order 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeseg.parallel import plane_threads, split_rows

if TYPE_CHECKING:
    from edgeseg.spec import ModelSpec

# LPS axis and sign of each orientation letter: the direction in which an axis *increases*.
_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class Orientation:
    """How to view a (z, y, x) array in model axes: ``np.transpose(a, perm)`` then flip ``flips``."""

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """A view of ``array`` (z, y, x, …) in model axes (D, H, W, …); no copy."""
        out = np.transpose(array, self.perm + tuple(range(3, array.ndim)))
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return out

    def from_model(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_model`: a view in (z, y, x) order."""
        out = array
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        return np.transpose(out, inverse + tuple(range(3, array.ndim)))

    def model_shape(self, zyx_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(zyx_shape[p] for p in self.perm)  # type: ignore[return-value]

    def model_spacing(self, zyx_spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(zyx_spacing[p] for p in self.perm)  # type: ignore[return-value]


def orientation_for(direction: np.ndarray, code: str | None) -> Orientation:
    """The :class:`Orientation` that brings a volume with ``direction`` to ``code`` (e.g. "RAS").

    ``direction`` is the Volume's 3×3 matrix whose columns are the LPS unit vectors of the x, y
    and z index axes. Each model axis takes the array axis most parallel to its letter (greedy on
    the largest |cos|, so oblique scans map to their nearest anatomical axes) and is flipped when
    antiparallel.
    """
    if code is None:
        return Orientation()
    # Array axes in (z, y, x) order → direction columns 2, 1, 0.
    dirs = np.stack([direction[:, 2], direction[:, 1], direction[:, 0]])
    targets = np.zeros((3, 3))
    for i, letter in enumerate(code.upper()):
        lps_axis, sign = _LETTER[letter]
        targets[i, lps_axis] = sign
    cos = targets @ dirs.T  # [model axis, array axis]
    perm = [-1, -1, -1]
    used: set[int] = set()
    for flat in np.argsort(-np.abs(cos), axis=None):
        m, a = divmod(int(flat), 3)
        if perm[m] == -1 and a not in used:
            perm[m] = a
            used.add(a)
    flips = tuple(bool(cos[m, perm[m]] < 0) for m in range(3))
    return Orientation(tuple(perm), flips)  # type: ignore[arg-type]


def source_coords(n_in: int, n_out: int) -> np.ndarray:
    """Edge-aligned source coordinate of each output sample (float64, clamped)."""
    dst = np.arange(n_out, dtype=np.float64)
    src = (dst + 0.5) * (n_in / n_out) - 0.5
    return np.clip(src, 0.0, n_in - 1)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output sample for nearest ("nearest-exact") resampling."""
    dst = np.arange(n_out, dtype=np.float64)
    return np.minimum(np.floor((dst + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w) so that ``out = (1 - w) * a[i0] + w * a[i1]`` along one axis."""
    src = source_coords(n_in, n_out)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    return i0, i1, w


def resample_axis(
    array: np.ndarray, axis: int, n_out: int, mode: str, threads: int = 1, out: np.ndarray | None = None
) -> np.ndarray:
    """Resample one axis of ``array`` to ``n_out`` samples (float32 out for linear); with
    ``threads``, parts of the first other axis at once (the same values). Like an unchanged
    axis, a nearest pick of evenly spaced samples returns a view of ``array``. Linear writes
    into ``out`` when it is a C-contiguous float32 array of the result's shape."""
    n_in = array.shape[axis]
    if n_in == n_out:
        return array
    shape = list(array.shape)
    shape[axis] = n_out
    if mode == "nearest":
        return take_axis(array, nearest_indices(n_in, n_out), axis, threads)
    i0, i1, w = linear_weights(n_in, n_out)
    if out is None or out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        out = np.empty(shape, dtype=np.float32)
    plane = out.size // n_out
    if axis == 0 and plane >= 1024:
        # Plane by plane: each output plane from its two source planes while they are in
        # cache, instead of two gathered copies of the whole output; the same float32 ops.
        # (Along later axes the planes are strided and the gathers below were faster.)

        def planes(r: slice) -> None:
            for k in range(r.start, r.stop):
                dst, a0 = out[k], array[int(i0[k])]
                np.subtract(array[int(i1[k])], a0, out=dst, dtype=np.float32)
                dst *= w[k]
                np.add(dst, a0, out=dst, dtype=np.float32)

        split_rows(n_out, plane_threads(plane, threads), planes, out.size)
        return out
    wshape = [1] * array.ndim
    wshape[axis] = n_out
    w = w.reshape(wshape)
    split = 1 if axis == 0 else 0
    part: list[slice] = [slice(None)] * array.ndim

    def rows(r: slice) -> None:
        box = list(part)
        box[split] = r
        src, dst = array[tuple(box)], out[tuple(box)]
        a0 = np.take(src, i0, axis=axis)
        # a0 + w * (a1 - a0) in float32, written into the output (stored integers are cast
        # by the ufuncs, not copied to float first)
        np.subtract(np.take(src, i1, axis=axis), a0, out=dst, dtype=np.float32)
        dst *= w
        np.add(dst, a0, out=dst, dtype=np.float32)

    split_rows(shape[split], threads, rows, out.size)
    return out


def take_axis(array: np.ndarray, index: np.ndarray, axis: int, threads: int = 1) -> np.ndarray:
    """``np.take(array, index, axis)``: a view of ``array`` when ``index`` is evenly spaced
    (256 → 128 takes 1, 3, 5, …; a flip takes n-1, …, 0), else a new array. Along the last
    axis, which moves single elements, ``threads`` gather parts of the first axis at once."""
    step = stride_of(index)
    if step:
        stop = int(index[-1]) + (1 if step > 0 else -1)
        box = [slice(None)] * array.ndim
        box[axis] = slice(int(index[0]), stop if stop >= 0 else None, step)
        return array[tuple(box)]
    if array.dtype == np.uint8 and axis == array.ndim - 1:
        times = _repeats(index)
        if times in _WIDE:  # labels doubled along x: widen each byte into 2, 4 or 8 copies
            wide, copies = _WIDE[times]
            picked = take_axis(array, index[::times], axis)
            out = np.empty(picked.shape, dtype=wide)  # C order, whatever the view's strides
            return np.multiply(picked, copies, out=out).view(np.uint8)
    if axis < array.ndim - 1 or threads <= 1:  # whole rows or planes: memory copies, no threads
        return np.take(array, index, axis=axis)
    shape = list(array.shape)
    shape[axis] = len(index)
    out = np.empty(shape, dtype=array.dtype)
    split_rows(
        shape[0],
        threads,
        lambda r: np.take(array[r], index, axis=axis, out=out[r], mode="clip"),
        out.size,
    )
    return out


# A gather along the last axis moves one element at a time (~0.5 ns each, whatever its size);
# an integer upsampling of uint8 labels is instead one multiply that copies each byte into the
# bytes of a wider integer: v * 0x0101 = (v, v).
_WIDE = {2: (np.uint16, np.uint16(0x0101)), 4: (np.uint32, np.uint32(0x01010101)),
         8: (np.uint64, np.uint64(0x0101010101010101))}  # fmt: skip


def _repeats(index: np.ndarray) -> int:
    """``r`` when ``index`` is an evenly spaced progression with each entry ``r`` times, else 0."""
    runs = np.flatnonzero(np.diff(index))
    r = int(runs[0]) + 1 if runs.size else index.size
    if index.size % r or not stride_of(index[::r]):
        return 0
    return r if np.array_equal(index, np.repeat(index[::r], r)) else 0


def stride_of(index: np.ndarray) -> int:
    """The step of ``index`` when it is an arithmetic progression with a nonzero step, else 0."""
    if index.size == 1:
        return 1
    step = int(index[1] - index[0])
    return step if step != 0 and bool(np.all(np.diff(index) == step)) else 0


def resample(
    array: np.ndarray,
    out_shape: tuple[int, ...],
    mode: str,
    axes: tuple[int, ...],
    threads: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Separable resampling of ``axes`` of ``array`` to ``out_shape`` (one entry per axis in ``axes``).

    Axes are processed from the one that shrinks most, so the intermediate arrays stay small.
    ``out`` (C-contiguous, the result's shape and dtype) receives the result, written by the
    last linear pass itself where there is one; it is then returned.
    """
    todo = [i for i in range(len(axes)) if array.shape[axes[i]] != int(out_shape[i])]
    todo.sort(key=lambda i: out_shape[i] / max(array.shape[axes[i]], 1))
    result = array
    for n, i in enumerate(todo):
        last = out if n == len(todo) - 1 and mode == "linear" else None
        result = resample_axis(result, axes[i], int(out_shape[i]), mode, threads, out=last)
    return _into(out, result)


def _into(out: np.ndarray | None, result: np.ndarray) -> np.ndarray:
    if out is None or result is out:
        return result
    np.copyto(out, result)
    return out


def lowres_axis(spacing: tuple[float, ...], other: tuple[float, ...], threshold: float = 3.0) -> int | None:
    """nnU-Net's separate-z rule (``determine_do_sep_z_and_axis``, ``force_separate_z=None``):
    when ``spacing`` (else ``other``) is anisotropic, max/min > ``threshold``, the one axis with
    its largest spacing; None when neither is, or when the largest spacing is shared by 2 axes."""
    for sp in (spacing, other):
        a = np.asarray(sp, dtype=np.float64)
        if a.max() / a.min() > threshold:
            axes = np.flatnonzero(a.max() / a == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def resample_image(
    array: np.ndarray,
    out_shape: tuple[int, ...],
    mode: str,
    axes: tuple[int, ...],
    lowres: int | None = None,
    threads: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`resample` with ``mode`` "linear", "nearest" or "cubic", and nnU-Net's separate
    low-resolution axis: ``lowres`` (an array axis among ``axes``, or None) goes nearest;
    ``out`` as for :func:`resample`.

    Cubic clips to the input's range like skimage's ``resize`` (``clip=True``): over the whole
    array (one channel), or per slice along ``lowres`` when nnU-Net resizes slice by slice.
    """
    if mode != "cubic":
        if lowres not in axes or mode == "nearest":
            return resample(array, out_shape, mode, axes, threads, out=out)
        inplane = tuple(i for i, a in enumerate(axes) if a != lowres)
        shape = tuple(out_shape[i] for i in inplane)
        part = resample(array, shape, mode, tuple(axes[i] for i in inplane), threads)
        return _into(out, resample_axis(part, lowres, int(out_shape[axes.index(lowres)]), "nearest", threads))
    from edgeseg.resample_spline import cubic_axis

    todo = [(a, int(n)) for a, n in zip(axes, out_shape) if a != lowres and array.shape[a] != int(n)]
    if not todo:
        res = array
    else:
        others = tuple(a for a in range(array.ndim) if a != lowres)
        lo = np.min(array, axis=others if lowres is not None else None, keepdims=True)
        hi = np.max(array, axis=others if lowres is not None else None, keepdims=True)
        # the axis that shrinks most first, as resample does: smaller intermediates
        res = array
        for a, n in sorted(todo, key=lambda t: t[1] / max(array.shape[t[0]], 1)):
            res = cubic_axis(res, a, n)
        np.clip(res, lo.astype(np.float32), hi.astype(np.float32), out=res)
    if lowres in axes:  # a separate axis outside ``axes`` (a 2D model's slices) only sets the clip
        res = resample_axis(res, lowres, int(out_shape[axes.index(lowres)]), "nearest")
    return _into(out, res)


def image_lowres_axis(spec: ModelSpec, spacing: tuple[float, float, float]) -> int | None:
    """The model axis a spec resamples separately (nearest) for an image of model-axis
    ``spacing``, or None: nnU-Net's rule on (source spacing, target spacing)."""
    if not spec.separate_lowres_axis:
        return None
    return lowres_axis(spacing, _target_spacing(spec, spacing), spec.anisotropy_threshold)


def output_lowres_axis(spec: ModelSpec, spacing: tuple[float, float, float]) -> int | None:
    """The same for the way back (model grid → source): nnU-Net asks the model spacing first."""
    if not spec.separate_lowres_axis:
        return None
    return lowres_axis(_target_spacing(spec, spacing), spacing, spec.anisotropy_threshold)


def _target_spacing(spec: ModelSpec, spacing: tuple[float, float, float]) -> tuple[float, ...]:
    # A 2D model keeps the slice spacing, as nnU-Net's 2d configurations do; without a target
    # spacing (target_shape, or none) only the source spacing decides.
    tsp = spec.target_spacing
    if tsp is None:
        return tuple(spacing)
    if spec.dims == 2 or len(tsp) == 2:
        return (spacing[0], *tsp[-2:])
    return tuple(tsp)


def spacing_to_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target_spacing: tuple[float, ...]
) -> tuple[int, ...]:
    """Grid size that covers the same extent at ``target_spacing``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def world_resample(
    source: np.ndarray,
    source_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
) -> np.ndarray:
    """Trilinear resampling of a (z, y, x) array onto another grid through patient space.

    Both affines map (x, y, z, 1) voxel indices to LPS mm (the Volume convention). Points that
    fall outside the source take the nearest edge value. Done one target slice at a time so
    memory stays at a few slices.
    """
    to_source = np.linalg.inv(source_affine) @ target_affine
    nz, ny, nx = target_shape
    sz, sy, sx = source.shape
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    out = np.empty(target_shape, dtype=np.float32)
    src = source.astype(np.float32, copy=False)
    for k in range(nz):
        pts = to_source[:3, 0, None, None] * xx + to_source[:3, 1, None, None] * yy
        pts += (to_source[:3, 2] * k + to_source[:3, 3])[:, None, None]
        x = np.clip(pts[0], 0, sx - 1)
        y = np.clip(pts[1], 0, sy - 1)
        z = np.clip(pts[2], 0, sz - 1)
        x0, y0, z0 = (np.floor(v).astype(np.int64) for v in (x, y, z))
        x1, y1, z1 = np.minimum(x0 + 1, sx - 1), np.minimum(y0 + 1, sy - 1), np.minimum(z0 + 1, sz - 1)
        fx, fy, fz = (v - np.floor(v) for v in (x, y, z))
        c00 = src[z0, y0, x0] * (1 - fx) + src[z0, y0, x1] * fx
        c01 = src[z0, y1, x0] * (1 - fx) + src[z0, y1, x1] * fx
        c10 = src[z1, y0, x0] * (1 - fx) + src[z1, y0, x1] * fx
        c11 = src[z1, y1, x0] * (1 - fx) + src[z1, y1, x1] * fx
        out[k] = (c00 * (1 - fy) + c01 * fy) * (1 - fz) + (c10 * (1 - fy) + c11 * fy) * fz
    return out
