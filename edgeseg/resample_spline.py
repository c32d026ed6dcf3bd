"""Cubic B-spline resampling as nnU-Net does it, in numpy (the runtime has no scipy).

nnU-Net resamples images with ``skimage.transform.resize(order=3, mode="edge",
anti_aliasing=False)``, which is ``scipy.ndimage.zoom(order=3, mode="nearest", grid_mode=True)``
(prefilter on) followed by a clip to the input's [min, max]. Here, separably per axis:

* prefilter: scipy pads ``_PAD`` edge samples on each side (its ``_prepad_for_spline_filter``
  for mode "nearest"), then runs the causal/anticausal recursion of the cubic B-spline
  (pole √3 − 2, gain 6) with half-sample symmetric initial values;
* sampling: output ``j`` reads the spline at ``(j + 0.5) * n_in / n_out - 0.5`` (the
  edge-aligned grid of :mod:`edgeseg.geometry`), four coefficients per sample;
* the clip to the input range is the caller's (:func:`edgeseg.geometry.resample_image`), since
  nnU-Net clips per 2D slice when it resamples a low-resolution axis separately.
"""

from __future__ import annotations

import math

import numpy as np

_POLE = math.sqrt(3.0) - 2.0
_PAD = 12  # scipy's prepadding for mode "nearest": z**12 ≈ 1e-7, so the padded edge is exact enough


def _prefilter(coef: np.ndarray) -> None:
    """Cubic B-spline coefficients along axis 0 of ``coef``, in place (scipy's reflect init)."""
    z = _POLE
    n = coef.shape[0]
    if not coef.flags.c_contiguous:
        raise ValueError("the spline prefilter works in place on a C-contiguous array")
    coef = coef.reshape(n, -1)  # rows: a view, so the recursion writes through
    coef *= np.float32((1.0 - z) * (1.0 - 1.0 / z))
    # causal initial value, half-sample symmetric extension (scipy's _init_causal_reflect)
    z_n = z**n
    c0 = coef[0].copy()
    acc = coef[0] + z_n * coef[n - 1]
    z_i = z
    for i in range(1, n):
        acc += z_i * (coef[i] + z_n * coef[n - 1 - i])
        z_i *= z
        if abs(z_i) < 1e-12:  # the rest adds nothing in float32 (scipy sums all: < 1e-12 apart)
            break
    coef[0] = acc * np.float32(z / (1.0 - z_n * z_n)) + c0
    for i in range(1, n):
        coef[i] += np.float32(z) * coef[i - 1]
    coef[n - 1] *= np.float32(z / (z - 1.0))
    for i in range(n - 2, -1, -1):
        np.subtract(coef[i + 1], coef[i], out=coef[i])
        coef[i] *= np.float32(z)


def _weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(first coefficient index, (4, n_out) weights) of each output sample, in padded indices."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5 + _PAD
    base = np.floor(src)
    t = src - base
    w = np.stack([(1 - t) ** 3, 4 - 6 * t**2 + 3 * t**3, 1 + 3 * t + 3 * t**2 - 3 * t**3, t**3]) / 6.0
    return base.astype(np.int64) - 1, w.astype(np.float32)


def cubic_axis(array: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Resample one axis of ``array`` to ``n_out`` samples with nnU-Net's cubic spline (float32)."""
    a = np.moveaxis(np.asarray(array), axis, 0)
    n_in = a.shape[0]
    pad = [(_PAD, _PAD)] + [(0, 0)] * (a.ndim - 1)
    # C order whatever the input's layout, so the rows _prefilter walks are a view of coef
    coef = np.ascontiguousarray(np.pad(a.astype(np.float32, copy=False), pad, mode="edge"))
    _prefilter(coef)
    first, w = _weights(n_in, n_out)
    last = coef.shape[0] - 1
    shape = (n_out,) + (1,) * (a.ndim - 1)
    out = np.take(coef, np.clip(first, 0, last), axis=0)
    out *= w[0].reshape(shape)
    for k in range(1, 4):
        term = np.take(coef, np.clip(first + k, 0, last), axis=0)
        term *= w[k].reshape(shape)
        out += term
    return np.moveaxis(out, 0, axis)
