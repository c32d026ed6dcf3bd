"""What a user would write instead of edgeseg: pydicom → numpy → torch (or plain ONNX Runtime) → highdicom.

Written the straightforward way on purpose: read every file with pydicom, sort the slices
properly along the slice normal, preprocess with plain numpy expressions (fresh arrays at every
step), run the network under ``torch.no_grad`` (or ``InferenceSession.run`` with default options),
``argmax``, and write a DICOM SEG with highdicom. It executes the same :class:`ModelSpec` as
edgeseg so both compute the same thing and the benchmark can check their labels agree.

Nothing here imports edgeseg's runtime: it stands for code written without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.spec import ModelSpec  # the spec only (a dataclass): the same recipe, not the runtime

STAGES = ("read", "preprocess", "infer", "postprocess", "write")


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class NaiveSeries:
    """A series as a user gets it from pydicom: sorted datasets, a float32 (z, y, x) array in
    modality units, and the LPS affine of (x, y, z) voxel indices."""

    datasets: list[Any]
    array: np.ndarray
    affine: np.ndarray


def read_series(files: Sequence[str | Path]) -> NaiveSeries:
    """pydicom read + sort along the slice normal + stack + rescale (one float32 copy per slice)."""
    import pydicom

    dss = [pydicom.dcmread(str(f)) for f in files]
    row, col = (np.array(v, dtype=float) for v in np.reshape(dss[0].ImageOrientationPatient, (2, 3)))
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    slices = []
    for ds in dss:
        px = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        icpt = float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append(px * slope + icpt)
    array = np.stack(slices)
    sy, sx = (float(v) for v in dss[0].PixelSpacing)
    first = np.array(dss[0].ImagePositionPatient, dtype=float)
    if len(dss) > 1:
        step = (np.array(dss[-1].ImagePositionPatient, dtype=float) - first) / (len(dss) - 1)
    else:
        step = normal * float(getattr(dss[0], "SliceThickness", 1.0))
    affine = np.eye(4)
    affine[:3, 0] = row * sx  # x (columns) runs along the row direction
    affine[:3, 1] = col * sy
    affine[:3, 2] = step
    affine[:3, 3] = first
    return NaiveSeries(dss, array, affine)


# ---------------------------------------------------------------------------------------------
# Preprocessing (the obvious numpy way)


def _orientation(affine_lps: np.ndarray, code: str | None):
    """nibabel's (forward, inverse) orientation transforms between the (x, y, z) array and ``code``."""
    import nibabel as nib

    if code is None:
        return None
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # nibabel thinks in RAS world
    src, dst = nib.io_orientation(ras), nib.orientations.axcodes2ornt(code)
    return nib.orientations.ornt_transform(src, dst), nib.orientations.ornt_transform(dst, src)


def _resize(x: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resize the trailing spatial axes with torch's interpolate (what a torch user reaches for)."""
    if tuple(x.shape[-len(shape) :]) == tuple(shape):
        return x
    import torch
    import torch.nn.functional as F

    # (N, C, *spatial) for interpolate: leading axes (2D slices of a volume) become the batch.
    t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 1, *x.shape[x.ndim - len(shape) :])
    if mode == "nearest":
        out = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=tuple(shape), mode="trilinear" if len(shape) == 3 else "bilinear")
    return out.numpy().reshape(*x.shape[: x.ndim - len(shape)], *shape)


def _intensity(x: np.ndarray, steps: Sequence[Any]) -> np.ndarray:
    for step in steps:
        kind = step.kind
        if kind == "window":
            lo = step.center - step.width / 2
            x = np.clip((x - lo) / step.width, 0, 1)
            x = x * (step.out_max - step.out_min) + step.out_min
        elif kind == "clip":
            x = np.clip(x, step.low, step.high)
        elif kind == "percentile_clip":
            lo, hi = np.percentile(x, [step.low, step.high])
            x = np.clip(x, lo, hi)
            if step.rescale:
                x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        elif kind == "zscore":
            sample = x[x != 0] if step.nonzero else x
            mean = step.mean if step.mean is not None else sample.mean()
            std = step.std if step.std is not None else sample.std()
            x = (x - mean) / max(std, 1e-8)
        elif kind == "scale":
            x = x * step.mul + step.add
        else:
            raise NotImplementedError(f"naive pipeline: intensity step {kind!r}")
    return x.astype(np.float32)


@dataclass
class NaiveInput:
    """The network input plus what is needed to put the labels back."""

    array: np.ndarray  # (D, C, H, W) for 2D models, (1, C, D, H, W) for 3D
    grid: tuple[int, ...]  # model grid before padding (D, H, W)
    oriented: tuple[int, ...]  # source shape in model axes
    ornt: Any


def _target_grid(spec: ModelSpec, oriented: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Model grid (D, H, W): 2D models keep D and take H, W from the spec."""
    if spec.target_shape is not None:
        t = tuple(spec.target_shape)
        return (oriented[0], *t[-2:]) if spec.dims == 2 or len(t) == 2 else t
    if spec.target_spacing is not None:
        ts = tuple(spec.target_spacing)
        new = tuple(
            max(1, round(n * s / t)) for n, s, t in zip(oriented[-len(ts) :], spacing[-len(ts) :], ts)
        )
        return (oriented[0], *new[-2:]) if spec.dims == 2 or len(ts) == 2 else new
    return tuple(oriented)


def preprocess(series: NaiveSeries, spec: ModelSpec) -> NaiveInput:
    """Reorient (nibabel), resize (torch interpolate), intensity (numpy), pad (np.pad)."""
    import nibabel as nib

    xyz = series.array.transpose(2, 1, 0)  # nibabel's (i, j, k) = (x, y, z)
    zooms = np.linalg.norm(series.affine[:3, :3], axis=0)
    ornt = _orientation(series.affine, spec.orientation)
    if ornt is not None:
        model = nib.orientations.apply_orientation(xyz, ornt[0])
        spacing = tuple(float(zooms[int(a)]) for a in ornt[0][:, 0].argsort())
    else:  # keep scanner order: model axes are (z, y, x)
        model = series.array
        spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    oriented = tuple(model.shape)
    grid = _target_grid(spec, oriented, spacing)
    x = _resize(np.asarray(model, dtype=np.float32), grid if spec.dims == 3 else grid[1:], spec.interpolation)
    x = _intensity(x, spec.intensity)
    m = spec.divisible_by
    pads = (
        [(0, 0)] + [(0, -(-n // m) * m - n) for n in x.shape[1:]]
        if spec.dims == 2
        else [(0, -(-n // m) * m - n) for n in x.shape]
    )
    x = np.pad(x, pads, constant_values=spec.pad_value)
    arr = x[:, None] if spec.dims == 2 else x[None, None]
    return NaiveInput(np.ascontiguousarray(arr, dtype=np.float32), grid, oriented, ornt)


# ---------------------------------------------------------------------------------------------
# Inference


def torch_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Eager fp32 forward under no_grad: numpy in, numpy out."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    return run


def ort_predictor(onnx_path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A plain ONNX Runtime session: default SessionOptions, ``sess.run``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    return run


def openvino_predictor(
    onnx_path: str | Path, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A plain OpenVINO script: ``read_model``, ``compile_model(model, "CPU")`` with the latency
    hint (what OpenVINO's own samples do for one stream), ``compiled(x)``."""
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)

    def run(x: np.ndarray) -> np.ndarray:
        return compiled(x)[0]

    return run


def infer(predict: Callable[[np.ndarray], np.ndarray], x: NaiveInput, spec: ModelSpec) -> np.ndarray:
    """2D: slices in batches; 3D whole volume: one call; 3D patches: MONAI sliding_window_inference."""
    if spec.dims == 2:
        bs = spec.batch_size
        return np.concatenate([predict(x.array[s : s + bs]) for s in range(0, len(x.array), bs)])
    if spec.patch_size is None:
        return predict(x.array)
    import torch
    from monai.inferers import sliding_window_inference

    def patch_fn(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(predict(t.numpy())))

    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(x.array),
            roi_size=tuple(spec.patch_size),
            sw_batch_size=spec.batch_size,
            predictor=patch_fn,
            overlap=spec.overlap,
            mode="gaussian",
        )
    return out.numpy()


# ---------------------------------------------------------------------------------------------
# Postprocessing and writing


def postprocess(output: np.ndarray, x: NaiveInput, spec: ModelSpec) -> np.ndarray:
    """argmax → crop padding → nearest resize back → undo the orientation → (z, y, x) uint8."""
    import nibabel as nib

    if spec.output != "argmax":
        raise NotImplementedError("naive pipeline: only argmax outputs")
    labels = np.argmax(output, axis=1).astype(np.uint8)  # (D, H, W) for 2D, (1, D, H, W) for 3D
    labels = labels if spec.dims == 2 else labels[0]
    d, h, w = x.grid
    labels = labels[:d, :h, :w]
    labels = _resize(labels.astype(np.float32), x.oriented, "nearest").astype(np.uint8)
    if x.ornt is None:
        return labels
    # ornt holds (forward, inverse); the inverse brings the model axes back to (x, y, z).
    return np.ascontiguousarray(nib.orientations.apply_orientation(labels, x.ornt[1]).transpose(2, 1, 0))


def write_seg(
    labels: np.ndarray, datasets: Sequence[Any], spec: ModelSpec, out: Path, name: str = "naive_seg.dcm"
) -> Path:
    """highdicom Segmentation (BINARY, one segment per label) saved with dcmwrite."""
    import warnings

    import highdicom as hd
    from pydicom.sr.codedict import codes

    for ds in datasets:  # highdicom rejects an empty SpecificCharacterSet (the real CT has one)
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
        # ... and needs type 2 patient attributes that anonymised series (TCIA) leave out.
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            if keyword not in ds:
                setattr(ds, keyword, None)

    descriptions = []
    for i, lab in enumerate(spec.labels, start=1):
        category = hd.sr.CodedConcept(*lab.category)
        kind = hd.sr.CodedConcept(*lab.type) if lab.type else codes.SCT.Tissue
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=lab.name,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="naive", version="1", family=codes.DCM.ArtificialIntelligence
                ),
            )
        )
    # Label values → segment numbers (1..n in spec order).
    lut = np.zeros(256, dtype=np.uint8)
    for i, lab in enumerate(spec.labels, start=1):
        lut[lab.value] = i
    with warnings.catch_warnings():  # single-component patient names in the test data
        warnings.simplefilter("ignore", UserWarning)
        seg = _segmentation(hd, datasets, lut[labels], descriptions)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    seg.save_as(path)
    return path


def _segmentation(hd: Any, datasets: Sequence[Any], pixels: np.ndarray, descriptions: list[Any]) -> Any:
    return hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="naive",
        manufacturer_model_name="naive",
        software_versions="1",
        device_serial_number="0",
    )


# ---------------------------------------------------------------------------------------------
# The whole pipeline with per-stage timings


def run_pipeline(
    files: Sequence[str | Path],
    spec: ModelSpec,
    predict: Callable[[np.ndarray], np.ndarray],
    out: Path,
) -> tuple[np.ndarray, dict[str, float]]:
    """read → preprocess → infer → postprocess → write; returns (labels, ms per stage)."""
    ms: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        ms[stage] = (now - t) * 1e3
        t = now

    series = read_series(files)
    lap("read")
    x = preprocess(series, spec)
    lap("preprocess")
    output = infer(predict, x, spec)
    lap("infer")
    labels = postprocess(output, x, spec)
    lap("postprocess")
    write_seg(labels, series.datasets, spec, out)
    lap("write")
    return labels, ms
