"""Multimodal input: pick the series of each study that feed a multi-channel model, and bring
them onto one grid.

The spec's ``channels`` holds one regular expression per channel, matched against each series'
SeriesDescription within a study. Channels other than the first are resampled (trilinear,
through patient coordinates) onto the first channel's grid when their grids differ.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgeseg._exceptions import SpecError
from edgeseg.geometry import world_resample
from edgeseg.nifti_input import is_nifti, read_nifti
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume


def align_channels(volumes: Sequence[Volume]) -> list[Volume]:
    """The volumes with channels 1… resampled onto channel 0's grid where needed."""
    ref = volumes[0]
    out = [ref]
    for k, vol in enumerate(volumes[1:], 1):
        same_grid = vol.shape == ref.shape and np.allclose(vol.affine, ref.affine, atol=1e-3)
        if same_grid:
            out.append(vol)
            continue
        data = world_resample(vol.modality_values(), vol.affine, ref.shape, ref.affine)
        moved = Volume.from_array(data, spacing=ref.spacing, affine=ref.affine)
        moved.warnings.append(f"channel {k} resampled onto channel 0's grid")
        out.append(moved)
        ref.warnings.append(f"channel {k} ({vol.describe()}) resampled onto this series' grid")
    for_refs = {_frame_of_reference(v) for v in volumes if _frame_of_reference(v)}
    if len(for_refs) > 1:
        ref.warnings.append("the channels have different Frames of Reference: check they are registered")
    return out


def _frame_of_reference(vol: Volume) -> str:
    return str(vol.headers[0].get("FrameOfReferenceUID", "")) if vol.headers else ""


def _description(ref) -> str:
    ds = next(iter(ref.datasets.values()), None)
    return str(ds.get("SeriesDescription", "")) if ds is not None else ref.label


def _study(ref) -> str:
    ds = next(iter(ref.datasets.values()), None)
    return str(ds.get("StudyInstanceUID", "")) if ds is not None else str(Path(ref.files[0]).parent)


def multichannel_jobs(inputs: Sequence[str | Path], spec: ModelSpec) -> Iterator[object]:
    """Yield failed outcomes or ``(source, load, series_uid)`` job tuples, one per study.

    NIfTI inputs are taken as channels in the order given, ``in_channels`` files a case.
    """
    from edgeseg.dicom import find_series, load_volume
    from edgeseg.outcome import SeriesOutcome

    n = spec.in_channels
    niftis = [Path(p) for p in inputs if is_nifti(p)]
    others = [Path(p) for p in inputs if not is_nifti(p)]
    if niftis:
        if len(niftis) % n:
            yield SeriesOutcome(
                str(niftis[0]),
                "failed",
                error=f"{niftis[0]}: the model takes {n} channels; give NIfTI files in groups of {n}",
            )
        for i in range(0, len(niftis) - len(niftis) % n, n):
            group = niftis[i : i + n]
            yield (str(group[0]), (lambda g=group: align_channels([read_nifti(p) for p in g])), None)
    if not others:
        return
    if spec.channels is None:
        raise SpecError(
            f"the model takes {n} co-registered series; its spec must name 'channels' (one SeriesDescription "
            "pattern per channel) so edgeseg can pick them from DICOM folders"
        )
    scan = find_series(others)
    for rejected in scan.rejected:
        status = "skipped" if rejected.not_an_image else "failed"
        yield SeriesOutcome(str(rejected.path), status, error=str(rejected))
    studies: dict[str, list] = defaultdict(list)
    for ref in scan.series:
        studies[_study(ref)].append(ref)
    for refs in studies.values():
        where = str(Path(refs[0].files[0]).parent.parent)
        chosen = []
        problem = None
        for pattern in spec.channels:
            matches = [r for r in refs if re.search(pattern, _description(r), re.IGNORECASE)]
            if len(matches) != 1:
                found = "; ".join(r.label for r in refs)
                problem = (
                    f"{where}: {len(matches)} series match channel pattern {pattern!r} "
                    f"(exactly one needed; series: {found})"
                )
                break
            chosen.append(matches[0])
        if problem:
            yield SeriesOutcome(where, "failed", error=problem)
            continue

        def load(chosen=chosen):
            return align_channels([load_volume(r) for r in chosen])

        yield (f"{where} ({' + '.join(r.label for r in chosen)})", load, chosen[0].series_instance_uid)
