"""Launch parameters of the preprocessing kernels, computed on the host from a spec and a Volume.

One :class:`ChannelPlan` is everything the device kernels need for one input channel: per-axis
index tables (reorientation and resampling folded into element offsets into the raw stored
array), the rescale mode, the intensity steps encoded as a small float table, and where the
steps must stop for a whole-volume statistic (percentiles, z-score) or a Gaussian filter.
The numpy references in :mod:`edgeseg.cuda.reference` execute exactly the same plan, so the
kernels can be checked against them and the references against :mod:`edgeseg.preprocess`.

The tables come from the same :mod:`edgeseg.geometry` helpers as the CPU path, which makes the
index arithmetic identical by construction rather than by re-derivation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeseg.geometry import Orientation, linear_weights, nearest_indices
from edgeseg.preprocess import Preprocessor, gaussian_kernel
from edgeseg.spec import Clip, Denoise, ModelSpec, PercentileClip, Scale, Window, ZScore
from edgeseg.volume import Volume

# Op codes shared with kernels/preprocess.cu (keep in sync).
OP_WINDOW, OP_CLIP, OP_PERCENTILE, OP_ZSCORE, OP_SCALE = 0, 1, 2, 3, 4
OP_WIDTH = 8  # floats per op: code, stats slot (-1: none), p0..p3, flag, unused
STAT_WIDTH = 4  # floats per stats slot

# Stored dtypes the preprocessing kernel is instantiated for (kernel name suffix).
SRC_DTYPES = {np.dtype(np.int16): "i16", np.dtype(np.uint16): "u16", np.dtype(np.float32): "f32",
              np.dtype(np.uint8): "u8"}  # fmt: skip

RESCALE_UNIFORM, RESCALE_PER_SLICE = 1, 2


@dataclass
class Barrier:
    """A point where elementwise work stops for a whole-volume pass.

    ``kind`` is "percentile" (4 exact order statistics by radix select), "zscore" (mean/std)
    or "denoise" (separable Gaussian). ``slot`` is the stats slot the following op reads.
    """

    kind: str
    slot: int = -1
    ranks: tuple[int, int, int, int] = (0, 0, 0, 0)  # percentile: i_lo, j_lo, i_hi, j_hi
    fracs: tuple[float, float] = (0.0, 0.0)  # percentile: r - i for lo and hi
    q: tuple[float, float] = (0.0, 100.0)  # percentile: (low, high) in percent
    nonzero: bool = False  # zscore
    mean: float | None = None
    std: float | None = None
    kernel: np.ndarray | None = None  # denoise weights (float32, odd length)


@dataclass
class Segment:
    """Run ``barrier`` (if any), then ops ``[start, stop)`` elementwise."""

    barrier: Barrier | None
    start: int
    stop: int


@dataclass
class ChannelPlan:
    """Launch parameters for one channel (see the module docstring)."""

    src_shape: tuple[int, int, int]
    src_strides: tuple[int, int, int]  # elements, (z, y, x)
    src_dtype: np.dtype
    grid: tuple[int, int, int]  # model grid (D, H, W) before padding
    padded: tuple[int, int, int]
    linear: bool
    off0: np.ndarray  # int64 [D+H+W]: element offset of the first tap per axis sample
    off1: np.ndarray  # int64: second tap (linear only; equals off0 when unused)
    weight: np.ndarray  # float32: weight of the second tap
    zi0: np.ndarray  # int32: slice index of the taps (only meaningful on the z axis)
    zi1: np.ndarray
    base: tuple[int, int, int]  # where each model axis starts in the tables
    order: tuple[int, int, int]  # model axes in interpolation order (the CPU path's order)
    zaxis: int  # model axis that walks the stored slices
    rescale_mode: int
    slope0: float
    intercept0: float
    slope: np.ndarray  # float32 [nz]
    intercept: np.ndarray
    ops: np.ndarray  # float32 [n_ops, OP_WIDTH]
    segments: list[Segment] = field(default_factory=list)
    n_slots: int = 0

    @property
    def n_grid(self) -> int:
        return int(np.prod(self.grid))

    @property
    def needs_scratch(self) -> bool:
        """True when the steps cannot all be fused into the resampling kernel."""
        return len(self.segments) > 1


def output_strides(spec: ModelSpec, padded: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Element strides (c, d, h, w) of the model input: (C, D, H, W) for 3D, (D, C, H, W) for 2D."""
    pd, ph, pw = padded
    if spec.dims == 3:
        return (pd * ph * pw, ph * pw, pw, 1)
    return (ph * pw, spec.in_channels * ph * pw, pw, 1)


def axis_tables(
    n_in: int, n_out: int, linear: bool, flip: bool, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(off0, off1, w, i0, i1) for one model axis; ``i*`` are array indices after the flip."""
    if n_in == n_out:  # the CPU path leaves such an axis untouched
        i0 = np.arange(n_out, dtype=np.int64)
        i1, w = i0, np.zeros(n_out, np.float32)
    elif linear:
        i0, i1, w = linear_weights(n_in, n_out)
    else:
        i0 = nearest_indices(n_in, n_out)
        i1, w = i0, np.zeros(n_out, np.float32)
    if flip:
        i0, i1 = n_in - 1 - i0, n_in - 1 - i1
    return i0 * stride, i1 * stride, w.astype(np.float32), i0.astype(np.int32), i1.astype(np.int32)


def encode_ops(steps: list[object]) -> tuple[np.ndarray, list[Segment], int]:
    """Encode intensity steps as the kernels' op table and split them at whole-volume passes."""
    ops: list[list[float]] = []
    segments: list[Segment] = [Segment(None, 0, 0)]
    slots = 0
    for step in steps:
        op = [0.0] * OP_WIDTH
        op[1] = -1.0
        if isinstance(step, Window):
            op[0] = OP_WINDOW
            op[2] = np.float32(step.center - step.width / 2.0)
            op[3] = np.float32(1.0 / step.width)
            op[4] = np.float32(step.out_max - step.out_min)
            op[5] = np.float32(step.out_min)
            op[6] = float((step.out_min, step.out_max) != (0.0, 1.0))
        elif isinstance(step, Clip):
            op[0], op[2], op[3] = OP_CLIP, np.float32(step.low), np.float32(step.high)
        elif isinstance(step, Scale):
            op[0], op[2], op[3] = OP_SCALE, np.float32(step.mul), np.float32(step.add)
        elif isinstance(step, PercentileClip):
            op[0], op[1], op[6] = OP_PERCENTILE, slots, float(step.rescale)
            segments.append(
                Segment(Barrier("percentile", slot=slots, q=(step.low, step.high)), len(ops), len(ops))
            )
            slots += 1
        elif isinstance(step, ZScore):
            op[0] = OP_ZSCORE
            if step.mean is None or step.std is None:
                op[1] = slots
                b = Barrier("zscore", slot=slots, nonzero=step.nonzero, mean=step.mean, std=step.std)
                segments.append(Segment(b, len(ops), len(ops)))
                slots += 1
            else:
                op[2] = np.float32(step.mean)
                op[3] = np.float32(1.0 / max(step.std, 1e-8))
        elif isinstance(step, Denoise):
            if step.sigma > 0:
                b = Barrier("denoise", kernel=gaussian_kernel(step.sigma))
                segments.append(Segment(b, len(ops), len(ops)))
            continue
        else:  # pragma: no cover - spec validation rejects these
            raise TypeError(f"unknown intensity step {step!r}")
        ops.append(op)
        segments[-1].stop = len(ops)
    table = np.asarray(ops, dtype=np.float32).reshape(-1, OP_WIDTH)
    return table, segments, slots


def percentile_ranks(
    n: int, low: float, high: float
) -> tuple[tuple[int, int, int, int], tuple[float, float]]:
    """The order statistics ``np.percentile(..., method='linear')`` interpolates between."""
    ranks, fracs = [], []
    for q in (low, high):
        r = (n - 1) * q / 100.0
        i = int(math.floor(r))
        ranks += [i, min(i + 1, n - 1)]
        fracs.append(r - i)
    return tuple(ranks), tuple(fracs)  # type: ignore[return-value]


def plan_channel(
    volume: Volume,
    spec: ModelSpec,
    orient: Orientation,
    grid: tuple[int, int, int],
    padded: tuple[int, int, int],
    steps: list[object],
    layout: tuple[np.dtype, tuple[int, int, int]] | None = None,
) -> ChannelPlan:
    """Build the :class:`ChannelPlan` for one channel of ``volume`` under ``spec``.

    ``layout`` is ``(dtype, element strides)`` of the buffer the kernel will actually read
    (the GPU pipeline stages host arrays C-contiguously, and device arrays keep their own
    strides); by default, those of ``volume.stored`` itself (what the numpy reference reads).
    """
    stored = volume.stored
    if layout is None:
        layout = (np.dtype(stored.dtype), tuple(s // stored.itemsize for s in stored.strides))
    src_dtype, strides = np.dtype(layout[0]), tuple(int(s) for s in layout[1])
    if src_dtype not in SRC_DTYPES:
        raise TypeError(f"stored pixels of dtype {src_dtype} are not supported on the GPU path")
    oriented = orient.model_shape(volume.shape)
    linear = spec.interpolation == "linear"
    parts = [
        axis_tables(oriented[m], grid[m], linear, orient.flips[m], strides[orient.perm[m]]) for m in range(3)
    ]
    off0, off1, w, zi0, zi1 = (np.concatenate([p[k] for p in parts]) for k in range(5))
    base = (0, grid[0], grid[0] + grid[1])
    # Same order as geometry.resample: the axis that shrinks most first (identity axes are
    # exact no-ops wherever they go).
    axes = (1, 2) if spec.dims == 2 else (0, 1, 2)
    ordered = sorted(range(len(axes)), key=lambda i: grid[axes[i]] / max(oriented[axes[i]], 1))
    order = tuple([a for a in range(3) if a not in axes] + [axes[i] for i in ordered])
    uniform = bool(
        np.all(volume.slope == volume.slope[0]) and np.all(volume.intercept == volume.intercept[0])
    )
    ops, segments, n_slots = encode_ops(steps)
    for seg in segments:
        b = seg.barrier
        if b is not None and b.kind == "percentile":
            b.ranks, b.fracs = percentile_ranks(int(np.prod(grid)), *b.q)
    return ChannelPlan(
        src_shape=volume.shape,
        src_strides=strides,  # type: ignore[arg-type]
        src_dtype=src_dtype,
        grid=grid,
        padded=padded,
        linear=linear,
        off0=off0.astype(np.int64),
        off1=off1.astype(np.int64),
        weight=w.astype(np.float32),
        zi0=zi0,
        zi1=zi1,
        base=base,
        order=order,  # type: ignore[arg-type]
        zaxis=orient.perm.index(0),
        rescale_mode=RESCALE_UNIFORM if uniform else RESCALE_PER_SLICE,
        slope0=float(np.float32(volume.slope[0])),
        intercept0=float(np.float32(volume.intercept[0])),
        slope=volume.slope.astype(np.float32),
        intercept=volume.intercept.astype(np.float32),
        ops=ops,
        segments=segments,
        n_slots=n_slots,
    )


def source_tables(
    orient: Orientation, grid: tuple[int, int, int], src_shape: tuple[int, int, int]
) -> np.ndarray:
    """int64 ``[nz + ny + nx]``: for each source (z, y, x) index, the element offset into the
    C-contiguous (D, H, W) grid labels of the voxel it takes — nearest resampling back to the
    oriented shape, then the inverse reorientation, i.e. :func:`edgeseg.preprocess.labels_to_source`
    folded into three per-axis tables (``gather_u8`` of postprocess.cu adds one from each).
    """
    grid_strides = (grid[1] * grid[2], grid[2], 1)
    parts = []
    for a in range(3):
        m = orient.perm.index(a)  # the model axis that walks source axis a
        n = int(src_shape[a])  # == the oriented extent of model axis m
        d = np.arange(n, dtype=np.int64)
        if orient.flips[m]:
            d = n - 1 - d
        g = d if grid[m] == n else nearest_indices(grid[m], n)[d]
        parts.append(g.astype(np.int64) * grid_strides[m])
    return np.concatenate(parts)


def plan_volumes(
    volumes: Volume | list[Volume], spec: ModelSpec, layouts: list | None = None
) -> tuple[list[ChannelPlan], object]:
    """Plans for every channel plus the CPU path's geometry plan ``(orientation, oriented, grid)``.

    The geometry decisions (orientation, grid, padding) are taken from
    :class:`edgeseg.preprocess.Preprocessor` itself, so both paths agree on them. ``layouts``:
    per channel, the ``layout`` of :func:`plan_channel` (None: the stored array's own).
    """
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    pre = Preprocessor(spec)
    orient, oriented, grid = pre.plan(vols[0])
    padded = pre.padded_shape(grid)
    layouts = list(layouts) if layouts is not None else [None] * len(vols)
    plans = [
        plan_channel(v, spec, orient, grid, padded, spec.intensity_for_channel(c), layouts[c])
        for c, v in enumerate(vols)
    ]
    return plans, (orient, oriented, grid)


# TensorRT's setTensorAddress needs device addresses aligned to 256 bytes.
TRT_ALIGNMENT = 256


def slice_batches(depth: int, batch: int, slice_bytes: int) -> list[tuple[int, bool]]:
    """The 2D path's batches of slices: ``(first slice, staged)`` each. Every batch has
    ``batch`` slices (the last one overlaps the one before, so one input shape serves all); a
    batch whose byte offset into the preprocessed volume is not 256-byte aligned is ``staged``:
    copied device-to-device into an aligned buffer before TensorRT reads it."""
    batch = min(batch, depth)
    starts = sorted({min(start, depth - batch) for start in range(0, depth, batch)})
    return [(s, (s * slice_bytes) % TRT_ALIGNMENT != 0) for s in starts]
