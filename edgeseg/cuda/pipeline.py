"""The GPU path: raw stored pixels in, uint8 labels out, with nothing but the model in between.

Per call: the raw pixels (2 bytes a voxel) reach the device once — read in place from mapped
pinned memory on integrated GPUs (Jetson), one async copy from pinned memory on discrete ones,
or not at all for arrays already on the device (``__cuda_array_interface__`` / DLPack) — the
fused kernel writes the TensorRT input, TensorRT runs on the same non-default stream, one kernel
turns its output into labels, and only the labels come back. The kernel chain is launched
plainly the first time a shape/parameter set is seen and captured as a CUDA graph the second
time, then replayed. Labels are mapped back to the source grid on the host (nearest, uint8).
Timings per stage ("h2d", "preprocess", "infer", "postprocess", "d2h") come from CUDA events.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeseg._exceptions import BackendError, SpecError
from edgeseg.cuda.device import device_info
from edgeseg.cuda.graph import GraphRunner
from edgeseg.cuda.interop import as_device_view
from edgeseg.cuda.memory import DeviceBuffer, Event, PinnedBuffer
from edgeseg.cuda.module import PostParams, PreParams
from edgeseg.cuda.plan import SRC_DTYPES, STAT_WIDTH, ChannelPlan, output_strides, plan_volumes
from edgeseg.geometry import resample
from edgeseg.preprocess import gaussian_importance, window_starts
from edgeseg.segmenter import SegmentationResult
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

STAGES = ("h2d", "preprocess", "infer", "postprocess", "d2h")
_ACT = {"logits": 0, "softmax": 1, "sigmoid": 2}
u64, i32, f32, f64 = ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_double


class _Buffers:
    """Device buffers by name, reallocated only when a larger size is needed."""

    def __init__(self) -> None:
        self._bufs: dict[str, DeviceBuffer] = {}

    def get(self, name: str, nbytes: int) -> DeviceBuffer:
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.close()
            buf = self._bufs[name] = DeviceBuffer(nbytes)
        return buf

    def close(self) -> None:
        for b in self._bufs.values():
            b.close()
        self._bufs.clear()


class GpuPipeline:
    """Volume(s) + spec + TensorRT backend → labels on the source grid, timings per stage.

    Parameters
    ----------
    spec:
        the bundle's model spec (same semantics as the CPU path).
    backend:
        an opened :class:`~edgeseg.backends.tensorrt.TensorRTBackend`.
    use_graphs:
        capture the steady-state launch sequence as a CUDA graph (falls back to plain launches).
    """

    def __init__(
        self, spec: ModelSpec, backend: Any, *, device_index: int = 0, use_graphs: bool = True
    ) -> None:
        from edgeseg.cuda.module import Kernels

        self.spec = spec
        self.backend = backend
        self.device = device_info(device_index)
        self.kernels = Kernels(self.device.sm)
        self.stream = backend.stream
        self.use_graphs = use_graphs
        self._bufs = _Buffers()
        self._pinned: dict[str, PinnedBuffer] = {}
        self._events = {s: (Event(), Event()) for s in STAGES}
        self._graph: GraphRunner | None = None
        self._graph_key: bytes | None = None
        self._last_key: bytes | None = None
        self._half_in = backend.input.dtype == np.float16
        self._half_out = backend.output.dtype == np.float16

    # -- staging -------------------------------------------------------------------------------
    def _pinned_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> PinnedBuffer:
        buf = self._pinned.get(name)
        if buf is None or buf.array.shape != shape or buf.array.dtype != dtype:
            if buf is not None:
                buf.close()
            buf = self._pinned[name] = PinnedBuffer(shape, dtype, mapped=self.device.integrated)
        return buf

    def _stage_source(self, c: int, stored: Any) -> int:
        """Device address of channel ``c``'s raw pixels (enqueues the one H2D copy if needed)."""
        view = as_device_view(stored)
        if view is not None:  # already on the device: read in place
            return view.ptr
        stored = np.asarray(stored)
        pinned = self._pinned_buffer(f"src{c}", stored.shape, stored.dtype)
        np.copyto(pinned.array, stored)
        if self.device.integrated:  # the kernel reads the mapped host memory directly
            return pinned.device_ptr
        dev = self._bufs.get(f"src{c}", stored.nbytes)
        dev.upload(pinned.array, self.stream)
        return dev.ptr

    def _upload(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        pinned = self._pinned_buffer(name, array.shape, array.dtype)
        np.copyto(pinned.array, array)
        dev = self._bufs.get(name, max(array.nbytes, 16))
        dev.upload(pinned.array, self.stream)
        return dev.ptr

    # -- launch program --------------------------------------------------------------------------
    def _pre_params(self, plan: ChannelPlan, c: int, src: int, dst: int, strides, padded, ops, n_ops: int,
                    stats: int, *, channel: int, half: bool) -> PreParams:  # fmt: skip
        t = {k: self._upload(f"{k}{c}", getattr(plan, k)) for k in ("off0", "off1", "weight", "zi0", "zi1")}
        p = PreParams(
            src=src, off0=t["off0"], off1=t["off1"], weight=t["weight"], zi0=t["zi0"], zi1=t["zi1"],
            slope=self._upload(f"slope{c}", plan.slope), intercept=self._upload(f"intercept{c}", plan.intercept),
            ops=ops, stats=stats, dst=dst,
        )  # fmt: skip
        p.dst_stride[:] = strides
        p.grid[:], p.padded[:], p.base[:], p.order[:] = plan.grid, padded, plan.base, plan.order
        p.zaxis, p.linear, p.rescale_mode, p.n_ops = plan.zaxis, int(plan.linear), plan.rescale_mode, n_ops
        p.channel, p.dst_half, p.pad_value = channel, int(half), self.spec.pad_value
        p.slope0, p.intercept0 = plan.slope0, plan.intercept0
        return p

    def _preprocess_program(self, plans: list[ChannelPlan], srcs: list[int], dst: int, layout_strides,
                            half: bool) -> list[Callable[[], None]]:  # fmt: skip
        """Launches that write every channel into ``dst`` (padded layout, fp32/fp16)."""
        k, s, steps = self.kernels, self.stream, []
        for c, (plan, src) in enumerate(zip(plans, srcs)):
            ops = self._upload(f"ops{c}", plan.ops if plan.ops.size else np.zeros(8, np.float32))
            op_size = plan.ops.shape[1] * 4 if plan.ops.size else 32
            stats = self._bufs.get(f"stats{c}", max(plan.n_slots, 1) * STAT_WIDTH * 4).ptr
            kernel = f"preprocess_{SRC_DTYPES[plan.src_dtype]}"
            first = plan.segments[0]
            if not plan.needs_scratch:
                p = self._pre_params(plan, c, src, dst, layout_strides, plan.padded, ops + first.start * op_size,
                                     first.stop - first.start, stats, channel=c, half=half)  # fmt: skip
                steps.append(
                    lambda p=p, kernel=kernel, n=int(np.prod(plan.padded)): k.launch(kernel, n, [p], s)
                )
                continue
            n = plan.n_grid
            scratch = [self._bufs.get(f"scratch{c}_{i}", n * 4).ptr for i in range(2)]
            g = plan.grid
            grid_strides = (0, g[1] * g[2], g[2], 1)
            p = self._pre_params(plan, c, src, scratch[0], grid_strides, g, ops + first.start * op_size,
                                 first.stop - first.start, stats, channel=0, half=False)  # fmt: skip
            steps.append(lambda p=p, kernel=kernel, n=n: k.launch(kernel, n, [p], s))
            cur = 0
            for i, seg in enumerate(plan.segments[1:]):
                steps += self._barrier(seg.barrier, plan, scratch, cur, stats, c)
                if seg.barrier.kind == "denoise":
                    cur = (cur + sum(1 for a in range(3) if g[a] >= 2)) % 2
                last = i == len(plan.segments) - 2
                q = self._pre_params(plan, c, scratch[cur], dst if last else scratch[cur],
                                     layout_strides if last else grid_strides, plan.padded if last else g,
                                     ops + seg.start * op_size, seg.stop - seg.start, stats,
                                     channel=c if last else 0, half=half and last)  # fmt: skip
                steps.append(lambda q=q, n=int(np.prod(q.padded)): k.launch("intensity_apply", n, [q], s))
        return steps

    def _barrier(self, b, plan: ChannelPlan, scratch: list[int], cur: int, stats: int, c: int):
        k, s, n = self.kernels, self.stream, plan.n_grid
        x = scratch[cur]
        if b.kind == "percentile":
            state = self._bufs.get(f"radix{c}", 4 * 258 * 4).ptr
            steps = [lambda: k.launch("radix_init", 1, [u64(state), i32(4), *[ctypes.c_uint32(r) for r in b.ranks]],
                                      s, blocks=1)]  # fmt: skip
            for shift in (24, 16, 8, 0):
                steps.append(
                    lambda sh=shift: k.launch(
                        "radix_hist", n, [u64(x), u64(n), u64(state), i32(4), i32(sh)], s
                    )
                )
                steps.append(
                    lambda sh=shift: k.launch(
                        "radix_select", 4, [u64(state), i32(4), i32(sh)], s, blocks=1, threads=32
                    )
                )
            steps.append(lambda: k.launch("percentile_finalize", 1, [u64(state), u64(stats), i32(b.slot),
                                          f64(b.fracs[0]), f64(b.fracs[1])], s, blocks=1, threads=32))  # fmt: skip
            return steps
        if b.kind == "zscore":
            acc = self._bufs.get(f"zacc{c}", 32)
            return [
                lambda: acc.zero(s),
                lambda: k.launch("zscore_sum", n, [u64(x), u64(n), i32(int(b.nonzero)), u64(acc.ptr)], s),
                lambda: k.launch("zscore_m2", n, [u64(x), u64(n), i32(int(b.nonzero)), u64(acc.ptr)], s),
                lambda: k.launch(
                    "zscore_finalize",
                    1,
                    [
                        u64(acc.ptr),
                        u64(stats),
                        i32(b.slot),
                        i32(b.mean is not None),
                        f64(b.mean or 0.0),
                        i32(b.std is not None),
                        f64(b.std or 0.0),
                    ],
                    s,
                    blocks=1,
                    threads=32,
                ),  # fmt: skip
            ]
        weights = self._upload(f"gauss{c}", b.kernel)
        steps, src = [], cur
        for axis in range(3):
            if plan.grid[axis] < 2:
                continue
            a, o = scratch[src], scratch[1 - src]
            steps.append(lambda a=a, o=o, axis=axis: k.launch("gauss_axis", n, [u64(a), u64(o), *[i32(v) for v in plan.grid],
                         i32(axis), u64(weights), i32(len(b.kernel) // 2)], s))  # fmt: skip
            src = 1 - src
        return steps

    def _post_params(
        self, logits: int, labels: int, conf: int, n: int, k_: int, spatial, grid, n_offset: int
    ) -> PostParams:
        spec = self.spec
        values = np.array([lab.value for lab in spec.labels], np.uint8)
        p = PostParams(logits=logits, labels=labels, confidence=conf, label_values=self._upload("labvals", values),
                       n_offset=n_offset, N=n, K=k_)  # fmt: skip
        p.S[:] = spatial
        p.G[:] = grid
        p.mode, p.activation = int(spec.output == "threshold"), _ACT[spec.activation]
        p.n_labels, p.threshold = len(values), spec.threshold
        return p

    # -- the call ----------------------------------------------------------------------------------
    def run(self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False) -> SegmentationResult:
        spec = self.spec
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        if len(vols) != spec.in_channels:
            raise SpecError(f"the model takes {spec.in_channels} input channel(s), got {len(vols)}")
        plans, (orient, oriented, grid) = plan_volumes(vols, spec)
        padded = plans[0].padded
        ev, s = self._events, self.stream
        ev["h2d"][0].record(s)
        srcs = [self._stage_source(c, v.stored) for c, v in enumerate(vols)]
        ev["h2d"][1].record(s)
        g_count = int(np.prod(grid))
        labels_d = self._bufs.get("labels", g_count)
        conf_d = self._bufs.get("conf", g_count) if with_confidence else None
        program, stage_of = self._program(
            plans, srcs, padded, grid, labels_d.ptr, conf_d.ptr if conf_d else 0
        )
        key = b"".join(stage_of) + repr((padded, grid, with_confidence)).encode()
        self._execute(program, key)
        ev["d2h"][0].record(s)
        labels = np.empty(grid, np.uint8)
        labels_d.download(labels, s)
        conf = None
        if conf_d is not None:
            conf = np.empty(grid, np.uint8)
            conf_d.download(conf, s)
        ev["d2h"][1].record(s)
        s.synchronize()
        timings = {st: ev[st][1].elapsed_ms(ev[st][0]) for st in STAGES}
        back = _to_source(labels, orient, oriented)
        return SegmentationResult(
            back, _to_source(conf, orient, oriented) if conf is not None else None, timings
        )

    def _program(self, plans, srcs, padded, grid, labels: int, conf: int):
        """The launch sequence (with stage events) and the bytes that identify it for graph reuse."""
        spec, be, k, s, ev = self.spec, self.backend, self.kernels, self.stream, self._events
        c_in = spec.in_channels
        in_item = 2 if self._half_in else 4
        out_item = 2 if self._half_out else 4
        post = "postprocess_f16" if self._half_out else "postprocess_f32"
        steps: list[Callable[[], None]] = [lambda: ev["preprocess"][0].record(s)]
        ident: list[bytes] = []
        if spec.dims == 2:
            d = padded[0]
            bs = min(spec.batch_size, d)
            x = self._bufs.get("input", d * c_in * padded[1] * padded[2] * in_item)
            steps += self._preprocess_program(plans, srcs, x.ptr, output_strides(spec, padded), self._half_in)
            steps.append(lambda: ev["preprocess"][1].record(s))
            slice_in = c_in * padded[1] * padded[2] * in_item
            out_shape = be.bind((bs, c_in, padded[1], padded[2]), x.ptr)
            y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
            k_out = out_shape[1]
            steps.append(lambda: ev["infer"][0].record(s))
            for start in range(0, d, bs):
                n = min(bs, d - start)
                ptr = x.ptr + start * slice_in
                p = self._post_params(
                    y.ptr, labels, conf, n, k_out, (1, padded[1], padded[2]), (1, grid[1], grid[2]), start
                )
                steps.append(
                    lambda n=n, ptr=ptr: (
                        be.bind((n, c_in, padded[1], padded[2]), ptr, y.ptr),
                        be.enqueue(s.handle),
                    )
                )
                steps.append(lambda p=p, n=n: k.launch(post, n * grid[1] * grid[2], [p], s))
                ident.append(bytes(p))
            steps.append(lambda: ev["infer"][1].record(s))
            steps += [lambda: ev["postprocess"][0].record(s), lambda: ev["postprocess"][1].record(s)]
        elif spec.patch_size is None:
            x = self._bufs.get("input", c_in * int(np.prod(padded)) * in_item)
            steps += self._preprocess_program(plans, srcs, x.ptr, output_strides(spec, padded), self._half_in)
            steps.append(lambda: ev["preprocess"][1].record(s))
            out_shape = be.bind((1, c_in, *padded), x.ptr)
            y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
            be.bind((1, c_in, *padded), x.ptr, y.ptr)
            steps += [
                lambda: ev["infer"][0].record(s),
                lambda: be.enqueue(s.handle),
                lambda: ev["infer"][1].record(s),
            ]
            p = self._post_params(y.ptr, labels, conf, 1, out_shape[1], padded, grid, 0)
            ident.append(bytes(p))
            steps += [lambda: ev["postprocess"][0].record(s), lambda: k.launch(post, int(np.prod(grid)), [p], s),
                      lambda: ev["postprocess"][1].record(s)]  # fmt: skip
        else:
            steps += self._sliding_program(plans, srcs, padded, grid, labels, conf, ident)
        for plan in plans:
            ident += [plan.ops.tobytes(), repr((plan.src_dtype, plan.src_strides, plan.slope0, plan.intercept0,
                                                plan.rescale_mode)).encode(), plan.off0.tobytes(), plan.weight.tobytes()]  # fmt: skip
        ident += [repr(srcs).encode()]
        return steps, ident

    def _sliding_program(self, plans, srcs, padded, grid, labels: int, conf: int, ident: list[bytes]):
        spec, be, k, s, ev = self.spec, self.backend, self.kernels, self.stream, self._events
        c_in = spec.in_channels
        patch = tuple(int(p) for p in spec.patch_size)
        vol = self._bufs.get("volume", c_in * int(np.prod(padded)) * 4)
        steps = self._preprocess_program(plans, srcs, vol.ptr, output_strides(spec, padded), False)
        steps.append(lambda: ev["preprocess"][1].record(s))
        starts = [(a, b, c) for a in window_starts(padded[0], patch[0], spec.overlap)
                  for b in window_starts(padded[1], patch[1], spec.overlap)
                  for c in window_starts(padded[2], patch[2], spec.overlap)]  # fmt: skip
        bs = spec.batch_size
        in_item, out_item = (2 if self._half_in else 4), (2 if self._half_out else 4)
        x = self._bufs.get("input", bs * c_in * int(np.prod(patch)) * in_item)
        out_shape = be.bind((bs, c_in, *patch), x.ptr)
        y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
        k_out = out_shape[1]
        weight = self._upload("importance", gaussian_importance(patch))
        n_vox = int(np.prod(padded))
        acc = self._bufs.get("acc", k_out * n_vox * 4)
        wsum = self._bufs.get("wsum", n_vox * 4)
        steps.append(lambda: ev["infer"][0].record(s))
        steps.append(
            lambda: k.launch("fill_f32", k_out * n_vox, [u64(acc.ptr), u64(k_out * n_vox), f32(0.0)], s)
        )
        steps.append(lambda: k.launch("fill_f32", n_vox, [u64(wsum.ptr), u64(n_vox), f32(0.0)], s))
        acc_fn = "sw_accumulate_f16" if self._half_out else "sw_accumulate_f32"
        dims = [i32(v) for v in padded]
        for i in range(0, len(starts), bs):
            group = starts[i : i + bs]
            for j, (a, b, c) in enumerate(group):
                args = [u64(vol.ptr), u64(x.ptr), i32(int(self._half_in)), i32(j), i32(c_in), *dims,
                        *[i32(v) for v in patch], i32(a), i32(b), i32(c)]  # fmt: skip
                steps.append(lambda args=args: k.launch("sw_extract", c_in * int(np.prod(patch)), args, s))
            n = len(group)
            steps.append(lambda n=n: (be.bind((n, c_in, *patch), x.ptr, y.ptr), be.enqueue(s.handle)))
            for j, (a, b, c) in enumerate(group):
                args = [u64(y.ptr), i32(j), i32(k_out), *[i32(v) for v in patch], u64(weight), u64(acc.ptr),
                        u64(wsum.ptr), *dims, i32(a), i32(b), i32(c)]  # fmt: skip
                steps.append(lambda args=args: k.launch(acc_fn, int(np.prod(patch)), args, s))
        steps.append(lambda: ev["infer"][1].record(s))
        p = self._post_params(acc.ptr, labels, conf, 1, k_out, padded, grid, 0)
        ident += [bytes(p), repr(starts).encode()]
        steps += [
            lambda: ev["postprocess"][0].record(s),
            lambda: k.launch(
                "sw_finalize", k_out * n_vox, [u64(acc.ptr), u64(wsum.ptr), i32(k_out), u64(n_vox)], s
            ),
            lambda: k.launch("postprocess_f32", int(np.prod(grid)), [p], s),
            lambda: ev["postprocess"][1].record(s),
        ]
        return steps

    def _execute(self, program: list[Callable[[], None]], key: bytes) -> None:
        def enqueue() -> None:
            for step in program:
                step()

        if self.use_graphs and self._graph is not None and key == self._graph_key:
            self._graph.run()
            return
        if self.use_graphs and key == self._last_key:
            # Second time with the same launches: the previous run was the plain warm-up run.
            self.stream.synchronize()
            if self._graph is not None:
                self._graph.close()
            self._graph = GraphRunner(self.stream, enqueue)
            if self._graph.capture():
                self._graph_key = key
                self._graph.run()
                return
            self._graph = None
        enqueue()
        self._last_key = key

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
        self._bufs.close()
        for b in self._pinned.values():
            b.close()
        self._pinned.clear()
        self.kernels.close()


def _to_source(grid_labels: np.ndarray, orient, oriented) -> np.ndarray:
    """Grid labels back onto the source (z, y, x) grid: nearest resample, undo the orientation."""
    out = resample(grid_labels, oriented, "nearest", (0, 1, 2))
    return np.ascontiguousarray(orient.from_model(out))


class GpuSegmenter:
    """The Segmenter's GPU path: a bundle opened on TensorRT + the CUDA kernels."""

    def __init__(self, spec: ModelSpec, backend: Any, *, bundle: Any = None) -> None:
        self.spec = spec
        self.backend = backend
        self.bundle = bundle
        self.pipeline = GpuPipeline(spec, backend)

    @classmethod
    def open(cls, bundle: Any, *, precision: str | None = None) -> GpuSegmenter:
        """Open ``bundle`` on this GPU: the cached engine for it, or one built now (once)."""
        from edgeseg.backends.tensorrt import TensorRTBackend
        from edgeseg.engine_cache import TRT_PRECISIONS, load_or_build

        choices = [precision] if precision else [p for p in TRT_PRECISIONS if p in bundle.artifacts]
        if not choices or choices[0] not in bundle.artifacts:
            raise BackendError(f"the bundle has no {precision or 'TensorRT-suitable'} model")
        prec = choices[0]
        plan, _, _ = load_or_build(
            bundle.onnx(prec), bundle.sha256(bundle.artifacts[prec]), bundle.spec, prec
        )
        return cls(bundle.spec, TensorRTBackend(plan, precision=prec), bundle=bundle)

    def segment(
        self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False
    ) -> SegmentationResult:
        return self.pipeline.run(volumes, with_confidence=with_confidence)

    def describe(self) -> dict:
        d = self.backend.describe()
        d["gpu"] = f"{self.pipeline.device.name} ({self.pipeline.device.sm})"
        if self.bundle is not None:
            d["model"] = f"{self.bundle.name} {self.bundle.version}"
        return d

    def close(self) -> None:
        self.pipeline.close()
        self.backend.close()

    def __enter__(self) -> GpuSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
