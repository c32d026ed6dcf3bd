"""PyTorch → ONNX (fp32), checked against PyTorch on real inputs.

Accepts an ``nn.Module``, a TorchScript file (``.pt``/``.ts``/``.pth`` saved with
``torch.jit.save``) or an ONNX file. The ONNX gets a dynamic batch axis; spatial sizes stay as
exported (dynamic spatial sizes cost TensorRT tactics and are rarely needed at the edge).

Two exporters: "dynamo" (``torch.onnx.export(dynamo=True)``, torch.export based: the default
since torch 2.9, while torch 2.13 deprecates ``torch.jit.*``) and "torchscript" (the tracing
exporter, the only one a TorchScript model can take). :func:`export_checked` with "auto" tries
dynamo first and keeps it when it passes the parity check, else falls back to torchscript, and
says which one it used and why.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import ExportError
from edgeseg.spec import ModelSpec

log = logging.getLogger("edgeseg.export")

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18  # below 18 torch.onnx converts versions afterwards, which may fail
EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ParityReport:
    """How the ONNX model's output compares with PyTorch's on the same inputs."""

    max_abs: float
    max_rel: float
    mean_abs: float
    label_agreement: float  # fraction of voxels with the same argmax/threshold label
    n_inputs: int
    tolerance: float
    min_label_agreement: float
    passed: bool
    exporter: str | None = None  # which exporter made the ONNX that was checked

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExportResult:
    """The checked ONNX of :func:`export_checked`, the exporter that made it and, when "auto"
    did not keep dynamo, why."""

    onnx: bytes
    parity: ParityReport
    exporter: str
    fallback_reason: str | None = None  # why dynamo was not kept (None: kept, or not tried)
    scripted: bool = False  # a TorchScript model: the TorchScript exporter is its only way


def load_torch_model(model: Any):
    """An ``nn.Module`` in eval mode from a module or a TorchScript file."""
    import torch

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ExportError(f"{path}: no such model file")
        try:
            import warnings

            with warnings.catch_warnings():
                # "torch.jit.load is deprecated" (Future- or DeprecationWarning by torch version):
                # still the format users have, and the TorchScript exporter is its only way out
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise ExportError(
                f"{path}: cannot load as TorchScript ({str(exc).splitlines()[0]}); save the model with "
                "torch.jit.save, pass an ONNX file, or pass the nn.Module from Python"
            ) from None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"'model' must be an nn.Module or a path, got {type(model).__name__}")
    return model.eval()


def example_shape(spec: ModelSpec, grid: tuple[int, ...] | None = None, batch: int = 1) -> tuple[int, ...]:
    """A model input shape for export: (N, C, *spatial) from the spec's patch/target geometry."""
    spatial: tuple[int, ...] | None = None
    if spec.patch_size is not None:
        spatial = tuple(spec.patch_size)
    elif spec.target_shape is not None:
        spatial = tuple(spec.target_shape)[-spec.dims :]
    elif grid is not None:
        spatial = tuple(grid)[-spec.dims :]
    if spatial is None or len(spatial) != spec.dims:
        raise ExportError(
            "cannot tell the model's input size from the spec: give 'patch_size' or 'target_shape', "
            "or pass a real input to derive it"
        )
    return (batch, spec.in_channels, *spatial)


def torch_to_onnx(
    model: Any,
    example: np.ndarray,
    spec: ModelSpec,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> bytes:
    """Export ``model`` to ONNX bytes with a dynamic batch axis.

    ``exporter``: "torchscript" (torch.onnx's tracing exporter; works for TorchScript files and
    most MONAI/nnU-Net networks) or "dynamo" (torch.export based).
    """
    import torch

    module = load_torch_model(model)
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    buf = io.BytesIO()
    names = {"input_names": [spec.input_name], "output_names": [spec.output_name]}
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"'exporter' must be 'dynamo' or 'torchscript', got {exporter!r}")
    try:
        if exporter == "dynamo":
            import warnings

            batch = torch.export.Dim("batch", min=1, max=1024)
            with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._export"):
                # torch's internal FutureWarnings and "torchvision is not installed" notes
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    module,
                    (x,),
                    dynamo=True,
                    opset_version=max(opset, DYNAMO_MIN_OPSET),
                    external_data=False,
                    dynamic_shapes=({0: batch},),
                    verbose=False,
                    **names,
                )
            prog.save(buf)  # type: ignore[union-attr]
        else:
            axes = {spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}}
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (x,),
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                    **names,
                )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed ({exporter} exporter): {first}") from None
    data = buf.getvalue()
    if not data:
        raise ExportError("ONNX export produced an empty model")
    return _single_output(data, spec)


class _quiet:
    """Raise the named loggers to ERROR for the duration (torch logs warnings through logging)."""

    def __init__(self, *names: str):
        self._loggers = [logging.getLogger(n) for n in names]
        self._levels: list[int] = []

    def __enter__(self) -> None:
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def export_checked(
    model: Any,
    example: np.ndarray,
    inputs: list[np.ndarray],
    spec: ModelSpec,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    tolerance: float = 1e-2,
) -> ExportResult:
    """Export and check parity against PyTorch on ``inputs``.

    ``exporter`` "auto": dynamo, kept when its export succeeds and passes parity; otherwise the
    TorchScript exporter (a TorchScript model goes there directly: torch.export cannot take it).
    "dynamo"/"torchscript": that one only. The result's parity may not have passed (the caller
    decides); its ``exporter`` says which one made the ONNX.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"'exporter' must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    module = load_torch_model(model)
    scripted = isinstance(module, torch.jit.ScriptModule)
    if exporter == "dynamo" and scripted:
        raise ExportError(
            "a TorchScript model cannot go through torch.export (exporter 'dynamo'); use 'torchscript' "
            "or 'auto', or pass the nn.Module from Python"
        )
    if exporter == "auto":
        order = ["torchscript"] if scripted else ["dynamo", "torchscript"]
    else:
        order = [exporter]
    reasons: list[str] = []
    for i, name in enumerate(order):
        last = i == len(order) - 1
        try:
            data = torch_to_onnx(module, example, spec, opset=opset, exporter=name)
        except ExportError as exc:
            if last:
                if reasons:
                    raise ExportError(f"{exc} (after: {'; '.join(reasons)})") from None
                raise
            reasons.append(str(exc))
            log.info("%s; trying the next exporter", exc)
            continue
        report = check_parity(module, data, inputs, spec, tolerance=tolerance)
        report.exporter = name
        if report.passed or last:
            return ExportResult(data, report, name, "; ".join(reasons) or None, scripted)
        reasons.append(
            f"the {name} export failed the parity check (max rel error {report.max_rel:.2e}, label "
            f"agreement {report.label_agreement:.4%})"
        )
    raise AssertionError("unreachable")  # the last exporter always returns or raises


def _single_output(data: bytes, spec: ModelSpec) -> bytes:
    """Keep only the first output (deep-supervision nets return several) and check the graph."""
    import onnx

    m = onnx.load_from_string(data)
    if len(m.graph.output) > 1:
        log.warning(
            "the model returns %d outputs; keeping the first (full resolution) one", len(m.graph.output)
        )
        keep = m.graph.output[0]
        del m.graph.output[:]
        m.graph.output.append(keep)
        m.graph.output[0].name = keep.name
    try:
        onnx.checker.check_model(m)
    except Exception as exc:
        raise ExportError(f"the exported ONNX is invalid: {exc}") from None
    return m.SerializeToString()


def check_parity(
    model: Any,
    onnx_model: bytes,
    inputs: list[np.ndarray],
    spec: ModelSpec,
    *,
    tolerance: float = 1e-2,
    min_label_agreement: float = 0.999,
) -> ParityReport:
    """Run PyTorch and ONNX Runtime on ``inputs`` and compare.

    Passes when the max absolute error relative to the output's dynamic range (max |torch
    output|, so logits and probabilities are judged alike) is within ``tolerance`` *and* the
    labels agree on at least ``min_label_agreement`` of voxels. Element-wise fp32 differences of
    1e-3 are normal on large 3D convolutions with normalisation (different summation order), so
    the label check is what says whether a difference matters.
    """
    import torch

    from edgeseg.backends.onnxruntime import OrtBackend
    from edgeseg.preprocess import to_labels

    module = load_torch_model(model)
    backend = OrtBackend(onnx_model)
    max_abs = max_rel = 0.0
    abs_sum = 0.0
    n_values = 0
    agree = total = 0
    for x in inputs:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        if isinstance(ref, (list, tuple)):
            ref = ref[0]
        ref = ref.detach().float().numpy()
        got = backend.infer(x)
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
        scale = max(float(np.abs(ref).max()), 1e-12)
        err = float(np.abs(got - ref).max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale)
        abs_sum += float(np.abs(got - ref).sum(dtype=np.float64))
        n_values += got.size
        la, _ = to_labels(ref, spec)
        lb, _ = to_labels(got, spec)
        agree += int((la == lb).sum())
        total += la.size
    backend.close()
    agreement = agree / max(total, 1)
    return ParityReport(
        max_abs=max_abs,
        max_rel=max_rel,
        mean_abs=abs_sum / max(n_values, 1),
        label_agreement=agreement,
        n_inputs=len(inputs),
        tolerance=tolerance,
        min_label_agreement=min_label_agreement,
        passed=max_rel <= tolerance and agreement >= min_label_agreement,
    )


def onnx_from_file(path: str | Path) -> bytes:
    """Read and check an ONNX file given as the build input."""
    import onnx

    path = Path(path)
    try:
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except Exception as exc:
        raise ExportError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    if len(m.graph.input) - len(m.graph.initializer) > 1 and len(m.graph.input) > 1:
        inits = {i.name for i in m.graph.initializer}
        real = [i.name for i in m.graph.input if i.name not in inits]
        if len(real) != 1:
            raise ExportError(f"{path}: the model must have exactly one input, it has {real}")
    return m.SerializeToString()
