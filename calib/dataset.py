"""Calibration sets: real images, preprocessed with the bundle's own spec, sampled as the runtime
will see them (slices for 2D models, sliding-window patches for 3D), stratified across series,
split by series into a calibration part and a held-out part, and cached on disk.

The cache (one ``.npz`` per key) is keyed by the spec, the file list with sizes and mtimes, and
the sampling settings, so a rebuild with the same inputs reads no DICOM at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg._exceptions import CalibrationError, DicomInputError, SpecError
from edgeseg.nifti_input import is_nifti, nifti_labels, read_nifti
from edgeseg.preprocess import Preprocessor, window_starts
from edgeseg.spec import ModelSpec
from edgeseg.volume import Volume

log = logging.getLogger("edgeseg.calib")

CACHE_SCHEMA = 1
# A series contributes at least this many samples: a single slice per series would miss the
# background-only slices at the ends, which the runtime sees just as often.
MIN_PER_CASE = {2: 4, 3: 2}


@dataclass
class Case:
    """One source series: a NIfTI file or a DICOM series, with optional ground-truth labels.

    ``load`` returns the Volume; ``labels`` is a NIfTI label file on the same grid, a DICOM
    SEG referencing the series, or None.
    """

    name: str
    load: Callable[[], Volume]
    labels: Path | None = None
    files: list[Path] = field(default_factory=list)


@dataclass
class HeldOut:
    """A held-out series for the accuracy gate: the volume and its ground truth when known."""

    name: str
    volume: Volume
    labels: np.ndarray | None = None


@dataclass
class CalibrationSet:
    """Preprocessed calibration samples plus held-out series.

    Attributes
    ----------
    samples:
        model inputs without the batch axis, (C, *spatial) float32 each, exactly what the
        backend gets at run time.
    holdout:
        series never used for calibration; the gate segments them with fp32 and each candidate.
    summary:
        JSON-friendly description (counts, foreground fraction, sources, cache hit) that goes
        into the bundle's provenance.
    """

    samples: list[np.ndarray]
    holdout: list[HeldOut]
    summary: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int = 8) -> list[np.ndarray]:
        """The samples stacked into (N, C, *spatial) batches of one size.

        ORT's histogram calibrators stack the outputs of all batches, so every batch must have
        the same size: the remainder (fewer than ``batch_size`` samples) is left out, unless the
        set is smaller than one batch.
        """
        bs = max(1, min(batch_size, len(self.samples)))
        n = len(self.samples) - len(self.samples) % bs
        groups: dict[tuple[int, ...], list[np.ndarray]] = {}
        for s in self.samples[:n]:
            groups.setdefault(s.shape, []).append(s)
        out: list[np.ndarray] = []
        for group in groups.values():
            out.extend(np.stack(group[i : i + bs]) for i in range(0, len(group) - len(group) % bs, bs))
        return out

    def subset(self, n: int) -> CalibrationSet:
        """The same set with only ``n`` samples spread evenly (for quick experiments)."""
        idx = np.linspace(0, len(self.samples) - 1, num=min(n, len(self.samples))).astype(int)
        return CalibrationSet(
            [self.samples[i] for i in sorted(set(idx.tolist()))], self.holdout, self.summary
        )

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | Path] | str | Path,
        spec: ModelSpec,
        *,
        labels: str | Path | None = None,
        max_samples: int = 200,
        holdout: float = 0.2,
        max_holdout: int = 8,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> CalibrationSet:
        """Build (or load from the cache) a calibration set from folders of DICOM series or NIfTI.

        Parameters
        ----------
        paths:
            folders (searched recursively for DICOM series and ``.nii``/``.nii.gz`` files) or
            single NIfTI files.
        spec:
            the bundle's spec; samples are preprocessed with it (:class:`~edgeseg.preprocess.Preprocessor`).
        labels:
            folder of ground truth (optional; lets the gate also report Dice against it):
            NIfTI label maps with the same file names as the NIfTI images, and/or DICOM SEG
            files matched to the DICOM series by the Series Instance UID they reference.
        max_samples:
            the size budget: at most this many slices (2D) or patches (3D).
        holdout, max_holdout:
            fraction of series held out for the gate (at least one when there are two or more
            series), capped at ``max_holdout``.
        seed:
            makes the split and the sampling reproducible.
        cache_dir:
            where the ``.npz`` cache lives; ``None`` disables caching.

        Raises
        ------
        CalibrationError
            when no usable image series is found.
        """
        if isinstance(paths, (str, Path)):
            paths = [paths]
        cases = discover(paths, labels)
        if not cases:
            where = ", ".join(str(p) for p in paths)
            raise CalibrationError(f"no usable image series (DICOM or NIfTI) found in {where}")
        key = _cache_key(cases, spec, labels, max_samples, holdout, max_holdout, seed)
        cache = Path(cache_dir) / f"calib-{key[:24]}.npz" if cache_dir is not None else None
        if cache is not None and cache.is_file():
            try:
                loaded = load_cache(cache)
                loaded.summary["from_cache"] = True
                log.info("calibration set loaded from %s", cache)
                return loaded
            except Exception as exc:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable calibration cache %s (%s)", cache, exc)
        calib_cases, held_cases = split_cases(cases, holdout, max_holdout, seed)
        result = cls.from_cases(calib_cases, held_cases, spec, max_samples=max_samples, seed=seed)
        result.summary.update(
            {"sources": [str(p) for p in paths], "labels": str(labels) if labels else None, "key": key}
        )
        if cache is not None:
            save_cache(result, cache)
        result.summary["from_cache"] = False
        return result

    @classmethod
    def from_cases(
        cls,
        calib_cases: Sequence[Case],
        held_cases: Sequence[Case],
        spec: ModelSpec,
        *,
        max_samples: int = 200,
        seed: int = 0,
    ) -> CalibrationSet:
        """Sample ``calib_cases`` within the budget and load ``held_cases`` for the gate."""
        rng = np.random.default_rng(seed)
        per_case = max(MIN_PER_CASE[spec.dims], math.ceil(max_samples / max(len(calib_cases), 1)))
        n_used = min(len(calib_cases), math.ceil(max_samples / per_case))
        # Stratified: every used series gives about the same number of samples.
        order = rng.permutation(len(calib_cases))[:n_used] if n_used < len(calib_cases) else range(n_used)
        pre = Preprocessor(spec)
        samples: list[np.ndarray] = []
        used: list[str] = []
        failed: list[str] = []
        fg = []
        for i in order:
            case = calib_cases[int(i)]
            try:
                vol = case.load()
            except DicomInputError as exc:
                failed.append(f"{case.name}: {exc.reason}")
                continue
            quota = min(per_case, max_samples - len(samples))
            if quota <= 0:
                break
            picked = sample_volume(pre, vol, quota, rng)
            samples.extend(picked)
            used.append(case.name)
            if case.labels is not None:
                fg.append(float((case_labels(case, vol, spec) > 0).mean()))
        if not samples:
            detail = f" ({failed[0]})" if failed else ""
            raise CalibrationError(f"no usable image series for calibration{detail}")
        held: list[HeldOut] = []
        for case in held_cases:
            try:
                vol = case.load()
            except DicomInputError as exc:
                failed.append(f"{case.name}: {exc.reason}")
                continue
            lab = case_labels(case, vol, spec) if case.labels is not None else None
            if lab is not None and lab.shape != vol.shape:
                raise CalibrationError(
                    f"{case.labels}: label map shape {lab.shape} differs from its image {vol.shape}"
                )
            held.append(HeldOut(case.name, vol, lab))
        summary = {
            "n_series": len(calib_cases) + len(held_cases),
            "calibration_series": used,
            "holdout_series": [h.name for h in held],
            "n_samples": len(samples),
            "sample_shape": list(samples[0].shape),
            "unit": "slice" if spec.dims == 2 else "patch",
            "max_samples": max_samples,
            "seed": seed,
            "skipped": failed,
            "foreground_fraction": float(np.mean(fg)) if fg else None,
        }
        return cls(samples, held, summary)

    @classmethod
    def from_volumes(
        cls,
        volumes: Sequence[Volume],
        spec: ModelSpec,
        *,
        holdout: Sequence[Volume] = (),
        holdout_labels: Sequence[np.ndarray | None] | None = None,
        max_samples: int = 200,
        seed: int = 0,
    ) -> CalibrationSet:
        """A set from in-memory volumes (tests, notebooks): all of ``volumes`` calibrate."""
        calib = [Case(f"volume{i}", (lambda v=v: v)) for i, v in enumerate(volumes)]
        out = cls.from_cases(calib, [], spec, max_samples=max_samples, seed=seed)
        labs = list(holdout_labels) if holdout_labels is not None else [None] * len(holdout)
        out.holdout = [HeldOut(f"holdout{i}", v, lab) for i, (v, lab) in enumerate(zip(holdout, labs))]
        out.summary["holdout_series"] = [h.name for h in out.holdout]
        return out


# ---------------------------------------------------------------------------------------------
# Discovery and splitting


def case_labels(case: Case, volume: Volume, spec: ModelSpec) -> np.ndarray:
    """The ground truth of ``case`` on ``volume``'s grid: a NIfTI label map or a DICOM SEG."""
    assert case.labels is not None
    if is_nifti(case.labels):
        return nifti_labels(case.labels)
    from edgeseg.seg_input import read_seg_truth

    return read_seg_truth(case.labels, volume, spec.labels)


def discover(paths: Sequence[str | Path], labels: str | Path | None = None) -> list[Case]:
    """Every NIfTI file and DICOM series under ``paths`` as a :class:`Case`, in a stable order.

    With ``labels``, NIfTI images get the label map of the same name and DICOM series the SEG
    that references them; a SEG that references none of the series is an error.
    """
    from edgeseg.dicom import find_series, load_volume

    label_dir = Path(labels) if labels is not None else None
    if label_dir is not None and not label_dir.exists():
        raise CalibrationError(f"{label_dir}: calibration labels path does not exist")
    cases: list[Case] = []
    dicom_series = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CalibrationError(f"{p}: calibration path does not exist")
        if p.is_file() and is_nifti(p):
            niftis = [p]
            dicom_root: list[Path] = []
        elif p.is_dir():
            niftis = sorted(f for f in p.rglob("*") if f.is_file() and is_nifti(f))
            dicom_root = [p] if any(f.is_file() and not is_nifti(f) for f in p.rglob("*")) else []
        else:
            niftis, dicom_root = [], [p]
        for f in niftis:
            lab = label_dir / f.name if label_dir is not None else None
            if lab is not None and not lab.is_file():
                lab = None
            cases.append(Case(f.name, (lambda f=f: read_nifti(f)), lab, [f]))
        if dicom_root:
            for ref in find_series(dicom_root).series:
                name = ref.label or ref.series_instance_uid
                cases.append(Case(name, (lambda ref=ref: load_volume(ref)), None, list(ref.files)))
                dicom_series.append((ref, cases[-1]))
    if label_dir is not None:
        from edgeseg.seg_input import find_seg_files, pair_with_series

        where = ", ".join(str(p) for p in paths)
        try:
            found = find_seg_files(label_dir)
            paired = pair_with_series(found, [ref for ref, _ in dicom_series], where) if found else []
        except DicomInputError as exc:
            raise CalibrationError(str(exc)) from None
        seg_of = {id(ref): seg for ref, seg in paired}
        for ref, case in dicom_series:
            case.labels = seg_of.get(id(ref))
    return cases


def split_cases(
    cases: Sequence[Case], fraction: float, max_holdout: int, seed: int
) -> tuple[list[Case], list[Case]]:
    """Split by series (never by slice: neighbouring slices would leak), seeded."""
    n = len(cases)
    if n < 2 or fraction <= 0:
        return list(cases), []
    n_hold = min(max_holdout, max(1, round(fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    hold = set(order[:n_hold].tolist())
    return [c for i, c in enumerate(cases) if i not in hold], [c for i, c in enumerate(cases) if i in hold]


# ---------------------------------------------------------------------------------------------
# Sampling as the runtime sees the data


def sample_volume(pre: Preprocessor, vol: Volume, quota: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``quota`` model inputs from one volume, spread over it (background included).

    2D: slices at evenly spaced positions with a random offset (one window of each where the
    model slides a patch over the slice); 3D: sliding-window patches at
    the runtime's own window positions (or the whole padded volume without a patch size).
    """
    spec = pre.spec
    try:
        x = pre(vol).array
    except SpecError:
        raise
    if spec.dims == 2:
        depth = x.shape[0]
        k = min(quota, depth)
        step = depth / k
        idx = (np.arange(k) * step + rng.uniform(0, step)).astype(int).clip(0, depth - 1)
        if spec.patch_size is None:
            return [x[i].copy() for i in sorted(set(idx.tolist()))]
        # a 2D sliding window: the model sees patches of each slice, one window per slice here
        ph, pw = (int(p) for p in spec.patch_size[-2:])
        rows = window_starts(x.shape[2], ph, spec.overlap)
        cols = window_starts(x.shape[3], pw, spec.overlap)
        out = []
        for i in sorted(set(idx.tolist())):
            b, c = rows[int(rng.integers(len(rows)))], cols[int(rng.integers(len(cols)))]
            out.append(x[i, :, b : b + ph, c : c + pw].copy())
        return out
    if spec.patch_size is None:
        return [x.copy()]
    patch = [int(p) for p in spec.patch_size]
    size = x.shape[1:]
    starts = [
        (a, b, c)
        for a in window_starts(size[0], patch[0], spec.overlap)
        for b in window_starts(size[1], patch[1], spec.overlap)
        for c in window_starts(size[2], patch[2], spec.overlap)
    ]
    pick = rng.permutation(len(starts))[: min(quota, len(starts))]
    return [
        x[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]].copy()
        for a, b, c in (starts[int(i)] for i in sorted(pick))
    ]


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_key(
    cases: Sequence[Case],
    spec: ModelSpec,
    labels: str | Path | None,
    max_samples: int,
    holdout: float,
    max_holdout: int,
    seed: int,
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_SCHEMA, spec.to_dict(), max_samples, holdout, max_holdout, seed]).encode())
    for case in cases:
        for f in [*case.files, *([case.labels] if case.labels else [])]:
            st = os.stat(f)
            h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(str(labels).encode())
    return h.hexdigest()


def save_cache(cs: CalibrationSet, path: Path) -> None:
    """Write the set as one uncompressed ``.npz`` (atomically: a crash leaves no half cache)."""
    from edgeseg.atomic import atomic_path

    arrays: dict[str, np.ndarray] = {f"s{i}": s for i, s in enumerate(cs.samples)}
    for i, h in enumerate(cs.holdout):
        v = h.volume
        arrays.update(
            {
                f"h{i}_stored": v.stored,
                f"h{i}_slope": v.slope,
                f"h{i}_intercept": v.intercept,
                f"h{i}_spacing": np.asarray(v.spacing),
                f"h{i}_affine": v.affine,
            }
        )
        if h.labels is not None:
            arrays[f"h{i}_labels"] = h.labels
    meta = {"schema": CACHE_SCHEMA, "n": len(cs.samples), "holdout": [h.name for h in cs.holdout]}
    meta["summary"] = cs.summary
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_cache(path: Path) -> CalibrationSet:
    """Read a set written by :func:`save_cache`."""
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("schema") != CACHE_SCHEMA:
            raise ValueError(f"cache schema {meta.get('schema')} != {CACHE_SCHEMA}")
        samples = [z[f"s{i}"] for i in range(meta["n"])]
        held = []
        for i, name in enumerate(meta["holdout"]):
            vol = Volume(
                stored=z[f"h{i}_stored"],
                slope=z[f"h{i}_slope"],
                intercept=z[f"h{i}_intercept"],
                spacing=tuple(float(s) for s in z[f"h{i}_spacing"]),  # type: ignore[arg-type]
                affine=z[f"h{i}_affine"],
            )
            lab = z[f"h{i}_labels"] if f"h{i}_labels" in z.files else None
            held.append(HeldOut(name, vol, lab))
    return CalibrationSet(samples, held, dict(meta["summary"]))
