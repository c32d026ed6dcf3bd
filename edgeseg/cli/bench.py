"""``edgeseg bench``: per-stage latency percentiles and throughput for whichever backend runs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from edgeseg.cli._common import echo_json, table
from edgeseg.cli.triton import BACKEND

STAGES = ("read", "preprocess", "h2d", "infer", "postprocess", "d2h", "write")


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def bench(
    bundle: str,
    inputs: list[str],
    *,
    backend: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    iterations: int = 10,
    warmup: int = 2,
    write: bool = True,
    tta: bool = True,
) -> dict:
    """Run the full pipeline ``iterations`` times on INPUT and summarise per-stage latency."""
    from edgeseg.outputs import write_outputs
    from edgeseg.run import read_any, series_stem
    from edgeseg.segmenter import Segmenter

    t_open = time.perf_counter()
    seg = Segmenter.open(bundle, backend=backend, precision=precision, threads=threads, tta=tta)
    open_ms = (time.perf_counter() - t_open) * 1e3
    per_stage: dict[str, list[float]] = {}
    totals: list[float] = []
    first_result_ms = None
    with tempfile.TemporaryDirectory(prefix="edgeseg-bench-") as tmp:
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            volume = read_any(inputs[0])
            stages = {"read": (time.perf_counter() - t0) * 1e3}
            result = seg.segment(volume)
            stages.update(result.timings)
            if write:
                t1 = time.perf_counter()
                write_outputs(
                    result.labels,
                    volume,
                    Path(tmp),
                    formats=("seg",),
                    labels_spec=seg.spec.labels,
                    stem=series_stem(volume.series_instance_uid, "bench"),
                    algorithm_name="edgeseg-bench",
                    algorithm_version="0",
                )
                stages["write"] = (time.perf_counter() - t1) * 1e3
            total = (time.perf_counter() - t0) * 1e3
            if first_result_ms is None:
                first_result_ms = open_ms + total
            if i < warmup:
                continue
            totals.append(total)
            for k, v in stages.items():
                per_stage.setdefault(k, []).append(v)
    desc = seg.describe()
    seg.close()
    shape = list(volume.shape)
    return {
        "backend": desc,
        "input": {"path": str(inputs[0]), "shape_zyx": shape},
        "iterations": iterations,
        "open_ms": open_ms,
        "time_to_first_result_ms": first_result_ms,
        "stages_ms": {k: _percentiles(v) for k, v in per_stage.items()},
        "total_ms": _percentiles(totals),
        "throughput_series_per_s": 1e3 / float(np.median(totals)),
        "throughput_voxels_per_s": float(np.prod(shape)) * 1e3 / float(np.median(totals)),
    }


@click.command("bench")
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--backend",
    type=BACKEND,
    default="auto",
    show_default=True,
    help="A local engine, or triton://HOST:PORT/MODEL: segment through a Triton server (edgeseg export-triton).",
)
@click.option("--no-tta", is_flag=True, help="Skip test-time mirroring (one network pass per window).")
@click.option("--precision", default=None)
@click.option("--threads", type=int, default=None)
@click.option("-n", "--iterations", default=10, show_default=True)
@click.option("--warmup", default=2, show_default=True)
@click.option("--no-write", is_flag=True, help="Leave the SEG writing stage out.")
@click.option("--json", "as_json", is_flag=True)
def command(bundle, inputs, backend, no_tta, precision, threads, iterations, warmup, no_write, as_json):
    """Time read → preprocess → infer → postprocess → write on INPUT (one series) with BUNDLE."""
    r = bench(
        bundle,
        list(inputs),
        backend=backend,
        precision=precision,
        threads=threads,
        iterations=iterations,
        warmup=warmup,
        write=not no_write,
        tta=not no_tta,
    )
    if as_json:
        echo_json(r)
        return
    b = r["backend"]
    click.echo(
        f"{b.get('model', '')} on {b['backend']} {b.get('precision', '')} "
        f"({b.get('threads', b.get('device', ''))} threads/device), input {r['input']['shape_zyx']} zyx, "
        f"{iterations} runs after {warmup} warm-up"
    )
    rows = [
        [s, f"{r['stages_ms'][s]['p50']:.1f}", f"{r['stages_ms'][s]['p99']:.1f}"]
        for s in STAGES
        if s in r["stages_ms"]
    ]
    rows.append(["total", f"{r['total_ms']['p50']:.1f}", f"{r['total_ms']['p99']:.1f}"])
    click.echo(table(rows, ["stage", "p50 ms", "p99 ms"]))
    click.echo(
        f"throughput {r['throughput_series_per_s']:.2f} series/s "
        f"({r['throughput_voxels_per_s'] / 1e6:.1f} Mvoxel/s); time to first result "
        f"{r['time_to_first_result_ms']:.0f} ms (open {r['open_ms']:.0f} ms)"
    )
