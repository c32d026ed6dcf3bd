"""Open a bundle on TensorRT: the cached or freshly built engine, checked against the bundle's
acceptance set before its first use.

A TensorRT engine is built on the device with that GPU's own tactics, so its fp16/int8 numbers are
only known once it exists. Each candidate precision (the one asked for, or int8 → fp16 → fp32) is
built or loaded, its labels on the acceptance set compared with fp32's at the bundle's gate, and
the first that passes is used; a failing one is recorded (the check is cached next to the engine,
keyed by the plan's own hash) and never run. Asked for one precision explicitly, a failure is a
:class:`~edgeseg.BackendError` with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeseg._exceptions import BackendError
from edgeseg.backends.base import Backend


def open_tensorrt_backend(
    bundle: Any,
    precision: str | None = None,
    *,
    root: Path | None = None,
    key_for: Callable[[str, str], Any] | None = None,
    builder: Callable[..., bytes] | None = None,
    make_backend: Callable[[bytes, str], Backend] | None = None,
) -> Backend:
    """The first TensorRT engine for ``bundle`` that passes its acceptance check.

    ``key_for(onnx_sha256, precision)``, ``builder`` and ``make_backend(plan, precision)`` default
    to this GPU's engine key, TensorRT's builder and :class:`TensorRTBackend`; they are
    parameters so the selection can be exercised where no GPU is.
    """
    from edgeseg.backends.acceptance import first_accepted
    from edgeseg.backends.choice import min_dice
    from edgeseg.backends.engine_cache import TRT_PRECISIONS, current_key, load_or_build

    if make_backend is None:
        from edgeseg.backends.tensorrt import TensorRTBackend

        def make_backend(plan: bytes, prec: str) -> Backend:
            return TensorRTBackend(plan, precision=prec)

    key_for = key_for or (lambda sha, prec: current_key(sha, prec, spec=bundle.spec))
    if precision is not None and precision not in bundle.artifacts:
        raise BackendError(f"{bundle.path}: the bundle has no {precision} model")
    candidates = [precision] if precision else [p for p in TRT_PRECISIONS if p in bundle.artifacts]
    if not candidates:
        raise BackendError(f"{bundle.path}: the bundle has no model TensorRT can build from")

    def open_one(prec: str) -> tuple[Backend, Path, str]:
        sha = bundle.sha256(bundle.artifacts[prec])
        plan, path, _ = load_or_build(
            bundle.onnx(prec), sha, bundle.spec, prec, key=key_for(sha, prec), root=root, builder=builder
        )
        # The check is a function of the plan itself: keyed by its hash, next to it.
        return make_backend(plan, prec), path.with_suffix(".accept.json"), hashlib.sha256(plan).hexdigest()

    return first_accepted(bundle, candidates, open_one, "TensorRT", min_dice(bundle))
