"""The bundle's acceptance set, and the check every engine passes before its first use.

An engine compiled or built on the device (OpenVINO now, TensorRT later) runs its own kernels:
int8 and fp16 results differ between engines, and a tampered or mis-compiled model differs from
everything. The bundle therefore carries a few preprocessed inputs from real series with the
labels fp32 gives them (``acceptance.npz``); an engine is used only when its labels on those
inputs agree with fp32 at the bundle's gate (worst per-label Dice, pooled over the inputs, as
the build's gate measures it). The result is cached next to the engine, keyed by what the
compiled engine is a function of (model hash, engine version, CPU, compile options), so it is
paid once per engine and redone whenever any of them changes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import BackendError, BundleError
from edgeseg.atomic import write_bytes_atomic
from edgeseg.backends.base import Backend
from edgeseg.spec import ModelSpec

MEMBER = "acceptance.npz"
DEFAULT_MIN_DICE = 0.99


@dataclass
class AcceptanceSet:
    """``inputs[i]`` is one model batch (float32, stored as float16: the reference labels are
    computed from the rounded input, so the rounding costs no agreement); ``labels[i]`` the fp32
    model's uint8 labels for it."""

    inputs: list[np.ndarray]
    labels: list[np.ndarray]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"input_{i}": x.astype(np.float16) for i, x in enumerate(self.inputs)}
        arrays.update({f"labels_{i}": lab.astype(np.uint8) for i, lab in enumerate(self.labels)})
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "the bundle") -> AcceptanceSet:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                n = sum(1 for k in z.files if k.startswith("input_"))
                inputs = [z[f"input_{i}"].astype(np.float32) for i in range(n)]
                labels = [z[f"labels_{i}"] for i in range(n)]
        except Exception as exc:  # a zip/npy error deep in numpy: say where
            raise BundleError(f"{where}: the acceptance set cannot be read ({exc})") from None
        if not inputs:
            raise BundleError(f"{where}: the acceptance set is empty")
        return cls(inputs, labels)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for x, lab in zip(self.inputs, self.labels):
            h.update(x.astype(np.float16).tobytes())
            h.update(lab.tobytes())
        return h.hexdigest()


def rounded(batch: np.ndarray) -> np.ndarray:
    """The input exactly as the acceptance set will store and return it."""
    return batch.astype(np.float16).astype(np.float32)


def build_acceptance(reference: Backend, inputs: list[np.ndarray], spec: ModelSpec) -> AcceptanceSet:
    """Reference labels of ``inputs`` from an opened fp32 backend (the build uses ONNX Runtime)."""
    xs = [rounded(x) for x in inputs]
    return AcceptanceSet(xs, [engine_labels(reference, x, spec) for x in xs])


def engine_labels(backend: Backend, batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
    from edgeseg.preprocess import to_labels

    lab, _ = to_labels(backend.infer(batch), spec, with_confidence=False)
    return np.array(lab, dtype=np.uint8, copy=True)


def run_check(backend: Backend, acc: AcceptanceSet, spec: ModelSpec, min_dice: float) -> dict[str, Any]:
    """Labels of ``backend`` on the acceptance set against fp32: worst per-label Dice pooled over
    the inputs (labels absent from both count as agreeing) and the voxel agreement."""
    values = [lab.value for lab in spec.labels if lab.value != 0]
    inter = dict.fromkeys(values, 0)
    total = dict.fromkeys(values, 0)
    same = voxels = 0
    for x, ref in zip(acc.inputs, acc.labels):
        got = engine_labels(backend, x, spec)
        if got.shape != ref.shape:
            raise BackendError(
                f"{backend.name}: output labels {got.shape} do not match the acceptance set's {ref.shape}"
            )
        same += int((got == ref).sum())
        voxels += ref.size
        for v in values:
            g, r = got == v, ref == v
            inter[v] += int((g & r).sum())
            total[v] += int(g.sum() + r.sum())
    dice = {v: (2.0 * inter[v] / total[v]) if total[v] else 1.0 for v in values}
    worst = min(dice.values()) if dice else 1.0
    return {
        "min_dice_vs_fp32": round(worst, 5),
        "voxel_agreement": round(same / max(voxels, 1), 6),
        "n_inputs": len(acc.inputs),
        "min_dice": min_dice,
        "passed": bool(worst >= min_dice),
    }


def cached_check(
    backend: Backend,
    acc: AcceptanceSet,
    spec: ModelSpec,
    min_dice: float,
    *,
    record: Path,
    engine_id: str,
) -> dict[str, Any]:
    """:func:`run_check`, or its cached result when ``record`` holds one for this very engine
    (``engine_id``), acceptance set and gate."""
    want = {"engine_id": engine_id, "acceptance_sha256": acc.sha256, "min_dice": min_dice}
    try:
        old = json.loads(record.read_text())
        if all(old.get(k) == v for k, v in want.items()) and isinstance(old.get("result"), dict):
            return {**old["result"], "cached": True}
    except (OSError, ValueError):
        pass
    result = run_check(backend, acc, spec, min_dice)
    write_bytes_atomic(record, json.dumps({**want, "result": result}, indent=2).encode())
    return {**result, "cached": False}


def refusal(engine: str, precision: str, result: dict[str, Any]) -> str:
    """The sentence for an engine that failed its acceptance check."""
    return (
        f"{engine} {precision} fails the bundle's acceptance check: worst label Dice vs fp32 "
        f"{result['min_dice_vs_fp32']:.4f} < {result['min_dice']} on {result['n_inputs']} input(s) "
        f"(voxel agreement {result['voxel_agreement']:.4%}); it will not be used here"
    )


def first_accepted(
    bundle: Any,
    candidates: list[str],
    open_one: Any,
    engine: str,
    min_dice: float,
) -> Backend:
    """The first precision in ``candidates`` whose engine passes the acceptance check.

    ``open_one(precision)`` builds or loads that engine and returns ``(backend, record_path,
    engine_id)``: where its check is cached and what the compiled engine is a function of. A
    precision other than fp32 is skipped when the bundle has no acceptance set (nothing to check
    it against); fp32 then runs unchecked, with a warning. Raises :class:`BackendError` with
    every reason when none passes.
    """
    import logging

    log = logging.getLogger("edgeseg")
    acc = bundle.acceptance
    reasons: list[str] = []
    for prec in candidates:
        if acc is None and prec != "fp32":
            reasons.append(f"{engine} {prec} cannot be checked before use: the bundle has no acceptance set")
            continue
        backend, record, engine_id = open_one(prec)
        if acc is None:
            log.warning("%s has no acceptance set: %s fp32 runs unchecked", bundle.path, engine)
            return backend
        try:
            result = cached_check(backend, acc, bundle.spec, min_dice, record=record, engine_id=engine_id)
        except BaseException:
            backend.close()
            raise
        if result["passed"]:
            backend.acceptance = result  # type: ignore[attr-defined]
            return backend
        backend.close()
        reasons.append(refusal(engine, prec, result))
        log.warning("%s: %s", bundle.path, reasons[-1])
    raise BackendError(f"{bundle.path}: " + "; ".join(reasons))
