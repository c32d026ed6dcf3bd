"""What a segmentation returns, shared by the CPU and GPU segmenters (its own module so that
neither has to import the other)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentationResult:
    """``labels``: (z, y, x) uint8 on the source grid (0 = background, values from the spec).
    ``confidence``: same shape, uint8 0–255 (probability of the chosen label), when asked for.
    ``timings``: milliseconds per stage ("preprocess", "infer", "postprocess", …)."""

    labels: np.ndarray
    confidence: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
