"""Triton Python-backend model written by ``edgeseg export-triton``: one series per request.

It opens the bundle next to it with edgeseg's own Segmenter (its CPU engines, or TensorRT and
the CUDA preprocessing on a GPU server), so preprocessing, sliding window, TTA and resampling
back to the source grid run next to the engine and only uint8 labels go back on the wire.

Inputs (one request = one series; with ``max_batch_size`` > 0 each has a leading batch axis):
  STORED_INT16 | STORED_UINT16 | STORED_FP32  (z, y, x) stored pixels as decoded (exactly one)
  SLOPE, INTERCEPT  (z,) FP64 per-slice modality rescale
  SPACING           (3,) FP64 z, y, x mm
  AFFINE            (4, 4) FP64 voxel (x, y, z, 1) -> patient LPS mm
Outputs:
  LABELS      (z, y, x) UINT8 on the source grid
  CONFIDENCE  (z, y, x) UINT8 0-255, computed only when the client asks for it

Configuration comes from config.pbtxt's ``parameters`` (BUNDLE, BACKEND, THREADS, TTA, PRECISION).
This file is copied verbatim into the repository; it imports only edgeseg and numpy.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

STORED_INPUTS = ("STORED_INT16", "STORED_UINT16", "STORED_FP32")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from edgeseg.segmenter import Segmenter

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        bundle = os.path.join(here, params["BUNDLE"])
        backend = params.get("BACKEND", "cpu")
        threads = int(params["THREADS"]) if params.get("THREADS") else None
        if backend == "tensorrt" and args.get("model_instance_kind") == "GPU":
            # One engine per instance, on the instance's own GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.segmenter = Segmenter.open(
            bundle,
            backend=backend,
            precision=params.get("PRECISION") or None,
            threads=threads,
            tta=params.get("TTA", "true").lower() != "false",
        )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # noqa: BLE001 (one bad request is that request's error)
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)))
        return responses

    def _one(self, request):
        from edgeseg.volume import Volume

        want_conf = "CONFIDENCE" in (request.requested_output_names() or ())
        stored = [pb_utils.get_input_tensor_by_name(request, n) for n in STORED_INPUTS]
        stored = [t.as_numpy() for t in stored if t is not None]
        if len(stored) != 1:
            raise ValueError(f"send exactly one of {', '.join(STORED_INPUTS)} (got {len(stored)})")
        arrays = {
            n: pb_utils.get_input_tensor_by_name(request, n).as_numpy()
            for n in ("SLOPE", "INTERCEPT", "SPACING", "AFFINE")
        }
        series = [(stored[0], arrays)]
        if self.batched:  # a batch of series of one shape: each is segmented on its own
            series = [(stored[0][i], {k: v[i] for k, v in arrays.items()}) for i in range(stored[0].shape[0])]
        labels, conf = [], []
        for pixels, a in series:
            vol = Volume(
                stored=pixels,
                slope=a["SLOPE"],
                intercept=a["INTERCEPT"],
                spacing=tuple(a["SPACING"].tolist()),
                affine=a["AFFINE"],
            )
            result = self.segmenter.segment(vol, with_confidence=want_conf)
            labels.append(result.labels)
            conf.append(result.confidence)
        out = [pb_utils.Tensor("LABELS", _stack(labels, self.batched))]
        if want_conf:
            out.append(pb_utils.Tensor("CONFIDENCE", _stack(conf, self.batched)))
        return pb_utils.InferenceResponse(output_tensors=out)

    def finalize(self) -> None:
        seg = getattr(self, "segmenter", None)
        if seg is not None:
            seg.close()


def _stack(arrays: list, batched: bool) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays) if batched else arrays[0], dtype=np.uint8)
