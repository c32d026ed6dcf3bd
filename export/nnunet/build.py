"""Build a bundle from an nnU-Net v2 results folder: no spec, no flags needed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeseg._exceptions import ExportError
from edgeseg.export.nnunet.folder import read_folder
from edgeseg.export.nnunet.network import Ensemble, build_network, load_weights
from edgeseg.export.nnunet.spec import resolve_configuration, spec_from_nnunet


def build_from_nnunet(
    folder: str | Path,
    output: str | Path,
    *,
    folds: list[str] | None = None,
    checkpoint: str = "final",
    progress: Callable[[str], None] | None = None,
    **build_kwargs: Any,
):
    """Export every chosen fold of ``folder`` (one graph that averages their logits, as nnU-Net
    does) with a spec that reproduces nnU-Net's inference; returns the build report.

    ``build_kwargs`` go to :func:`edgeseg.export.build.build_bundle`; its ``calibration`` may be
    a callable that makes the set from the spec (the spec exists only once the plans are read)."""
    from edgeseg.export.build import build_bundle

    say = progress or (lambda msg: None)
    nf = read_folder(folder, folds, checkpoint)
    say(
        f"nnU-Net {nf.configuration} ({nf.trainer}, {nf.plans_name}), folds {', '.join(nf.checkpoints)}; "
        "checkpoints are pickles read with torch.load(weights_only=False): build only from folders you trust"
    )
    cfg = resolve_configuration(nf.plans, nf.configuration)
    nets = []
    mirror_axes = None
    for i, (fold, path) in enumerate(nf.checkpoints.items()):
        ck = nf.load(fold)
        trained = (ck.get("init_args") or {}).get("configuration")
        if trained is not None and trained != nf.configuration:
            raise ExportError(
                f"{path}: trained as configuration {trained!r}, the folder says {nf.configuration!r}"
            )
        axes = ck.get("inference_allowed_mirroring_axes")
        if i == 0:
            mirror_axes = axes
        n_out = len(nf.dataset_json.get("labels") or {})
        n_in = max(1, len(nf.dataset_json.get("channel_names") or nf.dataset_json.get("modality") or {}))
        net = build_network(cfg, nf.configuration, n_in, n_out)
        nets.append(load_weights(net, ck, str(path)))
    spec, notes = spec_from_nnunet(
        nf.plans, nf.dataset_json, nf.fingerprint, nf.configuration, mirror_axes, len(nets)
    )
    for n in notes:
        say(n)
    model = Ensemble.of(nets)
    if callable(build_kwargs.get("calibration")):  # made from the spec the plans give
        build_kwargs["calibration"] = build_kwargs["calibration"](spec)
    name = build_kwargs.pop("name", None) or f"{nf.path.parent.name}-{nf.configuration}"
    report = build_bundle(model, spec, output, name=name, progress=progress, **build_kwargs)
    report.warnings.extend(notes)
    return report
