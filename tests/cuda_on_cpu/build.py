"""Compile edgeseg's real kernel files for the CPU against cuda_cpu.h, with ASan + UBSan.

Each ``edgeseg/cuda/kernels/*.cu`` file is compiled unchanged except for three mechanical
rewrites, each of which refuses what it does not understand rather than guess:

* ``_common.cu`` is prepended as on the GPU, with its inline PTX (``asm("cvt…")``) replaced by
  the equivalent C++ of ``cuda_cpu::ptx``;
* every ``__shared__ T name[n];`` becomes a per-block heap array (see cuda_cpu.h);
* one ``extern "C" cpu_launch_<kernel>`` entry per ``extern "C" __global__`` kernel is appended,
  taking grid, block, shared bytes and cuLaunchKernel's ``void** args`` (plus each argument's
  size, which the entry checks against the kernel's parameters).

Kernels whose call graph reaches ``__syncthreads`` run their blocks as fibers; the others run
their threads one after another (cuda_cpu.h says why that is a legal schedule, and aborts if
a "barrier-free" kernel reaches a barrier after all). One shared library per file, like one
CUDA module per file, cached by the hash of everything that goes into it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_cpu.h"
KERNEL_DIR = HERE.parents[1] / "edgeseg" / "cuda" / "kernels"

CXX = os.environ.get("CXX", "g++")
SANITIZERS = "address,undefined,float-cast-overflow"
FLAGS = [
    "-std=c++20", "-O1", "-g", f"-fsanitize={SANITIZERS}", "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer", "-ffp-contract=off", "-shared", "-fPIC",
]  # fmt: skip
# --fmad=false on the GPU; -ffp-contract=off here: both round after every multiply and add.

PTX = {
    "cvt.f32.f16 %0, %1;": "::cuda_cpu::ptx::cvt_f32_f16",
    "cvt.rn.f16.f32 %0, %1;": "::cuda_cpu::ptx::cvt_rn_f16_f32",
}
_ASM = re.compile(
    r'asm\s*(?:volatile\s*)?\(\s*"([^"]*)"\s*:\s*"=\w"\s*\(\s*(\w+)\s*\)\s*:\s*"\w"\s*\(\s*(\w+)\s*\)\s*\)\s*;'
)
_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w\s]*?)\s+(\w+\s*\[[^;]*);")
_DECL = re.compile(r"^(\w+)\s*\[([^\[\]]+)\]$")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_FUNC = re.compile(r"\b(\w+)\s*(?:<[^<>;{}()]*>)?\s*\(([^(){};]*)\)\s*(?:const\s*)?\{")
_CALL = re.compile(r"\b(\w+)\s*(?:<[^<>;{}()]*>)?\s*\(")
_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "catch"}


class TranslationError(RuntimeError):
    """The kernel source uses something the CPU model does not translate."""


def translate_ptx(src: str, name: str) -> str:
    def repl(m: re.Match) -> str:
        fn = PTX.get(m.group(1).strip())
        if fn is None:
            raise TranslationError(f"{name}: no CPU translation for PTX {m.group(1)!r}")
        return f"{m.group(2)} = {fn}({m.group(3)});"

    out = _ASM.sub(repl, src)
    if re.search(r"\basm\b", out):
        raise TranslationError(f"{name}: an asm statement the CPU model cannot parse")
    return out


def rewrite_shared(src: str, name: str, first_site: int = 0) -> tuple[str, int]:
    if re.search(r"extern\s+__shared__", src):
        raise TranslationError(f"{name}: dynamic shared memory (extern __shared__) is not modelled")
    site = first_site

    def repl(m: re.Match) -> str:
        nonlocal site
        ctype = " ".join(m.group(1).split())
        parts = []
        for decl in m.group(2).split(","):
            d = _DECL.match(decl.strip())
            if d is None:
                raise TranslationError(f"{name}: unsupported __shared__ declaration {m.group(0)!r}")
            parts.append(
                f"{ctype}* const {d.group(1)} = ::cuda_cpu::shared_array<{ctype}>(({d.group(2)}), {site});"
            )
            site += 1
        return " ".join(parts) + "\n" * m.group(0).count("\n")  # keep line numbers

    out = _SHARED.sub(repl, src)
    if "__shared__" in out:
        raise TranslationError(f"{name}: a __shared__ use the CPU model does not rewrite")
    return out, site


def _top_level_functions(src: str) -> dict[str, str]:
    """name -> concatenated bodies of every top-level function definition of that name."""
    depth = [0] * (len(src) + 1)
    d = 0
    for i, ch in enumerate(src):
        depth[i] = d
        d += (ch == "{") - (ch == "}")
    bodies: dict[str, str] = {}
    for m in _FUNC.finditer(src):
        if m.group(1) in _KEYWORDS or depth[m.start()] != 0:
            continue
        start, level = m.end() - 1, 0
        for j in range(start, len(src)):
            level += (src[j] == "{") - (src[j] == "}")
            if level == 0:
                bodies[m.group(1)] = bodies.get(m.group(1), "") + src[start : j + 1]
                break
    return bodies


def barrier_kernels(src: str) -> dict[str, bool]:
    """For each ``extern "C" __global__`` kernel: does its call graph reach ``__syncthreads``?"""
    bodies = _top_level_functions(src)
    calls = {f: {c for c in _CALL.findall(b) if c in bodies and c != f} for f, b in bodies.items()}
    syncs = {f for f, b in bodies.items() if "__syncthreads" in b}
    changed = True
    while changed:
        changed = False
        for f, cs in calls.items():
            if f not in syncs and cs & syncs:
                syncs.add(f)
                changed = True
    kernels = _KERNEL.findall(src)
    missing = [k for k in kernels if k not in bodies]
    if missing:
        raise TranslationError(f"kernel definitions not found by the scan: {missing}")
    return {k: k in syncs for k in kernels}


def split_common(source: str) -> tuple[str, str]:
    """(prelude, file) of a source as nvrtc.kernel_source builds it: the real _common.cu, or none."""
    common = (KERNEL_DIR / "_common.cu").read_text()
    if source.startswith(common + "\n"):
        return common, source[len(common) + 1 :]
    return "", source


def cpu_source(name: str, text: str | None = None, common: str | None = None) -> tuple[str, dict[str, bool]]:
    """The C++ translation unit for kernel file ``name`` (``text``: its source, default the real
    file; ``common``: the prelude, default the real _common.cu)."""
    real = text is None
    common = common if common is not None else (KERNEL_DIR / "_common.cu").read_text()
    text = text if text is not None else (KERNEL_DIR / name).read_text()
    common_cpu, site = rewrite_shared(translate_ptx(common, "_common.cu"), "_common.cu")
    body, _ = rewrite_shared(translate_ptx(text, name), name, site)
    kernels = barrier_kernels(common + "\n" + text)
    entries = []
    for k, bar in kernels.items():
        entries += [
            f'extern "C" int cpu_launch_{k}(const unsigned* g, const unsigned* b, unsigned long long shmem, '
            f"void** args, const unsigned long long* sizes, int n, int reverse) {{",
            f'    return ::cuda_cpu::launch(&{k}, "{k}", {str(bar).lower()}, g, b, shmem, args, sizes, n, reverse);',
            "}",
            f'extern "C" int cpu_params_{k}(unsigned long long* out, int cap) {{',
            f"    return ::cuda_cpu::param_sizes(&{k}, out, cap);",
            "}",
        ]
    where = KERNEL_DIR / name if real or (KERNEL_DIR / name).is_file() else name
    src = "\n".join(
        [
            f'#include "{HEADER}"',
            f'#line 1 "{KERNEL_DIR / "_common.cu"}"',
            common_cpu,
            f'#line 1 "{where}"',
            body,
            '#line 1 "cpu_launch_entries"',
            *entries,
            "",
        ]
    )
    return src, kernels


@dataclass
class Library:
    name: str
    path: Path
    kernels: dict[str, bool]  # kernel -> uses __syncthreads


def cache_root() -> Path:
    root = Path(
        os.environ.get(
            "EDGESEG_CPU_KERNEL_CACHE", Path(tempfile.gettempdir()) / f"edgeseg-cuda-on-cpu-{os.getuid()}"
        )
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def _compiler_id() -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True, env=env).stdout


def compile_library(
    name: str, text: str | None = None, common: str | None = None, *, tag: str = ""
) -> Library:
    """Compile (or take from the cache) the CPU library of kernel file ``name``."""
    src, kernels = cpu_source(name, text, common)
    key = hashlib.sha256("\0".join([src, HEADER.read_text(), *FLAGS, _compiler_id()]).encode()).hexdigest()[
        :20
    ]
    stem = Path(name).stem + (f"-{tag}" if tag else "")
    out = cache_root() / f"{stem}-{key}.so"
    if not out.is_file():
        cpp = out.with_suffix(".cpp")
        cpp.write_text(src)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # not g++ under ASan
        proc = subprocess.run(
            [CXX, *FLAGS, "-o", str(tmp), str(cpp)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            raise TranslationError(f"{CXX} could not compile {name} for the CPU:\n{proc.stderr[-6000:]}")
        os.replace(tmp, out)
    return Library(name, out, kernels)


def compile_all(names: list[str], texts: dict[str, str] | None = None) -> list[Library]:
    texts = texts or {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda n: compile_library(n, texts.get(n)), names))
