"""A quick-look PNG: evenly spaced slices in a grid, labels blended in colour with outlines.

For a glance at a result (a report, a CI artifact), not for reading: no patient text is drawn.
Slices are shown as stored (rows down, columns right), which is how the source series displays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg.atomic import atomic_path
from edgeseg.outputs._common import OutputError, check_labels, check_labels_spec
from edgeseg.spec import Label
from edgeseg.volume import Volume

#: Opacity of the label fill; outlines are drawn opaque.
ALPHA = 0.4


def write_png_montage(
    volume: Volume,
    labels: np.ndarray | None,
    path: str | Path,
    labels_spec: Sequence[Label],
    *,
    max_tiles: int = 16,
    window: tuple[float, float] | None = None,
    tile_size: int | None = 256,
) -> Path:
    """Write a grid of up to ``max_tiles`` evenly spaced slices with the labels overlaid.

    Parameters
    ----------
    volume:
        the image; modality values are windowed to grey.
    labels:
        (z, y, x) uint8 label map with the Volume's shape, or None for the image alone.
    path:
        target PNG file; written atomically.
    labels_spec:
        label colours (RGB 0–255) by value; values without a Label are drawn white.
    max_tiles:
        most slices shown; all slices when the Volume has no more.
    window:
        (center, width) in modality units (HU for CT); None picks the 1st–99th percentile of
        the shown slices, leaving out voxels at their minimum (padding, outside the field of view).
    tile_size:
        long side of each tile in pixels (aspect follows the pixel spacing); None keeps the
        slice's own size (and ignores pixel spacing).

    Returns
    -------
    pathlib.Path
        ``path``. The image is ``rows * tile_height`` by ``columns * tile_width`` pixels, RGB,
        with ``columns = ceil(sqrt(n_tiles))``.
    """
    from edgeseg._optional import require

    image_mod = require("PIL.Image", extra="", feature="Writing PNG montages")
    if max_tiles < 1:
        raise OutputError(f"'max_tiles' must be at least 1; got {max_tiles}")
    spec = check_labels_spec(labels_spec) if labels is not None else list(labels_spec)
    nz, ny, nx = volume.shape
    picks = _pick_slices(nz, max_tiles)

    # Modality values of the shown slices only (not the whole volume).
    values = volume.stored[picks].astype(np.float32)
    values *= volume.slope[picks].astype(np.float32)[:, None, None]
    values += volume.intercept[picks].astype(np.float32)[:, None, None]
    grey = _window(values, window)  # (n, y, x) uint8
    lab = check_labels(labels, volume)[picks] if labels is not None else np.zeros_like(grey)

    th, tw = _tile_shape(ny, nx, volume.spacing, tile_size)
    if (th, tw) != (ny, nx):
        # Grey with bilinear, labels with nearest: outlines are then found at display size.
        grey = np.stack(
            [np.asarray(image_mod.fromarray(g).resize((tw, th), image_mod.BILINEAR)) for g in grey]
        )
        lab = np.stack([np.asarray(image_mod.fromarray(m).resize((tw, th), image_mod.NEAREST)) for m in lab])

    rgb = _overlay(grey, lab, _palette(spec))  # (n, th, tw, 3) uint8
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    canvas = np.zeros((rows, cols, th, tw, 3), dtype=np.uint8)
    canvas.reshape(rows * cols, th, tw, 3)[: len(picks)] = rgb
    canvas = canvas.transpose(0, 2, 1, 3, 4).reshape(rows * th, cols * tw, 3)

    with atomic_path(path) as tmp:
        image_mod.fromarray(canvas, mode="RGB").save(tmp, format="PNG")
    return Path(path)


def tile_layout(n_slices: int, max_tiles: int = 16) -> tuple[list[int], int, int]:
    """Slices shown and the grid for them: (slice indices, rows, columns)."""
    picks = _pick_slices(n_slices, max_tiles)
    cols = math.ceil(math.sqrt(len(picks)))
    return picks, math.ceil(len(picks) / cols), cols


# -- pieces -------------------------------------------------------------------------------------


def _pick_slices(nz: int, max_tiles: int) -> list[int]:
    if nz <= max_tiles:
        return list(range(nz))
    return sorted({int(round(v)) for v in np.linspace(0, nz - 1, max_tiles)})


def _tile_shape(ny: int, nx: int, spacing, tile_size: int | None) -> tuple[int, int]:
    if tile_size is None:
        return ny, nx
    _, sy, sx = spacing
    height_mm, width_mm = ny * sy, nx * sx
    scale = tile_size / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _window(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """(n, y, x) float32 modality values → uint8 grey, by window or 1st–99th percentile."""
    if window is None:
        finite = values[np.isfinite(values)]
        # Padding and the air outside the field of view sit at the minimum; leaving them out
        # keeps them from stretching the window over nothing.
        inside = finite[finite > finite.min()] if finite.size else finite
        lo, hi = np.percentile(inside, [1.0, 99.0]) if inside.size else (0.0, 1.0)
    else:
        center, width = (float(w) for w in window)
        if width <= 0:
            raise OutputError(f"'window' width must be positive; got {width}")
        lo, hi = center - width / 2, center + width / 2
    if hi <= lo:
        hi = lo + 1.0
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)


def _palette(spec: Sequence[Label]) -> np.ndarray:
    """(256, 3) uint8 colour per label value; white for values without a Label."""
    palette = np.full((256, 3), 255, dtype=np.uint8)
    palette[0] = 0
    for lab in spec:
        palette[int(lab.value)] = np.clip(np.asarray(lab.color, dtype=np.int64), 0, 255)
    return palette


def _overlay(grey: np.ndarray, lab: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Blend label colours over grey at :data:`ALPHA`, then draw label outlines opaque.

    grey, lab: (n, h, w) uint8. Returns (n, h, w, 3) uint8. All slices at once, no Python loop.
    """
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    colour = palette[lab].astype(np.float32)
    fg = (lab > 0)[..., None]
    out = np.where(fg, (1.0 - ALPHA) * base + ALPHA * colour, base)
    # A labelled pixel is on the outline when a 4-neighbour has another value (or is outside).
    padded = np.pad(lab, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    edge = (
        (padded[:, :-2, 1:-1] != centre)
        | (padded[:, 2:, 1:-1] != centre)
        | (padded[:, 1:-1, :-2] != centre)
        | (padded[:, 1:-1, 2:] != centre)
    ) & (lab > 0)
    out[edge] = colour[edge]
    return np.round(out).astype(np.uint8)
