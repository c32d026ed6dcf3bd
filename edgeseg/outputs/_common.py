"""Checks shared by every output writer: one error type, label maps and label specs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from edgeseg._exceptions import EdgesegError
from edgeseg.spec import Label
from edgeseg.volume import Volume


class OutputError(EdgesegError, ValueError):
    """An output cannot be written from these labels, this Volume or this spec.

    Also a ``ValueError``, so callers that treat bad arguments generically still catch it.
    Messages never contain patient data.
    """


#: Characters allowed in a file stem: callers pass a hash or a fixed name, never patient data.
_STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_stem(stem: str) -> str:
    """Return ``stem`` if it is a plain, short file name; raise :class:`OutputError` otherwise."""
    if not isinstance(stem, str) or not _STEM_RE.match(stem) or ".." in stem:
        raise OutputError(
            "'stem' must be a plain file name of letters, digits, '.', '_' or '-' (at most 128, "
            "no folders), such as a hash of the SeriesInstanceUID; got an unusable value"
        )
    return stem


def check_labels(labels: np.ndarray, volume: Volume, *, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a (z, y, x) uint8 array aligned to ``volume``.

    Parameters
    ----------
    labels:
        (z, y, x) integer or boolean label map; values must fit 0..255.
    volume:
        the Volume the labels were computed on; shapes must match exactly.

    Raises
    ------
    OutputError
        wrong shape or dtype, or values outside 0..255.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise OutputError(
            f"'{name}' must have the Volume's (z, y, x) shape {volume.shape}; got {labels.shape}"
        )
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype == np.bool_:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise OutputError(f"'{name}' must hold integers (uint8 label values); got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise OutputError(f"'{name}' values must lie in 0..255; got {int(labels.min())}..{int(labels.max())}")
    return labels.astype(np.uint8)


def check_labels_spec(labels_spec: Sequence[Label]) -> list[Label]:
    """Return the spec as a list after checking values are distinct and in 1..255."""
    spec = list(labels_spec)
    if not spec:
        raise OutputError("'labels_spec' must describe at least one foreground label")
    values = [int(lab.value) for lab in spec]
    if len(set(values)) != len(values) or min(values) < 1 or max(values) > 255:
        raise OutputError(f"'labels_spec' values must be distinct and in 1..255; got {values}")
    return spec


def value_lut(labels_spec: Sequence[Label]) -> np.ndarray:
    """(256,) uint8 table mapping a label value to its 1-based position in ``labels_spec`` (0: none)."""
    lut = np.zeros(256, dtype=np.uint8)
    for i, lab in enumerate(labels_spec, start=1):
        lut[int(lab.value)] = i
    return lut


def segment_map(labels: np.ndarray, labels_spec: Sequence[Label]) -> np.ndarray:
    """Map label values to 1-based segment numbers (position in ``labels_spec``).

    One table lookup and two counts over the array (no ``bincount``: it would widen every voxel
    to int64), so it stays cheap for 512×512×300 volumes.

    Parameters
    ----------
    labels:
        (z, y, x) uint8 label map.
    labels_spec:
        the labels in segment order.

    Returns
    -------
    numpy.ndarray
        (z, y, x) uint8 segment numbers, 0 for background.

    Raises
    ------
    OutputError
        a foreground value that no Label describes.
    """
    values = [int(lab.value) for lab in labels_spec]
    if values == list(range(1, len(values) + 1)):
        # The usual case (labels 1..N in order): segment numbers are the label values.
        if labels.size == 0 or int(labels.max()) <= len(values):
            return labels
        segments = np.where(labels > len(values), 0, labels)
    else:
        lut = value_lut(labels_spec)
        segments = np.empty_like(labels)
        # In blocks of slices: indexing with a whole uint8 volume would build an int64 copy of it.
        for z in range(0, labels.shape[0], 16):
            np.take(lut, labels[z : z + 16], out=segments[z : z + 16])
    if np.count_nonzero(segments) != np.count_nonzero(labels):
        unknown = np.unique(labels[(segments == 0) & (labels != 0)])
        raise OutputError(
            f"the label map holds value(s) {unknown.tolist()} that no label in 'labels_spec' describes "
            f"(described: {values}); fix the spec or the labels"
        )
    return segments
