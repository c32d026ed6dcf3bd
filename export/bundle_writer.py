"""Writing bundles (build time). The runtime reader is :mod:`edgeseg.bundle`."""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from pathlib import Path
from typing import Any

from edgeseg.atomic import atomic_path
from edgeseg.bundle import MANIFEST, SCHEMA_VERSION, Bundle
from edgeseg.spec import ModelSpec


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("edgeseg", "torch", "onnx", "onnxruntime", "numpy", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__: simply not recorded
            continue
    return out


def write_bundle(
    path: str | Path,
    *,
    spec: ModelSpec,
    models: dict[str, bytes],
    name: str,
    version: str = "1",
    description: str = "",
    provenance: dict[str, Any] | None = None,
    accuracy: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """Write a bundle atomically and return its path.

    Parameters
    ----------
    models:
        precision ("fp32", "fp16", "int8", "int8_cpu") → ONNX bytes. "fp32" is required.
    extra_members:
        other members (engines, timing caches, calibration ranges), name → bytes.
    """
    if "fp32" not in models:
        raise ValueError("a bundle always carries the fp32 model ('models' lacks 'fp32')")
    members: dict[str, bytes] = {f"model.{p}.onnx": data for p, data in models.items()}
    members.update(extra_members or {})
    prov = {"versions": _versions(), **(provenance or {})}
    manifest = {
        "schema": SCHEMA_VERSION,
        "model": {"name": name, "version": version, "description": description},
        "spec": spec.to_dict(),
        "artifacts": {p: f"model.{p}.onnx" for p in models},
        "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in members.items()},
        "provenance": prov,
        "accuracy": accuracy or {},
        "runtime": runtime or {"cpu_precision": "fp32"},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        # ZIP_STORED: engines and models can be read (or mapped) without inflating.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            for n, d in members.items():
                zf.writestr(n, d)
    return path


def rewrite_bundle(
    source: str | Path,
    target: str | Path,
    *,
    models: dict[str, bytes] | None = None,
    manifest_updates: dict[str, Any] | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """Copy a bundle adding/replacing models and top-level manifest sections."""
    b = Bundle.open(source)
    all_models = {p: b.onnx(p) for p in b.precisions}
    all_models.update(models or {})
    extras = {
        n: b.read(n)
        for n in b._members
        if n.startswith(("engines/", "extra/")) or n == "acceptance.npz"  # kept with its models
    }
    extras.update(extra_members or {})
    m = dict(b.manifest)
    m.update(manifest_updates or {})
    return write_bundle(
        target,
        spec=b.spec,
        models=all_models,
        name=m["model"]["name"],
        version=m["model"].get("version", "1"),
        description=m["model"].get("description", ""),
        provenance=m.get("provenance"),
        accuracy=m.get("accuracy"),
        runtime=m.get("runtime"),
        extra_members=extras,
    )
