"""Sliding-window inference: one window plan, and a blend that streams in slabs.

:class:`WindowPlan` is what a sliding window runs: the window starts in visiting order (slab
order along the first axis, then the others, as nested loops), the batches (a short last batch,
or one filled up with its last window for engines that need one input shape), the importance
weights and the test-time mirrors. The CPU Segmenter blends with :class:`SlabBlender`; the GPU
pipeline (:mod:`edgeseg.cuda.pipeline`) takes its windows and batches from the same plan.

The blend never holds K channels × the whole volume. Along the first axis the volume is cut
into *slabs* at every window edge; each slab keeps its own weighted sum and is finished (divided
by its weight sum when asked, then handed to the caller for argmax/confidence) as soon as the
last window that touches it has been added. Only the open slabs are held: K × at most one patch
depth × H × W floats, whatever the volume's depth. Window outputs are added at every voxel in
the same order as a whole-volume buffer would add them, and the first window to reach a block
writes its product instead of adding it to zeros, so the blended values are the same floats.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from edgeseg.parallel import split_rows
from edgeseg.preprocess import gaussian_importance, window_starts

Start = tuple[int, int, int]
# One piece of a window's blend: (slab, rows of the window, in-plane box of the volume and of
# the window, first write) — the rows of the slab are all of its rows.
_Piece = tuple[int, slice, tuple[slice, slice], tuple[slice, slice], bool]
INV_CACHE_BYTES = 256 << 20  # inverse weight sums kept per plan (repeated slab patterns share one)


def mirror_sets(mirror_axes: Sequence[int] | None, first_axis: int) -> list[tuple[int, ...]]:
    """Every non-empty combination of the spatial ``mirror_axes`` (0 = first spatial axis) as
    array axes (spatial axis + ``first_axis``), in nnU-Net's order; the plain pass is implied."""
    axes = [int(a) + first_axis for a in (mirror_axes or ())]
    return [c for i in range(1, len(axes) + 1) for c in itertools.combinations(axes, i)]


def window_weights(patch: tuple[int, ...], kind: str = "gaussian") -> np.ndarray:
    """The importance map of a window (``patch``: 2 or 3 axes), float32, read-only."""
    if kind == "nnunet_gaussian":
        return nnunet_gaussian(tuple(int(n) for n in patch))
    if len(patch) == 3:
        return gaussian_importance(patch)
    return gaussian_importance((1, *patch))[0]


@functools.lru_cache(maxsize=8)
def nnunet_gaussian(patch: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's sliding-window weights: ``scipy.ndimage.gaussian_filter`` of a delta at n//2
    with sigma n/8 (truncated at 4 sigma), scaled to max 1, zeros raised to the smallest value."""
    w = np.ones((), dtype=np.float64)
    for n in patch:
        sigma = n * 0.125
        t = np.arange(n) - n // 2
        g = np.exp(-0.5 * (t / sigma) ** 2)
        g[np.abs(t) > int(4.0 * sigma + 0.5)] = 0.0
        w = np.multiply.outer(w, g)
    w /= w.max()
    w[w == 0] = w[w > 0].min()
    out = w.astype(np.float32)
    out.flags.writeable = False
    return out


def batches(n: int, size: int, *, fill: bool = False) -> list[list[int]]:
    """Window indices ``0..n-1`` in batches of ``size``. The last batch is short, or with
    ``fill`` filled up with its last window (one input shape for every batch: a CUDA graph
    cannot span a shape change; the repeats are run, never blended)."""
    out = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if fill and out and len(out[-1]) < size:
        out[-1] += [out[-1][-1]] * (size - len(out[-1]))
    return out


def _cells(starts: Sequence[int], patch: int) -> list[int]:
    """The edges that cut one axis into cells: every window start and end."""
    return sorted(set(starts) | {s + patch for s in starts})


class WindowPlan:
    """The windows over a (D, H, W) array for a patch (p0, p1, p2), and how they blend.

    ``size``/``patch`` are 3 axes; a 2D model's windows are (1, p1, p2) over (slices, H, W),
    one slice per step. ``overlap`` sets the starts along every axis whose patch is > 1.
    ``roi`` ((start, stop) per axis, default all) is the box whose blend is wanted, the image
    inside its padding: windows still cover the whole array, but only the box is blended, held
    and handed out (slabs are rows of the box, their arrays the box's in-plane extent).
    """

    def __init__(self, size: Sequence[int], patch: Sequence[int], overlap: float, weight: np.ndarray,
                 roi: Sequence[tuple[int, int]] | None = None):  # fmt: skip
        self.size = tuple(int(n) for n in size)
        self.patch = tuple(int(p) for p in patch)
        if len(self.size) != 3 or len(self.patch) != 3 or any(p > n for p, n in zip(self.patch, self.size)):
            raise ValueError(
                f"windows of {self.patch} need a 3-axis array at least that big, got {self.size}"
            )
        self.roi = (
            tuple((int(a), int(b)) for a, b in roi) if roi is not None else tuple((0, n) for n in self.size)
        )
        if len(self.roi) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(self.roi, self.size)):
            raise ValueError(f"roi {self.roi} is not a non-empty box inside {self.size}")
        self.weight = np.asarray(weight, dtype=np.float32).reshape(self.patch)
        per_axis = [
            list(range(n)) if p == 1 else window_starts(n, p, overlap) for n, p in zip(self.size, self.patch)
        ]
        self.starts: list[Start] = list(itertools.product(*per_axis))  # slab order: axis 0 outermost
        # cells: cut at every window edge and at the box, inside the box
        edges = [
            [e for e in sorted(set(_cells(s, p)) | {a, b}) if a <= e <= b]
            for s, p, (a, b) in zip(per_axis, self.patch, self.roi)
        ]
        self.slabs = list(zip(edges[0][:-1], edges[0][1:]))  # (first row, end row) along axis 0
        self._edges = edges
        self._inv: dict[tuple, np.ndarray] = {}
        self._inv_bytes = 0

    def _span(self, axis: int, start: int) -> range:
        """The cells along ``axis`` that the window starting at ``start`` covers."""
        e = self._edges[axis]
        a, b = self.roi[axis]
        lo, hi = max(start, a), min(start + self.patch[axis], b)
        return range(bisect.bisect_left(e, lo), bisect.bisect_left(e, hi)) if hi > lo else range(0)

    # -- the blend layout: computed on first use (the GPU path takes only starts and batches) --
    @functools.cached_property
    def pieces(self) -> list[list[_Piece]]:
        """Per window, the pieces of its blend: for each slab it touches, its in-plane blocks
        (box coordinates) merged into runs that are all first writes or all additions."""
        edges = self._edges
        (_, _), (y0, _), (x0, _) = self.roi
        out: list[list[_Piece]] = []
        self._last = [0] * len(self.slabs)
        self._covering: list[list[int]] = [[] for _ in self.slabs]
        touched: set[tuple[int, int, int]] = set()
        for w, st in enumerate(self.starts):
            span = [self._span(a, st[a]) for a in range(3)]
            pieces: list[_Piece] = []
            for j in span[0]:
                lo, hi = self.slabs[j]
                self._last[j] = w
                self._covering[j].append(w)
                rows = slice(lo - st[0], hi - st[0])
                lines: list[tuple[int, int, tuple]] = []  # (u0, u1, runs along axis 2)
                for u in span[1]:
                    runs: list[list] = []
                    for v in span[2]:
                        fresh = (j, u, v) not in touched
                        touched.add((j, u, v))
                        if runs and runs[-1][2] == fresh:
                            runs[-1][1] = v + 1
                        else:
                            runs.append([v, v + 1, fresh])
                    key = tuple(tuple(r) for r in runs)
                    if lines and lines[-1][2] == key:
                        lines[-1] = (lines[-1][0], u + 1, key)
                    else:
                        lines.append((u, u + 1, key))
                for u0, u1, key in lines:
                    ya, yb = edges[1][u0], edges[1][u1]
                    ys, wy = slice(ya - y0, yb - y0), slice(ya - st[1], yb - st[1])
                    for v0, v1, fresh in key:
                        xa, xb = edges[2][v0], edges[2][v1]
                        xs, wx = slice(xa - x0, xb - x0), slice(xa - st[2], xb - st[2])
                        pieces.append((j, rows, (ys, xs), (wy, wx), fresh))
            out.append(pieces)
        return out

    @property
    def last(self) -> list[int]:
        """The last window that touches each slab."""
        self.pieces  # noqa: B018 (computes it)
        return self._last

    @functools.cached_property
    def _ring_layout(self) -> tuple[int, list[int]]:
        return self._ring()

    @property
    def ring_rows(self) -> int:
        return self._ring_layout[0]

    @property
    def slab_at(self) -> list[int]:
        """Where each slab starts in the ring buffer (rows)."""
        return self._ring_layout[1]

    def _ring(self) -> tuple[int, list[int]]:
        """The fewest rows of one circular buffer that hold every open slab, and where each slab
        lies in it: slabs open and finish in row order, so they are placed one after the other,
        back to row 0 when the next one does not fit before the end."""
        lens = [hi - lo for lo, hi in self.slabs]
        for rows in range(max(lens), sum(lens) + 1):
            at = self._place(rows, lens)
            if at is not None:
                return rows, at
        raise AssertionError("unreachable: the whole depth always fits")  # pragma: no cover

    def _place(self, rows: int, lens: list[int]) -> list[int] | None:
        at = [-1] * len(lens)
        held: dict[int, tuple[int, int]] = {}
        head = 0
        for w, pieces in enumerate(self.pieces):
            for j in dict.fromkeys(p[0] for p in pieces):
                if at[j] >= 0:
                    continue
                if head + lens[j] > rows:
                    head = 0
                if any(a < head + lens[j] and head < b for a, b in held.values()):
                    return None
                at[j], held[j] = head, (head, head + lens[j])
                head += lens[j]
            for j in [j for j in held if self.last[j] == w]:
                del held[j]
        return at

    def batches(self, size: int, *, fill: bool = False) -> list[list[int]]:
        return batches(len(self.starts), size, fill=fill)

    def slab_shape(self, j: int) -> tuple[int, int, int]:
        lo, hi = self.slabs[j]
        (_, _), (y0, y1), (x0, x1) = self.roi
        return (hi - lo, y1 - y0, x1 - x0)

    def inverse_weight_sum(self, j: int) -> np.ndarray:
        """1 / (sum of the window weights) over slab ``j``: summed in the blend's order, so it is
        the whole-volume sum's value there; slabs that meet the same windows share one array."""
        lo = self.slabs[j][0]
        self.pieces  # noqa: B018 (computes _covering)
        key = (self.slabs[j][1] - lo, tuple(lo - self.starts[w][0] for w in self._covering[j]))
        inv = self._inv.get(key)
        if inv is not None:
            return inv
        wsum = np.empty(self.slab_shape(j), dtype=np.float32)
        for w in self._covering[j]:
            for jj, rows, (ys, xs), (wy, wx), fresh in self.pieces[w]:
                if jj != j:
                    continue
                dst = wsum[:, ys, xs]
                src = self.weight[rows, wy, wx]
                if fresh:
                    np.copyto(dst, src)
                else:
                    dst += src
        inv = np.reciprocal(wsum, out=wsum)
        if self._inv_bytes + inv.nbytes <= INV_CACHE_BYTES:
            self._inv[key] = inv
            self._inv_bytes += inv.nbytes
        return inv


Finish = Callable[[int, int, np.ndarray], None]


class SlabBlender:
    """Blends window outputs of one pass over a :class:`WindowPlan`.

    :meth:`add` takes window ``w``'s output (K, p0, p1, p2) and calls ``finish(first_row,
    end_row, slab)`` for every slab that no later window touches, ``slab`` being its (K, rows, H, W)
    weighted sum, divided by the weight sum when ``normalize`` (argmax alone does not need it:
    the division by a positive sum keeps the order of the channels). The slabs are views of one
    (K, ``plan.ring_rows``, H, W) buffer, ``ring`` when given (kept for the next volume of the
    same plan), reused after ``finish`` returns. ``threads`` split each window's blend by rows
    of its in-plane boxes (the same operations on every element, so the same floats).

    ``difference``: window outputs have 2 channels and the one blended channel is (channel 1 -
    channel 0), weighted: all that a 2-class argmax needs, for half the memory traffic.
    """

    def __init__(self, plan: WindowPlan, channels: int, finish: Finish, *, normalize: bool,
                 ring: np.ndarray | None = None, threads: int = 1, difference: bool = False):  # fmt: skip
        if difference and channels != 1:
            raise ValueError("a difference blend has 1 channel")
        self.difference = difference
        self.plan, self.k, self.finish, self.normalize = plan, int(channels), finish, normalize
        shape = (self.k, plan.ring_rows, *plan.slab_shape(0)[1:])
        if ring is None or ring.shape != shape or ring.dtype != np.float32:
            ring = np.empty(shape, dtype=np.float32)
        self.ring = ring
        self.threads = max(1, int(threads))
        self.open: dict[int, np.ndarray] = {}
        self._scratch: dict[int, np.ndarray] = {}  # per part: products to add
        self.peak_open = 0  # the most slab rows open at once (for tests and the benchmark)

    def _slab(self, j: int) -> np.ndarray:
        a = self.open.get(j)
        if a is None:
            lo, hi = self.plan.slabs[j]
            at = self.plan.slab_at[j]
            a = self.open[j] = self.ring[:, at : at + hi - lo]
            self.peak_open = max(self.peak_open, sum(s.shape[1] for s in self.open.values()))
        return a

    def add(self, w: int, out: np.ndarray) -> None:
        plan = self.plan
        pieces = [(self._slab(p[0]), *p[1:]) for p in plan.pieces[w]]  # opened here, not in threads

        def blend(part: slice) -> None:  # the window's in-plane rows ``part``
            for slab, rows, (ys, xs), (wy, wx), fresh in pieces:
                w0, w1 = max(wy.start, part.start), min(wy.stop, part.stop)
                if w1 <= w0:
                    continue
                shift = ys.start - wy.start
                dst = slab[:, :, w0 + shift : w1 + shift, xs]
                src = out[:, rows, w0:w1, wx]
                wgt = plan.weight[rows, w0:w1, wx]
                if fresh:  # the first window here: its product is the sum so far
                    if self.difference:
                        np.subtract(src[1:], src[:1], out=dst)
                        dst *= wgt
                    else:
                        np.multiply(src, wgt, out=dst)
                    continue
                scratch = self._scratch.get(part.start)
                if scratch is None or scratch.size < dst.size:
                    scratch = self._scratch[part.start] = np.empty(out.size, dtype=np.float32)
                tmp = scratch[: dst.size].reshape(dst.shape)
                if self.difference:
                    np.subtract(src[1:], src[:1], out=tmp)
                    tmp *= wgt
                else:
                    np.multiply(src, wgt, out=tmp)
                dst += tmp

        split_rows(plan.patch[1], self.threads, blend, out.size)
        for j in [j for j in self.open if plan.last[j] == w]:
            slab = self.open.pop(j)
            if self.normalize:
                inv = plan.inverse_weight_sum(j)

                def scale(r: slice, slab: np.ndarray = slab, inv: np.ndarray = inv) -> None:
                    slab[:, :, r] *= inv[None, :, r]

                split_rows(slab.shape[2], self.threads, scale, slab.size)
            self.finish(*plan.slabs[j], slab)

    def close(self) -> None:
        """Every window was added: nothing may be left open."""
        if self.open:
            raise RuntimeError(f"slabs {sorted(self.open)} were never finished: windows are missing")
