"""What this machine can run, and for each missing piece why not and how to install it.

Every probe is independent and never raises: a missing library, a driver too old for the
bindings or an unreadable file each become one line, so the report is complete even on a box
where half of it is absent. Nothing here starts a GPU context unless a driver answers.
"""

from __future__ import annotations

import ctypes
import importlib.metadata as md
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """One line of the report: ``ok`` says whether it is usable; ``fix`` how to get it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)  # what `--backend` can use here
    gpu_path: str = ""  # one sentence: can the GPU path run, and if not what is missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "checks": [asdict(c) for c in self.checks],
            "engines": self.engines,
            "gpu_path": self.gpu_path,
        }


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu(report: Report) -> None:
    from edgeseg.backends.host import host_cpu

    host = host_cpu()
    isa = set(host.isa)
    if platform.machine() in ("aarch64", "arm64"):
        wanted = [("NEON", "asimd"), ("dot product", "asimddp"), ("int8 matmul", "i8mm")]
    else:
        wanted = [("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"), ("AMX", "amx_int8")]
    flags = ", ".join(f"{label} {'yes' if flag in isa else 'no'}" for label, flag in wanted)
    report.checks.append(Check("CPU", True, f"{host.model}, {host.threads} usable threads; {flags}"))


def _cpu_engines(report: Report) -> None:
    ort, ort_gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    if ort or ort_gpu:
        try:
            import onnxruntime

            providers = ", ".join(onnxruntime.get_available_providers())
            report.checks.append(Check("ONNX Runtime", True, f"{onnxruntime.__version__} ({providers})"))
            report.engines.append("onnxruntime")
        except Exception as exc:  # a broken wheel: say so, never a traceback
            report.checks.append(Check("ONNX Runtime", False, f"installed but fails to import: {exc}",
                                       "pip install --force-reinstall onnxruntime"))  # fmt: skip
    else:
        report.checks.append(Check("ONNX Runtime", False, "not installed", "pip install onnxruntime"))
    if ort and ort_gpu:
        report.checks.append(Check("ONNX Runtime packages", False,
                                   f"both onnxruntime {ort} and onnxruntime-gpu {ort_gpu} are installed: "
                                   "they overwrite each other's files",
                                   "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime"))  # fmt: skip
    try:
        import openvino

        report.checks.append(Check("OpenVINO", True, openvino.__version__.split("-")[0]))
        report.engines.append("openvino")
    except ImportError:
        report.checks.append(Check("OpenVINO", False, "not installed (the fastest CPU engine on x86 and "
                                   "aarch64 with glibc ≥ 2.35)", "pip install openvino"))  # fmt: skip


def _driver_version() -> tuple[str | None, str]:
    """(CUDA version the driver supports, e.g. "12.6", or None; a detail line)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return (
                f"{v.value // 1000}.{(v.value % 1000) // 10}",
                f"libcuda supports CUDA {v.value // 1000}.{(v.value % 1000) // 10}",
            )
        return None, "libcuda loads but does not report a version"
    text = ""
    try:
        text = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except OSError:
        pass
    return None, ("no libcuda.so.1 (" + (text or "no NVIDIA kernel driver") + ")")


def _jetson() -> str | None:
    try:
        model = Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        return None
    if "jetson" not in model.lower() and "orin" not in model.lower() and "thor" not in model.lower():
        return None
    release = ""
    try:
        release = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    except OSError:
        pass
    return f"{model}" + (f" ({release})" if release else "")


def _gpu(report: Report) -> None:
    jetson = _jetson()
    if jetson:
        report.checks.append(Check("Jetson", True, jetson))
    cuda_major, driver_detail = _driver_version()
    report.checks.append(Check("NVIDIA driver", cuda_major is not None, driver_detail,
                               "" if cuda_major else "install the NVIDIA driver (JetPack on Jetson)"))  # fmt: skip
    cu = "12" if (cuda_major or "12").startswith("12") else "13"
    bindings = _version("cuda-bindings") or _version("cuda-python")
    if bindings is None:
        report.checks.append(Check("cuda-bindings", False, "not installed",
                                   f"pip install 'edgeseg[gpu-cu{cu}]'"))  # fmt: skip
    else:
        ok = cuda_major is None or int(bindings.split(".")[0]) <= int(cuda_major.split(".")[0])
        detail = f"{bindings}" + (
            ""
            if ok
            else f": needs a driver for CUDA {bindings.split('.')[0]}, this one supports {cuda_major}"
        )
        report.checks.append(Check("cuda-bindings", ok, detail,
                                   "" if ok else f"pip install 'edgeseg[gpu-cu{cuda_major.split('.')[0]}]'"))  # fmt: skip
    nvrtc_ok, nvrtc_detail = False, "not found"
    try:
        from edgeseg.cuda.nvrtc import BindingsNvrtc

        major, minor = BindingsNvrtc().version()
        nvrtc_ok, nvrtc_detail = True, f"{major}.{minor}"
    except Exception as exc:
        nvrtc_detail = (
            f"not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        )
    report.checks.append(Check("NVRTC", nvrtc_ok, nvrtc_detail,
                               "" if nvrtc_ok else f"pip install 'nvidia-cuda-nvrtc-cu{cu}'" if cu == "12" else "pip install 'nvidia-cuda-nvrtc>=13'"))  # fmt: skip
    gpus = 0
    if cuda_major is not None and bindings is not None:
        from edgeseg.cuda.device import device_count, device_info

        gpus = device_count()
        for i in range(gpus):
            try:
                d = device_info(i)
                kind = "integrated" if d.integrated else "discrete"
                report.checks.append(
                    Check(f"GPU {i}", True, f"{d.name}, {d.sm}, {d.total_memory / 2**30:.1f} GiB, {kind}")
                )
            except Exception as exc:
                report.checks.append(Check(f"GPU {i}", False, f"cannot be opened: {exc}"))
    if gpus == 0:
        report.checks.append(Check("GPU", False, "no CUDA device visible"))
    try:
        import tensorrt

        has_lib = True
        try:
            tensorrt.Logger()
        except Exception:  # bindings without libnvinfer
            has_lib = False
        report.checks.append(Check("TensorRT", has_lib, f"{tensorrt.__version__}" + ("" if has_lib else ": bindings only, libnvinfer missing"),
                                   "" if has_lib else "install TensorRT's libraries (JetPack on Jetson; NVIDIA's pip index on x86)"))  # fmt: skip
        trt_ok = has_lib
    except Exception:
        trt_ok = False
        report.checks.append(Check("TensorRT", False, "not installed",
                                   "JetPack ships it on Jetson; on x86: pip install tensorrt-cu12 (or tensorrt-cu13)"))  # fmt: skip
    ort_cuda = False
    try:
        import onnxruntime

        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except Exception:
        pass
    if gpus and nvrtc_ok and (trt_ok or ort_cuda):
        engine = "tensorrt" if trt_ok else "onnxruntime-cuda"
        report.engines.append(engine)
        report.gpu_path = f"the GPU path can run: {engine}, NVRTC and a CUDA device are all here"
    else:
        missing = [c.name for c in report.checks if not c.ok and c.name in
                   ("NVIDIA driver", "cuda-bindings", "NVRTC", "GPU")]  # fmt: skip
        if not (trt_ok or ort_cuda):
            missing.append("an engine (TensorRT, or onnxruntime-gpu in place of onnxruntime)")
        report.gpu_path = "the GPU path cannot run here: missing " + ", ".join(missing)


def _cache(report: Report) -> None:
    from edgeseg.backends.host import cache_root

    root = cache_root()
    parts = []
    for sub, pattern in (("engines", "*.plan"), ("openvino", "*.blob"), ("choices", "*.json")):
        n = sum(1 for _ in (root / sub).rglob(pattern)) if (root / sub).is_dir() else 0
        parts.append(f"{n} {sub}")
    report.checks.append(Check("engine cache", True, f"{root}: " + ", ".join(parts)))


def diagnose() -> Report:
    """The whole report (each probe guarded: one failing probe is one line, not a crash)."""
    report = Report()
    report.checks.append(Check("Python", sys.version_info >= (3, 10), f"{platform.python_version()} on {platform.machine()}",
                               "" if sys.version_info >= (3, 10) else "edgeseg needs Python 3.10+"))  # fmt: skip
    for probe in (_cpu, _cpu_engines, _gpu, _cache):
        try:
            probe(report)
        except Exception as exc:
            report.checks.append(
                Check(
                    probe.__name__.strip("_"), False, f"the check itself failed: {type(exc).__name__}: {exc}"
                )
            )
    return report
