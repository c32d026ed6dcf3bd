"""The CUDA runtime, driver and NVRTC that edgeseg.cuda calls, modelled on the CPU.

:func:`install` puts ``cuda``, ``cuda.bindings`` and ``cuda.bindings.{runtime,driver,nvrtc}``
into ``sys.modules`` (before anything imports the real ones), so every line of
``edgeseg.cuda`` — ``module.Kernels`` and its ``cuLaunchKernel`` argument packing,
``memory.DeviceBuffer``/``PinnedPool``, ``graph.GraphRunner``, ``pipeline.GpuPipeline`` — runs
unchanged, and the kernels it launches are the real ``.cu`` files compiled by :mod:`.build`:

* NVRTC "compiles" a kernel file into a CPU shared library (the "cubin" is its path);
  ``cuModuleLoadData`` loads it, ``cuLaunchKernel`` calls its ``cpu_launch_<kernel>`` entry;
* device memory is host memory from ``posix_memalign`` (256-byte aligned like ``cudaMalloc``, and
  exactly the size asked, so ASan's redzones sit right after the last byte), copies are
  ``memmove`` (ASan checks both ranges) after checking the device side lies in one live
  allocation;
* work runs synchronously at submission; events record the host clock; stream capture records
  launches (with their argument bytes copied, as the driver does), copies and event records
  into a graph that ``cudaGraphLaunch`` replays. Calls that are illegal while a capture is open
  (allocation, frees, synchronisation) fail with ``cudaErrorStreamCaptureUnsupported`` and
  invalidate the capture, as on the device.

It runs in the sanitized child process only (see :mod:`.plugin` and tests/test_kernels_on_cpu.py).
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from . import build

TOTAL_MEMORY = 8 << 30
ALIGN = 256  # cudaMalloc's guarantee, which TensorRT's setTensorAddress relies on


class cudaError_t(enum.IntEnum):  # noqa: N801 - CUDA's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureWrongThread = 908
    cudaErrorCapturedEvent = 907
    cudaErrorLaunchFailure = 719


class CUresult(enum.IntEnum):  # noqa: N801
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_IMAGE = 200
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_LAUNCH_FAILED = 719


class nvrtcResult(enum.IntEnum):  # noqa: N801
    NVRTC_SUCCESS = 0
    NVRTC_ERROR_COMPILATION = 6


OK = cudaError_t.cudaSuccess
E = cudaError_t

_libc = ctypes.CDLL(None)  # under LD_PRELOAD=libasan.so these resolve to ASan's interceptors
_libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p


@dataclass
class Capture:
    thread: int
    nodes: list = field(default_factory=list)
    invalid: str | None = None


class CpuDevice:
    """All the state of the modelled device; ``integrated`` picks Jetson-like mapped memory."""

    def __init__(self) -> None:
        self.integrated = False
        self.device_allocs: dict[int, int] = {}  # ptr -> nbytes
        self.host_allocs: dict[int, int] = {}
        self.streams: set[int] = {0, 1, 2}  # legacy, per-thread default handles
        self.events: dict[int, float | None] = {}
        self.captures: dict[int, Capture] = {}  # stream -> open capture
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.modules: dict[int, ctypes.CDLL] = {}
        self.functions: dict[int, tuple[ctypes.CDLL, str, object]] = {}
        self.next_handle = 0x1000
        self.launches: list[str] = []  # kernel names, in order (what a run executed)
        self.grids: list[int] = []  # gridDim.x of each launch, in the same order
        self.pending_sizes: list[int] | None = None
        self.reverse = 0  # barrier kernels: fiber schedule forward (0) or reversed (1)
        self.log: list[str] = []  # why a call failed, for the test's messages

    def handle(self) -> int:
        self.next_handle += 16
        return self.next_handle

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, err: E, why: str) -> E:
        self.log.append(why)
        return err

    def capture_guard(self, what: str) -> E | None:
        """Calls that are illegal while the calling thread captures (thread-local mode)."""
        me = threading.get_ident()
        for cap in self.captures.values():
            if cap.thread == me:
                cap.invalid = cap.invalid or f"{what} during stream capture"
                return self.fail(E.cudaErrorStreamCaptureUnsupported, f"{what} called during stream capture")
        return None

    def in_device(self, ptr: int, n: int) -> bool:
        for base, size in self.device_allocs.items():
            if base <= ptr and ptr + n <= base + size:
                return True
        if self.integrated:  # mapped pinned memory is device-addressable
            for base, size in self.host_allocs.items():
                if base <= ptr and ptr + n <= base + size:
                    return True
        return False

    def submit(self, stream: int, op, what: str) -> E:
        if stream not in self.streams:
            return self.fail(E.cudaErrorInvalidResourceHandle, f"{what} on unknown stream {stream:#x}")
        cap = self.captures.get(stream)
        if cap is not None:
            if cap.thread != threading.get_ident():
                return self.fail(E.cudaErrorStreamCaptureWrongThread, f"{what} from another thread")
            cap.nodes.append(op)
            return OK
        return op()


DEVICE = CpuDevice()


# -- runtime --------------------------------------------------------------------------------
def _alloc(n: int, align: int) -> int:
    p = ctypes.c_void_p()
    if _libc.posix_memalign(ctypes.byref(p), align, max(int(n), 1)) != 0:
        return 0
    return int(p.value)


def _poison(ptr: int, n: int) -> None:
    _libc.memset(ptr, 0xA7, n)  # cudaMalloc'd memory is not zeroed: never read zeros by luck


class _Props:
    def __init__(self) -> None:
        self.name = b"CPU model of CUDA (tests/cuda_on_cpu)\0"
        self.major, self.minor = 8, 7
        self.totalGlobalMem = TOTAL_MEMORY


def _runtime() -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaError_t = cudaError_t
    rt.cudaStreamNonBlocking = 1
    rt.cudaEventDefault, rt.cudaEventDisableTiming, rt.cudaEventBlockingSync = 0, 2, 1
    rt.cudaEventRecordDefault, rt.cudaEventRecordExternal = 0, 1
    rt.cudaHostAllocDefault, rt.cudaHostAllocMapped = 0, 2
    rt.cudaMemcpyKind = enum.IntEnum(
        "cudaMemcpyKind",
        {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
         "cudaMemcpyDeviceToDevice": 3, "cudaMemcpyDefault": 4},
    )  # fmt: skip
    rt.cudaDeviceAttr = enum.IntEnum("cudaDeviceAttr", {"cudaDevAttrIntegrated": 18})
    rt.cudaStreamCaptureMode = enum.IntEnum(
        "cudaStreamCaptureMode",
        {"cudaStreamCaptureModeGlobal": 0, "cudaStreamCaptureModeThreadLocal": 1,
         "cudaStreamCaptureModeRelaxed": 2},
    )  # fmt: skip
    d = DEVICE

    def cudaGetDeviceCount():
        return OK, 1

    def cudaSetDevice(i):
        return OK if int(i) == 0 else E.cudaErrorInvalidDevice

    def cudaGetDeviceProperties(i):
        return OK, _Props()

    def cudaDeviceGetAttribute(attr, i):
        return OK, int(d.integrated)

    def cudaFree(ptr):
        ptr = int(ptr)
        if ptr == 0:  # context initialisation idiom
            return d.capture_guard("cudaFree") or OK
        err = d.capture_guard("cudaFree")
        if err:
            return err
        if ptr not in d.device_allocs:
            return d.fail(E.cudaErrorInvalidValue, f"cudaFree of {ptr:#x}, not a live allocation")
        del d.device_allocs[ptr]
        _libc.free(ptr)
        return OK

    def cudaMalloc(n):
        err = d.capture_guard("cudaMalloc")
        if err:
            return err, 0
        ptr = _alloc(n, ALIGN)
        if not ptr:
            return E.cudaErrorMemoryAllocation, 0
        _poison(ptr, max(int(n), 1))
        d.device_allocs[ptr] = max(int(n), 1)
        return OK, ptr

    def cudaHostAlloc(n, flags):
        err = d.capture_guard("cudaHostAlloc")
        if err:
            return err, 0
        ptr = _alloc(n, 4096)
        if not ptr:
            return E.cudaErrorMemoryAllocation, 0
        d.host_allocs[ptr] = max(int(n), 1)
        return OK, ptr

    def cudaHostGetDevicePointer(ptr, flags):
        ptr = int(ptr)
        if ptr not in d.host_allocs:
            return d.fail(E.cudaErrorInvalidValue, "cudaHostGetDevicePointer of unpinned memory"), 0
        return OK, ptr

    def cudaFreeHost(ptr):
        err = d.capture_guard("cudaFreeHost")
        if err:
            return err
        ptr = int(ptr)
        if ptr not in d.host_allocs:
            return d.fail(E.cudaErrorInvalidValue, f"cudaFreeHost of {ptr:#x}, not pinned memory")
        del d.host_allocs[ptr]
        _libc.free(ptr)
        return OK

    def cudaMemGetInfo():
        used = sum(d.device_allocs.values())
        return OK, TOTAL_MEMORY - used, TOTAL_MEMORY

    def cudaMemcpyAsync(dst, src, n, kind, stream):
        dst, src, n, kind = int(dst), int(src), int(n), int(kind)
        if kind in (1, 3) and not d.in_device(dst, n):
            return d.fail(
                E.cudaErrorInvalidValue, f"copy of {n} bytes to {dst:#x}: not inside one device buffer"
            )
        if kind in (2, 3) and not d.in_device(src, n):
            return d.fail(
                E.cudaErrorInvalidValue, f"copy of {n} bytes from {src:#x}: not inside one device buffer"
            )

        def op():
            ctypes.memmove(dst, src, n)
            return OK

        return d.submit(int(stream), op, "cudaMemcpyAsync")

    def cudaMemsetAsync(ptr, value, n, stream):
        ptr, value, n = int(ptr), int(value), int(n)
        if not d.in_device(ptr, n):
            return d.fail(
                E.cudaErrorInvalidValue, f"memset of {n} bytes at {ptr:#x}: not inside one device buffer"
            )

        def op():
            _libc.memset(ptr, value, n)
            return OK

        return d.submit(int(stream), op, "cudaMemsetAsync")

    def cudaStreamCreateWithFlags(flags):
        h = d.handle()
        d.streams.add(h)
        return OK, h

    def cudaStreamDestroy(s):
        d.streams.discard(int(s))
        return OK

    def cudaStreamSynchronize(s):
        return d.capture_guard("cudaStreamSynchronize") or OK

    def cudaEventCreate():
        h = d.handle()
        d.events[h] = None
        return OK, h

    def cudaEventCreateWithFlags(flags):
        return cudaEventCreate()

    def cudaEventDestroy(e):
        d.events.pop(int(e), None)
        return OK

    def _record(e, s, external):
        e = int(e)
        if e not in d.events:
            return d.fail(E.cudaErrorInvalidResourceHandle, "record of an unknown event")
        cap = d.captures.get(int(s))
        if cap is not None and not external:
            # Inside a capture a plain record only orders work; the event is then unusable for timing.
            d.events[e] = "captured"
            return OK

        def op():
            d.events[e] = time.perf_counter()
            return OK

        return d.submit(int(s), op, "cudaEventRecord")

    def cudaEventRecord(e, s):
        return _record(e, s, False)

    def cudaEventRecordWithFlags(e, s, flags):
        if int(flags) == 1 and int(s) not in d.captures:
            return d.fail(E.cudaErrorInvalidValue, "cudaEventRecordExternal outside a capture")
        return _record(e, s, int(flags) == 1)

    def cudaStreamWaitEvent(s, e, flags):
        return OK  # everything already ran in submission order

    def cudaEventSynchronize(e):
        return d.capture_guard("cudaEventSynchronize") or OK

    def cudaEventElapsedTime(a, b):
        ta, tb = d.events.get(int(a)), d.events.get(int(b))
        if ta == "captured" or tb == "captured":
            return E.cudaErrorCapturedEvent, 0.0
        if ta is None or tb is None:
            return d.fail(E.cudaErrorInvalidResourceHandle, "elapsed time of an event never recorded"), 0.0
        return OK, (tb - ta) * 1e3

    def cudaStreamBeginCapture(s, mode):
        s = int(s)
        if s in (0, 1, 2):
            return d.fail(E.cudaErrorStreamCaptureUnsupported, "capture on a default stream")
        if s in d.captures:
            return d.fail(E.cudaErrorInvalidValue, "capture already open on this stream")
        d.captures[s] = Capture(threading.get_ident())
        return OK

    def cudaStreamEndCapture(s):
        cap = d.captures.pop(int(s), None)
        if cap is None:
            return d.fail(E.cudaErrorInvalidValue, "no capture open"), None
        if cap.invalid:
            return d.fail(E.cudaErrorStreamCaptureInvalidated, cap.invalid), None
        h = d.handle()
        d.graphs[h] = cap.nodes
        return OK, h

    def cudaGraphInstantiate(g, flags):
        h = d.handle()
        d.execs[h] = list(d.graphs[int(g)])
        return OK, h

    def cudaGraphLaunch(x, s):
        if int(s) in d.captures:
            return d.fail(E.cudaErrorStreamCaptureUnsupported, "graph launch during capture")
        for op in d.execs[int(x)]:
            err = op()
            if int(err) != 0:
                return err
        return OK

    def cudaGraphDestroy(g):
        d.graphs.pop(int(g), None)
        return OK

    def cudaGraphExecDestroy(x):
        d.execs.pop(int(x), None)
        return OK

    for name, fn in list(locals().items()):
        if name.startswith("cuda") and callable(fn):
            setattr(rt, name, fn)
    return rt


# -- driver ---------------------------------------------------------------------------------
def _driver() -> types.ModuleType:
    drv = types.ModuleType("cuda.bindings.driver")
    drv.CUresult = CUresult
    d = DEVICE

    def cuModuleLoadData(image):
        path = Path(bytes(image).rstrip(b"\0 ").decode())
        if not path.is_file():
            return CUresult.CUDA_ERROR_INVALID_IMAGE, None
        h = d.handle()
        d.modules[h] = ctypes.CDLL(str(path))
        return CUresult.CUDA_SUCCESS, h

    def cuModuleGetFunction(mod, name):
        lib = d.modules[int(mod)]
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            entry = getattr(lib, f"cpu_launch_{name}")
        except AttributeError:
            return CUresult.CUDA_ERROR_NOT_FOUND, None
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.cuda_cpu_error.restype = ctypes.c_char_p
        params = getattr(lib, f"cpu_params_{name}")
        params.restype, params.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]
        buf = (ctypes.c_ulonglong * 64)()
        sizes = list(buf[: params(buf, 64)])
        h = d.handle()
        d.functions[h] = (lib, name, entry, sizes)
        return CUresult.CUDA_SUCCESS, h

    def cuModuleUnload(mod):
        d.modules.pop(int(mod), None)
        return CUresult.CUDA_SUCCESS

    def cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        lib, name, entry, sizes = d.functions[int(f)]
        given = d.pending_sizes  # known when the launch came through Kernels.launch
        d.pending_sizes = None
        if given is not None and list(given) != sizes:
            return d.fail(
                CUresult.CUDA_ERROR_INVALID_VALUE,
                f"{name}: argument sizes {given} passed, the kernel's parameters are {sizes}",
            )
        n = len(sizes)
        # The driver copies the argument values at launch (and at capture): so do we.
        ptrs = (ctypes.c_void_p * n).from_address(int(params)) if n else []
        values = [
            ctypes.create_string_buffer(ctypes.string_at(ptrs[i], sizes[i]), sizes[i]) for i in range(n)
        ]
        grid = (ctypes.c_uint * 3)(gx, gy, gz)
        block = (ctypes.c_uint * 3)(bx, by, bz)
        sz = (ctypes.c_ulonglong * max(n, 1))(*sizes)
        reverse = d.reverse

        def op():
            argv = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(v) for v in values])
            d.launches.append(name)
            d.grids.append(int(gx))
            if entry(grid, block, int(shmem), argv, sz, n, reverse) != 0:
                return d.fail(CUresult.CUDA_ERROR_LAUNCH_FAILED, lib.cuda_cpu_error().decode())
            return CUresult.CUDA_SUCCESS

        return d.submit(int(stream), op, f"launch of {name}")

    for name, fn in list(locals().items()):
        if name.startswith("cu") and callable(fn):
            setattr(drv, name, fn)
    return drv


# -- NVRTC ----------------------------------------------------------------------------------
def _nvrtc() -> types.ModuleType:
    nv = types.ModuleType("cuda.bindings.nvrtc")
    nv.nvrtcResult = nvrtcResult
    programs: dict[int, dict] = {}
    S = nvrtcResult.NVRTC_SUCCESS

    def nvrtcVersion():
        return S, 0, 0  # "version 0.0": the CPU model, its own cubin cache key

    def nvrtcCreateProgram(src, name, n, headers, names):
        h = DEVICE.handle()
        programs[h] = {"src": src.decode(), "name": name.decode(), "image": b"", "log": b""}
        return S, h

    def nvrtcCompileProgram(prog, n, opts):
        p = programs[int(prog)]
        try:
            common, text = build.split_common(p["src"])
            tag = ""
            mutations = json.loads(os.environ.get("EDGESEG_CPU_KERNEL_MUTATION") or "[]")
            for m in [mutations] if isinstance(mutations, dict) else mutations:
                if m["file"] != p["name"]:
                    continue
                if text.count(m["old"]) != 1:
                    raise build.TranslationError(f"mutation {m['old']!r} does not occur once in {p['name']}")
                text, tag = text.replace(m["old"], m["new"]), "mutant"
            lib = build.compile_library(p["name"], text, common, tag=tag)
        except build.TranslationError as exc:
            p["log"] = str(exc).encode()
            return (nvrtcResult.NVRTC_ERROR_COMPILATION,)
        p["image"] = str(lib.path).encode()
        return (S,)

    def nvrtcGetProgramLogSize(prog):
        return S, len(programs[int(prog)]["log"]) + 1

    def _copy_into(buf, data: bytes) -> None:
        # cuda-python writes into the caller's bytes object; so does this
        ctypes.memmove(ctypes.c_char_p(buf), data, min(len(data), len(buf)))

    def nvrtcGetProgramLog(prog, buf):
        _copy_into(buf, programs[int(prog)]["log"])
        return (S,)

    def nvrtcGetCUBINSize(prog):
        return S, len(programs[int(prog)]["image"])

    def nvrtcGetCUBIN(prog, buf):
        _copy_into(buf, programs[int(prog)]["image"])
        return (S,)

    def nvrtcDestroyProgram(prog):
        programs.pop(int(prog), None)
        return (S,)

    for name, fn in list(locals().items()):
        if name.startswith("nvrtc") and callable(fn):
            setattr(nv, name, fn)
    return nv


def install() -> CpuDevice:
    """Make ``cuda.bindings`` the CPU model in this process; returns the modelled device."""
    if "edgeseg.cuda._api" in sys.modules or "cuda.bindings.runtime" in sys.modules:
        raise RuntimeError("install() must run before anything imports CUDA")
    cuda = types.ModuleType("cuda")
    cuda.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.runtime, bindings.driver, bindings.nvrtc = _runtime(), _driver(), _nvrtc()
    cuda.bindings = bindings
    sys.modules.update({"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": bindings.runtime,
                        "cuda.bindings.driver": bindings.driver, "cuda.bindings.nvrtc": bindings.nvrtc})  # fmt: skip

    # cuLaunchKernel receives only pointers; the real driver knows each parameter's size from the
    # cubin. Kernels.launch (unchanged, it does the packing) is wrapped to tell the model the sizes
    # of the ctypes values it packs, so a wrong-width argument fails the launch instead of
    # reading neighbouring bytes as the GPU would.
    from edgeseg.cuda import module

    real_launch = module.Kernels.launch

    def launch(self, name, n, args, stream, **kw):
        DEVICE.pending_sizes = [ctypes.sizeof(a) for a in args]
        return real_launch(self, name, n, args, stream, **kw)

    module.Kernels.launch = launch
    return DEVICE
