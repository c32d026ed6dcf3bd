"""numpy references of the CUDA kernels: the same computation, for the same launch parameters.

Each function mirrors one kernel of ``edgeseg/cuda/kernels`` step by step (same float32
roundings, same tap order, same radix passes), so GPU tests compare kernel output with these
(max rel error ≤ 1e-5, labels identical), and CPU tests compare these with the independent CPU
path in :mod:`edgeseg.preprocess` (what the product computes without a GPU).

Exactness vs :mod:`edgeseg.preprocess`: resampling, rescale, Window/Clip/Scale, the percentiles
(exact order statistics by radix select, numpy's linear interpolation in float64) and the
Gaussian are bit-identical; z-score mean/std are float64 sums in another order (≤ 1 float32
ulp after rounding).
"""

from __future__ import annotations

import numpy as np

from edgeseg.cuda.plan import (
    OP_CLIP,
    OP_PERCENTILE,
    OP_SCALE,
    OP_WINDOW,
    OP_ZSCORE,
    RESCALE_PER_SLICE,
    STAT_WIDTH,
    Barrier,
    ChannelPlan,
    output_strides,
    plan_volumes,
)
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

F32 = np.float32


# -- preprocess.cu ------------------------------------------------------------------------------


def apply_ops(x: np.ndarray, ops: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """``apply_ops`` of preprocess.cu on a float32 array (in place) for ops rows ``ops``."""
    for op in ops:
        code, slot = int(op[0]), int(op[1])
        p = stats[slot] if slot >= 0 else op[2:6]
        p = p.astype(F32)
        if code == OP_WINDOW:
            x -= p[0]
            x *= p[1]
            np.minimum(np.maximum(x, F32(0), out=x), F32(1), out=x)
            if op[6] != 0:
                x *= p[2]
                x += p[3]
        elif code == OP_CLIP:
            np.minimum(np.maximum(x, p[0], out=x), p[1], out=x)
        elif code == OP_PERCENTILE:
            np.minimum(np.maximum(x, p[0], out=x), p[1], out=x)
            if op[6] != 0:
                if p[3] != 0:
                    x -= p[0]
                    x *= p[2]
                else:
                    x.fill(0)
        elif code == OP_ZSCORE:
            x -= p[0]
            x *= p[1]
        elif code == OP_SCALE:
            if p[0] != 1:
                x *= p[0]
            if p[1] != 0:
                x += p[1]
    return x


def resample_channel(stored: np.ndarray, plan: ChannelPlan) -> np.ndarray:
    """``sample`` of preprocess.cu over the whole grid: float32 (D, H, W) modality values."""
    # The offsets address the stored buffer with its own strides (as the kernel does): view
    # that buffer flat. Only non-negative strides are supported, as on the device.
    span = int(np.sum(np.array(plan.src_strides) * (np.array(stored.shape) - 1))) + 1
    base = np.lib.stride_tricks.as_strided(stored, (span,), (stored.itemsize,))
    sl = [slice(plan.base[m], plan.base[m] + plan.grid[m]) for m in range(3)]
    shape = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    o0 = [plan.off0[sl[m]].reshape(shape[m]) for m in range(3)]
    o1 = [plan.off1[sl[m]].reshape(shape[m]) for m in range(3)]
    w = [plan.weight[sl[m]].reshape(shape[m]) for m in range(3)]
    z = plan.zaxis
    z0, z1 = plan.zi0[sl[z]].reshape(shape[z]), plan.zi1[sl[z]].reshape(shape[z])

    def tap(bits: int) -> np.ndarray:
        off = sum(o1[m] if bits >> m & 1 else o0[m] for m in range(3))
        v = base[off].astype(F32)
        if plan.rescale_mode == RESCALE_PER_SLICE:
            zi = z1 if bits >> z & 1 else z0
            v = v * plan.slope[zi] + plan.intercept[zi]
        return np.broadcast_to(v, plan.grid).astype(F32)

    if not plan.linear:
        v = tap(0)
    else:
        t = [tap(b) for b in range(8)]
        for a in plan.order:
            bit = 1 << a
            for b in range(8):
                if not b & bit:
                    t[b] = t[b] + (t[b | bit] - t[b]) * w[a]
        v = t[0]
    v = np.array(v, dtype=F32)
    if plan.rescale_mode != RESCALE_PER_SLICE:
        if F32(plan.slope0) != 1:
            v *= F32(plan.slope0)
        if F32(plan.intercept0) != 0:
            v += F32(plan.intercept0)
    return v


def gauss_axis(src: np.ndarray, axis: int, kernel: np.ndarray) -> np.ndarray:
    """``gauss_axis`` of preprocess.cu: taps in kernel order, numpy "symmetric" borders."""
    n = src.shape[axis]
    r = len(kernel) // 2
    acc = np.zeros_like(src, dtype=F32)
    pos = np.arange(n)
    for k, kv in enumerate(kernel.astype(F32)):
        m = (pos + k - r) % (2 * n)
        j = np.where(m < n, m, 2 * n - 1 - m)
        acc = acc + kv * np.take(src, j, axis=axis)
    return acc


# -- stats.cu -----------------------------------------------------------------------------------


def float_keys(x: np.ndarray) -> np.ndarray:
    """The ordered uint32 keys of ``float_key`` in stats.cu."""
    u = np.ascontiguousarray(x, dtype=F32).reshape(-1).view(np.uint32)
    return np.where(u & 0x80000000, ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def key_floats(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.uint32)
    return np.where(k & 0x80000000, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32).view(F32)


def radix_select(x: np.ndarray, ranks: tuple[int, ...]) -> np.ndarray:
    """The 4 ``radix_hist`` + ``radix_select`` passes: the values of rank ``ranks`` (0-based)."""
    keys = float_keys(x)
    prefix = np.zeros(len(ranks), np.uint32)
    k = np.array(ranks, dtype=np.int64)
    for shift in (24, 16, 8, 0):
        mask = np.uint32(0) if shift >= 24 else np.uint32((0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF)
        for r in range(len(ranks)):
            sel = keys[(keys & mask) == (prefix[r] & mask)]
            hist = np.bincount((sel >> shift) & 255, minlength=256)
            cum = np.cumsum(hist)
            d = min(int(np.searchsorted(cum, k[r], side="right")), 255)
            k[r] -= int(cum[d - 1]) if d > 0 else 0
            prefix[r] |= np.uint32(d << shift)
    return key_floats(prefix)


def percentile_stats(x: np.ndarray, barrier: Barrier) -> np.ndarray:
    """``percentile_finalize``: the stats slot (lo, hi, 1/(hi-lo), hi > lo)."""
    v = [float(f) for f in radix_select(x, barrier.ranks)]
    lo = v[0] + barrier.fracs[0] * (v[1] - v[0])
    hi = v[2] + barrier.fracs[1] * (v[3] - v[2])
    return np.array([lo, hi, 1.0 / (hi - lo) if hi > lo else 0.0, float(hi > lo)], dtype=F32)


def zscore_stats(x: np.ndarray, barrier: Barrier) -> np.ndarray:
    """``zscore_sum`` / ``zscore_m2`` / ``zscore_finalize``: the stats slot (mean, 1/std)."""
    sample = x[x != 0] if barrier.nonzero else x.reshape(-1)
    sample = sample.astype(np.float64)
    count = sample.size
    mean = float(sample.mean()) if count else 0.0
    std = float(np.sqrt(np.sum((sample - mean) ** 2) / count)) if count else 0.0
    mean = barrier.mean if barrier.mean is not None else mean
    std = barrier.std if barrier.std is not None else std
    return np.array([mean, 1.0 / max(std, 1e-8), 0.0, 0.0], dtype=F32)


# -- the preprocessing chain --------------------------------------------------------------------


def preprocess_channel(stored: np.ndarray, plan: ChannelPlan) -> np.ndarray:
    """One channel through every kernel of its plan: float32 (D, H, W) on the model grid."""
    stats = np.zeros((max(plan.n_slots, 1), STAT_WIDTH), dtype=F32)
    first = plan.segments[0]
    x = apply_ops(resample_channel(stored, plan), plan.ops[first.start : first.stop], stats)
    for seg in plan.segments[1:]:
        b = seg.barrier
        assert b is not None
        if b.kind == "percentile":
            stats[b.slot] = percentile_stats(x, b)
        elif b.kind == "zscore":
            stats[b.slot] = zscore_stats(x, b)
        else:
            assert b.kernel is not None
            for axis in range(3):
                if x.shape[axis] >= 2:  # as preprocess.gaussian_filter
                    x = gauss_axis(x, axis, b.kernel)
        x = apply_ops(x, plan.ops[seg.start : seg.stop], stats)
    return x


def preprocess(volumes: Volume | list[Volume], spec: ModelSpec) -> np.ndarray:
    """The model input the GPU path writes: (C, D, H, W) for 3D, (D, C, H, W) for 2D, float32."""
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    plans, _ = plan_volumes(vols, spec)
    padded = plans[0].padded
    sc, sd, sh, sw = output_strides(spec, padded)
    out = np.full(spec.in_channels * int(np.prod(padded)), F32(spec.pad_value), dtype=F32)
    for c, (vol, plan) in enumerate(zip(vols, plans)):
        x = preprocess_channel(vol.stored, plan)
        view = np.lib.stride_tricks.as_strided(out[c * sc :], plan.grid, (sd * 4, sh * 4, sw * 4))
        view[...] = x
    layout = (spec.in_channels, *padded) if spec.dims == 3 else (padded[0], spec.in_channels, *padded[1:])
    return out.reshape(layout)


# -- postprocess.cu / sliding_window.cu ---------------------------------------------------------


def postprocess(
    logits: np.ndarray, spec: ModelSpec, grid: tuple[int, ...], *, with_confidence: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """``postprocess_*``: (N, K, *S) output → uint8 labels / confidence cropped to ``grid``."""
    x = logits[(slice(None), slice(None), *(slice(0, g) for g in grid))].astype(F32)
    k_count = x.shape[1]
    if spec.output == "argmax":
        best = x[:, 0].copy()
        labels = np.zeros(best.shape, np.uint8)
        for k in range(1, k_count):
            better = x[:, k] > best
            labels[better] = k
            best[better] = x[:, k][better]
        if not with_confidence:
            return labels, None
        if spec.activation == "softmax":
            conf = best
        else:
            total = np.zeros_like(best)
            for k in range(k_count):
                total = total + np.exp(x[:, k] - best)
            conf = F32(1) / total
    else:
        probs = x if spec.activation != "logits" else F32(1) / (F32(1) + np.exp(-x))
        labels = np.zeros(probs[:, 0].shape, np.uint8)
        values = [lab.value for lab in spec.labels]
        for k in range(min(len(values), k_count)):
            labels[probs[:, k] > F32(spec.threshold)] = values[k]
        conf = probs.max(axis=1)
    return labels, (np.rint(conf * F32(255)).astype(np.uint8) if with_confidence else None)


def sliding_window(
    volume: np.ndarray,
    starts: list[tuple[int, int, int]],
    patch: tuple[int, int, int],
    weight: np.ndarray,
    infer,
    batch_size: int = 1,
) -> np.ndarray:
    """``sw_extract`` → model → ``sw_accumulate`` per patch in order → ``sw_finalize``.

    ``volume`` is (C, *S) float32; ``infer`` maps a (n, C, *patch) batch to (n, K, *patch).
    Returns the blended (K, *S) output.
    """
    size = volume.shape[1:]
    acc: np.ndarray | None = None
    wsum = np.zeros(size, F32)
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        batch = np.stack(
            [volume[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] for a, b, c in group]
        )
        out = infer(batch).astype(F32)
        if acc is None:
            acc = np.zeros((out.shape[1], *size), F32)
        for j, (a, b, c) in enumerate(group):
            region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            acc[(slice(None), *region)] = acc[(slice(None), *region)] + out[j] * weight
            wsum[region] = wsum[region] + weight
    assert acc is not None
    return acc / wsum[None]


def gather_labels(grid_labels: np.ndarray, table: np.ndarray, src_shape: tuple[int, int, int]) -> np.ndarray:
    """``gather_u8``: (D, H, W) grid labels → source (z, y, x) labels through ``source_tables``."""
    nz, ny, nx = (int(n) for n in src_shape)
    flat = np.ascontiguousarray(grid_labels).ravel()
    idx = table[:nz, None, None] + table[nz : nz + ny][None, :, None] + table[nz + ny :][None, None, :]
    return flat[idx]
