"""TensorRT engines keyed by what they depend on, cached per user.

An engine only runs with the TensorRT version and GPU (compute capability) it was built for,
and it encodes one ONNX file at one precision. The cache path spells the key out::

    $EDGESEG_CACHE (default ~/.cache/edgeseg)/engines/<trt-version>/<sm>_<gpu-slug>/<onnx-sha256>-<precision>-<profile>.plan

with a metadata JSON next to it. ``<profile>`` fingerprints the spec fields the optimization
profile is built from (batch size, patch/target shape, divisibility, channels), so one ONNX
shipped with another spec never reuses an engine whose profile rejects its shapes. Opening checks the metadata first, so a mismatched engine is
refused with a sentence naming both sides (:class:`EngineMismatchError`), never handed to the
deserializer. A missing engine is built once from the bundle's ONNX, with progress, and written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeseg._exceptions import BackendError, EngineMismatchError
from edgeseg.atomic import write_bytes_atomic
from edgeseg.backends.host import cache_root
from edgeseg.spec import ModelSpec

log = logging.getLogger("edgeseg")
# Precisions TensorRT builds from (int8_cpu is the ORT-CPU-tuned variant), best first.
TRT_PRECISIONS = ("int8", "fp16", "fp32")


@dataclass(frozen=True)
class EngineKey:
    trt_version: str
    sm: str  # "sm_87"
    gpu: str  # device name slug
    onnx_sha256: str
    precision: str
    profile: str = ""  # profile_id(spec); empty only for keys built by hand

    @property
    def relative_path(self) -> Path:
        suffix = f"-{self.profile}" if self.profile else ""
        return (
            Path("engines")
            / self.trt_version
            / f"{self.sm}_{self.gpu}"
            / f"{self.onnx_sha256}-{self.precision}{suffix}.plan"
        )


def profile_id(spec: ModelSpec) -> str:
    """12 hex digits naming what :func:`edgeseg.export.tensorrt_build.profile_shapes` reads."""
    fields = {
        "dims": spec.dims,
        "in_channels": spec.in_channels,
        "batch_size": spec.batch_size,
        "patch_size": list(spec.patch_size) if spec.patch_size is not None else None,
        "target_shape": list(spec.target_shape) if spec.target_shape is not None else None,
        "divisible_by": spec.divisible_by,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def engine_path(key: EngineKey, root: Path | None = None) -> Path:
    return (root or cache_root()) / key.relative_path


def check_metadata(meta: dict, key: EngineKey, where: str) -> None:
    """Raise :class:`EngineMismatchError` when ``meta`` was built for another TRT version or GPU."""
    theirs = (meta.get("trt_version"), meta.get("sm"))
    if theirs != (key.trt_version, key.sm):
        raise EngineMismatchError(
            f"the engine {where} was built with TensorRT {theirs[0]} for {theirs[1]} "
            f"({meta.get('gpu_name', 'unknown GPU')}), but this machine has TensorRT {key.trt_version} "
            f"on {key.sm} ({key.gpu}); it will not be used — rebuild it here"
        )
    if (
        meta.get("onnx_sha256") not in (None, key.onnx_sha256)
        or meta.get("precision") not in (None, key.precision)
        or meta.get("profile") not in (None, "", key.profile)
    ):
        raise EngineMismatchError(
            f"the engine {where} encodes another model or precision ({meta.get('precision')}, ONNX "
            f"{str(meta.get('onnx_sha256'))[:12]}…) than requested ({key.precision}, ONNX {key.onnx_sha256[:12]}…)"
        )


def current_key(
    onnx_sha256: str, precision: str, device_index: int = 0, spec: ModelSpec | None = None
) -> EngineKey:
    from edgeseg._optional import require
    from edgeseg.cuda.device import device_info

    trt = require("tensorrt", extra="gpu", feature="The TensorRT backend")
    dev = device_info(device_index)
    profile = profile_id(spec) if spec is not None else ""
    return EngineKey(str(trt.__version__), dev.sm, dev.slug, onnx_sha256, precision, profile)


def load_or_build(
    onnx_bytes: bytes,
    onnx_sha256: str,
    spec: ModelSpec,
    precision: str,
    *,
    key: EngineKey | None = None,
    root: Path | None = None,
    workspace_mb: int | None = None,
    echo: Callable[[str], None] | None = None,
    builder: Callable[..., bytes] | None = None,
) -> tuple[bytes, Path, bool]:
    """The engine bytes for this GPU: from the cache, or built now and cached.

    Returns ``(plan, path, built)``. ``builder`` defaults to
    :func:`edgeseg.export.tensorrt_build.build_engine` (injectable for tests).
    """
    key = key or current_key(onnx_sha256, precision, spec=spec)
    path = engine_path(key, root)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        check_metadata(json.loads(meta_path.read_text()), key, str(path))
        return path.read_bytes(), path, False
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    echo(f"no TensorRT engine for {key.precision} on {key.sm} ({key.gpu}) with TensorRT {key.trt_version} "
         f"yet: building it once, cached at {path}")  # fmt: skip
    if builder is None:
        from edgeseg.export.tensorrt_build import build_engine as builder
    timing = path.parent / "timing.cache"
    plan = builder(onnx_bytes, spec, workspace_mb=workspace_mb, timing_cache=timing, echo=echo)
    write_bytes_atomic(path, plan)
    meta = {**asdict(key), "gpu_name": key.gpu, "spec": spec.to_dict()}
    write_bytes_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return plan, path, True


def check_bundle_engine(member: str, key: EngineKey) -> None:
    """Refuse an engine stored in a bundle at ``engines/<trt>/<sm>/<precision>.plan`` that was
    built for another TensorRT version or GPU (the path is its metadata)."""
    parts = Path(member).parts
    if len(parts) != 4 or parts[0] != "engines":
        raise BackendError(f"bundle engine '{member}' is not at engines/<trt>/<sm>/<precision>.plan")
    sm = parts[2].split("_", 2)
    sm_value = "_".join(sm[:2]) if len(sm) >= 2 else parts[2]
    meta = {"trt_version": parts[1], "sm": sm_value, "precision": Path(parts[3]).stem}
    check_metadata(meta, key, f"'{member}' in the bundle")


def build_engines_for_bundle(bundle_path: str | Path, *, workspace_mb: int | None = None) -> list[str]:
    """Build (or find cached) engines for every TensorRT-suitable precision of a bundle on this
    GPU; returns warnings (one per precision that could not be built)."""
    from edgeseg.bundle import Bundle

    b = Bundle.open(bundle_path)
    warnings: list[str] = []
    for precision in (p for p in TRT_PRECISIONS if p in b.artifacts):
        try:
            sha = b.sha256(b.artifacts[precision])
            load_or_build(b.onnx(precision), sha, b.spec, precision, workspace_mb=workspace_mb)
        except BackendError as exc:
            warnings.append(f"{precision}: {exc}")
    return warnings
