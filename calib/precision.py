"""fp16 / int8 variants of an fp32 ONNX, gated by Dice against fp32: what ``build-engine
--precision`` calls (:func:`build_precisions`).

Order: check the model against the spec → fp16 (overflow check on calibration samples) → int8
for TensorRT and int8_cpu for ORT from one calibration pass → TensorRT Q/DQ rules → the gate on
held-out series → layer sensitivity for failing int8 → automatic mixed precision for failing
int8 (:func:`auto_keep_fp32`) → CPU benchmark → the runtime's choice.
Nothing is written here; the caller writes the bundle only after this returned.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import AccuracyGateError, CalibrationError, SpecError
from edgeseg.spec import ModelSpec

log = logging.getLogger("edgeseg.calib")

CANDIDATES = ("fp16", "int8", "int8_cpu")

# Automatic mixed precision (gate keys, all optional): when an int8 variant fails the gate, keep
# the layers the sensitivity ranking names in fp32, AUTO_KEEP_STEP more per round, re-quantize
# from the same ranges and gate again, for at most AUTO_KEEP_ROUNDS rounds; no round starts
# after AUTO_KEEP_BUDGET_S seconds.
AUTO_KEEP_STEP = 2
AUTO_KEEP_ROUNDS = 4
AUTO_KEEP_BUDGET_S = 120.0
# ...and only for a variant that misses the gate by at most this much Dice. Measured on the
# hippocampus U-Net: good calibration sets miss 0.99 by 0.001–0.006, a one-background-slice
# set by 0.10–0.15 (a broken calibration, which layers kept fp32 would only hide).
AUTO_KEEP_MAX_MISS = 0.02


@dataclass
class PrecisionBuild:
    """What :func:`build_precisions` hands back to the bundle writer."""

    models: dict[str, bytes] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def expand(wanted: Sequence[str]) -> list[str]:
    """Requested precisions → candidates: "int8" brings its CPU twin, "auto" brings all."""
    out: list[str] = []
    for p in wanted:
        p = p.strip().lower()
        if p == "auto":
            out.extend(CANDIDATES)
        elif p == "int8":
            out.extend(["int8", "int8_cpu"])
        elif p in CANDIDATES:
            out.append(p)
        elif p != "fp32":
            raise ValueError(f"unknown precision {p!r}; choose from fp32, fp16, int8, int8_cpu, auto")
    return [p for p in CANDIDATES if p in out]


def check_model_vs_spec(fp32: bytes, spec: ModelSpec, sample_shape: Sequence[int] | None) -> None:
    """Raise :class:`SpecError` in one sentence when the spec cannot feed this model."""
    import onnx

    m = onnx.load_from_string(fp32)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise SpecError(f"the model has {len(inputs)} inputs; edgeseg feeds exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != spec.dims + 2:
        raise SpecError(
            f"the spec says {spec.dims}D (input rank {spec.dims + 2}) but the model input '{inputs[0].name}' "
            f"has rank {len(dims)} {dims}"
        )
    if dims[1] is not None and dims[1] != spec.in_channels:
        raise SpecError(f"the spec has {spec.in_channels} input channel(s) but the model expects {dims[1]}")
    if sample_shape is not None:
        want = [d for d in dims[2:]]
        got = list(sample_shape[2:])
        if any(w is not None and w != g for w, g in zip(want, got)):
            raise SpecError(
                f"the spec's preprocessing gives inputs of spatial size {got} but the model expects {want}; "
                "fix 'target_shape'/'patch_size'/'divisible_by' in the spec"
            )
    out_dims = [
        d.dim_value if d.HasField("dim_value") else None for d in m.graph.output[0].type.tensor_type.shape.dim
    ]
    if spec.output == "argmax" and len(out_dims) > 1 and out_dims[1] not in (None, spec.num_classes):
        raise SpecError(
            f"the spec's labels need {spec.num_classes} output channels (argmax) but the model gives {out_dims[1]}"
        )


def _say(progress: Callable[[str], Any] | None, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)


def _split_keep(fp32: bytes, keep: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--keep-fp32`` entries → (op types, node names)."""
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(fp32).graph.node}
    return [k for k in keep if k in ops], [k for k in keep if k not in ops]


def _probe_batches(
    spec: ModelSpec, calibration: Any, fp32: bytes, *, n_series: int = 2, keep: int = 16
) -> list[np.ndarray]:
    """A few held-out inputs where fp32 finds the most foreground (for layer sensitivity and the
    benchmark): an all-background probe would rate every layer harmless."""
    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.calib.dataset import sample_volume
    from edgeseg.preprocess import Preprocessor, to_labels

    pre = Preprocessor(spec)
    rng = np.random.default_rng(1)
    pool: list[np.ndarray] = []
    for h in calibration.holdout[:n_series]:
        pool.extend(sample_volume(pre, h.volume, 64 if spec.dims == 2 else 8, rng))
    if not pool:
        pool = list(calibration.samples[: 2 * keep])
    backend = OrtBackend(fp32)
    try:
        scores = [int(np.count_nonzero(to_labels(backend.infer(x[None]), spec)[0])) for x in pool]
    finally:
        backend.close()
    order = np.argsort(scores)[::-1][: (keep if spec.dims == 2 else max(1, keep // 8))]
    chosen = [pool[i] for i in sorted(order.tolist())]
    bs = spec.batch_size if spec.dims == 2 else 1
    return [np.stack(chosen[i : i + bs]) for i in range(0, len(chosen), bs)]


def build_precisions(
    fp32: bytes,
    spec: ModelSpec,
    wanted: Sequence[str],
    *,
    calibration: Any = None,
    gate: dict[str, Any] | None = None,
    force: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> PrecisionBuild:
    """Build, validate and gate the requested precision variants of ``fp32``.

    Parameters
    ----------
    fp32:
        the exported fp32 ONNX (bytes).
    wanted:
        any of "fp16", "int8" (adds "int8_cpu"), "int8_cpu", "auto" (all of them).
    calibration:
        a :class:`~edgeseg.calib.dataset.CalibrationSet`; required for int8 and for the gate.
    gate:
        ``{"min_dice": 0.99, "method": "percentile", "keep_fp32": [names or op types]}``, and
        for automatic mixed precision ``"auto_keep": True`` (off: a failing int8 is dropped as
        calibrated), ``"auto_keep_step"``, ``"auto_keep_rounds"``, ``"auto_keep_budget_s"``,
        ``"auto_keep_max_miss"`` (defaults :data:`AUTO_KEEP_STEP`, :data:`AUTO_KEEP_ROUNDS`,
        :data:`AUTO_KEEP_BUDGET_S`, :data:`AUTO_KEEP_MAX_MISS`).
    force:
        keep candidates that fail the gate (with a warning) instead of dropping/refusing them.

    Raises
    ------
    SpecError
        the spec does not fit the model's input.
    CalibrationError
        no calibration set for int8, or a Q/DQ graph TensorRT would reject.
    AccuracyGateError
        every candidate failed the gate and ``force`` is off (``.report`` holds the figures).
    """
    with tempfile.TemporaryDirectory(prefix="edgeseg-precision-") as work:
        return _build(fp32, spec, wanted, calibration, dict(gate or {}), force, progress, Path(work))


def _build(
    fp32: bytes,
    spec: ModelSpec,
    wanted: Sequence[str],
    calibration: Any,
    gate: dict[str, Any],
    force: bool,
    progress: Callable[[str], Any] | None,
    work: Path,
) -> PrecisionBuild:
    min_dice = float(gate.get("min_dice", 0.99))
    method = str(gate.get("method", "percentile"))
    keep = [k for k in gate.get("keep_fp32", []) if k]
    cands = expand(wanted)
    out = PrecisionBuild(runtime={"cpu_precision": "fp32"})
    if not cands:
        return out
    if calibration is None or len(calibration) == 0:
        if any(p.startswith("int8") for p in cands):
            raise CalibrationError("int8 needs a calibration set of real images (--calib DIR)")
        out.warnings.append("fp16 built without a calibration set: no overflow check and no accuracy gate")
    sample_shape = calibration.samples[0].shape if calibration is not None and len(calibration) else None
    check_model_vs_spec(fp32, spec, (1, *sample_shape) if sample_shape is not None else None)
    batches = calibration.batches(8) if calibration is not None and len(calibration) else []
    keep_ops, keep_nodes = _split_keep(fp32, keep)
    prov: dict[str, Any] = {}
    if calibration is not None:
        prov["calibration"] = dict(calibration.summary, method=method)

    if "fp16" in cands:
        t = time.perf_counter()
        _say(progress, "fp16: overflow check and conversion")
        from edgeseg.calib.fp16 import FRAGILE_OPS, convert_fp16

        r16 = convert_fp16(
            fp32, batches[:2], spec.input_name, keep_ops=FRAGILE_OPS + keep_ops, keep_nodes=keep_nodes
        )
        out.models["fp16"] = r16.model
        prov["fp16"] = {
            "kept_fp32_ops": r16.kept_ops,
            "kept_fp32_nodes": r16.kept_nodes,
            "overflow": r16.overflow,
        }
        for o in r16.overflow:
            out.warnings.append(
                f"fp16: {o['tensor']} reaches {o['max_abs']:.3g} on the calibration set; node '{o['node']}' kept fp32"
            )
        out.timings["fp16"] = time.perf_counter() - t

    int8_variants = [p for p in cands if p.startswith("int8")]
    ranges_cache = work / "ranges.json"  # the one calibration's ranges, reused by auto-keep rounds
    user_kept: list[str] = []
    if int8_variants:
        t = time.perf_counter()
        _say(progress, f"int8: calibrating ({method}) on {len(calibration)} samples")
        from edgeseg.calib.qdq_rules import check_qdq
        from edgeseg.calib.quantize import quantize_int8

        q = quantize_int8(
            fp32,
            batches,
            spec.input_name,
            method=method,
            variants=int8_variants,
            keep_fp32=keep,
            calibration_cache=ranges_cache,
        )
        if "int8" in q.models:
            prov["qdq_check"] = check_qdq(q.models["int8"])  # before anything is written
        out.models.update(q.models)
        user_kept = list(q.excluded)
        prov["ranges"] = q.ranges
        prov["quantization"] = dict(q.settings, kept_fp32=q.excluded)
        out.timings["calibrate_int8"] = time.perf_counter() - t

    built = [p for p in cands if p in out.models]
    if calibration is None or not calibration.holdout:
        if calibration is not None:
            msg = "the calibration set has no held-out series, so the accuracy gate cannot run (give ≥ 2 series)"
            if not force:
                raise CalibrationError(msg)
            out.warnings.append(msg + "; --force: variants written ungated")
        out.provenance = prov
        return out

    t = time.perf_counter()
    _say(
        progress,
        f"gate: segmenting {len(calibration.holdout)} held-out series with fp32 and {', '.join(built)}",
    )
    from edgeseg.calib.gate import run_gate, segment_all

    reference = segment_all(fp32, spec, calibration.holdout, "fp32")
    report = run_gate(
        {"fp32": fp32, **{p: out.models[p] for p in built}},
        spec,
        calibration.holdout,
        min_dice=min_dice,
        decide_on=str(gate.get("decide_on", "pooled")),
        reference=reference,
    )
    out.timings["gate"] = time.perf_counter() - t
    failed = [p for p in built if not report[p]["passed"]]
    fail_int8 = [p for p in failed if p.startswith("int8")]
    auto = None
    if fail_int8:
        t = time.perf_counter()
        _say(progress, "gate failed for int8: ranking layers by the output error they add")
        from edgeseg.calib.sensitivity import rank_layers

        probe = _probe_batches(spec, calibration, fp32)
        ranked = "int8" if "int8" in fail_int8 else fail_int8[0]
        ranking = rank_layers(fp32, out.models[ranked], probe, spec, top=48)
        for p in fail_int8:
            report[p]["sensitivity"] = ranking[:5]
        out.timings["sensitivity"] = time.perf_counter() - t
        max_miss = float(gate.get("auto_keep_max_miss", AUTO_KEEP_MAX_MISS))
        repairable = [p for p in fail_int8 if min_dice - report[p]["min_dice_vs_fp32"] <= max_miss]
        for p in fail_int8:
            if p not in repairable and gate.get("auto_keep", True):
                report[p]["auto_keep_skipped"] = (
                    f"misses the gate by {min_dice - report[p]['min_dice_vs_fp32']:.3f}, more than keeping "
                    f"a few layers fp32 repairs (≤ {max_miss}): the calibration set is likely too small "
                    "or unlike the images"
                )
        if gate.get("auto_keep", True) and repairable:
            t = time.perf_counter()
            auto = auto_keep_fp32(
                fp32,
                spec,
                repairable,
                ranking,
                report,
                calibration=calibration,
                batches=batches,
                reference=reference,
                method=method,
                keep=keep,
                user_kept=user_kept,
                ranges_cache=ranges_cache,
                min_dice=min_dice,
                decide_on=str(gate.get("decide_on", "pooled")),
                cpu_tuning=prov["quantization"].get("int8_cpu_tuning"),
                step=int(gate.get("auto_keep_step", AUTO_KEEP_STEP)),
                max_rounds=int(gate.get("auto_keep_rounds", AUTO_KEEP_ROUNDS)),
                budget_s=float(gate.get("auto_keep_budget_s", AUTO_KEEP_BUDGET_S)),
                progress=progress,
            )
            for p, win in auto.winners.items():
                out.models[p] = win.model
                report[p] = win.report
                if p == "int8":
                    prov["qdq_check"] = win.qdq_check
                if win.cpu_tuning is not None:
                    prov["quantization"]["int8_cpu_tuning"] = win.cpu_tuning
            prov["auto_keep"] = auto.provenance()
            prov["quantization"]["auto_kept_fp32"] = {p: w.layers for p, w in auto.winners.items()}
            out.timings["auto_keep"] = time.perf_counter() - t
            failed = [p for p in failed if p not in auto.winners]
    for p in failed:
        rep = report[p]
        hint = ""
        if auto is not None and p in auto.attempted:
            hint = (
                f"; automatic mixed precision kept up to {auto.n_tried} layer(s) fp32 in "
                f"{len(auto.rounds) - 1} round(s) ({auto.stopped}), best min Dice vs fp32 "
                f"{auto.best(p):.4f}"
            )
        elif rep.get("auto_keep_skipped"):
            hint = f"; no layers kept fp32 automatically: it {rep['auto_keep_skipped']}"
        elif rep.get("sensitivity"):
            hint = "; layers that hurt most: " + ", ".join(
                f"{r['node']} ({r['op']}, {r['error_removed']:.0%} of the error, Dice {r['gain']:+.3f})"
                for r in rep["sensitivity"][:3]
            )
            hint += " (try --keep-fp32 with them)"
        line = f"{p} fails the gate: min Dice vs fp32 {rep['min_dice_vs_fp32']:.4f} < {min_dice}{hint}"
        out.warnings.append(line + ("; kept (--force)" if force else "; dropped"))
    if failed and len(failed) == len(built) and not force:
        raise AccuracyGateError(
            "every candidate failed the accuracy gate ("
            + "; ".join(f"{p}: min Dice vs fp32 {report[p]['min_dice_vs_fp32']:.4f}" for p in failed)
            + f" < {min_dice}); use a larger, more varied calibration set, --keep-fp32, or --force",
            report=report,
        )
    if not force:
        for p in failed:
            del out.models[p]
    out.accuracy = report

    t = time.perf_counter()
    _say(progress, "benchmarking the variants on this CPU")
    from edgeseg.calib.bench import fastest, time_models

    probe = _probe_batches(spec, calibration, fp32, n_series=1, keep=spec.batch_size)[0]
    times = time_models({"fp32": fp32, **out.models}, probe)
    passing = [p for p in out.models if report[p]["passed"]]
    out.runtime = {"cpu_precision": fastest(times, passing), "cpu_ms": times, "cpu_batch": list(probe.shape)}
    out.timings["benchmark"] = time.perf_counter() - t
    prov["benchmark"] = {"ms_per_batch": times, "batch_shape": list(probe.shape)}
    out.provenance = prov
    return out


# ---------------------------------------------------------------------------------------------
# Automatic mixed precision


@dataclass
class AutoKept:
    """A variant that passed the gate with some layers kept fp32 automatically."""

    model: bytes
    report: dict[str, Any]
    layers: list[str]
    round: int
    qdq_check: dict[str, int] | None = None
    cpu_tuning: dict[str, Any] | None = None


@dataclass
class AutoKeep:
    """What :func:`auto_keep_fp32` tried and which variants it rescued."""

    attempted: list[str]
    rounds: list[dict[str, Any]]
    winners: dict[str, AutoKept]
    stopped: str
    settings: dict[str, Any]
    seconds: float = 0.0

    @property
    def n_tried(self) -> int:
        return len(self.rounds[-1]["kept_fp32"]) if self.rounds else 0

    def best(self, variant: str) -> float:
        return max(r["min_dice_vs_fp32"][variant] for r in self.rounds if variant in r["min_dice_vs_fp32"])

    def provenance(self) -> dict[str, Any]:
        return {
            **self.settings,
            "variants": self.attempted,
            "rounds": self.rounds,
            "stopped": self.stopped,
            "kept_fp32": {p: w.layers for p, w in self.winners.items()},
            "seconds": round(self.seconds, 2),
        }


def auto_keep_fp32(
    fp32: bytes,
    spec: ModelSpec,
    variants: Sequence[str],
    ranking: Sequence[dict[str, Any]],
    report: dict[str, dict[str, Any]],
    *,
    calibration: Any,
    batches: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    method: str,
    keep: Sequence[str],
    user_kept: Sequence[str],
    ranges_cache: Path,
    min_dice: float,
    cpu_tuning: dict[str, Any] | None = None,
    decide_on: str = "pooled",
    step: int = AUTO_KEEP_STEP,
    max_rounds: int = AUTO_KEEP_ROUNDS,
    budget_s: float = AUTO_KEEP_BUDGET_S,
    progress: Callable[[str], Any] | None = None,
) -> AutoKeep:
    """Keep the most harmful layers fp32, a few more each round, until the int8 variants pass.

    Round ``r`` keeps the first ``r × step`` layers of ``ranking`` (most harmful first, by
    the share of the output error they remove; only layers whose restoring helped, and only
    nodes of the fp32 graph) in fp32 on top of
    ``keep``: the failing variants are re-quantized from the ranges in ``ranges_cache`` (no
    new calibration pass), the kept nodes read their inputs before the Q/DQ pairs
    (:func:`~edgeseg.calib.sensitivity.keep_layers_fp32`), the TensorRT Q/DQ rules are checked
    and the gate runs again on the held-out series. A variant leaves the loop in the first
    round it passes; the loop stops after ``max_rounds`` rounds, when the ranking has no more
    helpful layers, or when no round may start because ``budget_s`` is spent.

    ``report`` holds round 0 (the gate as calibrated). Returns the rounds (round 0 included)
    and, per rescued variant, its model, gate report and kept layers.
    """
    import onnx

    from edgeseg.calib.gate import run_gate
    from edgeseg.calib.qdq_rules import check_qdq
    from edgeseg.calib.quantize import name_nodes, quantize_int8
    from edgeseg.calib.sensitivity import keep_layers_fp32

    names = {n.name for n in name_nodes(onnx.load_from_string(fp32)).graph.node}
    order = [
        r["node"]
        for r in ranking
        if r["error_removed"] > 0 and r["node"] in names and r["node"] not in user_kept
    ]
    pending = list(variants)
    start = time.perf_counter()
    rounds: list[dict[str, Any]] = [_round_row(0, [], report, pending, 0.0)]
    winners: dict[str, AutoKept] = {}
    settings = {"step": step, "max_rounds": max_rounds, "budget_s": budget_s, "min_dice": min_dice}
    stopped = f"{max_rounds} round(s), the limit"
    for rnd in range(1, max_rounds + 1):
        kept = order[: rnd * step]
        if len(kept) == len(rounds[-1]["kept_fp32"]):
            stopped = "no more layers the sensitivity ranking found helpful"
            break
        if time.perf_counter() - start > budget_s:
            stopped = f"time budget of {budget_s:.0f} s spent"
            break
        t = time.perf_counter()
        q = quantize_int8(
            fp32,
            batches,
            spec.input_name,
            method=method,
            variants=pending,
            keep_fp32=[*keep, *kept],
            calibration_cache=ranges_cache,
            cpu_tuning=cpu_tuning,  # the first build's measured CPU choice, not re-timed
        )
        models = {p: keep_layers_fp32(q.models[p], kept) for p in pending}
        qdq = check_qdq(models["int8"]) if "int8" in models else None
        rep = run_gate(
            models,
            spec,
            calibration.holdout,
            min_dice=min_dice,
            reference=reference,
            decide_on=decide_on,
        )
        rounds.append(_round_row(rnd, kept, rep, pending, time.perf_counter() - t))
        _say(
            progress,
            f"auto-keep round {rnd}: {len(kept)} layer(s) fp32 → "
            + ", ".join(
                f"{p} min Dice vs fp32 {rep[p]['min_dice_vs_fp32']:.4f}"
                + (" (passes)" if rep[p]["passed"] else "")
                for p in pending
            ),
        )
        for p in [p for p in pending if rep[p]["passed"]]:
            r = dict(rep[p])
            r["auto_kept_fp32"] = list(kept)
            r["auto_keep_round"] = rnd
            r["sensitivity"] = report[p].get("sensitivity")
            tuning = q.settings.get("int8_cpu_tuning") if p == "int8_cpu" else None
            winners[p] = AutoKept(models[p], r, list(kept), rnd, qdq if p == "int8" else None, tuning)
        pending = [p for p in pending if p not in winners]
        if not pending:
            stopped = "every variant passes"
            break
    for p in variants:  # each variant's report carries the rounds it took part in
        history = [
            {
                "round": r["round"],
                "kept_fp32": len(r["kept_fp32"]),
                "min_dice_vs_fp32": r["min_dice_vs_fp32"][p],
            }
            for r in rounds
            if p in r["min_dice_vs_fp32"]
        ]
        (winners[p].report if p in winners else report[p])["auto_keep_rounds"] = history
    return AutoKeep(list(variants), rounds, winners, stopped, settings, time.perf_counter() - start)


def _round_row(
    rnd: int, kept: Sequence[str], rep: dict[str, dict[str, Any]], variants: Sequence[str], seconds: float
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": rnd,
        "kept_fp32": list(kept),
        "min_dice_vs_fp32": {p: rep[p]["min_dice_vs_fp32"] for p in variants},
        "passed": {p: rep[p]["passed"] for p in variants},
        "seconds": round(seconds, 2),
    }
    if all("mean_dice_vs_truth" in rep[p] for p in variants):
        row["mean_dice_vs_truth"] = {p: rep[p]["mean_dice_vs_truth"] for p in variants}
    return row
