"""The GPU pipeline's launch programs, checked on the CPU against the kernel sources.

No GPU: device and pinned buffers are host memory (real addresses), events and the TensorRT
backend record what they are asked, and the kernel loader records each launch instead of
running it. What is checked is what would only fail on a GPU: every launch passes exactly the
parameter types of its ``extern "C"`` signature in the .cu files, every pointer points into a
live buffer, TensorRT sees one input shape per program with in-bounds addresses, the graph key
covers every baked value, the param structs match the kernels field by field (NVRTC
static_asserts), and host arrays are planned with the layout they are staged in.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import re
import types

import numpy as np
import pytest

from edgeseg.backends.base import TensorInfo
from edgeseg.cuda import reference as R
from edgeseg.cuda.module import PostParams, PreParams
from edgeseg.cuda.nvrtc import KERNEL_FILES, BindingsNvrtc, compile_options, kernel_source
from edgeseg.cuda.plan import plan_volumes, source_tables
from edgeseg.geometry import Orientation, resample
from edgeseg.preprocess import Preprocessor, labels_to_source
from edgeseg.spec import Denoise, Label, ModelSpec, PercentileClip, Window, ZScore
from edgeseg.volume import Volume

RNG = np.random.default_rng(11)


# -- the kernels' signatures, parsed from the sources ------------------------------------------
_SIG = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')
_SCALARS = {"int": ctypes.c_int32, "unsigned int": ctypes.c_uint32, "u64": ctypes.c_uint64,
            "float": ctypes.c_float, "double": ctypes.c_double, "PreParams": PreParams,
            "PostParams": PostParams}  # fmt: skip


def kernel_signatures() -> dict[str, list[object]]:
    """Kernel name → parameter types: "ptr" for pointers, else the ctypes type."""
    out: dict[str, list[object]] = {}
    for f in KERNEL_FILES:
        for name, params in _SIG.findall(" ".join(kernel_source(f).split())):
            types: list[object] = []
            for param in params.split(","):
                words = param.replace("*", " * ").split()[:-1]  # drop the parameter name
                if "*" in words:
                    types.append("ptr")
                else:
                    base = " ".join(w for w in words if w != "const")
                    types.append(_SCALARS[base])
            out[name] = types
    return out


def test_signature_parser_sees_every_kernel():
    sigs = kernel_signatures()
    assert sigs["preprocess_i16"] == [PreParams] and sigs["postprocess_f16"] == [PostParams]
    assert sigs["radix_init"] == ["ptr", ctypes.c_int32, *[ctypes.c_uint32] * 4]
    assert sigs["percentile_finalize"][-2:] == [ctypes.c_double, ctypes.c_double]
    assert sigs["gather_u8"] == ["ptr", "ptr", "ptr", ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    assert len(sigs) >= 20


# -- a CPU stand-in for the device -------------------------------------------------------------
class Memory:
    """Every host buffer standing in for device or pinned memory, to check pointers against."""

    def __init__(self) -> None:
        self.live: list = []

    def contains(self, ptr: int, nbytes: int = 1) -> bool:
        return any(b.ptr and b.ptr <= ptr and ptr + nbytes <= b.ptr + b.nbytes for b in self.live)


class FakeStream:
    handle = 0x5EED
    capturing = False

    def synchronize(self) -> None:
        pass


class FakeEvent:
    def __init__(self) -> None:
        self.handle = id(self)

    def record(self, stream) -> None:
        pass

    def elapsed_ms(self, start) -> float:
        return 1.0


class FakeBackend:
    """TensorRT's side of the contract: bind shapes/addresses, enqueue; K output channels."""

    def __init__(self, memory: Memory, k: int = 2, in_dtype=np.float32) -> None:
        self.memory, self.k = memory, k
        self.stream = FakeStream()
        self.input = TensorInfo("image", (None, 1, None, None), np.dtype(in_dtype))
        self.output = TensorInfo("logits", (None, k, None, None), np.dtype(np.float32))
        self.shape: tuple[int, ...] = ()
        self.addresses: tuple[int, int | None] = (0, None)
        self.enqueued: list[tuple] = []

    def bind(self, shape, x, y=None):
        self.shape, self.addresses = tuple(shape), (x, y)
        return (shape[0], self.k, *shape[2:])

    def enqueue(self, handle) -> None:
        assert handle == FakeStream.handle
        x, y = self.addresses
        # setTensorAddress refuses addresses that are not 256-byte aligned.
        assert x % 256 == 0 and (y or 0) % 256 == 0, f"TensorRT address not 256-byte aligned: {x:#x}, {y}"
        n_in = int(np.prod(self.shape)) * self.input.dtype.itemsize
        n_out = int(np.prod(self.bind(self.shape, x, y))) * 4
        assert self.memory.contains(x, n_in), "TensorRT input reaches outside its buffer"
        assert y is not None and self.memory.contains(y, n_out), "TensorRT output reaches outside its buffer"
        self.enqueued.append(self.shape)


class FakeKernels:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.sigs = kernel_signatures()
        self.launches: list[tuple[str, list]] = []

    def launch(self, name, n, args, stream, *, blocks=None, threads=256) -> None:
        sig = self.sigs[name]
        assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters"
        for i, (arg, want) in enumerate(zip(args, sig)):
            if want == "ptr":
                assert type(arg) is ctypes.c_uint64, f"{name} argument {i}: pointer passed as {type(arg)}"
                assert self.memory.contains(arg.value), f"{name} argument {i}: pointer to no buffer"
            else:
                assert type(arg) is want, f"{name} argument {i}: {type(arg).__name__} for {want.__name__}"
            if isinstance(arg, PreParams):
                for field in ("src", "off0", "off1", "weight", "zi0", "zi1", "slope", "intercept", "stats",
                              "dst"):  # fmt: skip
                    assert self.memory.contains(getattr(arg, field)), f"{name}: PreParams.{field} dangles"
                # the op rows it reads (a segment without ops may point just past the table)
                assert arg.n_ops == 0 or self.memory.contains(arg.ops, arg.n_ops * 8 * 4), f"{name}: ops"
            if isinstance(arg, PostParams):
                for field in ("logits", "labels", "label_values"):
                    assert self.memory.contains(getattr(arg, field)), f"{name}: PostParams.{field} dangles"
                assert arg.confidence == 0 or self.memory.contains(arg.confidence)
        self.launches.append((name, list(args)))

    def close(self) -> None:
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    """(make_pipeline, memory): GpuPipeline's real code on host memory."""
    import edgeseg.cuda.module as module
    import edgeseg.cuda.pipeline as P
    from edgeseg.cuda.device import DeviceInfo

    memory = Memory()

    class HostBuffer:
        def __init__(self, nbytes) -> None:
            self.nbytes = int(nbytes)
            # cudaMalloc returns 256-byte aligned memory: so does this stand-in.
            raw = np.zeros(max(self.nbytes, 1) + 256, np.uint8)
            skip = -raw.ctypes.data % 256
            self._raw, self._mem = raw, raw[skip : skip + max(self.nbytes, 1)]
            self.ptr = self._mem.ctypes.data
            memory.live.append(self)

        def upload(self, array, stream) -> None:
            raw = np.ascontiguousarray(array).view(np.uint8).ravel()
            assert raw.size <= self.nbytes
            self._mem[: raw.size] = raw

        def download(self, out, stream, nbytes=None) -> None:
            out.view(np.uint8).ravel()[:] = self._mem[: out.nbytes]

        def zero(self, stream) -> None:
            self._mem[:] = 0

        def close(self) -> None:
            self.ptr = 0

    class HostPinned(HostBuffer):
        def __init__(self, shape, dtype, *, mapped=False) -> None:
            super().__init__(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.array = self._mem[: self.nbytes].view(dtype).reshape(shape)
            self.device_ptr = self.ptr if mapped else 0

    def make(spec, *, integrated=False, k=2, use_graphs=False, in_dtype=np.float32):
        monkeypatch.setattr(P, "DeviceBuffer", HostBuffer)
        monkeypatch.setattr(P, "PinnedBuffer", HostPinned)
        monkeypatch.setattr(P, "Event", FakeEvent)
        monkeypatch.setattr(P, "device_info", lambda i: DeviceInfo(i, "fake", 8, 7, integrated, 1 << 30))
        made_current: list[int] = []

        def set_device(index):
            made_current.append(index)
            return (0,)  # cudaSuccess, as cuda-bindings returns it

        def copy_device(dst, src, nbytes, stream):
            assert memory.contains(dst, nbytes) and memory.contains(src, nbytes), "D2D copy outside a buffer"
            ctypes.memmove(dst, src, nbytes)

        monkeypatch.setattr(P, "copy_device", copy_device)
        runtime = types.SimpleNamespace(cudaSetDevice=set_device)
        monkeypatch.setattr(P, "runtime_module", lambda: runtime)
        monkeypatch.setattr(module, "Kernels", lambda arch: FakeKernels(memory))
        pipe = P.GpuPipeline(spec, FakeBackend(memory, k, in_dtype), use_graphs=use_graphs)
        pipe.pool = P.PinnedPool(mapped=integrated, factory=lambda n, m: HostPinned((n,), np.uint8, mapped=m))
        pipe.made_current = made_current  # devices made current by run(), in order
        return pipe

    return make, memory


def _volume(shape=(9, 40, 36), dtype=np.int16):
    stored = RNG.integers(0, 2000, size=shape).astype(dtype)
    nz = shape[0]
    affine = np.array([[0, 0, -2.5, 10], [0.9, 0, 0, -3], [0, -0.8, 0, 7], [0, 0, 0, 1.0]])
    return Volume(stored, RNG.uniform(0.5, 2, nz), RNG.uniform(-50, 50, nz), (2.5, 0.9, 0.8), affine)


SPECS = {
    "3d-fused": ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(40, 400)], target_spacing=(1.5, 1.2, 1.1),
                          orientation="RAS", divisible_by=8),
    "3d-barriers": ModelSpec(dims=3, labels=[Label(1, "a"), Label(2, "b")], intensity=[PercentileClip(0.5, 99.5),
                             ZScore(), Denoise(0.8), Denoise(1.3)], orientation="LPS", divisible_by=4),
    "2d": ModelSpec(dims=2, labels=[Label(1, "a")], intensity=[Window(40, 400)], target_shape=(32, 32),
                    batch_size=4),
    "3d-sliding": ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[ZScore()], patch_size=(8, 16, 16),
                            batch_size=5, overlap=0.25),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("integrated", [False, True])
def test_every_launch_matches_its_kernel_signature(fake_gpu, name, integrated):
    make, memory = fake_gpu
    spec = SPECS[name]
    pipe = make(spec, integrated=integrated)
    vol = _volume()
    result = pipe.run(vol, with_confidence=True)
    assert result.labels.shape == vol.shape and result.confidence.shape == vol.shape
    assert set(result.timings) == {"h2d", "preprocess", "infer", "postprocess", "d2h"}
    names = [n for n, _ in pipe.kernels.launches]
    assert names.count("gather_u8") == 2  # labels and confidence come back on the source grid
    assert any(n.startswith("preprocess_") for n in names)
    assert pipe.backend.enqueued and len(set(pipe.backend.enqueued)) == 1  # one TensorRT shape
    assert pipe.made_current == [0]  # the calling thread gets the pipeline's device


def test_2d_batches_cover_every_slice_with_one_shape(fake_gpu):
    make, _ = fake_gpu
    pipe = make(SPECS["2d"])
    vol = _volume((10, 40, 36))
    plans, (_, _, grid) = plan_volumes(vol, SPECS["2d"])
    pipe.run(vol)
    assert pipe.backend.enqueued == [(4, 1, 32, 32)] * 3  # 10 slices: batches at 0, 4 and 6
    posts = [a[0] for n, a in pipe.kernels.launches if n.startswith("postprocess")]
    covered = sorted({p.n_offset + i for p in posts for i in range(p.N)})
    assert covered == list(range(grid[0])) and all(p.N == 4 for p in posts)


def test_2d_batches_at_unaligned_offsets_are_staged_into_an_aligned_buffer(fake_gpu):
    from edgeseg.cuda.plan import slice_batches

    make, _ = fake_gpu
    spec = ModelSpec(
        dims=2, labels=[Label(1, "a")], intensity=[Window(40, 400)], target_shape=(30, 30), batch_size=4
    )
    assert slice_batches(10, 4, 30 * 30 * 4) == [(0, False), (4, True), (6, True)]  # 3600-byte slices
    assert slice_batches(10, 4, 32 * 32 * 4) == [(0, False), (4, False), (6, False)]
    pipe = make(spec)
    pipe.run(_volume((10, 40, 36)))  # the fake TensorRT asserts every address it gets is aligned
    assert pipe.backend.enqueued == [(4, 1, 30, 30)] * 3


def test_sliding_window_accumulates_every_window_once_with_full_batches(fake_gpu):
    make, _ = fake_gpu
    spec = SPECS["3d-sliding"]  # batches of 5
    pipe = make(spec)
    pipe.run(_volume((9, 30, 28)))
    windows = [
        tuple(x.value for x in args[-3:]) for n, args in pipe.kernels.launches if n == "sw_accumulate_f32"
    ]
    assert len(windows) == len(set(windows)) == 12 and len(windows) % 5  # and a short last batch
    assert set(pipe.backend.enqueued) == {(5, 1, 8, 16, 16)} and len(pipe.backend.enqueued) == 3
    extracts = [n for n, _ in pipe.kernels.launches if n == "sw_extract"]
    assert len(extracts) == 3 * 5  # the short batch is filled up to the engine's shape


def test_graph_key_covers_baked_values(fake_gpu):
    make, _ = fake_gpu
    pipe = make(SPECS["3d-barriers"])
    vol = _volume()

    def key(**kw):
        staged = [pipe._stage_source(0, vol.stored)]
        plans, (orient, _, grid) = plan_volumes(vol, pipe.spec, [lay for _, lay in staged])
        labels = pipe._bufs.get("labels", int(np.prod(grid)))
        return pipe._program(plans, [p for p, _ in staged], plans[0].padded, grid, labels.ptr, 0).key()

    first = key()
    assert key() == first  # same inputs, same buffers: the same graph
    pipe._bufs.get("scratch0_1", 1 << 24)  # a reallocated scratch buffer moves a baked pointer
    assert key() != first
    second = key()
    vol.slope[:] = 1.0  # uniform rescale: other kernel parameters (slope0, rescale mode)
    vol.intercept[:] = 0.0
    assert key() != second


def test_graphs_are_captured_on_second_sight_and_dropped_on_shape_change(fake_gpu, monkeypatch):
    import edgeseg.cuda.pipeline as P

    make, _ = fake_gpu
    events: list[str] = []

    class FakeGraph:
        def __init__(self, stream, enqueue) -> None:
            self.enqueue = enqueue

        def capture(self) -> bool:
            events.append("capture")
            return True

        def run(self) -> None:
            events.append("replay")

        def close(self) -> None:
            events.append("close")

    monkeypatch.setattr(P, "GraphRunner", FakeGraph)
    pipe = make(SPECS["3d-fused"], use_graphs=True)
    a, b, c = _volume(), _volume((7, 40, 36)), _volume((30, 40, 36))  # b: a's engine shape, c: another
    enqueues = pipe.backend.enqueued
    pipe.run(a)
    assert (events, len(enqueues)) == ([], 1)  # first sight: plain
    pipe.run(a)
    assert events == ["capture", "replay"] and len(enqueues) == 1
    pipe.run(a)
    assert events[-1] == "replay" and len(enqueues) == 1
    pipe.run(b)  # other launches, same TensorRT shape: plain, a's graph is kept
    assert len(events) == 3 and len(enqueues) == 2
    pipe.run(b)
    pipe.run(a)
    assert events[3:] == ["capture", "replay", "replay"] and len(enqueues) == 2
    pipe.run(c)  # another TensorRT shape: every graph of the old one goes, c runs plainly
    assert events[6:] == ["close", "close"] and len(enqueues) == 3
    pipe.run(c)
    assert events[-2:] == ["capture", "replay"]


# -- layouts ------------------------------------------------------------------------------------
def test_host_arrays_are_planned_in_their_staged_layout():
    from edgeseg.cuda.pipeline import host_layout

    spec = SPECS["3d-fused"]
    vol = _volume()
    vol.stored = np.asfortranarray(vol.stored)  # e.g. straight from a NIfTI reader
    own = plan_volumes(vol, spec)[0][0]
    staged = plan_volumes(vol, spec, [host_layout(vol.stored)])[0][0]
    assert own.src_strides != staged.src_strides  # the bug this guards against is possible here
    want = R.resample_channel(vol.stored, own)  # the array's own strides on the array itself
    got = R.resample_channel(np.ascontiguousarray(vol.stored), staged)  # what the kernel reads
    np.testing.assert_array_equal(got, want)


def test_labels_gather_to_the_source_grid_like_the_cpu_path():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            orient = Orientation(perm, flips)
            src = tuple(int(v) for v in RNG.integers(3, 12, 3))
            oriented = orient.model_shape(src)
            grid = tuple(
                int(g) if RNG.random() > 0.3 else o for g, o in zip(RNG.integers(2, 15, 3), oriented)
            )
            labels = RNG.integers(0, 255, grid).astype(np.uint8)
            want = np.ascontiguousarray(orient.from_model(resample(labels, oriented, "nearest", (0, 1, 2))))
            np.testing.assert_array_equal(
                R.gather_labels(labels, source_tables(orient, grid, src), src), want
            )
    # and through a real plan (oblique orientation, resampling on every axis)
    vol = _volume()
    prepared = Preprocessor(SPECS["3d-fused"])(vol)
    labels = RNG.integers(0, 3, prepared.grid).astype(np.uint8)
    table = source_tables(prepared.orientation, prepared.grid, vol.shape)
    np.testing.assert_array_equal(
        R.gather_labels(labels, table, vol.shape), labels_to_source(labels, prepared)
    )


# -- parameter structs, field by field -------------------------------------------------------------
@pytest.mark.parametrize("struct,kernel_file", [(PreParams, "preprocess.cu"), (PostParams, "postprocess.cu")])
def test_param_struct_fields_sit_where_the_kernels_read_them(struct, kernel_file):
    pytest.importorskip("cuda.bindings")
    name = struct.__name__
    checks = (
        "".join(
            f'static_assert(__builtin_offsetof({name}, {f}) == {getattr(struct, f).offset}, "{f}");\n'
            f'static_assert(sizeof((({name}*)0)->{f}) == {getattr(struct, f).size}, "{f} size");\n'
            for f, *_ in struct._fields_
        )
        + f'static_assert(sizeof({name}) == {ctypes.sizeof(struct)}, "size");\n'
    )
    compiler = BindingsNvrtc()
    _, log = compiler.compile(kernel_source(kernel_file) + checks, "layout.cu", compile_options("sm_75"))
    assert log == ""
    last = struct._fields_[-1][0]
    wrong = (
        f'static_assert(__builtin_offsetof({name}, {last}) == {getattr(struct, last).offset + 4}, "moved");'
    )
    with pytest.raises(Exception, match="static assertion failed"):  # the check can fail
        compiler.compile(kernel_source(kernel_file) + wrong, "layout.cu", compile_options("sm_75"))


# -- interop streams -----------------------------------------------------------------------------
def test_cuda_array_interface_stream_is_carried_and_dlpack_gets_ours():
    from edgeseg.cuda.interop import as_device_view, from_cuda_array_interface

    class Cai:
        def __init__(self, stream) -> None:
            self.__cuda_array_interface__ = {"shape": (4,), "typestr": "<i2", "data": (8192, False),
                                             "version": 3, "stream": stream}  # fmt: skip

    assert from_cuda_array_interface(Cai(77)).stream == 77
    assert from_cuda_array_interface(Cai(None)).stream is None
    v2 = Cai(5)
    del v2.__cuda_array_interface__["stream"]
    v2.__cuda_array_interface__["version"] = 2
    assert from_cuda_array_interface(v2).stream == 1  # no stream said: after the legacy default stream
    with pytest.raises(ValueError, match="stream 0"):
        from_cuda_array_interface(Cai(0))

    class Producer:
        """A device DLPack producer that says which stream it was asked to order its work on."""

        def __init__(self, device_type: int) -> None:
            self.asked: list = []
            self._host = np.arange(6, dtype=np.int16)
            self.device_type = device_type

        def __dlpack_device__(self):
            return (self.device_type, 0)

        def __dlpack__(self, stream=None):
            self.asked.append(stream)
            return self._host.__dlpack__()

    cpu = Producer(1)
    assert as_device_view(cpu, 1234) is None and cpu.asked == []  # host memory: never asked
    dev = Producer(2)
    as_device_view(dev, 1234)
    assert dev.asked == [1234]
    both = Producer(2)  # a PyTorch tensor offers both: DLPack, which can order its writes, wins
    both.__cuda_array_interface__ = {"shape": (6,), "typestr": "<i2", "data": (8192, False), "version": 2}
    as_device_view(both, 99)
    assert both.asked == [99]


# -- pinned pool ------------------------------------------------------------------------------------
class _HostBuf:
    closed = 0

    def __init__(self, n, mapped) -> None:
        self._mem = np.zeros(n, np.uint8)
        self.ptr, self.nbytes = self._mem.ctypes.data, n
        self.device_ptr = self.ptr + (1 << 40) if mapped else 0

    def close(self) -> None:
        _HostBuf.closed += 1


def test_pinned_pool_arrays_own_their_memory_and_recycle_it():
    from edgeseg.cuda.memory import PinnedPool

    _HostBuf.closed = 0
    pool = PinnedPool(mapped=True, keep=1, factory=_HostBuf)
    a = pool.allocate((3, 4, 5), np.int16)
    assert a.shape == (3, 4, 5) and a.dtype == np.int16 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 7
    view = a[1:]
    buf = pool.lookup(view)
    assert buf is not None and pool.lookup(np.zeros(3)) is None
    address = a.ctypes.data
    del a
    gc.collect()
    assert pool.idle == 0 and int(view.sum()) == 7 * 40  # a view keeps the memory
    del view
    gc.collect()
    assert pool.idle == 1 and _HostBuf.closed == 0
    b = pool((2, 4, 5), np.int16)  # fits the idle buffer: reused, not allocated
    assert b.ctypes.data == address and pool.idle == 0
    c = pool((100,), np.float32)
    del b, c
    gc.collect()
    assert pool.idle == 1 and _HostBuf.closed == 1  # keep=1: the second idle buffer is freed
    pool.close()
    assert _HostBuf.closed == 2


# -- frees during a graph capture ---------------------------------------------------------------
def test_frees_wait_for_the_end_of_a_capture_and_failures_are_logged(caplog):
    import edgeseg.cuda.memory as M

    freed: list[int] = []

    class Runtime:
        def cudaMalloc(self, n):
            return (0, 0x1000 + len(freed) * 0x100)

        def cudaFree(self, ptr):
            freed.append(ptr)
            return (0,)

    buf = M.DeviceBuffer.__new__(M.DeviceBuffer)
    buf._rt, buf.nbytes, buf.ptr = Runtime(), 16, 0x1000
    with M.capture_scope():
        with M.capture_scope():  # nested: only the outermost end releases
            buf.close()
        assert freed == [] and M.capturing_here()
    assert freed == [0x1000] and not M.capturing_here()
    # A failing free is reported (the memory would leak), not raised from a finalizer.
    bad = M.DeviceBuffer.__new__(M.DeviceBuffer)
    bad._rt = types.SimpleNamespace(cudaFree=lambda ptr: (2,))
    bad.nbytes, bad.ptr = 16, 0x2000
    with caplog.at_level("WARNING", logger="edgeseg"):
        bad.close()
    assert "cudaFree of 0x2000 failed" in caplog.text and bad.ptr == 0
