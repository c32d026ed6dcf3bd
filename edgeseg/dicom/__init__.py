"""DICOM ingest: find series, assemble them into :class:`~edgeseg.volume.Volume`, write series.

``find_series`` reads headers only and sorts every file into usable series parts, rejected
files (with a one-sentence reason) and skipped non-DICOM files; ``load_volume`` decodes one
part; ``read_volume`` is the one-series shortcut; ``write_series`` writes a (z, y, x) array as
a classic CT/MR series (quickstart data, round-trip tests).
"""

from edgeseg.dicom.api import iter_volumes, read_volume
from edgeseg.dicom.assemble import load_volume
from edgeseg.dicom.scan import ScanResult, SeriesRef, find_series
from edgeseg.dicom.write_series import write_series

__all__ = [
    "ScanResult",
    "SeriesRef",
    "find_series",
    "iter_volumes",
    "load_volume",
    "read_volume",
    "write_series",
]
