"""Segmentation metrics: per-label Dice and HD95 (the 95th percentile Hausdorff distance)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice_counts(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per label (2·|A∩B|, |A|+|B|): summable across cases for a pooled Dice."""
    out = {}
    for lab in labels:
        x = a == lab
        y = b == lab
        out[int(lab)] = (
            2 * int(np.count_nonzero(x & y)),
            int(np.count_nonzero(x)) + int(np.count_nonzero(y)),
        )
    return out


def dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Per-label Dice of two label maps; 1.0 when the label is absent from both."""
    return {k: (num / den if den else 1.0) for k, (num, den) in dice_counts(a, b, labels).items()}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask (mask minus its 6-connected erosion)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between boolean masks ``a`` and ``b``.

    0 when both are empty; ``inf`` when exactly one is.
    """
    from scipy import ndimage

    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    # Distance from every voxel to the other mask's surface, read on this mask's surface.
    da = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    db = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(np.percentile(np.concatenate([da, db]), 95))


def summarize(per_case: list[dict[int, float]]) -> dict[int, float]:
    """Mean over cases per label, ignoring non-finite values (HD95 of a missed structure)."""
    labels = sorted({k for d in per_case for k in d})
    out = {}
    for lab in labels:
        vals = [d[lab] for d in per_case if lab in d and np.isfinite(d[lab])]
        out[lab] = float(np.mean(vals)) if vals else float("nan")
    return out
