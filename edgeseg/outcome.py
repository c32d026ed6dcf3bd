"""What happened to one series: the outcome ``edgeseg run``, the stream service and the
multimodal job builder all report (its own module so none of them imports another for it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeriesOutcome:
    """What happened to one series. ``source`` is a non-PHI description (folder or file path as
    the user gave it, plus series number); ``error`` is one sentence naming the file."""

    source: str
    status: str  # "ok" | "failed" | "skipped" (a DICOM object that is not an image: SEG, SR…)
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    series: str | None = None  # short hash of the SeriesInstanceUID
    warnings: list[str] = field(default_factory=list)
    # Which part of a series that splits into several ("part 2/3: <why>"), None when it is one;
    # ``part_key`` names that part in the output file names (stable across runs).
    part: str | None = None
    part_key: str | None = None
    # The listener's per-series outcome of a split series: one outcome per part.
    parts: list[SeriesOutcome] = field(default_factory=list)
    # The failure may pass by itself (the inference server is unreachable now): the listener
    # keeps the series and tries it again later instead of setting it aside.
    transient: bool = False

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "series": self.series,
            "part": self.part,
            "part_key": self.part_key,
            "status": self.status,
            "error": self.error,
            "outputs": self.outputs,
            "timings_ms": {k: round(v, 2) for k, v in self.timings.items()},
            "warnings": self.warnings,
            **({"transient": True} if self.transient else {}),
            **({"parts": [p.to_dict() for p in self.parts]} if self.parts else {}),
        }
