"""Compile the CUDA C kernels with NVRTC, for the device's arch, with a cubin cache on disk.

Two ways to reach NVRTC, same interface:

* :class:`BindingsNvrtc` — cuda-python (``cuda.bindings.nvrtc``, or ``cuda.nvrtc`` on 12.x):
  what the runtime uses;
* :class:`CtypesNvrtc` — any ``libnvrtc.so`` through ctypes (the C API is a handful of
  functions). cuda-bindings 13 binds only NVRTC 13, so CI compiles the kernels with CUDA 12's
  NVRTC (what JetPack 6 ships) this way.

No GPU is needed to compile.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from importlib import resources
from pathlib import Path

from edgeseg._exceptions import BackendError
from edgeseg.atomic import write_bytes_atomic

KERNEL_FILES = ("preprocess.cu", "stats.cu", "postprocess.cu", "sliding_window.cu")
COMMON_FILE = "_common.cu"
# fmad off: the numpy references round after every multiply and add (see _common.cu).
# NVRTC has no -Werror: compile_cached and the tests require an empty log instead.
BASE_OPTIONS = ("--fmad=false", "--std=c++17")


def kernel_source(name: str) -> str:
    """The compilable source of kernel file ``name``: the shared prelude + the file."""
    pkg = resources.files("edgeseg.cuda") / "kernels"
    return (pkg / COMMON_FILE).read_text() + "\n" + (pkg / name).read_text()


def cache_dir() -> Path:
    """Per-user cache root: ``$EDGESEG_CACHE`` or ``~/.cache/edgeseg``."""
    root = os.environ.get("EDGESEG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "edgeseg"


class NvrtcError(BackendError):
    """NVRTC rejected a kernel; the message carries NVRTC's log."""


class BindingsNvrtc:
    """NVRTC through cuda-python (``cuda.bindings.nvrtc`` or, on cuda-python 12.x, ``cuda.nvrtc``)."""

    def __init__(self) -> None:
        from edgeseg.cuda._api import nvrtc_module

        self._nvrtc = nvrtc_module()

    def _check(self, result: tuple, what: str, prog: object = None) -> tuple:
        err, *rest = result
        if int(err) != 0:
            log = self._log(prog) if prog is not None else ""
            raise NvrtcError(f"NVRTC {what} failed ({err.name if hasattr(err, 'name') else err}){log}")
        return tuple(rest)

    def _log(self, prog: object) -> str:
        nv = self._nvrtc
        err, size = nv.nvrtcGetProgramLogSize(prog)
        if int(err) != 0 or size <= 1:
            return ""
        buf = b" " * size
        nv.nvrtcGetProgramLog(prog, buf)
        return ":\n" + buf.rstrip(b"\x00 ").decode(errors="replace")

    def version(self) -> tuple[int, int]:
        major, minor = self._check(self._nvrtc.nvrtcVersion(), "version")
        return int(major), int(minor)

    def compile(self, source: str, name: str, options: list[str]) -> tuple[bytes, str]:
        """Compile ``source`` to a cubin; returns (cubin, log). Raises :class:`NvrtcError`."""
        nv = self._nvrtc
        (prog,) = self._check(nv.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "create")
        try:
            opts = [o.encode() for o in options]
            err = nv.nvrtcCompileProgram(prog, len(opts), opts)[0]
            log = self._log(prog)
            if int(err) != 0:
                raise NvrtcError(f"NVRTC could not compile {name} ({err.name}){log}")
            (size,) = self._check(nv.nvrtcGetCUBINSize(prog), "cubin size", prog)
            buf = b" " * size
            self._check(nv.nvrtcGetCUBIN(prog, buf), "cubin", prog)
            return bytes(buf), log.lstrip(":\n")
        finally:
            nv.nvrtcDestroyProgram(prog)


class CtypesNvrtc:
    """NVRTC through ctypes on a given ``libnvrtc.so`` (e.g. CUDA 12's ``libnvrtc.so.12``)."""

    def __init__(self, library: str | os.PathLike) -> None:
        try:
            self._lib = ctypes.CDLL(os.fspath(library))
        except OSError as exc:
            raise BackendError(f"cannot load NVRTC from {library}: {exc}") from None
        lib = self._lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for fn in ("nvrtcGetProgramLog", "nvrtcGetCUBIN"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise NvrtcError(f"NVRTC {what} failed ({self._lib.nvrtcGetErrorString(code).decode()})")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return major.value, minor.value

    def compile(self, source: str, name: str, options: list[str]) -> tuple[bytes, str]:
        lib = self._lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "create",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            code = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            if code != 0:
                msg = lib.nvrtcGetErrorString(code).decode()
                raise NvrtcError(f"NVRTC could not compile {name} ({msg}):\n{log}")
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
            return cubin.raw, log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_options(arch: str) -> list[str]:
    """NVRTC options for ``arch`` (e.g. "sm_87"): real-arch cubin, no FMA contraction."""
    return [f"--gpu-architecture={arch}", *BASE_OPTIONS]


def compile_cached(name: str, arch: str, compiler: BindingsNvrtc | CtypesNvrtc | None = None) -> bytes:
    """The cubin of kernel file ``name`` for ``arch``, from the disk cache or freshly compiled.

    The cache key is the source hash, the options, the arch and the NVRTC version, so an edited
    kernel, another GPU or another toolkit never reuses a stale cubin.
    """
    compiler = compiler or BindingsNvrtc()
    source = kernel_source(name)
    options = compile_options(arch)
    major, minor = compiler.version()
    key = hashlib.sha256("\0".join([source, *options]).encode()).hexdigest()[:24]
    path = cache_dir() / "kernels" / f"nvrtc-{major}.{minor}" / arch / f"{Path(name).stem}-{key}.cubin"
    if path.is_file():
        return path.read_bytes()
    cubin, log = compiler.compile(source, name, options)
    if log:  # warnings are errors: the kernels must compile clean on every NVRTC we support
        raise NvrtcError(f"NVRTC warned on {name} for {arch}:\n{log}")
    try:
        write_bytes_atomic(path, cubin, fsync=False)
    except OSError:  # a read-only home must not stop inference; the cubin is still usable
        pass
    return cubin
