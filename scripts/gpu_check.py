"""The first-GPU check: everything the CPU could not prove, in one run that prints one table.

Run on a fresh NVIDIA machine with the repository (and the wheels carried with it):
``bash scripts/gpu_check.sh [--bundle B.edgeseg --series DIR]``. Parts, each timed and reported
as a row (a failing part does not stop the others):

1. every kernel vs its numpy reference, graph replay vs plain launch, no leak over 1000 runs
   (tests/test_cuda_gpu.py and the ONNX Runtime CUDA test, through pytest);
2. H2D and D2H bandwidth from pinned memory;
3. the fused preprocessing kernel's bandwidth as a share of a device-to-device copy;
4. GpuSegmenter (TensorRT where importable, else ONNX Runtime's CUDA provider) vs the CPU
   Segmenter on a real series: label agreement and per-stage ms.

Without a GPU it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str]] = []  # (check, result, detail)


def row(check: str, ok: bool | None, detail: str) -> None:
    ROWS.append((check, {True: "ok", False: "FAIL", None: "skipped"}[ok], detail))


def no_gpu_reason() -> str | None:
    sys.path.insert(0, str(REPO / "tests"))
    from gpu_util import gpu_skip_reason

    return gpu_skip_reason()


def kernel_tests() -> None:
    t = time.perf_counter()
    files = ["tests/test_cuda_gpu.py", "tests/test_backend_onnxruntime_cuda.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *files], cwd=REPO, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    row(
        "kernels vs references, graphs, leaks (pytest)",
        r.returncode == 0,
        f"{last} in {time.perf_counter() - t:.0f} s",
    )
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-2000:], file=sys.stderr)


def _timed(stream: Any, fn, reps: int) -> float:
    """Median ms of ``fn()`` on ``stream``, by events."""
    from edgeseg.cuda.memory import Event

    start, end = Event(), Event()
    fn()
    stream.synchronize()
    times = []
    for _ in range(reps):
        start.record(stream)
        fn()
        end.record(stream)
        times.append(end.elapsed_ms(start))
    return float(np.median(times))


def bandwidth() -> None:
    from edgeseg.cuda.memory import DeviceBuffer, PinnedBuffer, Stream, copy_device

    n = 256 << 20
    stream, host, dev, dev2 = Stream(), PinnedBuffer((n,), np.uint8), DeviceBuffer(n), DeviceBuffer(n)
    h2d = _timed(stream, lambda: dev.upload(host.array, stream), 10)
    d2h = _timed(stream, lambda: dev.download(host.array, stream), 10)
    d2d = _timed(stream, lambda: copy_device(dev2.ptr, dev.ptr, n, stream), 10)
    gb = n / 1e9
    row("H2D / D2H from pinned memory", True, f"{gb / h2d * 1e3:.1f} / {gb / d2h * 1e3:.1f} GB/s (256 MiB)")
    # A copy reads and writes every byte: its bandwidth counts both.
    row("device-to-device copy", True, f"{2 * gb / d2d * 1e3:.1f} GB/s (read + write)")
    BANDWIDTH["d2d"] = 2 * gb / d2d * 1e3
    for b in (host, dev, dev2):
        b.close()
    stream.close()


BANDWIDTH: dict[str, float] = {}


def preprocess_bandwidth() -> None:
    """The fused kernel on a 176×256×256 int16 MR-sized volume → 128³ float32 (Window, RAS)."""
    from edgeseg.cuda.device import device_info
    from edgeseg.cuda.memory import DeviceBuffer, PinnedPool, Stream
    from edgeseg.cuda.module import Kernels
    from edgeseg.cuda.pipeline import GpuPipeline, Program, _Buffers
    from edgeseg.cuda.plan import output_strides, plan_volumes
    from edgeseg.spec import Label, ModelSpec, Window
    from edgeseg.volume import Volume

    info = device_info(0)
    spec = ModelSpec(dims=3, labels=[Label(1, "a")], intensity=[Window(40, 400)], target_shape=(128, 128, 128),
                     orientation="RAS", interpolation="linear")  # fmt: skip
    stored = np.random.default_rng(0).integers(0, 4000, (176, 256, 256)).astype(np.int16)
    vol = Volume(stored, np.ones(176), np.zeros(176), (1.0, 1.0, 1.0), np.diag([1.0, 1.0, 1.0, 1.0]))
    stream = Stream()
    pipe = GpuPipeline.__new__(GpuPipeline)
    pipe.spec, pipe.kernels, pipe.stream, pipe.device = spec, Kernels(info.sm), stream, info
    pipe._bufs, pipe._pinned, pipe.pool = _Buffers(), {}, PinnedPool(mapped=info.integrated)
    src, layout = pipe._stage_source(0, stored)  # the one H2D copy, then the kernel alone is timed
    stream.synchronize()
    plans, _ = plan_volumes(vol, spec, [layout])
    padded = plans[0].padded
    out = DeviceBuffer(int(np.prod(padded)) * 4)
    prog = Program(stream, pipe.kernels)
    pipe._preprocess_program(prog, plans, [src], out.ptr, output_strides(spec, padded), False)
    ms = _timed(stream, prog, 20)
    moved = stored.nbytes + out.nbytes  # one read of the source, one write of the input
    gbs = moved / 1e9 / ms * 1e3
    share = f", {gbs / BANDWIDTH['d2d']:.0%} of a D2D copy" if BANDWIDTH.get("d2d") else ""
    row("fused preprocessing kernel", True, f"{ms:.2f} ms, {gbs:.1f} GB/s{share}")
    pipe._bufs.close()
    out.close()
    stream.close()


def end_to_end(bundle: Path | None, series: Path | None) -> None:
    if bundle is None or series is None or not bundle.exists() or not series.exists():
        row(
            "GpuSegmenter vs CPU Segmenter",
            None,
            "no bundle/series (run examples/quickstart.py, or pass --bundle/--series)",
        )
        return
    from edgeseg import Bundle, Segmenter, read_volume
    from edgeseg.cuda.pipeline import GpuSegmenter

    vol = read_volume(series)
    b = Bundle.open(bundle)
    try:
        gpu = GpuSegmenter.open(b)
    except Exception as exc:
        row("GpuSegmenter vs CPU Segmenter", False, f"cannot open on the GPU: {exc}")
        return
    with Segmenter.open(b, backend="onnxruntime") as cpu:
        want = cpu.segment(vol)
    results = [gpu.segment(vol) for _ in range(5)]
    got = results[-1]
    agree = float((got.labels == want.labels).mean())
    stages = ", ".join(f"{k} {np.median([r.timings[k] for r in results[1:]]):.1f}" for k in got.timings)
    engine = gpu.backend.describe().get("backend", "?")
    row(f"GpuSegmenter ({engine}) vs CPU", agree >= 0.999, f"labels {agree:.5%} identical; ms: {stages}")
    cpu_ms = ", ".join(f"{k} {v:.1f}" for k, v in want.timings.items())
    row("CPU Segmenter (ONNX Runtime)", True, f"ms: {cpu_ms}")
    gpu.close()


def table() -> str:
    w = max(len(c) for c, _, _ in ROWS)
    lines = [f"| {'check':<{w}} | result  | detail", f"|{'-' * (w + 2)}|---------|-------"]
    lines += [f"| {c:<{w}} | {r:<7} | {d}" for c, r, d in ROWS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "out" / "quickstart" / "brain.edgeseg")
    ap.add_argument("--series", type=Path, default=REPO / "out" / "quickstart" / "dicom")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest part")
    args = ap.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: no GPU ({reason}); nothing to check here")
        return 2
    from edgeseg.cuda.device import device_info

    d = device_info(0)
    print(
        f"gpu_check on {d.name} ({d.sm}, {d.total_memory / 2**30:.0f} GiB, {'integrated' if d.integrated else 'discrete'})"
    )
    parts = [("bandwidth", bandwidth), ("preprocess", preprocess_bandwidth),
             ("e2e", lambda: end_to_end(args.bundle, args.series))]  # fmt: skip
    if not args.no_tests:
        parts.insert(0, ("tests", kernel_tests))
    for name, part in parts:
        try:
            part()
        except Exception as exc:  # one failing part is one row
            row(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    print(table())
    return 0 if all(r != "FAIL" for _, r, _ in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
