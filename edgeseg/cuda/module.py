"""Load the compiled kernels and launch them; the ctypes mirrors of the kernels' parameter structs."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from edgeseg.cuda._api import check, driver_module
from edgeseg.cuda.memory import Stream
from edgeseg.cuda.nvrtc import KERNEL_FILES, BindingsNvrtc, compile_cached

BLOCK = 256  # threads a block; stats.cu's block reduction assumes a power of two ≤ 256
MAX_BLOCKS = 4096  # kernels loop grid-stride, so this only bounds the launch


class PreParams(ctypes.Structure):
    """``struct PreParams`` of preprocess.cu (same field order and types)."""

    _fields_ = [
        *[
            (n, ctypes.c_uint64)
            for n in (
                "src",
                "off0",
                "off1",
                "weight",
                "zi0",
                "zi1",
                "slope",
                "intercept",
                "ops",
                "stats",
                "dst",
            )
        ],  # fmt: skip
        ("dst_stride", ctypes.c_int64 * 4),
        ("grid", ctypes.c_int * 3),
        ("padded", ctypes.c_int * 3),
        ("base", ctypes.c_int * 3),
        ("order", ctypes.c_int * 3),
        *[(n, ctypes.c_int) for n in ("zaxis", "linear", "rescale_mode", "n_ops", "channel", "dst_half")],
        ("pad_value", ctypes.c_float),
        ("slope0", ctypes.c_float),
        ("intercept0", ctypes.c_float),
        ("unused", ctypes.c_int),
    ]


class PostParams(ctypes.Structure):
    """``struct PostParams`` of postprocess.cu."""

    _fields_ = [
        ("logits", ctypes.c_uint64),
        ("labels", ctypes.c_uint64),
        ("confidence", ctypes.c_uint64),
        ("label_values", ctypes.c_uint64),
        ("n_offset", ctypes.c_int64),
        ("N", ctypes.c_int),
        ("K", ctypes.c_int),
        ("S", ctypes.c_int * 3),
        ("G", ctypes.c_int * 3),
        ("mode", ctypes.c_int),
        ("activation", ctypes.c_int),
        ("n_labels", ctypes.c_int),
        ("threshold", ctypes.c_float),
    ]


def blocks_for(n: int) -> int:
    return max(1, min((int(n) + BLOCK - 1) // BLOCK, MAX_BLOCKS))


class Kernels:
    """Every edgeseg kernel, compiled (or taken from the cubin cache) for ``arch`` and loaded."""

    def __init__(self, arch: str) -> None:
        self._drv = driver_module()
        self.arch = arch
        compiler = BindingsNvrtc()
        self._modules = []
        self._functions: dict[str, object] = {}
        for name in KERNEL_FILES:
            cubin = compile_cached(name, arch, compiler)
            self._modules.append(check(self._drv.cuModuleLoadData(cubin), f"loading {name} for {arch}"))

    def function(self, name: str) -> object:
        fn = self._functions.get(name)
        if fn is None:
            for mod in self._modules:
                err, f = self._drv.cuModuleGetFunction(mod, name.encode())
                if int(err) == 0:
                    fn = self._functions[name] = f
                    break
            else:
                raise KeyError(f"no kernel named {name!r}")
        return fn

    def launch(self, name: str, n: int, args: Sequence[ctypes._SimpleCData | ctypes.Structure],
               stream: Stream, *, blocks: int | None = None, threads: int = BLOCK) -> None:  # fmt: skip
        """Launch ``name`` over ``n`` items (grid-stride) with ``args`` (ctypes values, in order)."""
        # cuLaunchKernel takes the address of an array of pointers to the argument values; the
        # driver copies the values at launch (and at graph capture), so locals suffice.
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        check(
            self._drv.cuLaunchKernel(
                self.function(name),
                blocks or blocks_for(n),
                1,
                1,
                threads,
                1,
                1,
                0,
                stream.stream,
                ctypes.addressof(pointers),
                0,
            ),  # fmt: skip
            f"launching {name}",
        )

    def close(self) -> None:
        for mod in self._modules:
            self._drv.cuModuleUnload(mod)
        self._modules.clear()
        self._functions.clear()
