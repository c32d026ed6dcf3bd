"""Intensity steps (window, clip, percentile clip, z-score, scale, denoise), in place on
float32 values, with the statistics they need supplied by the caller: the voxels' own
(:func:`apply_intensity`, the reference every CUDA kernel is tested against) or a histogram's
(:mod:`edgeseg.intensity_lut`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from edgeseg._exceptions import SpecError
from edgeseg.spec import Clip, Denoise, PercentileClip, Scale, Window, ZScore


def apply_intensity(x: np.ndarray, steps: Sequence[object]) -> np.ndarray:
    """Apply intensity ``steps`` in order to ``x`` (float32, modified in place) and return it."""
    return apply_steps(x, steps, percentiles_of=percentiles, moments_of=_moments)


def _moments(x: np.ndarray, nonzero: bool) -> tuple[float, float]:
    sample = x[x != 0] if nonzero else x
    if sample.size == 0:
        sample = x
    flat = sample.reshape(-1)
    n = flat.size
    # One pass in float64 through a cache-sized block (np.mean then np.std read the volume
    # twice and make a float64 copy of it): sums of the deviations from a shift near the
    # mean, which keeps the variance as exact as the two-pass formula.
    shift = float(flat[:: max(1, n // 4096)].mean(dtype=np.float64))
    s1 = s2 = 0.0
    block = np.empty(min(n, _BLOCK), dtype=np.float64)
    for i in range(0, n, _BLOCK):
        d = block[: min(_BLOCK, n - i)]
        np.subtract(flat[i : i + _BLOCK], shift, out=d, dtype=np.float64)
        s1 += float(d.sum())
        np.multiply(d, d, out=d)  # not np.dot: BLAS threads would spin against the engine's
        s2 += float(d.sum())
    mean = s1 / n
    return shift + mean, math.sqrt(max(s2 / n - mean * mean, 0.0))


_BLOCK = 1 << 16  # float64 deviations per pass: half a MiB


def apply_steps(
    x: np.ndarray,
    steps: Sequence[object],
    *,
    percentiles_of: Callable[[np.ndarray, float, float], tuple[float, float]],
    moments_of: Callable[[np.ndarray, bool], tuple[float, float]],
) -> np.ndarray:
    """The steps on ``x`` in place, with the statistics a step needs (percentiles; mean and std
    over all or the nonzero values) from the given functions: the voxels' own, or a histogram's
    (:mod:`edgeseg.intensity_lut`), so both paths run exactly the same float32 operations."""
    for step in steps:
        if isinstance(step, Window):
            lo = step.center - step.width / 2.0
            x -= np.float32(lo)
            x *= np.float32(1.0 / step.width)
            np.clip(x, 0.0, 1.0, out=x)
            if (step.out_min, step.out_max) != (0.0, 1.0):
                x *= np.float32(step.out_max - step.out_min)
                x += np.float32(step.out_min)
        elif isinstance(step, Clip):
            np.clip(x, step.low, step.high, out=x)
        elif isinstance(step, PercentileClip):
            lo, hi = percentiles_of(x, step.low, step.high)
            np.clip(x, lo, hi, out=x)
            if step.rescale:
                if hi > lo:
                    x -= np.float32(lo)
                    x *= np.float32(1.0 / (hi - lo))
                else:
                    x.fill(0.0)
        elif isinstance(step, ZScore):
            mean, std = step.mean, step.std
            if mean is None or std is None:
                m, sd = moments_of(x, step.nonzero)
                mean = m if mean is None else mean
                std = sd if std is None else std
            x -= np.float32(mean)
            x *= np.float32(1.0 / max(std, 1e-8))
        elif isinstance(step, Scale):
            if step.mul != 1.0:
                x *= np.float32(step.mul)
            if step.add != 0.0:
                x += np.float32(step.add)
        elif isinstance(step, Denoise):
            if step.sigma > 0:
                x[...] = gaussian_filter(x, step.sigma)
        else:  # pragma: no cover - spec validation rejects these
            raise SpecError(f"unknown intensity step {step!r}")
    return x


def percentiles(x: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """``np.percentile(x, [low, high])`` (linear method) from the exact order statistics it
    interpolates between (:func:`order_statistics`), found once for both percentiles."""
    flat = x.reshape(-1)
    n = flat.size
    ranks = [(n - 1) * q / 100.0 for q in (low, high)]
    idx = sorted({int(np.floor(r)) for r in ranks} | {min(int(np.floor(r)) + 1, n - 1) for r in ranks})
    part = order_statistics(flat, idx)
    out = []
    for r in ranks:
        i = int(np.floor(r))
        j = min(i + 1, n - 1)
        out.append(float(part[i]) + (r - i) * (float(part[j]) - float(part[i])))
    return out[0], out[1]


def order_statistics(flat: np.ndarray, ks: Sequence[int]) -> dict[int, np.floating]:
    """The values at sorted positions ``ks`` of the 1-D ``flat``: ``np.partition(flat, ks)[k]``.

    Clipping percentiles sit in the tails: a strided sample gives a threshold that keeps a
    little more than the needed tail, and only that tail is partitioned (several times faster
    than partitioning the volume). When the tail kept is too short the whole array is
    partitioned as before; either way the values are exact. NaNs sort last, as np.partition
    sorts them: the high tail keeps them (it is what is not below its threshold).
    """
    n = flat.size
    ks = sorted({int(k) for k in ks})
    step = 32
    if n < (1 << 16):
        part = np.partition(flat, ks)
        return {k: part[k] for k in ks}
    sample = flat[::step]
    ns = sample.size
    out: dict[int, np.floating] = {}
    lo = [k for k in ks if k < n // 2]
    hi = [k for k in ks if k >= n // 2]
    if lo:
        r = min(ns - 1, (max(lo) + 1) // step * 5 // 4 + 16)
        tail = flat[flat <= np.partition(sample, r)[r]]  # holds the tail.size smallest values
        if tail.size > max(lo):
            part = np.partition(tail, lo)
            out.update({k: part[k] for k in lo})
        else:
            hi = ks
    if hi:
        r = min(ns - 1, (n - min(hi)) // step * 5 // 4 + 16)
        tail = flat[~(flat < np.partition(sample, ns - 1 - r)[ns - 1 - r])]  # the tail.size largest
        first = n - tail.size  # the sorted position of tail's smallest value
        if first > min(hi):
            part = np.partition(flat, ks)
            return {k: part[k] for k in ks}
        part = np.partition(tail, [k - first for k in hi])
        out.update({k: part[k - first] for k in hi})
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3.0 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian over every axis of ``x`` with reflect borders (numpy only)."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = x.astype(np.float32, copy=True)
    for axis in range(out.ndim):
        if out.shape[axis] < 2:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, kv in enumerate(k):
            acc += kv * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out
