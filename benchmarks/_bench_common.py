"""Helpers for the pipeline benchmark: timing statistics, machine facts, subprocess probes, reports."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("read", "preprocess", "infer", "postprocess", "write")
COLORS = {
    "read": "#4C72B0",
    "preprocess": "#55A868",
    "infer": "#C44E52",
    "postprocess": "#8172B2",
    "write": "#CCB974",
    "other": "#999999",
}


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class PipelineResult:
    """All timed runs of one pipeline on one model, plus one-off facts (load time, RSS)."""

    name: str
    runs: list[dict[str, float]] = field(default_factory=list)  # ms per stage + "e2e"
    load_ms: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""
    agreement: float | None = None  # fraction of voxels whose label equals the naive pipeline's
    skipped: bool = False

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if key in r]
        return statistics.median(values) if values else None

    def medians(self) -> dict[str, float]:
        keys = [*STAGES, "other", "e2e"]
        return {k: v for k in keys if (v := self.median(k)) is not None}

    def spread(self, key: str = "e2e") -> tuple[float, float] | None:
        """(min, max) over the timed runs, to show how noisy the machine was."""
        values = [r[key] for r in self.runs if key in r]
        return (min(values), max(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "skipped": self.skipped,
            "note": self.note,
            "n_runs": len(self.runs),
            "median_ms": {k: round(v, 2) for k, v in self.medians().items()},
            "e2e_min_max_ms": [round(v, 2) for v in self.spread()] if self.spread() else None,
            "load_ms": round(self.load_ms, 1) if self.load_ms is not None else None,
            "peak_rss_mib": round(self.peak_rss_mib, 1) if self.peak_rss_mib is not None else None,
            "label_agreement_vs_naive": self.agreement,
            "runs_ms": [{k: round(v, 2) for k, v in r.items()} for r in self.runs],
        }


def hippocampus_example() -> Any:
    """examples/hippocampus/train.py as a module (its make_model builds the example's nets)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "train.py"
    spec = importlib.util.spec_from_file_location("hippo_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def finish_run(stages: dict[str, float], e2e_ms: float) -> dict[str, float]:
    """Add e2e and "other" (wall time not inside any named stage) to one run's stages."""
    run = {k: stages.get(k, 0.0) for k in STAGES}
    run["other"] = max(0.0, e2e_ms - sum(run.values()))
    run["e2e"] = e2e_ms
    return run


# ---------------------------------------------------------------------------------------------
# Machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that decide ORT/torch kernels (AVX2, AVX-512, VNNI)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f)
    except OSError:
        pass
    return []


def versions(modules: Sequence[str]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:  # not installed: recorded as absent
            out[name] = "absent"
    return out


def git_commit(repo: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(repo: Path) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": cpu_flags(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(repo),
        "versions": versions(
            ["numpy", "torch", "onnxruntime", "onnx", "pydicom", "highdicom", "monai", "edgeseg"]
        ),
    }


# ---------------------------------------------------------------------------------------------
# Subprocess probes (fresh interpreters, so import state and peak RSS are honest)


def import_time_ms(statement: str, n: int) -> dict[str, float]:
    """Median/min wall time of ``statement`` in ``n`` fresh interpreters."""
    code = f"import time; t = time.perf_counter(); {statement}; print((time.perf_counter() - t) * 1e3)"
    times = []
    for _ in range(n):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}  # type: ignore[dict-item]
        times.append(float(r.stdout.strip().splitlines()[-1]))
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1), "n": n}


def run_child(argv: list[str], timeout: float = 300) -> dict[str, Any]:
    """Run a child process that prints one JSON object on its last stdout line."""
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child failed (rc {r.returncode}): {tail}"}
    return json.loads(lines[-1])


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB.

    VmHWM, not ru_maxrss: Linux carries the parent's peak into a fork+exec child's ru_maxrss, so
    a worker started by a parent that imported torch would report torch's footprint.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Reports


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return None if a is None or b is None or b == 0 else a / b


def markdown_table(models: list[dict[str, Any]]) -> str:
    """One row per (model, pipeline): per-stage medians, e2e, speedup vs naive, RSS."""
    head = (
        "| model | pipeline | read | pre | infer | post | write | e2e ms (min–max) | × naive | "
        "pre+post % | load ms | peak RSS MiB | labels = naive |"
    )
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for m in models:
        naive = next((p for p in m["pipelines"] if p["name"] == "naive_torch"), None)
        naive_e2e = naive["median_ms"].get("e2e") if naive and not naive["skipped"] else None
        for p in m["pipelines"]:
            if p["skipped"]:
                lines.append(f"| {m['key']} | {p['name']} | " + " | ".join(["–"] * 10) + f" | {p['note']} |")
                continue
            md = p["median_ms"]
            e2e = md.get("e2e")
            lo_hi = p.get("e2e_min_max_ms") or [None, None]
            prepost = ratio((md.get("preprocess", 0) + md.get("postprocess", 0)) * 100, e2e)
            agree = p.get("label_agreement_vs_naive")
            lines.append(
                f"| {m['key']} | {p['name']} | "
                + " | ".join(fmt(md.get(s)) for s in STAGES)
                + f" | **{fmt(e2e)}** ({fmt(lo_hi[0], 0)}–{fmt(lo_hi[1], 0)}) | {fmt(ratio(naive_e2e, e2e), 2)}× "
                + f"| {fmt(prepost)} | {fmt(p.get('load_ms'), 0)} | {fmt(p.get('peak_rss_mib'), 0)} "
                + f"| {'n/a' if agree is None else f'{agree:.4f}'} |"
            )
    return "\n".join(lines)


def plot(models: list[dict[str, Any]], path: Path) -> Path:
    """Stacked per-stage bars per pipeline, one panel per model (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in models if any(not p["skipped"] for p in m["pipelines"])]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(5.2 * max(1, len(shown)), 4.6), squeeze=False)
    for ax, m in zip(axes[0], shown):
        pipes = [p for p in m["pipelines"] if not p["skipped"]]
        names = [p["name"].replace("_", "\n", 1) for p in pipes]
        bottom = [0.0] * len(pipes)
        for stage in [*STAGES, "other"]:
            vals = [p["median_ms"].get(stage, 0.0) for p in pipes]
            ax.bar(names, vals, bottom=bottom, color=COLORS[stage], label=stage, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(m["title"], fontsize=9)
        ax.set_ylabel("ms (median, end to end)")
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
