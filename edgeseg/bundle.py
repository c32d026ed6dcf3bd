"""Reading, verifying and describing a bundle (``.edgeseg``).

A bundle is a zip whose members are stored uncompressed: ``manifest.json``, ``model.fp32.onnx``
and optionally ``model.fp16.onnx``, ``model.int8.onnx`` (TensorRT-ready Q/DQ),
``model.int8_cpu.onnx`` (ONNX Runtime CPU-tuned Q/DQ) and ``engines/<trt>/<sm>/<precision>.plan``.
The manifest records the sha256 of every member; opening verifies all of them.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseg._exceptions import BundleError, SpecError
from edgeseg.spec import ModelSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int8_cpu")


@dataclass
class Bundle:
    """An opened, verified bundle. Members are read lazily from the zip (no extraction)."""

    path: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    _members: dict[str, zipfile.ZipInfo] = field(default_factory=dict, repr=False)
    _acceptance: Any = field(default=None, repr=False)

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Open and (by default) verify the bundle at ``path``.

        Raises :class:`BundleError` with one sentence for a missing file, a file that is not a
        bundle, a newer schema, or any member whose sha256 differs from the manifest.
        """
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: no such bundle file")
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise BundleError(f"{path}: not an edgeseg bundle ({exc})") from None
        with zf:
            members = {i.filename: i for i in zf.infolist()}
            if MANIFEST not in members:
                raise BundleError(f"{path}: not an edgeseg bundle (no {MANIFEST})")
            try:
                manifest = json.loads(zf.read(MANIFEST))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BundleError(f"{path}: the manifest is not valid JSON ({exc})") from None
            schema = manifest.get("schema")
            if not isinstance(schema, int):
                raise BundleError(f"{path}: the manifest has no schema version")
            if schema > SCHEMA_VERSION:
                raise BundleError(
                    f"{path}: bundle schema {schema} is newer than this edgeseg supports "
                    f"({SCHEMA_VERSION}); upgrade edgeseg to open it"
                )
            try:
                spec = ModelSpec.from_dict(manifest["spec"])
            except (KeyError, SpecError) as exc:
                raise BundleError(f"{path}: the manifest's spec is invalid ({exc})") from None
            bundle = cls(path, manifest, spec, members)
            if verify:
                bundle._verify(zf)
        return bundle

    def _verify(self, zf: zipfile.ZipFile) -> None:
        recorded: dict[str, str] = self.manifest.get("sha256", {})
        for name, info in self._members.items():
            if name == MANIFEST or info.is_dir():
                continue
            if name not in recorded:
                raise BundleError(f"{self.path}: member '{name}' is not listed in the manifest (tampered?)")
        for name, digest in recorded.items():
            if name not in self._members:
                raise BundleError(f"{self.path}: member '{name}' listed in the manifest is missing")
            h = hashlib.sha256()
            with zf.open(name) as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise BundleError(
                    f"{self.path}: member '{name}' does not match its recorded sha256 "
                    "(the bundle was modified or corrupted)"
                )

    # -- access -----------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        if name not in self._members:
            raise BundleError(f"{self.path}: no member '{name}' in this bundle")
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(name)

    def sha256(self, name: str) -> str:
        return self.manifest["sha256"][name]

    @property
    def artifacts(self) -> dict[str, str]:
        """precision → member name of each ONNX model in the bundle."""
        return dict(self.manifest.get("artifacts", {}))

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.artifacts]

    def onnx(self, precision: str = "fp32") -> bytes:
        if precision not in self.artifacts:
            raise BundleError(
                f"{self.path}: no {precision} model in this bundle; it has {', '.join(self.precisions)}"
            )
        return self.read(self.artifacts[precision])

    @property
    def cpu_precision(self) -> str:
        """The precision the build recorded as fastest on CPU among those that passed the gate."""
        choice = self.manifest.get("runtime", {}).get("cpu_precision", "fp32")
        return choice if choice in self.artifacts else "fp32"

    @property
    def acceptance(self):
        """The acceptance set (:class:`edgeseg.backends.acceptance.AcceptanceSet`) every engine
        built or compiled on a device is checked against, or None in bundles built without one."""
        from edgeseg.backends.acceptance import MEMBER, AcceptanceSet

        if MEMBER not in self._members:
            return None
        if self._acceptance is None:
            self._acceptance = AcceptanceSet.from_bytes(self.read(MEMBER), str(self.path))
        return self._acceptance

    @property
    def cpu_engines(self) -> dict[str, Any]:
        """The build's table of CPU engines × precisions (``{"host": …, "rows": […]}``)."""
        return dict((self.manifest.get("runtime") or {}).get("cpu_engines") or {})

    @property
    def engines(self) -> list[str]:
        return sorted(n for n in self._members if n.startswith("engines/") and n.endswith(".plan"))

    @property
    def name(self) -> str:
        return self.manifest.get("model", {}).get("name", self.path.stem)

    @property
    def version(self) -> str:
        return str(self.manifest.get("model", {}).get("version", "0"))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for ``edgeseg info``."""
        sizes = {name: self._members[m].file_size for name, m in self.artifacts.items() if m in self._members}
        return {
            "path": str(self.path),
            "schema": self.manifest.get("schema"),
            "model": self.manifest.get("model", {}),
            "labels": [
                {"value": lab.value, "name": lab.name, "color": list(lab.color)} for lab in self.spec.labels
            ],
            "dims": self.spec.dims,
            "in_channels": self.spec.in_channels,
            "precisions": self.precisions,
            "artifact_bytes": sizes,
            "cpu_precision": self.cpu_precision,
            "cpu_engines": self.cpu_engines,
            "acceptance_inputs": len(self.acceptance.inputs) if self.acceptance is not None else 0,
            "engines": self.engines,
            "spec": self.spec.to_dict(),
            "provenance": self.manifest.get("provenance", {}),
            "accuracy": self.manifest.get("accuracy", {}),
        }
