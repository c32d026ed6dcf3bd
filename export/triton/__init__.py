"""``edgeseg export-triton``: a Triton Inference Server model repository that serves a bundle.

Layout written (``<model>`` defaults to the bundle's name)::

    REPO/<model>/config.pbtxt      Python backend, instance_group, inputs/outputs, parameters
    REPO/<model>/1/model.py        edgeseg.export.triton.model, copied verbatim
    REPO/<model>/1/<bundle file>   the bundle (copied, or linked with link=True)

CPU servers run the bundle on edgeseg's CPU engines (``KIND_CPU`` instances); ``gpu=True``
writes ``KIND_GPU`` instances whose model opens edgeseg's TensorRT backend: the TensorRT plan is
built on the server from the bundle's ONNX at first load (and cached), and the CUDA
preprocessing runs next to it in the same process.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeseg._exceptions import BundleError
from edgeseg.bundle import MANIFEST, Bundle

MODEL_FILE = Path(__file__).with_name("model.py")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TritonExport:
    """What was written: the repository, the model's folder and the bundle's identity."""

    repo: Path
    model_dir: Path
    model_name: str
    bundle_sha256: str
    config: str


def bundle_identity(bundle: Bundle) -> str:
    """sha256 of the bundle's manifest (which holds every member's sha256): the client checks
    that the server serves the very bundle it has."""
    return hashlib.sha256(bundle.read(MANIFEST)).hexdigest()


def model_name_for(bundle: Bundle) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", bundle.name).strip("-.") or "edgeseg"
    return name


def render_config(
    model_name: str,
    *,
    bundle_file: str,
    bundle_sha256: str,
    instances: int = 1,
    gpu: bool = False,
    max_batch: int = 0,
    backend: str | None = None,
    threads: int | None = None,
    tta: bool = True,
    precision: str | None = None,
) -> str:
    """config.pbtxt text. ``max_batch`` > 0 (2D models) adds a batch axis and dynamic batching."""
    dims3 = "[ -1, -1, -1 ]"
    inputs = [
        ("STORED_INT16", "TYPE_INT16", dims3, True),
        ("STORED_UINT16", "TYPE_UINT16", dims3, True),
        ("STORED_FP32", "TYPE_FP32", dims3, True),
        ("SLOPE", "TYPE_FP64", "[ -1 ]", False),
        ("INTERCEPT", "TYPE_FP64", "[ -1 ]", False),
        ("SPACING", "TYPE_FP64", "[ 3 ]", False),
        ("AFFINE", "TYPE_FP64", "[ 4, 4 ]", False),
    ]
    outputs = [("LABELS", "TYPE_UINT8", dims3), ("CONFIDENCE", "TYPE_UINT8", dims3)]
    lines = [
        f'name: "{model_name}"',
        'backend: "python"',
        f"max_batch_size: {int(max_batch)}",
    ]
    for name, dtype, dims, optional in inputs:
        opt = " optional: true" if optional else ""
        lines.append(f'input {{ name: "{name}" data_type: {dtype} dims: {dims}{opt} }}')
    for name, dtype, dims in outputs:
        lines.append(f'output {{ name: "{name}" data_type: {dtype} dims: {dims} }}')
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {int(instances)} kind: {kind} }} ]")
    if max_batch > 0:
        # Series of one shape that arrive together are handed to one execute() call.
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    params = {
        "BUNDLE": bundle_file,
        "BUNDLE_SHA256": bundle_sha256,
        "BACKEND": backend or ("tensorrt" if gpu else "cpu"),
        "TTA": "true" if tta else "false",
        # Each CPU instance is its own process: split the cores between them unless told.
        "THREADS": str(threads) if threads else "",
        "PRECISION": precision or "",
    }
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def write_repository(
    bundle_path: str | Path,
    repo_dir: str | Path,
    *,
    model_name: str | None = None,
    instances: int = 1,
    gpu: bool = False,
    max_batch: int = 0,
    backend: str | None = None,
    threads: int | None = None,
    tta: bool = True,
    precision: str | None = None,
    link: bool = False,
    version: int = 1,
) -> TritonExport:
    """Write (or replace) ``repo_dir/<model>`` serving the bundle; see the module docstring."""
    bundle = Bundle.open(bundle_path)
    if bundle.spec.in_channels > 1:
        raise BundleError(
            f"{bundle_path}: a {bundle.spec.in_channels}-channel model takes several co-registered "
            "series per request, which the Triton model does not serve yet"
        )
    if max_batch > 0 and bundle.spec.dims != 2:
        raise ValueError(
            "'--max-batch' (dynamic batching) applies to 2D models only; each 3D series is its own request"
        )
    if gpu and (backend or "tensorrt") == "tensorrt":
        from edgeseg.segmenter import gpu_unsupported

        missing = gpu_unsupported(bundle.spec)
        if missing:
            raise ValueError(
                f"the TensorRT path does not run {missing} yet: serve this bundle on CPU instances "
                "(no --gpu) or pass --backend onnxruntime"
            )
    if instances < 1:
        raise ValueError(f"'--instances' must be at least 1, got {instances}")
    name = model_name or model_name_for(bundle)
    if not _NAME_OK.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.' only")
    repo = Path(repo_dir)
    model_dir = repo / name
    version_dir = model_dir / str(version)
    if threads is None and not gpu and instances > 1:
        threads = max(1, (os.cpu_count() or 1) // instances)
    sha = bundle_identity(bundle)
    bundle_file = Path(bundle.path).name
    config = render_config(
        name,
        bundle_file=bundle_file,
        bundle_sha256=sha,
        instances=instances,
        gpu=gpu,
        max_batch=max_batch,
        backend=backend,
        threads=threads,
        tta=tta,
        precision=precision,
    )
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / bundle_file
    tmp = version_dir / f".{bundle_file}.tmp"
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    if link:
        tmp.symlink_to(Path(bundle.path).resolve())
    else:
        shutil.copyfile(bundle.path, tmp)
    os.replace(tmp, target)
    _write_text(version_dir / "model.py", MODEL_FILE.read_text())
    _write_text(model_dir / "config.pbtxt", config)
    return TritonExport(repo, model_dir, name, sha, config)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
