"""The model spec: what a bundle's model expects as input and how its output becomes labels.

Plain dataclasses, JSON in the bundle manifest. Both preprocessing implementations (the numpy
reference in :mod:`edgeseg.preprocess` and the CUDA kernels in :mod:`edgeseg.cuda`) execute the
same spec, so everything that changes *what* is computed lives here.

Axis conventions: a Volume is (z, y, x) in scanner order. ``orientation`` names the anatomical
direction (LPS letters, e.g. ``"RAS"``) in which the model's spatial axes increase, in the model's
axis order (D, H, W) for 3D and (·, H, W) for 2D slices along D. The volume is permuted/flipped
to that orientation before preprocessing and the labels are brought back afterwards.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from edgeseg._exceptions import SpecError

# ---------------------------------------------------------------------------------------------
# Intensity steps, applied in order to modality values (HU for CT).


@dataclass(frozen=True)
class Window:
    """Clip to [center - width/2, center + width/2] and map linearly to [out_min, out_max]."""

    center: float
    width: float
    out_min: float = 0.0
    out_max: float = 1.0
    kind: ClassVar[str] = "window"


@dataclass(frozen=True)
class Clip:
    """Clip to fixed bounds, no rescale."""

    low: float
    high: float
    kind: ClassVar[str] = "clip"


@dataclass(frozen=True)
class PercentileClip:
    """Clip to the volume's [low, high] percentiles; with ``rescale`` map them to [0, 1]."""

    low: float = 0.5
    high: float = 99.5
    rescale: bool = True
    kind: ClassVar[str] = "percentile_clip"


@dataclass(frozen=True)
class ZScore:
    """Subtract mean, divide by std. ``None`` means computed on this volume (``nonzero``: over
    voxels ≠ 0 only, as nnU-Net does for MR)."""

    mean: float | None = None
    std: float | None = None
    nonzero: bool = False
    kind: ClassVar[str] = "zscore"


@dataclass(frozen=True)
class Scale:
    """``x * mul + add``."""

    mul: float = 1.0
    add: float = 0.0
    kind: ClassVar[str] = "scale"


@dataclass(frozen=True)
class Denoise:
    """Gaussian smoothing with ``sigma`` in voxels of the model grid (0 disables)."""

    sigma: float = 0.5
    kind: ClassVar[str] = "denoise"


IntensityStep = Window | Clip | PercentileClip | ZScore | Scale | Denoise
_STEP_TYPES: dict[str, type] = {t.kind: t for t in (Window, Clip, PercentileClip, ZScore, Scale, Denoise)}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """One output class. ``value`` is the label value in the uint8 label map (0 is background)."""

    value: int
    name: str
    color: tuple[int, int, int] = (255, 0, 0)
    # SNOMED CT property category / type, (code value, scheme, meaning); optional.
    category: tuple[str, str, str] = ("123037004", "SCT", "Anatomical Structure")
    type: tuple[str, str, str] | None = None


@dataclass
class ModelSpec:
    """Everything the runtime needs to feed the model and read its output.

    Parameters
    ----------
    dims:
        2 (slices of the volume, batched) or 3 (whole volume or sliding-window patches).
    in_channels:
        number of input channels; more than one means co-registered series stacked as channels
        (multimodal input), in the order the series are given.
    labels:
        foreground labels; background (0) is implicit.
    intensity:
        intensity steps applied in order (per channel when ``per_channel_intensity`` is set).
    orientation:
        anatomical directions of the model axes, e.g. "RAS"; ``None`` keeps scanner order.
    target_spacing:
        resample to this (D, H, W) spacing in mm before the network (``None``: keep).
    target_shape:
        resample the whole volume to this (D, H, W) shape (``None``: keep). For 2D models only
        (H, W) is used. Mutually exclusive with ``target_spacing``.
    interpolation:
        "linear", "nearest" or "cubic" for the image. "cubic" is nnU-Net's order 3 (skimage's
        ``resize``: a cubic B-spline with prefilter, edge mode, clipped to the input's range).
    separate_lowres_axis:
        nnU-Net's "separate z": when the source (else the target) spacing is anisotropic, its
        largest over smallest above ``anisotropy_threshold``, and one axis alone has the
        largest spacing, that axis is resampled nearest and the others with ``interpolation``
        (for the image, and with ``output_interpolation`` for the output). False: never.
    anisotropy_threshold:
        the ratio for ``separate_lowres_axis`` (nnU-Net's ANISO_THRESHOLD, 3).
    intensity_before_resampling:
        run the intensity steps on the (cropped, reoriented) source before resampling, as
        nnU-Net normalises before it resamples: statistics and clips on the source grid.
        False (edgeseg's order): resample first, statistics on the model grid.
    output_interpolation:
        how the output returns to the source grid: "nearest" resamples the labels; "linear"
        resamples the network's (averaged) output before argmax/threshold, as nnU-Net does
        with its logits (order 1).
    patch_size:
        3D sliding window patch (D, H, W); ``None`` runs the whole (padded) volume at once.
    overlap:
        sliding-window overlap fraction in [0, 1).
    divisible_by:
        pad each spatial dim up to a multiple of this (the network's total stride).
    pad_value:
        value of padding, in the *normalised* domain.
    batch_size:
        slices (2D) or patches (3D) per inference call.
    activation:
        what the network's output already is: "logits", "softmax" or "sigmoid".
    output:
        "argmax" (multi-class channels, channel 0 background) or "threshold" (per-channel
        sigmoid/probability > ``threshold``, later channels win).
    channels:
        for multimodal models, one case-insensitive regular expression per input channel matched
        against each series' SeriesDescription, e.g. ``["t1", "flair"]``: ``edgeseg run`` picks
        the matching series of each study and resamples them onto the first channel's grid.
    mirror_axes:
        test-time augmentation: the network's spatial axes (0 = first spatial axis of its
        input) to mirror; every non-empty combination is run, flipped back and averaged with
        the plain prediction (nnU-Net's mirroring). ``None``: no mirroring.
    crop_nonzero:
        crop the source to the bounding box of its nonzero voxels (holes filled) before
        anything else, as nnU-Net does; labels outside the box are background.
    window_padding:
        where a sliding window pads an image smaller than the patch: "end" (after the data) or
        "center" (nnU-Net: half before, half after).
    window_weights:
        sliding-window blending: "gaussian" (edgeseg's, centred at (n-1)/2) or
        "nnunet_gaussian" (nnU-Net's: a filtered delta at n//2, truncated at 4 sigma).
    ensemble:
        how many models the (single) network averages inside its graph, for ``edgeseg info``.
    """

    dims: Literal[2, 3]
    labels: list[Label]
    in_channels: int = 1
    intensity: list[Any] = field(default_factory=list)
    per_channel_intensity: list[list[Any]] | None = None
    orientation: str | None = None
    target_spacing: tuple[float, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    interpolation: Literal["linear", "nearest", "cubic"] = "linear"
    separate_lowres_axis: bool = False
    anisotropy_threshold: float = 3.0
    output_interpolation: Literal["nearest", "linear"] = "nearest"
    intensity_before_resampling: bool = False
    patch_size: tuple[int, ...] | None = None
    overlap: float = 0.5
    divisible_by: int = 1
    pad_value: float = 0.0
    batch_size: int = 1
    activation: Literal["logits", "softmax", "sigmoid"] = "logits"
    output: Literal["argmax", "threshold"] = "argmax"
    threshold: float = 0.5
    input_name: str = "image"
    output_name: str = "logits"
    channels: list[str] | None = None
    mirror_axes: tuple[int, ...] | None = None
    crop_nonzero: bool = False
    window_padding: Literal["end", "center"] = "end"
    window_weights: Literal["gaussian", "nnunet_gaussian"] = "gaussian"
    ensemble: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        if self.dims not in (2, 3):
            raise SpecError(f"'dims' must be 2 or 3, got {self.dims!r}")
        if self.in_channels < 1:
            raise SpecError(f"'in_channels' must be ≥ 1, got {self.in_channels}")
        if self.target_spacing is not None and self.target_shape is not None:
            raise SpecError("give either 'target_spacing' or 'target_shape', not both")
        for name in ("target_spacing", "target_shape", "patch_size"):
            value = getattr(self, name)
            if value is not None and len(value) not in (2, 3):
                raise SpecError(f"'{name}' must have 2 or 3 entries, got {list(value)}")
        if self.patch_size is not None and self.dims == 2 and len(self.patch_size) != 2:
            raise SpecError(
                "a 2D model's 'patch_size' (sliding window over each slice) has 2 entries (H, W), "
                f"got {list(self.patch_size)}"
            )
        if self.mirror_axes is not None:
            if any(a not in range(self.dims) for a in self.mirror_axes) or len(set(self.mirror_axes)) != len(
                self.mirror_axes
            ):
                raise SpecError(
                    f"'mirror_axes' must be distinct spatial axes in 0..{self.dims - 1}, got "
                    f"{list(self.mirror_axes)}"
                )
        if self.interpolation not in ("linear", "nearest", "cubic"):
            raise SpecError(
                f"'interpolation' must be 'linear', 'nearest' or 'cubic', got {self.interpolation!r}"
            )
        if self.output_interpolation not in ("nearest", "linear"):
            raise SpecError(
                f"'output_interpolation' must be 'nearest' or 'linear', got {self.output_interpolation!r}"
            )
        if self.output_interpolation == "linear" and not (
            self.patch_size is not None and (self.dims == 2 or self.window_padding == "center")
        ):
            raise SpecError(
                "'output_interpolation' 'linear' needs the nnU-Net-style sliding window (a 2D "
                "'patch_size', or a 3D one with window_padding 'center')"
            )
        if not self.anisotropy_threshold >= 1.0:
            raise SpecError(f"'anisotropy_threshold' must be ≥ 1, got {self.anisotropy_threshold}")
        if self.window_padding not in ("end", "center"):
            raise SpecError(f"'window_padding' must be 'end' or 'center', got {self.window_padding!r}")
        if self.window_weights not in ("gaussian", "nnunet_gaussian"):
            raise SpecError(
                f"'window_weights' must be 'gaussian' or 'nnunet_gaussian', got {self.window_weights!r}"
            )
        if self.ensemble < 1:
            raise SpecError(f"'ensemble' must be ≥ 1, got {self.ensemble}")
        if not 0.0 <= self.overlap < 1.0:
            raise SpecError(f"'overlap' must be in [0, 1), got {self.overlap}")
        if self.divisible_by < 1:
            raise SpecError(f"'divisible_by' must be ≥ 1, got {self.divisible_by}")
        if self.batch_size < 1:
            raise SpecError(f"'batch_size' must be ≥ 1, got {self.batch_size}")
        if self.orientation is not None:
            o = self.orientation.upper()
            axes = sorted({"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}.get(c, -1) for c in o)
            if len(o) != 3 or axes != [0, 1, 2]:
                raise SpecError(
                    f"'orientation' must be 3 letters, one of L/R, P/A, S/I each; got {self.orientation!r}"
                )
            self.orientation = o
        if self.per_channel_intensity is not None and len(self.per_channel_intensity) != self.in_channels:
            raise SpecError(
                f"'per_channel_intensity' has {len(self.per_channel_intensity)} entries for "
                f"{self.in_channels} input channels"
            )
        if self.channels is not None:
            if len(self.channels) != self.in_channels:
                raise SpecError(
                    f"'channels' has {len(self.channels)} patterns for {self.in_channels} input channels"
                )
            import re

            for pattern in self.channels:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SpecError(
                        f"'channels' pattern {pattern!r} is not a valid regular expression ({exc})"
                    ) from None
        values = [lab.value for lab in self.labels]
        if not values:
            raise SpecError("'labels' must name at least one foreground label")
        if len(set(values)) != len(values) or min(values) < 1 or max(values) > 255:
            raise SpecError(f"label values must be distinct and in 1..255, got {values}")
        for steps in [self.intensity, *(self.per_channel_intensity or [])]:
            for step in steps:
                if not isinstance(step, tuple(_STEP_TYPES.values())):
                    raise SpecError(f"unknown intensity step {step!r}")

    @property
    def num_classes(self) -> int:
        """Number of network output channels the spec expects for argmax (background included)."""
        return max(lab.value for lab in self.labels) + 1

    def intensity_for_channel(self, channel: int) -> list[Any]:
        if self.per_channel_intensity is not None:
            return list(self.per_channel_intensity[channel])
        return list(self.intensity)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def steps(seq: list[Any]) -> list[dict[str, Any]]:
            return [{"kind": s.kind, **dataclasses.asdict(s)} for s in seq]

        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "intensity":
                value = steps(value)
            elif f.name == "per_channel_intensity" and value is not None:
                value = [steps(v) for v in value]
            elif f.name == "labels":
                value = [dataclasses.asdict(lab) for lab in value]
            elif isinstance(value, tuple):
                value = list(value)
            d[f.name] = value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s) {unknown}; known fields: {sorted(known)}")
        try:
            data["labels"] = [_label_from_dict(lab) for lab in data.get("labels", [])]
            data["intensity"] = [_step_from_dict(s) for s in data.get("intensity", [])]
            if data.get("per_channel_intensity") is not None:
                data["per_channel_intensity"] = [
                    [_step_from_dict(s) for s in ch] for ch in data["per_channel_intensity"]
                ]
            for name in ("target_spacing", "target_shape", "patch_size", "mirror_axes"):
                if data.get(name) is not None:
                    data[name] = tuple(data[name])
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"invalid spec: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from None


def _label_from_dict(d: dict[str, Any]) -> Label:
    d = dict(d)
    for key in ("color", "category", "type"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return Label(**d)


def _step_from_dict(d: dict[str, Any]) -> Any:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _STEP_TYPES:
        raise SpecError(f"unknown intensity step kind {kind!r}; known: {sorted(_STEP_TYPES)}")
    try:
        return _STEP_TYPES[kind](**d)
    except TypeError as exc:
        raise SpecError(f"invalid '{kind}' step {d}: {exc}") from None


def load_spec(path: str) -> ModelSpec:
    """Read a spec from a JSON file, with errors that name the file."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from None
    try:
        return ModelSpec.from_json(text)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
