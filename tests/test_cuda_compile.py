"""Every kernel compiles with NVRTC, warning-free, for the arches we ship to: with CUDA 13's NVRTC
(cuda-bindings 13) and with CUDA 12's NVRTC (what JetPack 6 has), the latter through ctypes in
a subprocess (loading libnvrtc.so.12 into this process would shadow cuda-bindings' libnvrtc)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from edgeseg.cuda.nvrtc import KERNEL_FILES, compile_options, kernel_source

ARCHES_13 = ("sm_75", "sm_87", "sm_89", "sm_90", "sm_110")
ARCHES_12 = ("sm_75", "sm_87", "sm_89", "sm_90")


def _nvrtc12_path() -> str | None:
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12"))
        if hits:
            return hits[0]
    return None


_CHILD = """
import json, sys
from edgeseg.cuda.nvrtc import CtypesNvrtc, KERNEL_FILES, compile_options, kernel_source
c = CtypesNvrtc(sys.argv[1])
out = {"version": c.version(), "results": []}
for name in KERNEL_FILES:
    for arch in sys.argv[2:]:
        try:
            cubin, log = c.compile(kernel_source(name), name, compile_options(arch))
            out["results"].append([name, arch, len(cubin), log])
        except Exception as exc:
            out["results"].append([name, arch, 0, str(exc)])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def nvrtc12_run():
    """Start the CUDA 12 compile in a subprocess right away, so it overlaps the in-process one."""
    path = _nvrtc12_path()
    if path is None:
        yield None
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, path, *ARCHES_12], stdout=subprocess.PIPE, text=True
    )
    yield proc
    proc.kill() if proc.poll() is None else None


def test_kernels_compile_with_cuda13_nvrtc(nvrtc12_run):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings is not installed")
    from edgeseg.cuda.nvrtc import BindingsNvrtc

    try:
        compiler = BindingsNvrtc()
        major, _ = compiler.version()
    except Exception as exc:  # libnvrtc.so.13 missing
        pytest.skip(f"NVRTC is not available: {exc}")
    assert major >= 13, nvrtc
    for name in KERNEL_FILES:
        for arch in ARCHES_13:
            cubin, log = compiler.compile(kernel_source(name), name, compile_options(arch))
            assert cubin[:4] == b"\x7fELF", (name, arch)
            assert log == "", f"{name} for {arch} warns:\n{log}"


def test_kernels_compile_with_cuda12_nvrtc(nvrtc12_run):
    if nvrtc12_run is None:
        pytest.skip("CUDA 12 NVRTC (nvidia-cuda-nvrtc-cu12's libnvrtc.so.12) is not installed")
    stdout, _ = nvrtc12_run.communicate(timeout=120)
    data = json.loads(stdout)
    assert tuple(data["version"])[0] == 12
    assert len(data["results"]) == len(KERNEL_FILES) * len(ARCHES_12)
    for name, arch, size, log in data["results"]:
        assert size > 0, f"{name} for {arch}: {log}"
        assert log == "", f"{name} for {arch} warns:\n{log}"


def test_compile_cache_reuses_cubins(tmp_path, monkeypatch):
    pytest.importorskip("cuda.bindings.nvrtc")
    from edgeseg.cuda import nvrtc

    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path))
    calls = []

    class Counting(nvrtc.BindingsNvrtc):
        def compile(self, *a):
            calls.append(a[1])
            return super().compile(*a)

    try:
        c = Counting()
        c.version()
    except Exception as exc:
        pytest.skip(f"NVRTC is not available: {exc}")
    first = nvrtc.compile_cached("postprocess.cu", "sm_87", c)
    again = nvrtc.compile_cached("postprocess.cu", "sm_87", c)
    assert first == again and calls == ["postprocess.cu"]
    files = list((tmp_path / "kernels").rglob("*.cubin"))
    assert len(files) == 1 and "sm_87" in str(files[0]) and "nvrtc-13" in str(files[0])
