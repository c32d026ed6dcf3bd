"""The GPU path: raw stored pixels in, uint8 labels out, with nothing but the model in between.

Per call: the raw pixels (2 bytes a voxel) reach the device once — read in place from mapped
pinned memory on integrated GPUs (Jetson), one async copy from pinned memory on discrete ones,
or not at all for arrays already on the device (``__cuda_array_interface__`` / DLPack) — the
fused kernel writes the TensorRT input, TensorRT runs on the same non-default stream, one kernel
turns its output into labels, and only the labels come back. The kernel chain is launched
plainly the first time a shape/parameter set is seen and captured as a CUDA graph the second
time, then replayed. Labels are mapped back to the source grid on the device (one gather
kernel through per-axis tables) and only source-grid labels come back. Timings per stage ("h2d",
"preprocess", "infer", "postprocess", "d2h") come from CUDA events; 2D inference and
postprocessing interleave per batch and are timed per batch.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeseg._exceptions import BackendError, SpecError
from edgeseg.cuda._api import check, runtime_module
from edgeseg.cuda.device import device_info
from edgeseg.cuda.graph import GraphRunner
from edgeseg.cuda.interop import as_device_view
from edgeseg.cuda.memory import DeviceBuffer, Event, PinnedBuffer, PinnedPool, copy_device
from edgeseg.cuda.module import BLOCK, PostParams, PreParams
from edgeseg.cuda.plan import (
    OP_WIDTH,
    SRC_DTYPES,
    STAT_WIDTH,
    ChannelPlan,
    output_strides,
    plan_volumes,
    slice_batches,
    source_tables,
)
from edgeseg.result import SegmentationResult
from edgeseg.sliding_window import WindowPlan, window_weights
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

STAGES = ("h2d", "preprocess", "infer", "postprocess", "d2h")
_ACT = {"logits": 0, "softmax": 1, "sigmoid": 2}
u64, i32, f32, f64 = ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_double
MAX_GRAPHS = 4  # captured programs kept (e.g. loader buffers that alternate between two addresses)


def host_layout(stored: np.ndarray) -> tuple[np.dtype, tuple[int, int, int]]:
    """What the kernels read for a host array: its dtype, C-contiguous element strides (the
    pipeline stages every host array C-contiguously, whatever the array's own strides)."""
    n = stored.shape
    return np.dtype(stored.dtype), (int(n[1]) * int(n[2]), int(n[2]), 1)


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


class Program:
    """A launch sequence and everything it bakes into a CUDA graph.

    Every step records the exact values a capture freezes (kernel name, launch size and the
    bytes of every argument, TensorRT shapes and addresses, memset ranges, event handles) in
    :attr:`ident`, so two programs with equal :meth:`key` are interchangeable as graphs: any
    reallocated buffer, new shape or parameter changes the key. Table *contents* are uploaded
    outside the program, each run, and are not part of it. :attr:`timing` lists
    ``(stage, start_event, end_event)`` spans whose sums give the per-stage times.
    """

    def __init__(self, stream: Any, kernels: Any = None) -> None:
        self.stream = stream
        self.kernels = kernels
        self.steps: list[Callable[[], None]] = []
        self.ident: list[bytes] = []
        self.trt_shapes: set[tuple[int, ...]] = set()
        self.timing: list[tuple[str, Any, Any]] = []

    def launch(self, name: str, n: int, args: Sequence[Any], *, blocks: int | None = None,
               threads: int = BLOCK) -> None:  # fmt: skip
        k, s, args = self.kernels, self.stream, list(args)
        self.ident.append(
            b"K" + name.encode() + repr((n, blocks, threads)).encode() + b"".join(bytes(a) for a in args)
        )
        self.steps.append(lambda: k.launch(name, n, args, s, blocks=blocks, threads=threads))

    def record(self, event: Any) -> None:
        s = self.stream
        self.ident.append(b"E" + repr(event.handle).encode())
        self.steps.append(lambda: event.record(s))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy on the program's stream (capturable)."""
        s = self.stream
        self.ident.append(b"C" + repr((int(dst), int(src), int(nbytes))).encode())
        self.steps.append(lambda: copy_device(dst, src, nbytes, s))

    def memset(self, buf: DeviceBuffer) -> None:
        s = self.stream
        self.ident.append(b"M" + repr((buf.ptr, buf.nbytes)).encode())
        self.steps.append(lambda: buf.zero(s))

    def infer(self, backend: Any, shape: tuple[int, ...], x: int, y: int) -> None:
        shape = tuple(int(v) for v in shape)
        s = self.stream
        self.trt_shapes.add(shape)
        self.ident.append(b"T" + repr((shape, int(x), int(y))).encode())
        self.steps.append(lambda: (backend.bind(shape, x, y), backend.enqueue(s.handle)))

    def span(self, stage: str, start: Any, end: Any) -> None:
        self.timing.append((stage, start, end))

    def key(self) -> bytes:
        return hashlib.sha256(b"\0".join(self.ident)).digest()

    def __call__(self) -> None:
        for step in self.steps:
            step()


class GpuPipeline:
    """Volume(s) + spec + TensorRT backend → labels on the source grid, timings per stage.

    Parameters
    ----------
    spec:
        the bundle's model spec (same semantics as the CPU path).
    backend:
        an opened :class:`~edgeseg.backends.tensorrt.TensorRTBackend` (or anything with its
        ``stream``, ``input``, ``output``, ``bind`` and ``enqueue``).
    use_graphs:
        capture the steady-state launch sequence as a CUDA graph (falls back to plain launches).

    :attr:`pool` hands out pinned (mapped, on integrated GPUs) host arrays: give it to
    :func:`edgeseg.dicom.load_volume` as ``out=`` and the decoded pixels are what the kernels
    read — no staging copy, and on Jetson no copy at all.
    """

    def __init__(
        self, spec: ModelSpec, backend: Any, *, device_index: int = 0, use_graphs: bool = True
    ) -> None:
        from edgeseg.cuda.module import Kernels

        for t in (backend.input, backend.output):
            if t.dtype not in (np.float32, np.float16):
                raise BackendError(
                    f"the engine's tensor '{t.name}' is {t.dtype}; the GPU path needs float32 or float16"
                )
        self.spec = spec
        self.backend = backend
        self.device = device_info(device_index)
        self.kernels = Kernels(self.device.sm)
        self.stream = backend.stream
        # An engine that allocates or synchronises inside a run (ONNX Runtime) cannot be captured.
        self.use_graphs = use_graphs and getattr(backend, "capturable", True)
        self.pool = PinnedPool(mapped=self.device.integrated, device_index=device_index)
        self._bufs = _Buffers()
        self._pinned: dict[str, PinnedBuffer] = {}
        self._events = {s: (Event(), Event()) for s in STAGES}
        self._batch_events: list[tuple[Event, Event]] = []
        self._graphs: OrderedDict[bytes, GraphRunner] = OrderedDict()
        self._graph_shapes: set | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._uncapturable: set[bytes] = set()
        self._last_shapes: set | None = None
        self._half_in = backend.input.dtype == np.float16
        self._half_out = backend.output.dtype == np.float16
        self._label_values = 0  # device table of label values, uploaded each run

    # -- staging -------------------------------------------------------------------------------
    def _pinned_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> PinnedBuffer:
        buf = self._pinned.get(name)
        if buf is None or buf.array.shape != shape or buf.array.dtype != dtype:
            if buf is not None:
                buf.close()  # the previous run synchronised: no copy from it is in flight
            buf = self._pinned[name] = PinnedBuffer(shape, dtype, mapped=self.device.integrated)
        return buf

    def _stage_source(self, c: int, stored: Any) -> tuple[int, tuple]:
        """Device address and layout (dtype, element strides) of channel ``c``'s raw pixels;
        enqueues the one H2D copy where one is needed."""
        view = as_device_view(stored, self.stream.handle)
        if view is not None:  # already on the device: read in place, after its producer
            if view.stream is not None:
                self.stream.wait_for(view.stream)
            return view.ptr, (view.dtype, view.strides)
        stored = np.asarray(stored)
        layout = host_layout(stored)
        buf = self.pool.lookup(stored) if stored.flags.c_contiguous else None
        if buf is not None:  # decoded straight into our pinned memory
            host = stored
            if self.device.integrated and buf.device_ptr:  # the kernel reads it where it lies
                return buf.device_ptr + (stored.ctypes.data - buf.ptr), layout
        else:
            pinned = self._pinned_buffer(f"src{c}", stored.shape, stored.dtype)
            np.copyto(pinned.array, stored)
            if self.device.integrated:
                return pinned.device_ptr, layout
            host = pinned.array
        dev = self._bufs.get(f"src{c}", max(host.nbytes, 1))
        dev.upload(host, self.stream)
        return dev.ptr, layout

    def _upload(self, name: str, array: np.ndarray) -> int:
        """Device copy of a small table (enqueued now, outside any program; names are unique
        per table within a run, so no pinned staging buffer is rewritten while in flight)."""
        array = np.ascontiguousarray(array)
        pinned = self._pinned_buffer(name, array.shape, array.dtype)
        np.copyto(pinned.array, array)
        dev = self._bufs.get(name, max(array.nbytes, 16))
        dev.upload(pinned.array, self.stream)
        return dev.ptr

    def _batch_event_pairs(self, n: int) -> list[tuple[Event, Event]]:
        while len(self._batch_events) < n:
            self._batch_events.append((Event(), Event()))
        return self._batch_events[:n]

    # -- launch program --------------------------------------------------------------------------
    def _channel_tables(self, plan: ChannelPlan, c: int) -> dict[str, int]:
        names = ("off0", "off1", "weight", "zi0", "zi1", "slope", "intercept")
        t = {k: self._upload(f"{k}{c}", getattr(plan, k)) for k in names}
        t["ops"] = self._upload(f"ops{c}", plan.ops if plan.ops.size else np.zeros((1, OP_WIDTH), np.float32))
        return t

    def _pre_params(self, plan: ChannelPlan, tables: dict[str, int], src: int, dst: int, strides, padded,
                    first_op: int, n_ops: int, stats: int, *, channel: int, half: bool) -> PreParams:  # fmt: skip
        t = tables
        p = PreParams(
            src=src, off0=t["off0"], off1=t["off1"], weight=t["weight"], zi0=t["zi0"], zi1=t["zi1"],
            slope=t["slope"], intercept=t["intercept"], ops=t["ops"] + first_op * OP_WIDTH * 4,
            stats=stats, dst=dst,
        )  # fmt: skip
        p.dst_stride[:] = strides
        p.grid[:], p.padded[:], p.base[:], p.order[:] = plan.grid, padded, plan.base, plan.order
        p.zaxis, p.linear, p.rescale_mode, p.n_ops = plan.zaxis, int(plan.linear), plan.rescale_mode, n_ops
        p.channel, p.dst_half, p.pad_value = channel, int(half), self.spec.pad_value
        p.slope0, p.intercept0 = plan.slope0, plan.intercept0
        return p

    def _preprocess_program(self, prog: Program, plans: list[ChannelPlan], srcs: list[int], dst: int,
                            layout_strides, half: bool) -> None:  # fmt: skip
        """Launches that write every channel into ``dst`` (padded layout, fp32/fp16)."""
        for c, (plan, src) in enumerate(zip(plans, srcs)):
            tables = self._channel_tables(plan, c)
            stats = self._bufs.get(f"stats{c}", max(plan.n_slots, 1) * STAT_WIDTH * 4).ptr
            kernel = f"preprocess_{SRC_DTYPES[plan.src_dtype]}"
            first = plan.segments[0]
            if not plan.needs_scratch:
                p = self._pre_params(plan, tables, src, dst, layout_strides, plan.padded, first.start,
                                     first.stop - first.start, stats, channel=c, half=half)  # fmt: skip
                prog.launch(kernel, int(np.prod(plan.padded)), [p])
                continue
            n = plan.n_grid
            scratch = [self._bufs.get(f"scratch{c}_{i}", n * 4).ptr for i in range(2)]
            g = plan.grid
            grid_strides = (0, g[1] * g[2], g[2], 1)
            p = self._pre_params(plan, tables, src, scratch[0], grid_strides, g, first.start,
                                 first.stop - first.start, stats, channel=0, half=False)  # fmt: skip
            prog.launch(kernel, n, [p])
            cur = 0
            for i, seg in enumerate(plan.segments[1:]):
                self._barrier(prog, seg.barrier, plan, scratch, cur, stats, c, i)
                if seg.barrier.kind == "denoise":
                    cur = (cur + sum(1 for a in range(3) if g[a] >= 2)) % 2
                last = i == len(plan.segments) - 2
                q = self._pre_params(plan, tables, scratch[cur], dst if last else scratch[cur],
                                     layout_strides if last else grid_strides, plan.padded if last else g,
                                     seg.start, seg.stop - seg.start, stats,
                                     channel=c if last else 0, half=half and last)  # fmt: skip
                prog.launch("intensity_apply", int(np.prod(q.padded)), [q])

    def _barrier(self, prog: Program, b, plan: ChannelPlan, scratch: list[int], cur: int, stats: int, c: int,
                 index: int) -> None:  # fmt: skip
        n = plan.n_grid
        x = scratch[cur]
        if b.kind == "percentile":
            state = self._bufs.get(f"radix{c}", 4 * 258 * 4).ptr
            prog.launch(
                "radix_init", 1, [u64(state), i32(4), *[ctypes.c_uint32(r) for r in b.ranks]], blocks=1
            )
            for shift in (24, 16, 8, 0):
                prog.launch("radix_hist", n, [u64(x), u64(n), u64(state), i32(4), i32(shift)])
                prog.launch("radix_select", 4, [u64(state), i32(4), i32(shift)], blocks=1, threads=32)
            prog.launch("percentile_finalize", 1, [u64(state), u64(stats), i32(b.slot), f64(b.fracs[0]),
                                                   f64(b.fracs[1])], blocks=1, threads=32)  # fmt: skip
            return
        if b.kind == "zscore":
            acc = self._bufs.get(f"zacc{c}", 32)
            prog.memset(acc)
            prog.launch("zscore_sum", n, [u64(x), u64(n), i32(int(b.nonzero)), u64(acc.ptr)])
            prog.launch("zscore_m2", n, [u64(x), u64(n), i32(int(b.nonzero)), u64(acc.ptr)])
            prog.launch("zscore_finalize", 1, [u64(acc.ptr), u64(stats), i32(b.slot), i32(b.mean is not None),
                                               f64(b.mean or 0.0), i32(b.std is not None), f64(b.std or 0.0)],
                        blocks=1, threads=32)  # fmt: skip
            return
        weights = self._upload(f"gauss{c}_{index}", b.kernel)  # one table per Denoise step
        src = cur
        for axis in range(3):
            if plan.grid[axis] < 2:
                continue
            a, o = scratch[src], scratch[1 - src]
            prog.launch("gauss_axis", n, [u64(a), u64(o), *[i32(v) for v in plan.grid], i32(axis), u64(weights),
                                          i32(len(b.kernel) // 2)])  # fmt: skip
            src = 1 - src

    def _post_params(
        self, logits: int, labels: int, conf: int, n: int, k_: int, spatial, grid, n_offset: int
    ) -> PostParams:
        spec = self.spec
        p = PostParams(logits=logits, labels=labels, confidence=conf, label_values=self._label_values,
                       n_offset=n_offset, N=n, K=k_)  # fmt: skip
        p.S[:] = spatial
        p.G[:] = grid
        p.mode, p.activation = int(spec.output == "threshold"), _ACT[spec.activation]
        p.n_labels, p.threshold = len(spec.labels), spec.threshold
        return p

    # -- the call ----------------------------------------------------------------------------------
    def run(self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False) -> SegmentationResult:
        spec = self.spec
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        if len(vols) != spec.in_channels:
            raise SpecError(f"the model takes {spec.in_channels} input channel(s), got {len(vols)}")
        ev, s = self._events, self.stream
        # The calling thread (a stream worker, a reader) may have another device current, or
        # none: the driver-API launches need this pipeline's context current here.
        check(runtime_module().cudaSetDevice(self.device.index), "cudaSetDevice")
        # Host staging buffers are rewritten below: nothing of an earlier call (one that raised
        # half-way, say) may still be copying out of them. Free when the stream is idle.
        s.synchronize()
        ev["h2d"][0].record(s)
        staged = [self._stage_source(c, v.stored) for c, v in enumerate(vols)]
        ev["h2d"][1].record(s)
        srcs = [ptr for ptr, _ in staged]
        plans, (orient, oriented, grid) = plan_volumes(vols, spec, [layout for _, layout in staged])
        padded = plans[0].padded
        src_shape = tuple(int(n) for n in vols[0].shape)
        g_count, s_count = int(np.prod(grid)), int(np.prod(src_shape))
        labels_g = self._bufs.get("labels", g_count)
        labels_s = self._bufs.get("labels_src", s_count)
        conf_g = self._bufs.get("conf", g_count) if with_confidence else None
        conf_s = self._bufs.get("conf_src", s_count) if with_confidence else None
        table = self._upload("to_source", source_tables(orient, grid, src_shape))
        self._label_values = self._upload("labvals", np.array([lab.value for lab in spec.labels], np.uint8))
        prog = self._program(plans, srcs, padded, grid, labels_g.ptr, conf_g.ptr if conf_g else 0)
        # Labels back onto the source grid on the device: only source-grid labels come back.
        for g_buf, s_buf in ((labels_g, labels_s), (conf_g, conf_s)):
            if g_buf is not None:
                prog.launch("gather_u8", s_count, [u64(g_buf.ptr), u64(s_buf.ptr), u64(table),
                                                   *[i32(v) for v in src_shape]])  # fmt: skip
        prog.record(ev["postprocess"][1])
        self._execute(prog)
        ev["d2h"][0].record(s)
        labels = np.empty(src_shape, np.uint8)
        labels_s.download(labels, s)
        conf = None
        if conf_s is not None:
            conf = np.empty(src_shape, np.uint8)
            conf_s.download(conf, s)
        ev["d2h"][1].record(s)
        s.synchronize()
        timings = {st: ev[st][1].elapsed_ms(ev[st][0]) for st in ("h2d", "d2h")}
        for stage, a, b in prog.timing:
            timings[stage] = timings.get(stage, 0.0) + b.elapsed_ms(a)
        return SegmentationResult(labels, conf, {st: timings.get(st, 0.0) for st in STAGES})

    def _program(self, plans, srcs, padded, grid, labels: int, conf: int) -> Program:
        """The launch sequence from preprocessing to grid labels, with its timing spans; the
        caller appends the mapping to the source grid and the final postprocess event.

        Every TensorRT enqueue of one program uses one input shape (2D: the last batch of
        slices overlaps the previous one; 3D: the last batch of patches is filled up), because
        a CUDA graph may not span an input-shape change of the execution context.
        """
        spec, be, ev = self.spec, self.backend, self._events
        prog = Program(self.stream, self.kernels)
        c_in = spec.in_channels
        in_item = 2 if self._half_in else 4
        out_item = 2 if self._half_out else 4
        post = "postprocess_f16" if self._half_out else "postprocess_f32"
        prog.record(ev["preprocess"][0])
        if spec.dims == 2:
            d = padded[0]
            bs = min(spec.batch_size, d)
            x = self._bufs.get("input", d * c_in * padded[1] * padded[2] * in_item)
            self._preprocess_program(prog, plans, srcs, x.ptr, output_strides(spec, padded), self._half_in)
            prog.record(ev["preprocess"][1])
            prog.span("preprocess", *ev["preprocess"])
            slice_in = c_in * padded[1] * padded[2] * in_item
            shape = (bs, c_in, padded[1], padded[2])
            out_shape = be.bind(shape, x.ptr)
            y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
            prog.record(ev["infer"][0])
            batches = slice_batches(d, bs, slice_in)
            stage = self._bufs.get("batch_in", bs * slice_in) if any(st for _, st in batches) else None
            before = ev["infer"][0]
            for (start, staged), (inferred, posted) in zip(batches, self._batch_event_pairs(len(batches))):
                src = x.ptr + start * slice_in
                if staged:  # TensorRT reads only 256-byte aligned addresses
                    prog.copy(stage.ptr, src, bs * slice_in)
                    src = stage.ptr
                prog.infer(be, shape, src, y.ptr)
                prog.record(inferred)
                p = self._post_params(y.ptr, labels, conf, bs, out_shape[1], (1, padded[1], padded[2]),
                                      (1, grid[1], grid[2]), start)  # fmt: skip
                prog.launch(post, bs * grid[1] * grid[2], [p])
                prog.record(posted)
                prog.span("infer", before, inferred)
                prog.span("postprocess", inferred, posted)
                before = posted
            prog.span("postprocess", before, ev["postprocess"][1])
        elif spec.patch_size is None:
            x = self._bufs.get("input", c_in * int(np.prod(padded)) * in_item)
            self._preprocess_program(prog, plans, srcs, x.ptr, output_strides(spec, padded), self._half_in)
            prog.record(ev["preprocess"][1])
            prog.span("preprocess", *ev["preprocess"])
            shape = (1, c_in, *padded)
            out_shape = be.bind(shape, x.ptr)
            y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
            prog.record(ev["infer"][0])
            prog.infer(be, shape, x.ptr, y.ptr)
            prog.record(ev["infer"][1])
            prog.span("infer", *ev["infer"])
            p = self._post_params(y.ptr, labels, conf, 1, out_shape[1], padded, grid, 0)
            prog.launch(post, int(np.prod(grid)), [p])
            prog.span("postprocess", ev["infer"][1], ev["postprocess"][1])
        else:
            self._sliding_program(prog, plans, srcs, padded, grid, labels, conf)
        return prog

    def _sliding_program(self, prog: Program, plans, srcs, padded, grid, labels: int, conf: int) -> None:
        spec, be, ev = self.spec, self.backend, self._events
        c_in = spec.in_channels
        patch = tuple(int(p) for p in spec.patch_size)
        vol = self._bufs.get("volume", c_in * int(np.prod(padded)) * 4)
        self._preprocess_program(prog, plans, srcs, vol.ptr, output_strides(spec, padded), False)
        # The CPU path's window plan (edgeseg.sliding_window): the same starts, order and weights.
        plan = WindowPlan(padded, patch, spec.overlap, window_weights(patch, spec.window_weights))
        starts = plan.starts
        bs = min(spec.batch_size, len(starts))
        in_item, out_item = (2 if self._half_in else 4), (2 if self._half_out else 4)
        x = self._bufs.get("input", bs * c_in * int(np.prod(patch)) * in_item)
        shape = (bs, c_in, *patch)
        out_shape = be.bind(shape, x.ptr)
        y = self._bufs.get("output", int(np.prod(out_shape)) * out_item)
        k_out = out_shape[1]
        weight = self._upload("importance", plan.weight)
        n_vox = int(np.prod(padded))
        acc = self._bufs.get("acc", k_out * n_vox * 4)
        wsum = self._bufs.get("wsum", n_vox * 4)
        prog.launch("fill_f32", k_out * n_vox, [u64(acc.ptr), u64(k_out * n_vox), f32(0.0)])
        prog.launch("fill_f32", n_vox, [u64(wsum.ptr), u64(n_vox), f32(0.0)])
        prog.record(ev["preprocess"][1])
        prog.span("preprocess", *ev["preprocess"])
        prog.record(ev["infer"][0])
        acc_fn = "sw_accumulate_f16" if self._half_out else "sw_accumulate_f32"
        dims = [i32(v) for v in padded]
        # One input shape for every enqueue (a CUDA graph cannot span a shape change): a short
        # last batch is filled up with its last window, run but never accumulated.
        for group in plan.batches(bs, fill=True):
            for j, w in enumerate(group):
                a, b, c = starts[w]
                prog.launch("sw_extract", c_in * int(np.prod(patch)), [u64(vol.ptr), u64(x.ptr), i32(int(self._half_in)),
                            i32(j), i32(c_in), *dims, *[i32(v) for v in patch], i32(a), i32(b), i32(c)])  # fmt: skip
            prog.infer(be, shape, x.ptr, y.ptr)
            for j, w in enumerate(dict.fromkeys(group)):  # the windows themselves, not the fill
                a, b, c = starts[w]
                prog.launch(acc_fn, int(np.prod(patch)), [u64(y.ptr), i32(j), i32(k_out), *[i32(v) for v in patch],
                            u64(weight), u64(acc.ptr), u64(wsum.ptr), *dims, i32(a), i32(b), i32(c)])  # fmt: skip
        prog.record(ev["infer"][1])
        prog.span("infer", *ev["infer"])
        p = self._post_params(acc.ptr, labels, conf, 1, k_out, padded, grid, 0)
        prog.launch("sw_finalize", k_out * n_vox, [u64(acc.ptr), u64(wsum.ptr), i32(k_out), u64(n_vox)])
        prog.launch("postprocess_f32", int(np.prod(grid)), [p])
        prog.span("postprocess", ev["infer"][1], ev["postprocess"][1])

    def _execute(self, prog: Program) -> None:
        """Run ``prog``: replay its graph if captured; capture it the second time it is seen.

        Graphs are kept per program key (at most :data:`MAX_GRAPHS`). All of them share one
        TensorRT execution context, so they must share its input shape too: a program with
        other shapes drops them. A capture happens only right after a plain run with the same
        shapes (TensorRT's state is then settled for them); it never runs inside a capture.
        """
        if not self.use_graphs:
            prog()
            return
        key, shapes = prog.key(), prog.trt_shapes
        if shapes != self._graph_shapes:
            self._drop_graphs()
            self._graph_shapes = shapes
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            graph.run()
            self._last_shapes = shapes
            return
        if key in self._seen and key not in self._uncapturable and self._last_shapes == shapes:
            self.stream.synchronize()  # nothing of an earlier run may be pending in the capture
            graph = GraphRunner(self.stream, prog)
            if graph.capture():
                self._graphs[key] = graph
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)[1].close()
                graph.run()
                self._last_shapes = shapes
                return
            if len(self._uncapturable) > 64:
                self._uncapturable.clear()
            self._uncapturable.add(key)
        prog()
        self._last_shapes = shapes
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > 4 * MAX_GRAPHS:
            self._seen.popitem(last=False)

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def close(self) -> None:
        self._drop_graphs()
        self._bufs.close()
        for b in self._pinned.values():
            b.close()
        self._pinned.clear()
        self.pool.close()
        self.kernels.close()


class GpuSegmenter:
    """The Segmenter's GPU path: a bundle opened on TensorRT + the CUDA kernels."""

    def __init__(self, spec: ModelSpec, backend: Any, *, bundle: Any = None) -> None:
        self.spec = spec
        self.backend = backend
        self.bundle = bundle
        self.pipeline = GpuPipeline(spec, backend)

    @classmethod
    def open(cls, bundle: Any, *, precision: str | None = None) -> GpuSegmenter:
        """Open ``bundle`` on this GPU: the cached engine for it, or one built now (once), that
        passed the bundle's acceptance check (int8 → fp16 → fp32 unless ``precision`` is given)."""
        from edgeseg._optional import available
        from edgeseg.backends.tensorrt_open import open_tensorrt_backend

        if available("tensorrt"):
            return cls(bundle.spec, open_tensorrt_backend(bundle, precision), bundle=bundle)
        # No TensorRT: ONNX Runtime's CUDA provider (onnxruntime-gpu) runs the same pipeline.
        from edgeseg.backends.ort_cuda_open import open_ort_cuda_backend

        return cls(bundle.spec, open_ort_cuda_backend(bundle, precision), bundle=bundle)

    def segment(
        self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False
    ) -> SegmentationResult:
        return self.pipeline.run(volumes, with_confidence=with_confidence)

    @property
    def pixel_allocator(self) -> PinnedPool:
        """``out=`` for :func:`edgeseg.dicom.load_volume`: decode straight into pinned (Jetson:
        mapped) memory that this segmenter's kernels read without a staging copy."""
        return self.pipeline.pool

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
