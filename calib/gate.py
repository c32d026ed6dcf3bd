"""The accuracy gate: segment held-out series with fp32 and each candidate, compare per label.

Dice is pooled over the held-out series per label (2·Σ|A∩B| / Σ(|A|+|B|)), so a label that is
small in one series does not dominate. A candidate passes when every label present in the
fp32 output reaches ``min_dice`` agreement with fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeseg.calib.dataset import HeldOut
from edgeseg.calib.metrics import dice_counts
from edgeseg.spec import ModelSpec


def segment_all(
    model: bytes, spec: ModelSpec, holdout: Sequence[HeldOut], precision: str
) -> list[np.ndarray]:
    """Labels of every held-out volume, as the runtime's Segmenter produces them."""
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.segmenter import Segmenter

    seg = Segmenter(spec, OrtBackend(model, precision=precision))
    try:
        return [seg.segment(h.volume).labels.copy() for h in holdout]
    finally:
        seg.close()


def pooled_dice(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]
) -> dict[int, float | None]:
    """Per-label Dice pooled over cases; None for a label absent from both everywhere."""
    num = dict.fromkeys(labels, 0)
    den = dict.fromkeys(labels, 0)
    for p, r in zip(preds, refs):
        for lab, (n, d) in dice_counts(p, r, labels).items():
            num[lab] += n
            den[lab] += d
    return {lab: (num[lab] / den[lab] if den[lab] else None) for lab in labels}


def _named(spec: ModelSpec, per_label: dict[int, float | None]) -> dict[str, float | None]:
    names = {lab.value: lab.name for lab in spec.labels}
    return {names[k]: (round(v, 5) if v is not None else None) for k, v in per_label.items()}


def _mean(values: dict[int, float | None]) -> float | None:
    vals = [v for v in values.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def run_gate(
    models: dict[str, bytes],
    spec: ModelSpec,
    holdout: Sequence[HeldOut],
    *,
    min_dice: float = 0.99,
    reference: Sequence[np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per precision: Dice vs fp32 (and vs ground truth where labels exist) and pass/fail.

    ``models`` must contain "fp32" (the reference) unless ``reference`` gives the fp32 labels
    of every held-out series already (:func:`segment_all`); then "fp32" is optional and is not
    segmented again. Returns ``{precision: report}`` for the precisions in ``models``.
    """
    labels = [lab.value for lab in spec.labels]
    if reference is None:
        if "fp32" not in models:
            raise ValueError("run_gate needs the fp32 model or its labels (reference=)")
        reference = segment_all(models["fp32"], spec, holdout, "fp32")
    ref = list(reference)
    outputs = {p: (ref if p == "fp32" else segment_all(m, spec, holdout, p)) for p, m in models.items()}
    truth = [h.labels for h in holdout]
    have_truth = bool(truth) and all(t is not None for t in truth)
    report: dict[str, dict[str, Any]] = {}
    for prec, preds in outputs.items():
        vs_fp32 = pooled_dice(preds, ref, labels)
        present = [v for v in vs_fp32.values() if v is not None]
        worst = min(present) if present else 1.0
        rep: dict[str, Any] = {
            "dice_vs_fp32": _named(spec, vs_fp32),
            "mean_dice_vs_fp32": round(_mean(vs_fp32) or 1.0, 5),
            "min_dice_vs_fp32": round(worst, 5),
            "voxel_agreement": round(
                float(np.mean([float((p == r).mean()) for p, r in zip(preds, ref)])) if ref else 1.0, 6
            ),
            "n_series": len(holdout),
            "min_dice": min_dice,
            "passed": bool(worst >= min_dice),
        }
        if have_truth:
            vs_truth = pooled_dice(preds, truth, labels)  # type: ignore[arg-type]
            rep["dice_vs_truth"] = _named(spec, vs_truth)
            rep["mean_dice_vs_truth"] = round(_mean(vs_truth) or 0.0, 5)
        report[prec] = rep
    return report
