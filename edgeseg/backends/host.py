"""The machine a CPU engine runs on (what its compiled code and measured speed depend on), and
the per-user cache root every engine cache lives under. Imports no engine."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """Per-user cache root: ``$EDGESEG_CACHE`` or ``~/.cache/edgeseg`` (no CUDA import)."""
    root = os.environ.get("EDGESEG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "edgeseg"


# ISA features that change which CPU kernels an engine picks (and so its speed and, for int8 and
# bf16, its numbers). Two hosts with the same model name and these flags run the same code.
_ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "bf16",
)  # fmt: skip


@dataclass(frozen=True)
class HostCpu:
    """What a CPU engine and a measured engine choice depend on."""

    model: str  # /proc/cpuinfo model name (or platform.processor())
    isa: tuple[str, ...]
    threads: int

    @property
    def slug(self) -> str:
        """A folder name: model name, then 8 hex digits of the ISA flags (threads excluded:
        a compiled model runs with any thread count)."""
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.model).strip("-").lower()[:40] or "cpu"
        digest = hashlib.sha256(",".join(self.isa).encode()).hexdigest()[:8]
        return f"{name}_{digest}"

    def to_dict(self) -> dict:
        return {"model": self.model, "isa": list(self.isa), "threads": self.threads, "slug": self.slug}


def host_cpu(threads: int | None = None) -> HostCpu:
    """This machine's CPU (Linux reads /proc/cpuinfo; elsewhere the platform's name only)."""
    import platform

    from edgeseg.backends.onnxruntime import default_threads

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "cpu"
    return HostCpu(model, tuple(f for f in _ISA_FLAGS if f in flags), threads or default_threads())
