"""Benchmark edgeseg against what users would run instead, end to end and per stage, on real DICOM.

Pipelines (all: read series → preprocess → infer → postprocess → write DICOM SEG):

* ``naive_torch``   pydicom → numpy → torch eager fp32 (no_grad) → argmax → highdicom
  (:mod:`naive_pipeline`);
* ``ort_plain``     the same reading/preprocessing, the exported fp32 ONNX in an
  ``InferenceSession`` with default SessionOptions, ``sess.run``;
* ``ov_plain``      the same reading/preprocessing, the fp32 ONNX in a plain OpenVINO script
  (``read_model``, ``compile_model(…, "CPU")``, latency hint): the strongest CPU peer;
* ``edgeseg_fp32``  ``edgeseg.dicom.read_volume`` → ``Segmenter.open(bundle,
  backend="onnxruntime", precision="fp32")`` → ``edgeseg.run.process_volume`` (writes the SEG);
* ``edgeseg_ort``   the same on ONNX Runtime at the build's recorded ORT precision;
* ``edgeseg_openvino`` the same on OpenVINO at its fastest precision that passed the gate and
  the acceptance check;
* ``edgeseg_auto``  ``backend="auto"``: the fastest CPU engine × precision measured at build;
* ``edgeseg_trt``   the TensorRT path, only when a GPU and TensorRT are present.

Runs are interleaved (pipeline order rotates every repetition) after warm-up, so a noisy shared
machine slows all pipelines alike; medians and ratios come from the same run. Peak RSS and cold
load come from a fresh subprocess per pipeline. A profile section times edgeseg's CPU path with
cProfile and measures candidate fixes (ORT options, postprocessing) against the current code.

    python benchmarks/bench_pipelines.py            # ≈ 6–9 min on 2 cores
    python benchmarks/bench_pipelines.py --quick    # ≈ 2 min
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _bench_common as common  # noqa: E402
import naive_pipeline as naive  # noqa: E402

from edgeseg.spec import Label, ModelSpec, Window, load_spec  # noqa: E402

SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared")).resolve()
DICOM = SHARED / "data" / "dicom"
PIPELINES = (
    "naive_torch",
    "ort_plain",
    "ov_plain",
    "edgeseg_fp32",
    "edgeseg_ort",
    "edgeseg_openvino",
    "edgeseg_auto",
    "edgeseg_trt",
)


# ---------------------------------------------------------------------------------------------
# Models and inputs


@dataclass
class Case:
    """One model on one real series."""

    key: str
    title: str
    files: list[Path]
    spec: ModelSpec
    make_model: Callable[[], Any]  # torch module in eval mode (imports torch lazily)
    weights: str  # what the weights are, for the report
    reps: int  # timed repetitions per pipeline (default run)
    note: str = ""
    skip: str = ""  # non-empty: why this case cannot run here
    # Calibration set for int8 and the gate (default: the benchmark series itself) and the gate's
    # threshold: 0 for untrained weights, whose labels are noise (speed only), 0.99 for trained.
    calibration: Callable[[ModelSpec], Any] | None = None
    min_dice: float = 0.0


def _monai_unet(dims: int, channels: Sequence[int], norm: str | None = None, act: str | None = None) -> Any:
    """MONAI UNet with fixed-seed random weights (speed does not depend on the weights)."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    extra = {k: v for k, v in (("norm", norm), ("act", act)) if v is not None}
    model = UNet(
        spatial_dims=dims,
        in_channels=1,
        out_channels=2,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        **extra,
    )
    return model.eval()


def _torchscript(path: Path) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "jit.load is deprecated"
        return torch.jit.load(str(path), map_location="cpu").eval()


def deepbet_model() -> Path | None:
    import importlib.metadata

    try:
        files = importlib.metadata.files("deepbet") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(str(f.locate())).resolve() for f in files if f.name == "bbox_model.pt"]
    return found[0] if found else None


def _series(pattern: str) -> list[Path]:
    return sorted(DICOM.glob(pattern))


def _ct_spec() -> ModelSpec:
    liver = Label(1, "Liver", (221, 130, 101), type=("10200004", "SCT", "Liver"))
    return ModelSpec(dims=2, labels=[liver], intensity=[Window(center=40.0, width=400.0)], divisible_by=16)


def _hippocampus_case() -> Case:
    """examples/hippocampus's 2D U-Net (trained on MSD Task04, tests/assets) on a real TCIA MR
    series, int8 calibrated on MSD hippocampus volumes and gated at 0.99 Dice vs fp32."""
    root = REPO / "examples" / "hippocampus"
    weights = REPO / "tests" / "assets" / "hippocampus" / "unet2d.state.pt"
    msd = SHARED / "data" / "seg" / "msd_task04_hippocampus"
    files = _series("tcia_brain_tumor_progression/*/11_HCropVolume/*.dcm")
    skip = "" if msd.is_dir() else f"MSD hippocampus data not found at {msd}"

    def model() -> Any:
        import torch

        net = common.hippocampus_example().make_model(2)
        net.load_state_dict(torch.load(weights, map_location="cpu"))
        return net.eval()

    def calibration(spec: ModelSpec) -> Any:
        from edgeseg.calib.dataset import CalibrationSet

        images = sorted((msd / "imagesTr").glob("*.nii.gz"))[:40]
        return CalibrationSet.from_paths(
            images, spec, labels=msd / "labelsTr", max_samples=200, max_holdout=8
        )

    return Case(
        "hippocampus_2d",
        "(b) hippocampus 2D U-Net (examples/hippocampus, trained), TCIA HippoCrop MR",
        files,
        load_spec(str(root / "spec2d.json")),
        model,
        "trained on MSD Task04 (tests/assets/hippocampus/unet2d.state.pt)",
        reps=8,
        skip=skip,
        calibration=calibration,
        min_dice=0.99,
    )


def cases() -> list[Case]:
    """The benchmark's models, each on a real series from ../shared/data/dicom."""
    ct = _series("dcmqi_ct3slice_seg/0[1-3].dcm")
    mr = _series("dcm_qa_decubitus/HFS_t1_fl2d_sag/*.dcm")
    untrained = "untrained (fixed-seed random init); speed does not depend on the weight values"
    out = [
        Case(
            "unet2d_in_prelu",
            "(a) MONAI UNet 2D 512², InstanceNorm+PReLU (MONAI default), CT 3×512²",
            ct,
            _ct_spec(),
            lambda: _monai_unet(2, (16, 32, 64, 128, 256)),
            untrained,
            reps=10,
        ),
        Case(
            "unet2d_bn_relu",
            "(a') MONAI UNet 2D 512², BatchNorm+ReLU (conv/BN/ReLU), CT 3×512²",
            ct,
            _ct_spec(),
            lambda: _monai_unet(2, (16, 32, 64, 128, 256), norm="batch", act="relu"),
            untrained,
            reps=10,
        ),
        _hippocampus_case(),
    ]
    bbox = deepbet_model()
    out.append(
        Case(
            "deepbet_3d",
            "(c) deepbet bbox (trained) 3D whole volume 128³, MR T1 sag 35×256²",
            mr,
            load_spec(str(REPO / "examples" / "brain_extraction" / "spec.json")),
            (lambda: _torchscript(bbox)) if bbox else (lambda: None),
            "trained (deepbet 1.0.2 bbox_model.pt, MIT)",
            reps=5,
            skip="" if bbox else "deepbet not installed (pip install --no-deps deepbet==1.0.2)",
            min_dice=0.99,  # trained: int8 must agree with fp32 (on the benchmark series itself)
        )
    )
    sw_spec = ModelSpec(
        dims=3,
        labels=[Label(1, "Brain", (255, 140, 0), type=("12738006", "SCT", "Brain"))],
        intensity=[load_spec(str(REPO / "examples" / "brain_extraction" / "spec.json")).intensity[0]],
        target_spacing=(2.0, 2.0, 2.0),
        patch_size=(96, 96, 96),
        overlap=0.5,
        divisible_by=16,
    )
    out.append(
        Case(
            "unet3d_sw96",
            "(c') MONAI UNet 3D, sliding window 96³ (2 mm), MR T1 sag 35×256²",
            mr,
            sw_spec,
            lambda: _monai_unet(3, (16, 32, 64, 128, 256)),
            untrained,
            reps=4,
        )
    )
    if os.environ.get("EDGESEG_BENCH_TINY"):  # the smoke test's case: seconds, not minutes
        out.append(
            Case(
                "tiny_ct",
                "tiny conv net on one real CT slice (smoke test)",
                _series("pydicom/ct/CT_small.dcm"),
                _ct_spec(),
                _tiny_model,
                "untrained",
                reps=2,
            )
        )
    return out


def _tiny_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1)).eval()


# ---------------------------------------------------------------------------------------------
# Artifacts: bundle (built once, cached under out/) and the plain fp32 ONNX file


def bundle_for(case: Case, folder: Path, rebuild: bool) -> tuple[Path, Path, dict[str, Any]]:
    """(bundle, fp32 onnx path, build info). Builds with parity on the case's real series."""
    from edgeseg.bundle import Bundle

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.key}.edgeseg"
    onnx_path = folder / f"{case.key}.fp32.onnx"
    info: dict[str, Any] = {"cached": path.is_file() and not rebuild}
    if rebuild or not path.is_file():
        info.update(_build(case, path))
    b = Bundle.open(path)
    onnx_path.write_bytes(b.onnx("fp32"))
    info["precisions"] = b.precisions
    info["cpu_precision"] = b.cpu_precision
    info["artifact_bytes"] = b.describe()["artifact_bytes"]
    info["bundle_bytes"] = path.stat().st_size
    info.update(gate_and_timings(b.manifest))
    return path, onnx_path, info


def _build(case: Case, path: Path) -> dict[str, Any]:
    """fp32 bundle (parity on the real series), then int8 when edgeseg.calib can build it."""
    import logging

    from edgeseg.dicom import read_volume
    from edgeseg.export.build import build_bundle

    logging.getLogger("edgeseg").setLevel(logging.ERROR)
    volume = read_volume(case.files)
    t = time.perf_counter()
    from edgeseg.calib.dataset import CalibrationSet

    note = ""
    if case.calibration is not None:
        calibration = case.calibration(case.spec)
    else:  # speed only: calibrate on the benchmark series, gate against fp32 on it
        calibration = CalibrationSet.from_volumes([volume], case.spec, holdout=[volume])
    model = case.make_model()
    try:
        report = build_bundle(
            model,
            case.spec,
            path,
            name=case.key,
            parity_volumes=[volume],
            precisions=("fp32", "int8"),
            calibration=calibration,
            gate={"min_dice": case.min_dice},
        )
    except Exception as exc:  # e.g. every int8 candidate failed the gate: benchmark fp32 only
        note = f"int8 not built ({type(exc).__name__}: {str(exc)[:200]}); fp32 only"
        report = build_bundle(model, case.spec, path, name=case.key, parity_volumes=[volume])
    return {"build_s": round(time.perf_counter() - t, 1), "parity": report.parity, "int8_note": note}


def gate_and_timings(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the build recorded: the gate per variant and the CPU timings ``auto`` chose from."""
    accuracy = manifest.get("accuracy") or {}
    return {
        "gate": {
            p: {"min_dice_vs_fp32": r.get("min_dice_vs_fp32"), "passed": r.get("passed")}
            for p, r in accuracy.items()
            if p != "fp32"
        },
        "gate_min_dice": next((r.get("min_dice") for r in accuracy.values()), None),
        "cpu_ms_per_batch": dict(manifest.get("runtime", {}).get("cpu_ms", {})),
    }


# ---------------------------------------------------------------------------------------------
# Pipelines: each has .load() (timed once) and .run(files, out) -> (labels, stage ms)


class NaivePipeline:
    """naive_torch, ort_plain or ov_plain: naive reading/preprocessing with a torch, ORT or
    OpenVINO predictor."""

    def __init__(self, name: str, case: Case, onnx_path: Path):
        self.name, self.case, self.onnx_path = name, case, onnx_path
        self.predict: Callable[[np.ndarray], np.ndarray] | None = None

    def load(self) -> None:
        if self.name == "naive_torch":
            self.predict = naive.torch_predictor(self.case.make_model())
        elif self.name == "ov_plain":
            self.predict = naive.openvino_predictor(self.onnx_path)
        else:
            self.predict = naive.ort_predictor(self.onnx_path)

    def run(self, files: Sequence[Path], out: Path) -> tuple[np.ndarray, dict[str, float]]:
        assert self.predict is not None
        return naive.run_pipeline(files, self.case.spec, self.predict, out)


def write_outputs_available() -> bool:
    try:
        from edgeseg.outputs import write_outputs  # noqa: F401
    except ImportError:
        return False
    return True


class EdgesegPipeline:
    """edgeseg's CPU (or TensorRT) path: read_volume → Segmenter → process_volume (SEG)."""

    def __init__(self, name: str, bundle: Path, backend: str = "cpu", precision: str | None = None):
        self.name, self.bundle, self.backend, self.precision = name, bundle, backend, precision
        self.seg: Any = None
        self.use_run = write_outputs_available()

    def load(self) -> None:
        from edgeseg.segmenter import Segmenter

        self.seg = Segmenter.open(self.bundle, backend=self.backend, precision=self.precision)

    def run(self, files: Sequence[Path], out: Path) -> tuple[np.ndarray | None, dict[str, float]]:
        from edgeseg.dicom import read_volume

        t = time.perf_counter()
        volume = read_volume(list(files))
        read_ms = (time.perf_counter() - t) * 1e3
        if self.use_run:
            from edgeseg.run import process_volume

            outcome = process_volume(self.seg, volume, out)
            return None, {"read": read_ms, **outcome.timings}
        # edgeseg.outputs.write_outputs is not there yet: write the SEG with the same highdicom
        # code as the naive pipeline, from the headers edgeseg already holds.
        result = self.seg.segment(volume)
        t = time.perf_counter()
        naive.write_seg(result.labels, volume.headers, self.seg.spec, out, name="edgeseg_seg.dcm")
        return result.labels, {"read": read_ms, **result.timings, "write": (time.perf_counter() - t) * 1e3}

    def labels(self, files: Sequence[Path]) -> np.ndarray:
        from edgeseg.dicom import read_volume

        return self.seg.segment(read_volume(list(files))).labels


def make_pipeline(name: str, case: Case, bundle: Path, onnx_path: Path) -> tuple[Any | None, str]:
    """(pipeline, note); pipeline is None when it cannot run here (the note says why)."""
    from edgeseg._optional import available

    if name in ("ov_plain", "edgeseg_openvino") and not available("openvino"):
        return None, "skipped: OpenVINO is not installed here"
    if name in ("naive_torch", "ort_plain", "ov_plain"):
        return NaivePipeline(name, case, onnx_path), ""
    if name == "edgeseg_fp32":
        return EdgesegPipeline(name, bundle, backend="onnxruntime", precision="fp32"), ""
    if name in ("edgeseg_ort", "edgeseg_openvino", "edgeseg_auto"):
        from edgeseg.backends.choice import choose
        from edgeseg.bundle import Bundle

        b = Bundle.open(bundle)
        if name == "edgeseg_ort":
            return EdgesegPipeline(name, bundle, backend="onnxruntime"), f"ORT {b.cpu_precision}"
        engine = "openvino" if name == "edgeseg_openvino" else None
        picked, precision, source = choose(b, engine=engine)
        backend = "openvino" if name == "edgeseg_openvino" else "auto"
        return EdgesegPipeline(name, bundle, backend=backend), f"{picked} {precision} ({source})"
    from edgeseg.segmenter import gpu_available

    if not gpu_available():
        return None, "skipped: no GPU/TensorRT here (gpu_available() is False)"
    return EdgesegPipeline(name, bundle, backend="tensorrt"), ""


# ---------------------------------------------------------------------------------------------
# Timing


def time_once(pipe: Any, files: Sequence[Path], out: Path) -> tuple[np.ndarray | None, dict[str, float]]:
    t = time.perf_counter()
    labels, stages = pipe.run(files, out)
    return labels, common.finish_run(stages, (time.perf_counter() - t) * 1e3)


class Worker:
    """One pipeline in its own process, driven over stdin/stdout JSON lines.

    Separate processes keep runtimes from disturbing each other (ORT's and OpenMP's spinning
    thread pools would steal the 2 cores from whichever pipeline runs next in one process) and
    make peak RSS per pipeline honest.
    """

    def __init__(self, key: str, name: str, out: Path):
        import subprocess

        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", key, name, "--out", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.name} exited (rc {self.proc.wait()})")

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self.recv()
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply


def worker_main(key: str, name: str, out: Path) -> None:
    """Load one pipeline, then serve "run" / "labels" / "quit" commands from stdin."""
    import logging
    import warnings

    logging.getLogger("edgeseg").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    case = next(c for c in cases() if c.key == key)
    folder = out / "bundles"
    pipe, _ = make_pipeline(name, case, folder / f"{key}.edgeseg", folder / f"{key}.fp32.onnx")
    assert pipe is not None
    work = out / "work" / key / name
    t = time.perf_counter()
    pipe.load()
    print(json.dumps({"ready": True, "load_ms": (time.perf_counter() - t) * 1e3}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        try:
            if cmd == "run":
                _, run = time_once(pipe, case.files, work)
                reply: dict[str, Any] = {"run": run}
            elif cmd == "labels":
                labels, _ = pipe.run(case.files, work)
                labels = labels if labels is not None else pipe.labels(case.files)
                path = work / "labels.npy"
                np.save(path, labels)
                reply = {"labels": str(path)}
            else:
                print(json.dumps({"peak_rss_mib": common.peak_rss_mib()}), flush=True)
                return
        except Exception as exc:  # reported to the parent, which notes it for this pipeline
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


def bench_case(case: Case, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Warm up every pipeline (own process each), then time them interleaved; medians, agreement,
    peak RSS, sizes."""
    bundle, onnx_path, build = bundle_for(case, out / "bundles", args.rebuild)
    results: dict[str, common.PipelineResult] = {}
    workers: dict[str, Worker] = {}
    for name in args.pipelines:
        pipe, note = make_pipeline(name, case, bundle, onnx_path)
        results[name] = common.PipelineResult(name, note=note, skipped=pipe is None)
        if pipe is not None:
            workers[name] = Worker(case.key, name, out)  # processes start (and import) in parallel
    for name, w in workers.items():
        results[name].load_ms = w.recv()["load_ms"]
    reference: np.ndarray | None = None
    for name, w in workers.items():  # warm-up; the first run also gives the labels to compare
        labels = np.load(w.call("labels")["labels"])
        for _ in range(args.warmup - 1):
            w.call("run")
        if name == "naive_torch":
            reference = labels
        if reference is not None and labels.shape == reference.shape:
            results[name].agreement = round(float((labels == reference).mean()), 6)
    reps = max(2, round(case.reps * args.reps_scale))
    names = list(workers)
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:  # rotate so no pipeline always runs first
            time.sleep(0.05)  # let the previous process's worker threads stop spinning
            results[name].runs.append(workers[name].call("run")["run"])
        print(f"  {case.key}: repetition {rep + 1}/{reps}", file=sys.stderr, flush=True)
    for name, w in workers.items():
        results[name].peak_rss_mib = w.call("quit")["peak_rss_mib"]
        w.proc.wait()
    return {
        "key": case.key,
        "title": case.title,
        "series": f"{case.files[0].parent.relative_to(DICOM)} ({len(case.files)} files)",
        "weights": case.weights,
        "spec": case.spec.to_dict(),
        "build": build,
        "pipelines": [results[n].to_dict() for n in args.pipelines],
    }


# ---------------------------------------------------------------------------------------------
# Goals (reported, not asserted)


def goals(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """edgeseg CPU vs naive (≥2× on conv/BN/ReLU, never slower), vs plain ORT (≥1.3×), pre+post ≤10%."""
    rows = []
    for m in models:
        p = {x["name"]: x for x in m["pipelines"] if not x["skipped"]}
        if "edgeseg_fp32" not in p:
            continue
        best = min(
            (p[n] for n in ("edgeseg_auto",) if n in p),
            key=lambda x: x["median_ms"]["e2e"],
            default=p["edgeseg_fp32"],
        )
        e2e = best["median_ms"]["e2e"]
        md = best["median_ms"]
        vs_naive = common.ratio(p.get("naive_torch", {}).get("median_ms", {}).get("e2e"), e2e)
        vs_ort = common.ratio(p.get("ort_plain", {}).get("median_ms", {}).get("e2e"), e2e)
        vs_ov = common.ratio(p.get("ov_plain", {}).get("median_ms", {}).get("e2e"), e2e)
        prepost = (md.get("preprocess", 0.0) + md.get("postprocess", 0.0)) / e2e * 100
        need = 2.0  # issue 11: edgeseg auto ≥ 2× the naive PyTorch pipeline on every model
        rows.append(
            {
                "model": m["key"],
                "edgeseg": best["name"],
                "speedup_vs_naive": round(vs_naive, 2) if vs_naive else None,
                "goal_vs_naive": need,
                "met_vs_naive": bool(vs_naive and vs_naive >= need),
                "speedup_vs_ort_plain": round(vs_ort, 2) if vs_ort else None,
                "met_vs_ort_plain": bool(vs_ort and vs_ort >= 1.3),
                "speedup_vs_ov_plain": round(vs_ov, 2) if vs_ov else None,
                "met_vs_ov_plain": bool(vs_ov and vs_ov >= 1.0),
                "pre_post_pct": round(prepost, 1),
                "met_pre_post": prepost <= 10.0,
                "infer_pct": round(md.get("infer", 0.0) / e2e * 100, 1),
            }
        )
    return rows


def goals_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | edgeseg | × naive (goal) | × ORT plain (goal 1.3) | × OpenVINO plain (goal 1.0) "
        "| pre+post % (goal ≤10) | infer % |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = {True: "✅", False: "❌"}
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['edgeseg']} | {common.fmt(r['speedup_vs_naive'], 2)}× (≥{r['goal_vs_naive']:.1f}) "
            f"{ok[r['met_vs_naive']]} | {common.fmt(r['speedup_vs_ort_plain'], 2)}× {ok[r['met_vs_ort_plain']]} "
            f"| {common.fmt(r['speedup_vs_ov_plain'], 2)}× {ok[r['met_vs_ov_plain']]} "
            f"| {r['pre_post_pct']} {ok[r['met_pre_post']]} | {r['infer_pct']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Profile: where edgeseg's CPU path spends its time, and candidate fixes measured in place


def cprofile_top(
    pipe: EdgesegPipeline, files: Sequence[Path], out: Path, n: int = 14
) -> list[dict[str, Any]]:
    """cProfile over two runs; the top functions by own time (ms per run)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        pipe.run(files, out)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "calls_per_run": ncalls / 2,
                "own_ms": round(tottime * 1e3 / 2, 2),
                "cum_ms": round(cumtime * 1e3 / 2, 2),
            }
        )
    rows.sort(key=lambda r: -r["own_ms"])
    return rows[:n]


def ort_session(onnx: bytes, **cfg: Any) -> Any:
    """An ORT session with explicit options: threads, spinning, optimization level, denormals."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.get("threads", 0)
    opts.graph_optimization_level = cfg.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if "spin" in cfg:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg["spin"] else "0")
    if cfg.get("denormal_zero"):
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


def ort_variants(bundle: Path, case: Case, reps: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Inference only, on the real preprocessed input, interleaved: OrtBackend as shipped vs options.
    Also returns the real network output (for the postprocessing comparison)."""
    import onnxruntime as ort

    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.bundle import Bundle
    from edgeseg.dicom import read_volume
    from edgeseg.preprocess import Preprocessor

    b = Bundle.open(bundle)
    data = b.onnx("fp32")
    x = Preprocessor(case.spec)(read_volume(case.files)).array
    if case.spec.dims == 2:
        x = x[: case.spec.batch_size]
    elif case.spec.patch_size is not None:
        p = case.spec.patch_size
        x = np.ascontiguousarray(x[None, :, : p[0], : p[1], : p[2]])
    else:
        x = x[None]
    level = ort.GraphOptimizationLevel
    shipped = OrtBackend(data)
    variants: dict[str, Callable[[], Any]] = {
        "edgeseg OrtBackend as shipped (2 thr, no spin, ALL)": lambda: shipped.infer(x)
    }
    configs = {
        "ORT defaults (what ort_plain uses)": {},
        "2 thr, spin on, ALL": {"threads": 2, "spin": True},
        "2 thr, spin on, EXTENDED (no NCHWc)": {
            "threads": 2,
            "spin": True,
            "level": level.ORT_ENABLE_EXTENDED,
        },
        "2 thr, spin on, ALL, denormal→0": {"threads": 2, "spin": True, "denormal_zero": True},
    }
    for label, cfg in configs.items():
        sess = ort_session(data, **cfg)
        name = sess.get_inputs()[0].name
        variants[label] = lambda sess=sess, name=name: sess.run(None, {name: x})
    times = interleave(variants, reps, pause_s=0.05)  # pause: other sessions' threads stop spinning
    base = float(np.median(times[next(iter(variants))]))
    rows = [
        {
            "variant": k,
            "median_ms": round(float(np.median(v)), 2),
            "vs_shipped": round(base / float(np.median(v)), 2),
        }
        for k, v in times.items()
    ]
    return rows, shipped.infer(x).copy()


def interleave(
    variants: dict[str, Callable[[], Any]], reps: int, pause_s: float = 0.0
) -> dict[str, list[float]]:
    """Warm each variant once, then time them in rotating order; ms per call."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    keys = list(variants)
    for rep in range(reps):
        k = rep % len(keys)
        for key in keys[k:] + keys[:k]:
            time.sleep(pause_s)
            t = time.perf_counter()
            variants[key]()
            times[key].append((time.perf_counter() - t) * 1e3)
    return times


def postprocess_variants(out: np.ndarray, spec: ModelSpec, reps: int) -> list[dict[str, Any]]:
    """to_labels as shipped vs a 2-class comparison (no argmax temporaries), on the real output."""
    from edgeseg.preprocess import to_labels

    def fast() -> np.ndarray:
        return np.greater(out[:, 1], out[:, 0]).view(np.uint8)

    variants = {
        "to_labels (argmax + astype)": lambda: to_labels(out, spec),
        "2-class: out[:,1] > out[:,0]": fast,
    }
    if out.shape[1] != 2 or spec.output != "argmax":
        return []
    same = bool(np.array_equal(fast(), to_labels(out, spec)[0]))
    times = interleave(variants, reps)
    return [
        {
            "variant": k,
            "shape": list(out.shape),
            "median_ms": round(float(np.median(v)), 3),
            "identical": same,
        }
        for k, v in times.items()
    ]


def profile_section(
    models_cases: list[tuple[Case, Path]], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    prof: dict[str, Any] = {}
    for case, bundle in models_cases:
        pipe = EdgesegPipeline("edgeseg_fp32", bundle, precision="fp32")
        pipe.load()
        work = out / "work" / case.key / "profile"
        pipe.run(case.files, work)
        entry = {"cprofile_top_own_time": cprofile_top(pipe, case.files, work)}
        reps = max(3, round(10 * args.reps_scale))
        entry["ort_variants_infer_only"], output = ort_variants(bundle, case, reps=reps)
        entry["postprocess_variants"] = postprocess_variants(output, case.spec, reps=reps)
        pipe.seg.close()
        prof[case.key] = entry
        print(f"  profiled {case.key}", file=sys.stderr, flush=True)
    return prof


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    ap.add_argument(
        "--quick", action="store_true", help="≈2 min: fewer repetitions, no RSS children, short profile"
    )
    ap.add_argument("--models", default="", help="comma-separated case keys (default: all)")
    ap.add_argument("--pipelines", default="", help=f"comma-separated subset of {','.join(PIPELINES)}")
    ap.add_argument(
        "--import-repeats", type=int, default=None, help="fresh interpreters per import probe (0: skip)"
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached bundles")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "PIPELINE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.reps_scale = 0.35 if args.quick else 1.0
    args.warmup = 1 if args.quick else 2
    args.import_n = args.import_repeats if args.import_repeats is not None else (3 if args.quick else 7)
    args.pipelines = tuple(p for p in PIPELINES if not args.pipelines or p in args.pipelines.split(","))
    return args


def select(all_cases: list[Case], wanted: str) -> list[Case]:
    keys = [k for k in wanted.split(",") if k]
    return [c for c in all_cases if not keys or c.key in keys]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"machine": common.machine_info(REPO), "command": " ".join(sys.argv), "models": []}
    probes = {
        "import edgeseg": "import edgeseg",
        "edgeseg ready (Segmenter + onnxruntime)": "import edgeseg.segmenter, edgeseg.dicom, onnxruntime",
        "import torch (naive baseline)": "import torch",
    }
    doc["import_ms"] = {
        k: common.import_time_ms(v, args.import_n) for k, v in probes.items() if args.import_n > 0
    }
    doc["edgeseg_write"] = (
        "edgeseg.run.process_volume"
        if write_outputs_available()
        else (
            "edgeseg.outputs.write_outputs missing: edgeseg pipelines write the SEG with the naive highdicom code"
        )
    )
    profiled: list[tuple[Case, Path]] = []
    for case in select(cases(), args.models):
        if case.skip:
            doc["models"].append(
                {"key": case.key, "title": case.title, "skipped": case.skip, "pipelines": []}
            )
            print(f"skip {case.key}: {case.skip}", file=sys.stderr)
            continue
        print(f"benchmarking {case.key} …", file=sys.stderr, flush=True)
        entry = bench_case(case, args, out)
        doc["models"].append(entry)
        profiled.append((case, out / "bundles" / f"{case.key}.edgeseg"))
    if args.profile:
        doc["profile"] = profile_section(profiled, args, out)
    doc["goals"] = goals(doc["models"])
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    return doc


def report(doc: dict[str, Any], out: Path) -> str:
    """Markdown report: machine, table, goals, skips; also writes results.json and pipelines.png."""
    m = doc["machine"]
    shown = [x for x in doc["models"] if x["pipelines"]]
    lines = [
        "# edgeseg pipeline benchmark",
        "",
        f"{m['date']} · {m['cpu']} · {m['usable_cores']} usable cores · SIMD {' '.join(m['simd'])} · "
        f"commit {m['git_commit']} · wall {doc['wall_s']} s",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"Command: `{doc['command']}`. Medians of interleaved runs after warm-up; ms.",
        "",
        common.markdown_table(shown),
        "",
        "## Goals (reported, not asserted)",
        "",
        goals_table(doc["goals"]),
        "",
        "## Import time (fresh interpreter, median)",
        "",
        *[f"- {k}: {v.get('median_ms', v)} ms" for k, v in doc["import_ms"].items()],
        "",
        "## Bundles",
        "",
        *[
            f"- {x['key']}: {x['build']['bundle_bytes'] / 1e6:.2f} MB bundle; per precision "
            + ", ".join(f"{p} {n / 1e6:.2f} MB" for p, n in x["build"]["artifact_bytes"].items())
            + (f" ({x['build']['int8_note']})" if x["build"].get("int8_note") else "")
            for x in shown
        ],
        "",
        "## int8: gate and the build's own CPU timing (ms per batch, what `auto` chose from)",
        "",
        *[
            f"- {x['key']}: gate ≥ {x['build'].get('gate_min_dice') or 0:g} Dice vs fp32 "
            + ("(speed only: untrained weights) " if not x["build"].get("gate_min_dice") else "")
            + "; ".join(
                f"{p} {g['min_dice_vs_fp32']} {'pass' if g['passed'] else 'FAIL'}"
                for p, g in x["build"].get("gate", {}).items()
            )
            + f" — {x['build'].get('cpu_ms_per_batch', {})} → auto = {x['build'].get('cpu_precision')}"
            for x in shown
        ],
        "",
        "## Notes",
        "",
        f"- SEG writing: {doc['edgeseg_write']}.",
        *[f"- {x['key']}: weights {x['weights']}." for x in shown],
        *[f"- {x['key']}: skipped — {x['skipped']}" for x in doc["models"] if not x["pipelines"]],
    ]
    text = "\n".join(lines) + "\n"
    if "profile" in doc:
        text += profile_text(doc["profile"])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    if shown:
        common.plot(shown, out / "pipelines.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker[0], args.worker[1], args.out)
        return 0
    doc = run(args)
    print(report(doc, args.out))
    print(f"wrote {args.out / 'report.md'}, results.json, pipelines.png")
    return 0


def profile_text(prof: dict[str, Any]) -> str:
    buf = io.StringIO()
    for key, entry in prof.items():
        buf.write(
            f"\n## Profile: {key}\n\n| function | calls/run | own ms/run | cum ms/run |\n|---|---|---|---|\n"
        )
        for r in entry["cprofile_top_own_time"][:10]:
            buf.write(f"| {r['function']} | {r['calls_per_run']:.0f} | {r['own_ms']} | {r['cum_ms']} |\n")
        buf.write("\n| ORT variant (infer only, one call) | median ms | × shipped |\n|---|---|---|\n")
        for r in entry["ort_variants_infer_only"]:
            buf.write(f"| {r['variant']} | {r['median_ms']} | {r['vs_shipped']} |\n")
        buf.write(
            "\n| postprocess variant (real output) | shape | median ms | same labels |\n|---|---|---|---|\n"
        )
        for r in entry["postprocess_variants"]:
            buf.write(f"| {r['variant']} | {r['shape']} | {r['median_ms']} | {r['identical']} |\n")
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
