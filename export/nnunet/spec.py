"""nnU-Net v2 inference → an edgeseg spec, or one sentence naming the plan field it cannot express.

What nnU-Net does at inference (nnunetv2/inference/predict_from_raw_data.py and
preprocessing/preprocessors/default_preprocessor.py), in order, and where it lands here:

- transpose_forward/backward: only the identity is expressed (``orientation`` None keeps the
  array order nnU-Net reads); another permutation is refused.
- crop to the nonzero box (holes filled): ``crop_nonzero``.
- normalisation per channel, before resampling as nnU-Net does it (``intensity_before_resampling``):
  ZScore (no mask) → ZScore; CT → Clip to the fingerprint's foreground 0.5/99.5 percentiles +
  ZScore with its mean/std; RescaleTo01 → min/max rescale;
  RGBTo01 → x/255; NoNormalization → nothing. ZScore *with* mask leaves the outside at 0, which
  edgeseg's ZScore does not: refused.
- resampling to the configuration's spacing: ``target_spacing``, with the plans' orders:
  images order 3 → ``interpolation`` "cubic", the logits back to the source grid order 1 →
  ``output_interpolation`` "linear", ``force_separate_z`` None → ``separate_lowres_axis``
  (order_z 0: nearest along that axis). Other resampling functions or orders are refused.
- sliding window: patch size, step 0.5, centred padding, nnU-Net's Gaussian.
- mirroring axes from the checkpoint: ``mirror_axes``; folds averaged (logits) in the graph.
- argmax; labels from dataset.json (regions are refused).
"""

from __future__ import annotations

from typing import Any

from edgeseg._exceptions import ExportError
from edgeseg.spec import Clip, Label, ModelSpec, PercentileClip, Scale, ZScore

# A colour per label so viewers tell them apart (tab10).
_COLORS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration with ``inherits_from`` applied, as nnU-Net's PlansManager does."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise ExportError(
            f"plans field configurations has no {name!r} (it has {', '.join(sorted(configs)) or 'none'})"
        )
    cfg = dict(configs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ExportError(
                f"plans field configurations.{name}.inherits_from names {parent!r}, which is not usable"
            )
        seen.add(parent)
        cfg = {**configs[parent], **cfg}
    return cfg


def labels_from_dataset(dataset_json: dict[str, Any]) -> list[Label]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ExportError("dataset.json field 'labels' is missing")
    out: list[Label] = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ExportError(
                f"dataset.json field 'labels' defines regions ({name!r}: {list(value)}): region-based "
                "models (sigmoid per region) are not supported yet"
            )
        if int(value) == 0:
            continue
        out.append(Label(int(value), str(name), _COLORS[(int(value) - 1) % len(_COLORS)]))
    values = sorted(lab.value for lab in out)
    if values != list(range(1, len(values) + 1)):
        raise ExportError(f"dataset.json field 'labels' must be consecutive 1..K, got {values}")
    return sorted(out, key=lambda lab: lab.value)


def _intensity(cfg: dict[str, Any], name: str, channel: int, fingerprint: dict[str, Any] | None) -> list[Any]:
    schemes = cfg.get("normalization_schemes") or []
    masks = cfg.get("use_mask_for_norm") or [False] * len(schemes)
    if channel >= len(schemes):
        raise ExportError(
            f"plans field configurations.{name}.normalization_schemes has no entry for channel {channel}"
        )
    scheme = schemes[channel]
    if scheme == "ZScoreNormalization":
        if masks[channel]:
            raise ExportError(
                f"plans field configurations.{name}.use_mask_for_norm is true for channel {channel}: "
                "nnU-Net then leaves the voxels outside the nonzero mask at 0, which edgeseg's ZScore "
                "cannot express yet"
            )
        return [ZScore()]
    if scheme == "CTNormalization":
        props = ((fingerprint or {}).get("foreground_intensity_properties_per_channel") or {}).get(
            str(channel)
        )
        if props is None:
            raise ExportError(
                "CTNormalization needs dataset_fingerprint.json field "
                f"foreground_intensity_properties_per_channel.{channel} (copy the fingerprint into the folder)"
            )
        return [
            Clip(float(props["percentile_00_5"]), float(props["percentile_99_5"])),
            ZScore(mean=float(props["mean"]), std=float(props["std"])),
        ]
    if scheme == "RescaleTo01Normalization":
        return [PercentileClip(0.0, 100.0, rescale=True)]
    if scheme == "RGBTo01Normalization":
        return [Scale(mul=1.0 / 255.0)]
    if scheme == "NoNormalization":
        return []
    raise ExportError(
        f"plans field configurations.{name}.normalization_schemes names {scheme!r} for channel "
        f"{channel}: only nnU-Net's default schemes are translated"
    )


def _resampling(cfg: dict[str, Any], name: str, what: str, modes: dict[int, str]) -> tuple[str, bool, float]:
    """(interpolation, separate low-resolution axis, threshold) of the plans' ``what`` resampling."""
    field = f"plans field configurations.{name}.resampling_fn_{what}"
    fn = cfg.get(f"resampling_fn_{what}", "resample_data_or_seg_to_shape")
    if fn != "resample_data_or_seg_to_shape":
        raise ExportError(f"{field} is {fn!r}: only nnU-Net's default resampling is translated")
    kw = cfg.get(f"resampling_fn_{what}_kwargs") or {}
    order = int(kw.get("order", 3 if what == "data" else 1))
    if order not in modes:
        raise ExportError(
            f"{field}_kwargs.order is {order}: edgeseg translates order "
            + " or ".join(str(o) for o in sorted(modes))
            + " here"
        )
    if int(kw.get("order_z", 0)) != 0:
        raise ExportError(f"{field}_kwargs.order_z is {kw['order_z']}: only 0 (nearest) is supported")
    force = kw.get("force_separate_z")
    if force is True:
        raise ExportError(f"{field}_kwargs.force_separate_z is true: only None (nnU-Net's rule) or false")
    threshold = float(kw.get("separate_z_anisotropy_threshold", 3.0))
    return modes[order], force is None, threshold


def spec_from_nnunet(
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    fingerprint: dict[str, Any] | None,
    configuration: str,
    mirror_axes: Any,
    n_models: int,
    batch_size: int = 16,
) -> tuple[ModelSpec, list[str]]:
    """The spec and the notes the build prints (what is approximated)."""
    notes: list[str] = []
    cfg = resolve_configuration(plans, configuration)
    if cfg.get("previous_stage") or "cascade" in configuration:
        raise ExportError(
            f"plans field configurations.{configuration}.previous_stage is set: cascades (3d_lowres → "
            "3d_cascade_fullres) are not supported yet; export 3d_fullres or 2d"
        )
    tf = list(plans.get("transpose_forward") or [0, 1, 2])
    if tf != [0, 1, 2]:
        raise ExportError(
            f"plans field transpose_forward is {tf}: only the identity permutation is supported yet"
        )
    patch = tuple(int(p) for p in cfg["patch_size"])
    dims = len(patch)
    if dims not in (2, 3):
        raise ExportError(
            f"plans field configurations.{configuration}.patch_size {list(patch)} is not 2D or 3D"
        )
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    n_in = max(1, len(channels))
    steps = [_intensity(cfg, configuration, c, fingerprint) for c in range(n_in)]
    spacing = tuple(float(s) for s in cfg["spacing"])
    image_mode, separate, threshold = _resampling(cfg, configuration, "data", {3: "cubic", 1: "linear"})
    output_mode, separate_out, _ = _resampling(
        cfg, configuration, "probabilities", {1: "linear", 0: "nearest"}
    )
    if separate_out != separate:
        raise ExportError(
            f"plans field configurations.{configuration}.resampling_fn_probabilities_kwargs."
            "force_separate_z differs from resampling_fn_data_kwargs': edgeseg has one rule for both"
        )
    axes = tuple(int(a) for a in mirror_axes) if mirror_axes else None
    spec = ModelSpec(
        dims=dims,  # type: ignore[arg-type]
        labels=labels_from_dataset(dataset_json),
        in_channels=n_in,
        intensity=steps[0] if n_in == 1 else [],
        per_channel_intensity=steps if n_in > 1 else None,
        orientation=None,
        target_spacing=spacing,
        interpolation=image_mode,  # type: ignore[arg-type]
        separate_lowres_axis=separate,
        anisotropy_threshold=threshold,
        output_interpolation=output_mode,  # type: ignore[arg-type]
        intensity_before_resampling=True,
        patch_size=patch,
        overlap=0.5,
        divisible_by=1,
        pad_value=0.0,
        batch_size=batch_size,
        activation="logits",
        output="argmax",
        mirror_axes=axes,
        crop_nonzero=True,
        window_padding="center",
        window_weights="nnunet_gaussian",
        ensemble=n_models,
    )
    return spec, notes
