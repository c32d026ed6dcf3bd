"""Peak memory and time of the CPU sliding window vs volume size and class count, before/after.

Every point runs in a fresh subprocess (peak RSS = the kernel's VmHWM of that process, which
includes Python, numpy, ONNX Runtime and the model): a real MR volume (MSD hippocampus, read
in place from ../shared/data/seg) resampled to N³, segmented twice by a ``Segmenter`` with the
hippocampus 3D spec's windows (patch 32×48×32, overlap 0.25, batch 2, z-score) on ONNX Runtime.
The networks are small real conv nets built with torch here and exported to ONNX (3×3×3 conv →
ReLU → 1×1×1 conv to K classes, untrained: time and memory do not depend on weight values).

``before`` is the segmenter of commit d9e3206 (one float32 buffer of K × the volume), run from
a temporary copy of the package with that one file swapped in; ``after`` is the tree's. Points
whose whole-volume buffer would exceed ``--max-buffer-gb`` are not run for ``before``.

    python benchmarks/bench_memory.py                     # 64³..256³ × K 3, 100; ≈ 5 min on 2 cores
    python benchmarks/bench_memory.py --sizes 64,128 --classes 3 --impls after
    python benchmarks/bench_memory.py --big               # + K=100 on 512×512×300 (after only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared")).resolve()
CASE = SHARED / "data" / "seg" / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_367.nii.gz"
BEFORE_COMMIT = "d9e3206"
PATCH, OVERLAP, BATCH = (32, 48, 32), 0.25, 2


def build_model(classes: int, path: Path) -> Path:
    """A small real 3D conv net with ``classes`` outputs, exported with torch (cached)."""
    if path.exists():
        return path
    import torch

    torch.manual_seed(classes)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, classes, 1)
    ).eval()
    x = torch.zeros(BATCH, 1, *PATCH)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        net, (x,), str(tmp), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    tmp.replace(path)
    return path


def before_package(work: Path) -> Path:
    """A copy of edgeseg/ with segmenter.py as of BEFORE_COMMIT (the tree is not touched)."""
    root = work / "before"
    if not (root / "edgeseg").is_dir():
        shutil.copytree(REPO / "edgeseg", root / "edgeseg", ignore=shutil.ignore_patterns("__pycache__"))
        old = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:edgeseg/segmenter.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        (root / "edgeseg" / "segmenter.py").write_text(old)
    return root


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    """One point, in this fresh process: prints one JSON line."""
    import numpy as np

    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.geometry import resample
    from edgeseg.nifti_input import read_nifti
    from edgeseg.segmenter import Segmenter
    from edgeseg.spec import Label, ModelSpec, ZScore
    from edgeseg.volume import Volume

    shape = tuple(int(n) for n in args.shape.split("x"))
    src = read_nifti(CASE)
    arr = resample(src.modality_values().astype(np.float32), shape, "linear", (0, 1, 2))
    vol = Volume.from_array(np.ascontiguousarray(arr, dtype=np.float32))
    labels = [Label(i, f"class {i}") for i in range(1, args.classes)]
    spec = ModelSpec(dims=3, labels=labels, intensity=[ZScore()], patch_size=PATCH, overlap=OVERLAP,
                     divisible_by=8, batch_size=BATCH)  # fmt: skip
    seg = Segmenter(spec, OrtBackend(Path(args.model).read_bytes(), threads=args.threads))
    base = peak_rss_mib()
    t = time.perf_counter()
    seg.segment(vol)  # the first volume of a grid also plans its windows and warms the engine
    first = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    res = seg.segment(vol)
    total = (time.perf_counter() - t) * 1e3
    tm = res.timings
    print(json.dumps({
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_segment_mib": round(base, 1),
        "segment_ms": round(total, 1), "first_segment_ms": round(first, 1), "timings_ms": {k: round(v, 1) for k, v in tm.items()},
        "labels_sum": int(res.labels.astype(np.int64).sum()),
    }), flush=True)  # fmt: skip


def run_point(impl: str, shape: str, classes: int, model: Path, pkg: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--classes", str(classes),
           "--model", str(model), "--threads", str(threads)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(pkg))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(pkg))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,192,256", help="edge lengths N of N³ volumes")
    ap.add_argument("--classes", default="3,100")
    ap.add_argument("--impls", default="before,after")
    ap.add_argument("--big", action="store_true", help="also K=100 on 512×512×300 (after only)")
    ap.add_argument("--max-buffer-gb", type=float, default=4.0, help="skip 'before' points above this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_memory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.classes = int(args.classes)
        worker(args)
        return 0
    if not CASE.exists():
        print(f"the shared test data is not here: {CASE}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    pkgs = {"after": REPO, "before": before_package(work)}
    impls = [i for i in args.impls.split(",") if i]
    points = [
        (f"{n}x{n}x{n}", int(k)) for k in args.classes.split(",") for n in map(int, args.sizes.split(","))
    ]
    if args.big:
        points.append(("300x512x512", 100))
    rows = []
    for shape, k in points:
        model = build_model(k, args.out / f"convnet_k{k}.onnx")
        voxels = 1
        for n in shape.split("x"):
            voxels *= int(n)
        buffer_gb = k * voxels * 4 / 1e9
        for impl in impls:  # alternated per point: both see the same machine load
            if impl == "before" and (buffer_gb > args.max_buffer_gb or shape == "300x512x512"):
                r = {"skipped": f"its K × volume buffer alone is {buffer_gb:.1f} GB"}
            else:
                r = run_point(impl, shape, k, model, pkgs[impl], args.threads)
            rows.append({"impl": impl, "shape": shape, "classes": k, **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        f"Patch {'×'.join(map(str, PATCH))}, overlap {OVERLAP}, batch {BATCH}, ONNX Runtime; each point in a "
        "fresh process, two runs (times: the second; peak RSS = VmHWM over both).",
        "",
        "| volume | K | impl | peak RSS MiB | segment s | infer s | pre+post s | pre+post % | first run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['shape'].replace('x', '×')} | {r['classes']} | {r['impl']} |"
        if "peak_rss_mib" not in r:
            lines.append(f"{head} – | – | – | – | – | – | {r.get('skipped') or r.get('error')} |")
            continue
        t = r["timings_ms"]
        pp = t.get("preprocess", 0.0) + t.get("postprocess", 0.0)
        lines.append(
            f"{head} {r['peak_rss_mib']:.0f} | {r['segment_ms'] / 1e3:.2f} | {t.get('infer', 0.0) / 1e3:.2f} "
            f"| {pp / 1e3:.2f} | {100 * pp / max(r['segment_ms'], 1e-9):.1f} | {r['first_segment_ms'] / 1e3:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
