"""Segmenting through Triton on this machine: series/s and p50/p99 latency with 1 and 2 model
instances and 1–8 concurrent clients, and bytes per request against sending float32 tensors.

The server is the real tritonserver (nvidia-pytriton's wheel) on 127.0.0.1, serving an
``edgeseg export-triton`` repository with two models of one bundle: ``<name>-i1`` (one instance,
all cores) and ``<name>-i2`` (two instances, half the cores each). Each client is a thread with
its own gRPC channel (:class:`edgeseg.triton.client.TritonSegmenter`) sending one real series
again and again; "local" is the same bundle in-process (``Segmenter.open(backend=...)``).

    .venv/bin/python benchmarks/bench_triton.py                 # tiny 2D bundle, a real MR series
    .venv/bin/python benchmarks/bench_triton.py --brain         # deepbet's 3D brain model (needs torch)
    .venv/bin/python benchmarks/bench_triton.py --bundle B.edgeseg --series DIR --json out.json

"Float32 tensors" is what a plain model-on-Triton deployment moves per series: the preprocessed
network input up, float32 logits/probabilities (K channels on the model grid) back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dicom"
DEFAULT_SERIES = SHARED / "tcia_brain_tumor_progression" / "PGBM-003_Study3" / "26401-T1prereg-52906"


def _tiny_bundle(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_bundle import threshold_bundle

    return threshold_bundle(folder)


def _brain_bundle(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import BRAIN_SPEC, deepbet_model_path

    from edgeseg.export.build import build_bundle
    from edgeseg.spec import load_spec

    model = deepbet_model_path()
    if model is None:
        sys.exit("--brain needs deepbet (pip install --no-deps deepbet==1.0.2)")
    out = folder / "brain.edgeseg"
    build_bundle(model, load_spec(str(BRAIN_SPEC)), out, name="deepbet-brain-mask", version="1.0.2")
    return out


def float32_bytes(seg, vol) -> tuple[int, int]:
    """(up, down) bytes of a float32-tensor deployment: the network input, and K channels of
    float32 output on the model grid (K measured by running the local engine once)."""
    prepared = seg._pre(vol)  # the local CPU Segmenter's own preprocessing
    x = prepared.array
    if seg.spec.dims == 2:  # (D, C, H, W): slices are the batch
        probe = x[:1]
        k = seg.backend.infer(np.ascontiguousarray(probe)).shape[1]
        return x.nbytes, x.shape[0] * k * x.shape[2] * x.shape[3] * 4
    probe = x[None]
    if seg.spec.patch_size is not None:
        probe = probe[(slice(None), slice(None), *(slice(0, p) for p in seg.spec.patch_size))]
    k = seg.backend.infer(np.ascontiguousarray(probe)).shape[1]
    return x.nbytes, int(np.prod(x.shape[1:])) * k * 4


def run_clients(target: str, bundle: Path, vol, clients: int, per_client: int) -> dict:
    from edgeseg.triton.client import TritonSegmenter

    segs = [TritonSegmenter.open(target, bundle) for _ in range(clients)]
    for s in segs:
        s.segment(vol)  # warm-up: channels open, the model's buffers sized
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(seg) -> None:
        barrier.wait()
        mine = []
        for _ in range(per_client):
            t = time.perf_counter()
            seg.segment(vol)
            mine.append((time.perf_counter() - t) * 1e3)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(s,)) for s in segs]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for s in segs:
        s.close()
    a = np.asarray(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "series_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
    }


def local_rate(bundle: Path, backend: str, vol, n: int) -> dict:
    from edgeseg.segmenter import Segmenter

    with Segmenter.open(bundle, backend=backend) as seg:
        seg.segment(vol)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            seg.segment(vol)
            times.append((time.perf_counter() - t) * 1e3)
    a = np.asarray(times)
    return {
        "series_per_s": 1e3 / statistics.median(times),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--bundle", type=Path, default=None, help="Bundle to serve (default: the tiny 2D test bundle)."
    )
    p.add_argument("--brain", action="store_true", help="Build and serve deepbet's 3D brain model.")
    p.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="A real DICOM series folder.")
    p.add_argument("--backend", default="onnxruntime", help="Engine inside the server's model (and local).")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=6, help="Requests per client per configuration.")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from edgeseg.dicom import read_volume
    from edgeseg.export.triton import write_repository
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.testing import free_port
    from edgeseg.triton.server import TritonServer

    clients = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        tmp = Path(tmp)
        bundle = a.bundle or (_brain_bundle(tmp) if a.brain else _tiny_bundle(tmp))
        vol = read_volume(a.series)
        repo = tmp / "repo"
        write_repository(bundle, repo, model_name="m-i1", instances=1, backend=a.backend)
        write_repository(bundle, repo, model_name="m-i2", instances=2, backend=a.backend)
        with Segmenter.open(bundle, backend=a.backend) as local:
            up32, down32 = float32_bytes(local, vol)
        server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=None)
        server.start(wait_s=300)
        try:
            from edgeseg.triton.client import TritonSegmenter

            with TritonSegmenter.open(f"triton://{server.grpc_url}/m-i1", bundle) as probe:
                probe.segment(vol)
                up = probe.bytes_sent
            down = int(np.prod(vol.shape))  # uint8 labels on the source grid
            rows = [{"instances": "local", "clients": 1, **local_rate(bundle, a.backend, vol, a.requests)}]
            # Alternate instance counts per client level: the machine's load drifts.
            for c in clients:
                for inst in (1, 2):
                    r = run_clients(f"triton://{server.grpc_url}/m-i{inst}", bundle, vol, c, a.requests)
                    rows.append({"instances": inst, **r})
        finally:
            server.stop()

    sz, sy, sx = vol.shape
    print(f"series {sx}x{sy}x{sz} stored {vol.stored.dtype}; bundle {Path(bundle).name}; engine {a.backend}")
    print("| model instances | clients | series/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['instances']} | {r['clients']} | {r['series_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    print()
    print("| bytes per request | up | down | total |")
    print("|---|---|---|---|")
    print(f"| edgeseg (stored pixels → uint8 labels) | {up:,} | {down:,} | {up + down:,} |")
    print(
        f"| float32 tensors (network input → K-channel output) | {up32:,} | {down32:,} | {up32 + down32:,} |"
    )
    print(f"float32 / edgeseg bytes per request: {(up32 + down32) / (up + down):.2f}")
    if a.json:
        a.json.write_text(
            json.dumps({"rows": rows, "bytes": {"edgeseg": [up, down], "float32": [up32, down32]}}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
