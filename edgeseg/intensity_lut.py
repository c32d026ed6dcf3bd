"""Intensity steps through a lookup table over the distinct stored values.

With nearest (or no) resampling, the model grid holds stored integers (CT and MR store 8 to 16
bits), and every intensity step but denoising maps a voxel's value alone, with statistics
(percentiles, mean, std) of the value distribution. So the steps can run on the histogram, at
most 65,536 values, and one table lookup per voxel writes the result: the percentile partition
and the variance pass over millions of float32 voxels (two thirds of the CPU preprocessing of
a 128³ whole-volume model) become one bincount and one take.

Results match :func:`edgeseg.preprocess.apply_intensity` on the expanded array: percentiles
are the same order statistics, and clip, window and scale are the same float32 operations per
value; the mean and std are sums over the histogram, equal to the array's to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeseg.intensity import apply_steps
from edgeseg.parallel import split_rows
from edgeseg.spec import Clip, PercentileClip, Scale, Window, ZScore

_POINTWISE = (Window, Clip, PercentileClip, ZScore, Scale)


def lut_applies(stored: np.ndarray, steps: Sequence[object]) -> bool:
    """True when ``stored`` holds integers of at most 16 bits and every step is per value."""
    return (
        stored.dtype.kind in "ui"
        and stored.dtype.itemsize <= 2
        and all(isinstance(s, _POINTWISE) for s in steps)
    )


def needs_statistics(steps: Sequence[object]) -> bool:
    """True when a step reads statistics of the image (percentiles, its own mean or std): only
    then does the histogram pay; fixed windows, clips and scales are cheaper on the array."""
    return any(
        isinstance(s, PercentileClip) or (isinstance(s, ZScore) and (s.mean is None or s.std is None))
        for s in steps
    )


def intensity_by_lut(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    steps: Sequence[object],
    out: np.ndarray | None = None,
    threads: int = 1,
    repeats: tuple[int, np.ndarray] | None = None,
) -> np.ndarray:
    """float32 ``apply_intensity(stored * slope + intercept, steps)`` as a new C-order array,
    or written into ``out`` (a C-contiguous float32 array of that shape) and returned.

    ``threads`` split the index, the histogram and the lookup along the first axis.
    ``repeats`` = (axis, counts): the statistics are those of ``stored`` with each plane ``i``
    along ``axis`` taken ``counts[i]`` times (what a nearest upsampling of that axis will make
    of it); the values are mapped here, before the planes are repeated."""
    if out is None or out.shape != stored.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        out = np.empty(stored.shape, dtype=np.float32)
    offset = -int(np.iinfo(stored.dtype).min) if stored.dtype.kind == "i" else 0  # signed: min is bin 0
    bins = 1 << (8 * stored.dtype.itemsize)
    # With repeats, each voxel's key also says how often its plane will be taken (at most 2
    # kinds for a nearest upsampling): key = bin * kinds + kind. One bincount then gives the
    # weighted histogram, and a table repeated per kind maps the keys, in the same passes.
    kinds, add, along_rows = np.ones(1, dtype=np.int64), np.asarray(offset, dtype=np.intp), False
    if repeats is not None:
        axis, times = repeats
        kinds, kind = np.unique(np.asarray(times, dtype=np.int64), return_inverse=True)
        shape = [1] * stored.ndim
        shape[axis] = stored.shape[axis]
        add = (kind.astype(np.intp) + offset * len(kinds)).reshape(shape)
        along_rows = axis == 0  # then each part of the rows takes its own kinds
    per = np.intp(len(kinds))
    # One intp index serves the bincount and the take (both would convert a narrower one).
    index = np.empty(stored.shape, dtype=np.intp)
    parts: list[np.ndarray] = []

    def count(r: slice) -> None:
        # a few rows at a time, so that the key is added while they are still in cache
        step = max(1, (1 << 16) // max(1, stored[0].size))
        for i in range(r.start, r.stop, step):
            rows = slice(i, min(i + step, r.stop))
            part = index[rows]
            np.multiply(stored[rows], per, out=part)
            if add.ndim or offset:
                part += add[rows] if along_rows else add
        parts.append(np.bincount(index[r].reshape(-1), minlength=bins * len(kinds)))

    split_rows(stored.shape[0], threads, count, stored.size)
    keyed = parts[0] if len(parts) == 1 else np.sum(parts, axis=0)
    counts = keyed if len(kinds) == 1 else keyed.reshape(bins, len(kinds)) @ kinds
    present = np.flatnonzero(counts)
    values = (present - offset).astype(np.float32)
    # The same float32 operations, in the same order, as the array path.
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    values = apply_steps_to_histogram(values, counts[present], steps)
    table = np.zeros(counts.size, dtype=np.float32)
    table[present] = values
    if len(kinds) > 1:
        table = np.repeat(table, len(kinds))
    # every index is in the table: "clip" never clips, and lets take write into out unbuffered
    split_rows(stored.shape[0], threads, lambda r: table.take(index[r], out=out[r], mode="clip"), stored.size)
    return out


def apply_steps_to_histogram(values: np.ndarray, counts: np.ndarray, steps: Sequence[object]) -> np.ndarray:
    """Apply per-value ``steps`` to the distinct ``values`` (float32, modified in place) that
    occur ``counts`` times each; statistics are those of the expanded array."""
    if not all(isinstance(s, _POINTWISE) for s in steps):
        raise TypeError(f"not per-value intensity steps: {list(steps)!r}")
    return apply_steps(
        values,
        steps,
        percentiles_of=lambda x, low, high: weighted_percentiles(x, counts, low, high),
        moments_of=lambda x, nonzero: weighted_moments(x, counts, nonzero),
    )


def weighted_moments(values: np.ndarray, counts: np.ndarray, nonzero: bool) -> tuple[float, float]:
    """Mean and std (float64) of the array in which ``values[i]`` occurs ``counts[i]`` times,
    over its nonzero values when ``nonzero`` (all of them when none is nonzero)."""
    keep = values != 0 if nonzero else np.ones(values.shape, bool)
    if not counts[keep].any():
        keep = np.ones(values.shape, bool)
    v, c = values[keep].astype(np.float64), counts[keep].astype(np.float64)
    n = c.sum()
    mean = float((v * c).sum() / n)
    return mean, float(np.sqrt((c * (v - mean) ** 2).sum() / n))


def weighted_percentiles(
    values: np.ndarray, counts: np.ndarray, low: float, high: float
) -> tuple[float, float]:
    """``np.percentile`` (linear method) of the array in which ``values[i]`` occurs
    ``counts[i]`` times: the same two order statistics, read off the cumulative counts."""
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(counts[order])
    n = int(cum[-1])
    out = []
    for q in (low, high):
        r = (n - 1) * q / 100.0
        i = int(np.floor(r))
        j = min(i + 1, n - 1)
        # The k-th smallest element is the first value whose cumulative count exceeds k.
        vi, vj = (float(v[np.searchsorted(cum, k, side="right")]) for k in (i, j))
        out.append(vi + (r - i) * (vj - vi))
    return out[0], out[1]
