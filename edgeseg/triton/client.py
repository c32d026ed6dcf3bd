"""A Segmenter that segments through a Triton Inference Server: ``triton://HOST:PORT/MODEL``.

The edge box keeps everything else (DICOM in, spool, journal, DICOM SEG out) and sends only a
series' stored pixels (int16/uint16 as decoded, 2 bytes a voxel) with the per-slice rescale and
the geometry; the server's edgeseg model (``edgeseg export-triton``) returns uint8 labels on the
source grid. gRPC via ``tritonclient`` (``pip install 'edgeseg[triton]'``), imported lazily.

Failures say one sentence: an unreachable server, a wrong model name (with the models the server
has), a server serving another bundle. A server that goes away mid-run is retried with back-off
for ``wait_s``; then :class:`~edgeseg._exceptions.ServiceUnavailableError`, which the listener
takes as "try this series again later" rather than a failure of the series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edgeseg._exceptions import BackendError, ServiceUnavailableError
from edgeseg._optional import require
from edgeseg.bundle import MANIFEST, Bundle
from edgeseg.result import SegmentationResult
from edgeseg.volume import Volume

log = logging.getLogger("edgeseg")
SCHEME = "triton://"
# gRPC codes after which the same request may succeed later (server restarting, overloaded).
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "UNKNOWN")
_STORED_INPUT = {np.dtype(np.int16): "STORED_INT16", np.dtype(np.uint16): "STORED_UINT16"}


def parse_target(target: str) -> tuple[str, str, dict[str, float]]:
    """``triton://HOST:PORT/MODEL[?timeout=S&wait=S]`` → (``HOST:PORT``, ``MODEL``, options).

    ``timeout``: seconds one request may take (default 300); ``wait``: seconds to keep retrying
    an unreachable server before giving the series up for now (default 30). ValueError naming
    the problem otherwise."""
    form = "triton://HOST:PORT/MODEL[?timeout=SECONDS&wait=SECONDS]"
    if not target.startswith(SCHEME):
        raise ValueError(f"a Triton backend is written {form}, got {target!r}")
    parts = urlsplit(target)
    model = parts.path.strip("/")
    try:
        port = parts.port or 8001
    except ValueError:
        raise ValueError(f"a Triton backend is written {form}, got {target!r}") from None
    if not parts.hostname or not model or "/" in model:
        raise ValueError(f"a Triton backend is written {form}, got {target!r}")
    options: dict[str, float] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if key not in ("timeout", "wait"):
            raise ValueError(f"{target!r}: unknown option {key!r} (known: timeout, wait)")
        try:
            options[f"{key}_s"] = float(values[-1])
        except ValueError:
            raise ValueError(f"{target!r}: {key} must be a number of seconds, got {values[-1]!r}") from None
    return f"{parts.hostname}:{port}", model, options


def _grpc():
    return require("tritonclient.grpc", extra="triton", feature="the Triton backend (triton://)")


def _code(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    text = (status() if callable(status) else status) or ""
    return str(text).replace("StatusCode.", "")


def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None)
    text = msg() if callable(msg) else str(exc)
    return (str(text or exc).strip().splitlines() or [type(exc).__name__])[0]


class TritonSegmenter:
    """Segments through a Triton model serving ``bundle`` (the same bundle file as the server's).

    Most callers use ``Segmenter.open(bundle, backend="triton://HOST:PORT/MODEL")``.
    """

    def __init__(
        self,
        url: str,
        model: str,
        bundle: Bundle,
        *,
        timeout_s: float = 300.0,
        wait_s: float = 30.0,
        connect_timeout_s: float = 5.0,
    ):
        self.url, self.model, self.bundle, self.spec = url, model, bundle, bundle.spec
        self.timeout_s, self.wait_s, self.connect_timeout_s = timeout_s, wait_s, connect_timeout_s
        self._client: Any = None
        self.config: dict = {}
        self.batched = False
        self.requests = 0
        self.bytes_sent = 0

    @classmethod
    def open(
        cls,
        target: str,
        bundle: str | Path | Bundle,
        *,
        tta: bool = True,
        timeout_s: float = 300.0,
        wait_s: float = 30.0,
    ) -> TritonSegmenter:
        """Connect, check that MODEL is ready and serves this very bundle; one-sentence errors."""
        url, model, options = parse_target(target)
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        options = {"timeout_s": timeout_s, "wait_s": wait_s, **options}
        seg = cls(url, model, b, **options)
        seg._connect()
        server_tta = seg.parameters.get("TTA", "true") != "false"
        if server_tta and not tta:
            log.warning(
                "test-time mirroring is set on the server (TTA on in model %s's config.pbtxt), not by "
                "the client: export the repository again with --no-tta to serve without it",
                model,
            )
        return seg

    # -- connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        grpc = _grpc()
        self._client = grpc.InferenceServerClient(self.url)
        where = f"Triton at {self.url}"
        try:
            live = self._client.is_server_live(client_timeout=self.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 (tritonclient raises its own or grpc's errors)
            raise BackendError(
                f"{where} is unreachable ({_message(exc)}); start it (edgeseg triton serve REPO) "
                "or check HOST:PORT (the gRPC port, 8001 by default)"
            ) from None
        if not live:
            raise BackendError(f"{where} answers but is not live")
        if not self._client.is_model_ready(self.model, client_timeout=self.connect_timeout_s):
            raise BackendError(f"{where} has no ready model '{self.model}'; {self._models_line()}")
        self.config = self._client.get_model_config(
            self.model, as_json=True, client_timeout=self.connect_timeout_s
        )["config"]
        self.parameters = {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}
        self.batched = int(self.config.get("max_batch_size", 0) or 0) > 0
        import hashlib

        mine = hashlib.sha256(self.bundle.read(MANIFEST)).hexdigest()
        theirs = self.parameters.get("BUNDLE_SHA256")
        if theirs is None:
            raise BackendError(f"{where}: model '{self.model}' was not written by edgeseg export-triton")
        if theirs != mine:
            raise BackendError(
                f"{where}: model '{self.model}' serves another bundle than {self.bundle.path.name} "
                f"(manifest sha256 {theirs[:12]} there, {mine[:12]} here); export this bundle or use its file"
            )

    def _reconnect(self) -> None:
        # A fresh channel: gRPC's own reconnect back-off grows to minutes while a server is away.
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 (a broken channel may fail to close; it is dropped)
            pass
        self._client = _grpc().InferenceServerClient(self.url)

    def _models_line(self) -> str:
        try:
            index = self._client.get_model_repository_index(
                as_json=True, client_timeout=self.connect_timeout_s
            )
        except Exception:  # noqa: BLE001
            return "its model list could not be read"
        models = [f"{m['name']} ({m.get('state', '?').lower() or '?'})" for m in index.get("models", [])]
        return "it has: " + ", ".join(models) if models else "it has no models"

    # -- the Segmenter contract ----------------------------------------------------------------
    def segment(
        self, volumes: Volume | Sequence[Volume], *, with_confidence: bool = False
    ) -> SegmentationResult:
        """One request per series; retried with back-off while the server is unreachable."""
        if isinstance(volumes, (list, tuple)):
            if len(volumes) != 1:
                raise BackendError(
                    "the Triton backend segments one series at a time (no multi-channel models yet)"
                )
            volumes = volumes[0]
        vol = volumes
        t0 = time.perf_counter()
        inputs, nbytes = self._inputs(vol)
        grpc = _grpc()
        outputs = [grpc.InferRequestedOutput("LABELS")]
        if with_confidence:
            outputs.append(grpc.InferRequestedOutput("CONFIDENCE"))
        t1 = time.perf_counter()
        result = self._infer_with_retry(inputs, outputs)
        t2 = time.perf_counter()
        labels = result.as_numpy("LABELS")
        conf = result.as_numpy("CONFIDENCE") if with_confidence else None
        if self.batched:
            labels = labels[0]
            conf = conf[0] if conf is not None else None
        if labels is None or labels.shape != vol.shape:
            raise BackendError(
                f"Triton model '{self.model}' returned labels of shape "
                f"{None if labels is None else labels.shape} for a {vol.shape} series"
            )
        self.requests += 1
        self.bytes_sent += nbytes
        timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3}
        return SegmentationResult(labels, conf, timings)

    def _inputs(self, vol: Volume) -> tuple[list, int]:
        grpc = _grpc()
        stored = vol.stored
        name = _STORED_INPUT.get(stored.dtype)
        if name is None:
            if stored.dtype in (np.uint8, np.int8):
                stored, name = stored.astype(np.int16), "STORED_INT16"  # lossless, still 2 bytes
            else:
                stored, name = stored.astype(np.float32), "STORED_FP32"  # modality values already
        arrays = [
            (name, np.ascontiguousarray(stored)),
            ("SLOPE", np.ascontiguousarray(vol.slope, dtype=np.float64)),
            ("INTERCEPT", np.ascontiguousarray(vol.intercept, dtype=np.float64)),
            ("SPACING", np.asarray(vol.spacing, dtype=np.float64)),
            ("AFFINE", np.ascontiguousarray(vol.affine, dtype=np.float64)),
        ]
        inputs = []
        for n, a in arrays:
            if self.batched:
                a = a[None]
            t = grpc.InferInput(n, list(a.shape), _TRITON_DTYPE[a.dtype])
            t.set_data_from_numpy(a)
            inputs.append(t)
        return inputs, sum(a.nbytes for _, a in arrays)

    def _infer_with_retry(self, inputs: list, outputs: list):
        deadline = time.monotonic() + self.wait_s
        delay = 0.5
        while True:
            try:
                return self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 (tritonclient's InferenceServerException)
                code = _code(exc)
                if code not in _RETRYABLE:
                    if code == "NOT_FOUND" or "unknown model" in _message(exc).lower():
                        raise ServiceUnavailableError(
                            f"Triton at {self.url} has no model '{self.model}' now ({_message(exc)})"
                        ) from None
                    raise BackendError(f"Triton model '{self.model}' failed: {_message(exc)}") from None
                if time.monotonic() + delay > deadline:
                    raise ServiceUnavailableError(
                        f"Triton at {self.url} did not answer for {self.wait_s:.0f} s ({code}: {_message(exc)})"
                    ) from None
                log.warning("Triton at %s: %s; retrying in %.1f s", self.url, code, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                self._reconnect()

    def describe(self) -> dict:
        groups = self.config.get("instance_group") or [{}]
        return {
            "backend": "triton",
            "device": f"{self.url}/{self.model}",
            "server_backend": self.parameters.get("BACKEND", ""),
            "precision": self.parameters.get("PRECISION", ""),
            "instances": sum(int(g.get("count", 1)) for g in groups),
            "kind": groups[0].get("kind", ""),
            "model": f"{self.bundle.name} {self.bundle.version}",
            "tta": self.parameters.get("TTA", "true") != "false",
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> TritonSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TRITON_DTYPE = {
    np.dtype(np.int16): "INT16",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
