"""Convenience entry points over :func:`find_series` and :func:`load_volume`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom.assemble import PixelsOut, load_volume
from edgeseg.dicom.scan import ScanResult, find_series
from edgeseg.volume import Volume


def _where(inputs: Sequence[str | Path] | str | Path) -> str | None:
    if isinstance(inputs, (str, Path)):
        return str(inputs)
    items = list(inputs)
    return str(items[0]) if len(items) == 1 else None


def read_volume(inputs: Sequence[str | Path] | str | Path, *, out: PixelsOut = None) -> Volume:
    """Load the one usable series in ``inputs`` (``out``: see :func:`load_volume`).

    Raises
    ------
    DicomInputError
        When there is no usable series (the reason of the first rejected file is given) or more
        than one (their labels are listed; pass one series' files, or use find_series).
    """
    return volume_from_scan(find_series(inputs), inputs, out=out)


def volume_from_scan(
    scan: ScanResult, inputs: Sequence[str | Path] | str | Path, *, out: PixelsOut = None
) -> Volume:
    """:func:`read_volume` on a scan already made of ``inputs`` (no second scan)."""
    if not scan.series:
        if scan.rejected:
            first = scan.rejected[0]
            raise DicomInputError(
                first.path,
                f"no usable image series found ({len(scan.rejected)} file(s) rejected; first: {first.reason})",
            )
        raise DicomInputError(_where(inputs), "no DICOM image files found")
    if len(scan.series) > 1:
        labels = "; ".join(ref.label for ref in scan.series[:5])
        more = f" and {len(scan.series) - 5} more" if len(scan.series) > 5 else ""
        raise DicomInputError(
            _where(inputs),
            f"{len(scan.series)} image series found ({labels}{more}); pass the files of one series",
        )
    volume = load_volume(scan.series[0], out=out)
    if scan.rejected:
        # A rejected file next to a usable series is most likely one of its slices: say so, since
        # with 1–2 slices left the spacing checks cannot see the hole.
        first = scan.rejected[0]
        volume.warnings.append(
            f"{len(scan.rejected)} other DICOM file(s) in the input were rejected (first: {first.reason}); "
            "if they belong to this series, it is incomplete"
        )
    return volume


def iter_volumes(inputs: Sequence[str | Path] | str | Path) -> Iterator[Volume | DicomInputError]:
    """Yield every rejected file's error, then each series part as a Volume or its error.

    Nothing is raised for bad input: a CLI can print one line per item and go on.
    """
    scan = find_series(inputs)
    yield from scan.rejected
    for ref in scan.series:
        try:
            yield load_volume(ref)
        except DicomInputError as err:
            yield err
