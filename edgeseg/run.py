"""Running a bundle over files and folders: one outcome per series, failures never stop the rest.

This is what ``edgeseg run`` and the stream service call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgeseg._exceptions import DicomInputError, EdgesegError
from edgeseg.nifti_input import is_nifti, read_nifti
from edgeseg.outcome import SeriesOutcome

log = logging.getLogger("edgeseg")

DEFAULT_FORMATS = ("seg",)


def series_stem(series_uid: str | None, fallback: str, part_key: str = "") -> str:
    """A file stem derived from the SeriesInstanceUID by hashing: no patient data in names.
    Each part of a split series adds its own key, so parts never overwrite each other."""
    key = series_uid or fallback
    stem = "series-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{stem}-{part_key}" if part_key else stem


@dataclass
class _Job:
    source: str
    load: object  # callable returning a Volume
    uid: str | None
    part: str = ""
    part_key: str = ""


def _jobs(inputs: Sequence[str | Path], spec=None, out=None) -> Iterator[_Job | SeriesOutcome]:
    if spec is not None and spec.in_channels > 1:
        from edgeseg.multichannel import multichannel_jobs

        for item in multichannel_jobs(inputs, spec):
            yield item if isinstance(item, SeriesOutcome) else _Job(*item)
        return
    yield from _single_jobs(inputs, out)


def _single_jobs(inputs: Sequence[str | Path], out=None) -> Iterator[_Job | SeriesOutcome]:
    """Expand inputs into per-series jobs (and outcomes for files that cannot be used).

    ``out``: where DICOM pixels are decoded into (:func:`edgeseg.dicom.load_volume`)."""
    from edgeseg.dicom import find_series, load_volume

    dicom_inputs: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file() and is_nifti(p):
            yield _Job(str(p), (lambda p=p: read_nifti(p)), None)
        elif not p.exists():
            yield SeriesOutcome(str(p), "failed", error=f"{p}: no such file or folder")
        else:
            if p.is_dir():  # a folder of NIfTI volumes, as nnUNetv2_predict -i takes it
                for f in sorted(f for f in p.rglob("*.nii*") if f.is_file() and is_nifti(f)):
                    yield _Job(str(f), (lambda f=f: read_nifti(f)), None)
            dicom_inputs.append(p)
    if not dicom_inputs:
        return
    scan = find_series(dicom_inputs)
    for rejected in scan.rejected:
        status = "skipped" if rejected.not_an_image else "failed"
        yield SeriesOutcome(str(rejected.path), status, error=str(rejected))
    for ref in scan.series:
        first = Path(ref.files[0])
        source = f"{first.parent} ({ref.label})" if ref.label else str(first.parent)
        yield _Job(
            source,
            (lambda ref=ref: load_volume(ref, out=out)),
            ref.series_instance_uid,
            ref.part,
            ref.part_key,
        )


def process_volume(
    segmenter,
    volumes,
    out_dir: Path,
    *,
    formats=DEFAULT_FORMATS,
    source: str = "",
    stem=None,
    with_confidence: bool = False,
    part: str = "",
    part_key: str = "",
) -> SeriesOutcome:
    """Segment one loaded Volume (or the co-registered Volumes of a multimodal model, first one
    first) and write its outputs, which reference the first volume."""
    from edgeseg.outputs import write_outputs

    volume = volumes[0] if isinstance(volumes, (list, tuple)) else volumes
    uid = volume.series_instance_uid or None
    outcome = SeriesOutcome(
        source, "ok", series=series_stem(uid, source)[7:19], warnings=list(volume.warnings), part=part or None
    )
    outcome.part_key = part_key or None
    result = segmenter.segment(volumes, with_confidence=with_confidence)
    outcome.timings.update(result.timings)
    t = time.perf_counter()
    spec = segmenter.spec
    bundle = getattr(segmenter, "bundle", None)
    paths = write_outputs(
        result.labels,
        volume,
        out_dir,
        formats=tuple(formats),
        labels_spec=spec.labels,
        stem=stem or series_stem(uid, source, part_key),
        algorithm_name=bundle.name if bundle is not None else "edgeseg",
        algorithm_version=bundle.version if bundle is not None else "0",
        confidence=result.confidence,
    )
    outcome.timings["write"] = (time.perf_counter() - t) * 1e3
    outcome.outputs = {k: str(v) for k, v in paths.items()}
    return outcome


def process_series(
    segmenter, files: Sequence[str | Path], out_dir: str | Path, *, formats: Sequence[str] = DEFAULT_FORMATS
) -> SeriesOutcome:
    """Read one series from ``files``, segment it and write the outputs to ``out_dir``.

    A series that find_series splits into parts (a 3-plane localizer, the volumes of a 4D
    series, MOSAIC instances) gets one result per part: the outcome's ``parts`` hold each part's
    own outcome, and it is ``ok`` when at least one part was segmented.

    Never raises for bad input: the outcome says ``failed`` with a one-sentence error.
    """
    from edgeseg.dicom import find_series

    files = [Path(f) for f in files]
    source = str(files[0].parent) if files else "<no files>"
    out = getattr(segmenter, "pixel_allocator", None)
    try:
        scan = find_series(files)
    except _STOP:
        raise
    except BaseException as exc:  # noqa: BLE001 (see _one_series)
        return SeriesOutcome(source, "failed", error=_error_line(source, exc))
    if len(scan.series) < 2:
        # No part (read_volume says why) or one: the series as a whole, named as ever.
        return _one_series(segmenter, files, scan, out_dir, formats=formats, source=source)
    outcomes: list[SeriesOutcome] = []
    for ref in scan.series:
        where = f"{source} ({ref.label})" if ref.label else source
        outcomes.append(_one_part(segmenter, ref, out_dir, formats=formats, source=where, out=out))
    total = _split_outcome(source, outcomes)
    if scan.rejected:
        first = scan.rejected[0]
        total.warnings.append(
            f"{len(scan.rejected)} other DICOM file(s) of the series were rejected (first: {first.reason})"
        )
    return total


def _split_outcome(source: str, outcomes: list[SeriesOutcome]) -> SeriesOutcome:
    """The outcome of a split series: each part's outputs keyed ``<format>@<part key>`` (so the
    journal records them all and the worker forwards each), each failed part's reason keyed
    ``error@<part key>``; ``ok`` when at least one part was segmented."""
    ok = [o for o in outcomes if o.status == "ok"]
    total = SeriesOutcome(source, "ok" if ok else "failed", series=outcomes[0].series, parts=outcomes)
    total.transient = any(o.transient for o in outcomes)  # a part to try again: the whole series
    for o in outcomes:
        key = o.part_key or "?"
        for fmt, path in o.outputs.items():
            total.outputs[f"{fmt}@{key}"] = path
        if o.status != "ok":
            total.outputs[f"error@{key}"] = f"{o.part}: {o.error}"
        for k, v in o.timings.items():
            total.timings[k] = total.timings.get(k, 0.0) + v
        total.warnings.extend(f"{o.part}: {w}" for w in o.warnings)
    failed = [o for o in outcomes if o.status != "ok"]
    if not ok:
        total.error = (
            f"none of the {len(outcomes)} parts of the series could be segmented ({_reasons(failed)})"
        )
    elif failed:
        total.warnings.append(f"{len(failed)} of {len(outcomes)} parts not segmented ({_reasons(failed)})")
    return total


def _reasons(failed: Sequence[SeriesOutcome]) -> str:
    # "part 2/3: <why>: <file>: <reason>", one clause per failed part.
    return "; ".join(f"{o.part}: {o.error}" for o in failed)


def _one_series(segmenter, files, scan, out_dir, *, formats, source: str) -> SeriesOutcome:
    from edgeseg.dicom.api import volume_from_scan

    t = time.perf_counter()
    try:
        volume = volume_from_scan(scan, files, out=getattr(segmenter, "pixel_allocator", None))
        read_ms = (time.perf_counter() - t) * 1e3
        outcome = process_volume(segmenter, volume, Path(out_dir), formats=formats, source=source)
    except _STOP:
        raise
    except BaseException as exc:  # noqa: BLE001 (a listener must outlive any one series; native
        # decoders raise BaseExceptions such as pyo3's PanicException)
        return SeriesOutcome(source, "failed", error=_error_line(source, exc), transient=_transient(exc))
    outcome.timings = {"read": read_ms, **outcome.timings}
    return outcome


def _one_part(segmenter, ref, out_dir, *, formats, source: str, out) -> SeriesOutcome:
    from edgeseg.dicom import load_volume

    series = series_stem(ref.series_instance_uid, source)[7:19]
    t = time.perf_counter()
    try:
        volume = load_volume(ref, out=out)
        read_ms = (time.perf_counter() - t) * 1e3
        outcome = process_volume(
            segmenter,
            volume,
            Path(out_dir),
            formats=formats,
            source=source,
            part=ref.part,
            part_key=ref.part_key,
        )
    except _STOP:
        raise
    except BaseException as exc:  # noqa: BLE001 (one part never costs the others)
        error = _error_line(source, exc)
        return SeriesOutcome(
            source,
            "failed",
            error=error,
            series=series,
            part=ref.part or None,
            part_key=ref.part_key or None,
            transient=_transient(exc),
        )
    outcome.timings = {"read": read_ms, **outcome.timings}
    return outcome


# Interrupts mean "stop", not "bad series": they are never turned into a failed outcome.
_STOP = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _transient(exc: BaseException) -> bool:
    # ServiceUnavailableError (edgeseg._exceptions): the server may answer later.
    return bool(getattr(exc, "transient", False))


def _error_line(source: str, exc: BaseException) -> str:
    """One line naming the file: DICOM errors carry their path, the rest get the series source."""
    if isinstance(exc, DicomInputError) and exc.path:
        return str(exc)
    if isinstance(exc, EdgesegError):
        return f"{source}: {exc}"
    # Not an input problem we know: still one line, the traceback goes to the debug log.
    log.debug("unexpected error on %s", source, exc_info=True)
    return f"{source}: internal error ({type(exc).__name__}: {exc}); please report it"


def _timed_load(job: _Job) -> tuple[object, float, BaseException | None]:
    t = time.perf_counter()
    try:
        return job.load(), (time.perf_counter() - t) * 1e3, None  # type: ignore[operator]
    except _STOP:
        raise
    except BaseException as exc:  # noqa: BLE001 (reported per series by the caller)
        return None, 0.0, exc


def run_inputs(
    segmenter,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    on_outcome=None,
    with_confidence: bool = False,
) -> list[SeriesOutcome]:
    """Segment every series found in ``inputs``; one outcome per series or unusable file.

    The next series is read on a background thread while the current one is segmented, so
    decoding overlaps inference. A failure never stops the others.
    """
    outcomes: list[SeriesOutcome] = []
    out_dir = Path(out_dir)
    # A GPU segmenter's allocator: pixels are decoded into memory its kernels read directly.
    jobs = list(_jobs(inputs, segmenter.spec, getattr(segmenter, "pixel_allocator", None)))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeseg-read") as pool:
        pending: dict[int, Future] = {}

        def prefetch(i: int) -> None:
            if i < len(jobs) and isinstance(jobs[i], _Job):
                pending[i] = pool.submit(_timed_load, jobs[i])

        prefetch(0)
        for i, job in enumerate(jobs):
            prefetch(i + 1)
            if isinstance(job, SeriesOutcome):
                outcome = job
            else:
                volume, read_ms, err = pending.pop(i).result()
                if err is None:
                    try:
                        outcome = process_volume(
                            segmenter,
                            volume,
                            out_dir,
                            formats=formats,
                            source=job.source,
                            with_confidence=with_confidence,
                            part=job.part,
                            part_key=job.part_key,
                        )
                        outcome.timings = {"read": read_ms, **outcome.timings}
                    except _STOP:
                        raise
                    except BaseException as exc:  # noqa: BLE001 (one bad series never stops the rest)
                        err = exc
                if err is not None:
                    outcome = SeriesOutcome(
                        job.source,
                        "failed",
                        error=_error_line(job.source, err),
                        series=series_stem(job.uid, job.source)[7:19] if job.uid else None,
                        part=job.part or None,
                        part_key=job.part_key or None,
                        transient=_transient(err),
                    )
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


def read_any(path: str | Path):
    """One Volume from a NIfTI file or a DICOM file/folder holding exactly one series."""
    if is_nifti(path):
        return read_nifti(path)
    from edgeseg.dicom import read_volume

    return read_volume([Path(path)])
