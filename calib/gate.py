"""The accuracy gate: segment held-out series with fp32 and each candidate, compare per label.

Dice is pooled over the held-out series per label (2·Σ|A∩B| / Σ(|A|+|B|)), so a label that is
small in one series does not dominate. A candidate passes when every label present in the
fp32 output reaches ``min_dice`` agreement with fp32.

A handful of gate series is a small sample: a variant that passes at 0.9903 on 8 series can
measure 0.989 on unseen ones. The report therefore also gives a one-sided 95 % lower confidence
bound on the per-series worst-label Dice (Student t over the series), ``dice_lower_bound_95``,
which ``edgeseg info`` prints next to the gate; ``gate["decide_on"] = "lower_bound"`` makes the
gate pass or fail on that bound instead of the pooled value.
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


# One-sided 95 % Student t quantiles by degrees of freedom (1–30); 1.645 beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771,
        1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706,
        1.703, 1.701, 1.699, 1.697)  # fmt: skip


def lower_bound_95(values: Sequence[float]) -> float | None:
    """One-sided 95 % lower confidence bound on the mean of ``values`` (None under 2 values)."""
    n = len(values)
    if n < 2:
        return None
    a = np.asarray(values, dtype=np.float64)
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.645
    return float(a.mean() - t * a.std(ddof=1) / np.sqrt(n))


def per_series_worst(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]
) -> list[float]:
    """Per series: the worst Dice vs the reference over the labels present in either."""
    out = []
    for p, r in zip(preds, refs):
        vals = [n / d for n, d in dice_counts(p, r, labels).values() if d]
        out.append(min(vals) if vals else 1.0)
    return out


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
    decide_on: str = "pooled",
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
        series = per_series_worst(preds, ref, labels)
        bound = lower_bound_95(series)
        decisive = bound if decide_on == "lower_bound" and bound is not None else worst
        rep: dict[str, Any] = {
            "dice_vs_fp32": _named(spec, vs_fp32),
            "mean_dice_vs_fp32": round(_mean(vs_fp32) or 1.0, 5),
            "min_dice_vs_fp32": round(worst, 5),
            "voxel_agreement": round(
                float(np.mean([float((p == r).mean()) for p, r in zip(preds, ref)])) if ref else 1.0, 6
            ),
            "n_series": len(holdout),
            "dice_lower_bound_95": round(bound, 5) if bound is not None else None,
            "decided_on": "lower_bound" if decisive is bound and bound is not None else "pooled",
            "min_dice": min_dice,
            "passed": bool(decisive >= min_dice),
        }
        if have_truth:
            vs_truth = pooled_dice(preds, truth, labels)  # type: ignore[arg-type]
            rep["dice_vs_truth"] = _named(spec, vs_truth)
            rep["mean_dice_vs_truth"] = round(_mean(vs_truth) or 0.0, 5)
        report[prec] = rep
    return report
