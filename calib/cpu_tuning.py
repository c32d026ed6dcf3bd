"""Shape the ONNX Runtime CPU int8 variant by what measurably runs faster on this host.

Two graph choices decide whether INT8 pays on a CPU, and both depend on the CPU (VNNI or not,
ARM dot products) and on the network, so they are measured, not assumed:

- **phase convolutions** for a ConvTranspose (:mod:`edgeseg.export.phase_conv`): ORT has no
  int8 ConvTranspose, so U-Net decoders run float between DQ/Q; as phase convolutions they run
  int8, at the price of an interleave. Deep decoder stages (many channels, small maps) win,
  the top stage (few channels, full resolution) often loses.
- **few-channel convolutions kept float**: int8 kernels work on channel blocks, so a conv with
  ≤ 4 input or output channels (the first and last layers of most segmentation nets) is slower
  in int8 than in float; these layers are also the most sensitive to quantization.

Greedy and bounded: start from the plain int8 graph, try each choice on its own, keep it when
the whole model gets faster by more than ``margin``, stop when ``budget_s`` is spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("edgeseg.calib")

FEW_CHANNELS = 4
KEEP_FEW_CHANNELS = "keep few-channel convs fp32"


@dataclass
class CpuChoice:
    """What the tuning kept, and the timings it based that on."""

    model: bytes
    phase_conv: list[str] = field(default_factory=list)
    kept_fp32: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    few_channels: bool = False

    def record(self) -> dict[str, Any]:
        """JSON for the bundle's provenance; :func:`tune_cpu_int8` can replay it."""
        return {
            "phase_conv": self.phase_conv,
            "few_channels_fp32": self.few_channels,
            "kept_fp32": self.kept_fp32,
            "trials": self.trials,
        }


def few_channel_convs(model: Any, limit: int = FEW_CHANNELS) -> list[str]:
    """Names of Conv/ConvTranspose nodes with at most ``limit`` input or output channels."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose") or len(n.input) < 2 or n.input[1] not in weights:
            continue
        w = weights[n.input[1]]
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        cout, cin = (w[1] * group, w[0]) if n.op_type == "ConvTranspose" else (w[0], w[1] * group)
        if min(cin, cout) <= limit:
            out.append(n.name)
    return out


def tune_cpu_int8(
    prepared: Any,
    quantize: Callable[[Any, Sequence[str]], bytes],
    batch: np.ndarray,
    *,
    keep: Sequence[str] = (),
    candidates: Sequence[str] | None = None,
    budget_s: float = 60.0,
    margin: float = 0.03,
    replay: dict[str, Any] | None = None,
) -> CpuChoice:
    """Pick phase convolutions and float few-channel convs for the CPU int8 graph.

    Parameters
    ----------
    prepared:
        the fp32 ModelProto that is quantized (after ORT's pre-processing).
    quantize:
        ``quantize(graph, excluded_node_names) -> int8 ONNX bytes`` with the shared ranges.
    batch:
        one input batch, as at run time, to time each variant on.
    keep:
        node names the user keeps fp32 (ConvTransposes among them are never rewritten).
    candidates:
        ConvTranspose names allowed to become phase convolutions (default: all that can).
    replay:
        a previous :meth:`CpuChoice.record` of this model: build its choice again without
        timing anything (re-quantizing with more layers kept fp32 must not re-tune each round).
    """
    from edgeseg.calib.bench import time_model
    from edgeseg.export.phase_conv import rewrite_conv_transpose

    keep = list(keep)
    if candidates is None:
        candidates = [n.name for n in prepared.graph.node if n.op_type == "ConvTranspose"]
    candidates = [c for c in candidates if c not in keep]

    def build(phase: Sequence[str], few: bool) -> tuple[bytes, list[str]]:
        graph = _copy(prepared)
        if phase:
            graph, _ = rewrite_conv_transpose(graph, only=set(phase))
        excluded = sorted(set(keep) | (set(few_channel_convs(graph)) if few else set()))
        return quantize(graph, excluded), excluded

    if replay is not None:
        phase = [c for c in replay.get("phase_conv", []) if c in candidates]
        few = bool(replay.get("few_channels_fp32"))
        model, excluded = build(phase, few)
        return CpuChoice(model, phase, excluded, list(replay.get("trials", [])), few)

    start = time.perf_counter()
    model, excluded = build([], False)
    best_ms = time_model(model, batch)
    choice = CpuChoice(
        model, [], excluded, [{"variant": "plain int8", "ms": round(best_ms, 3), "kept": True}]
    )
    phase: list[str] = []
    few = False
    options = list(candidates)
    convs = [n.name for n in prepared.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    if set(convs) - set(few_channel_convs(prepared)) - set(keep):
        options.insert(0, KEEP_FEW_CHANNELS)  # not when it would leave nothing to quantize
    for option in options:
        if time.perf_counter() - start > budget_s:
            choice.trials.append({"variant": option, "skipped": "time budget"})
            continue
        trial_phase = phase + ([option] if option != KEEP_FEW_CHANNELS else [])
        trial_few = few or option == KEEP_FEW_CHANNELS
        try:
            trial, trial_excluded = build(trial_phase, trial_few)
        except Exception as exc:  # a graph ORT cannot quantize: skip this option, say why
            choice.trials.append({"variant": option, "skipped": str(exc).splitlines()[0][:200]})
            continue
        ms = time_model(trial, batch)
        better = ms < best_ms * (1.0 - margin)
        label = option if option == KEEP_FEW_CHANNELS else f"phase conv {option}"
        choice.trials.append({"variant": label, "ms": round(ms, 3), "kept": bool(better)})
        if better:
            best_ms, phase, few = ms, trial_phase, trial_few
            choice = CpuChoice(trial, list(phase), trial_excluded, choice.trials, few)
    log.info("int8_cpu tuning: %s", choice.trials)
    return choice


def _copy(model: Any) -> Any:
    copy = type(model)()
    copy.CopyFrom(model)
    return copy
