"""Find image series in files, folders and DICOMDIRs, reading headers only.

Every path given or found ends in exactly one place of the :class:`ScanResult`: an instance of
a usable :class:`SeriesRef`, a rejected file (a :class:`DicomInputError` with a one-sentence
reason), or a skipped file (not DICOM, or a DICOMDIR index, which is followed instead).

A SeriesInstanceUID is split into several parts when its instances cannot form one stack:
different orientation or matrix size, several multi-frame instances, instances without any
position (each is its own 2D image), or repeated positions that are separate volumes (4D
series such as diffusion or multi-echo: the k-th instance at every position goes to part k).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import struct
import warnings
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom import uid as pydicom_uid
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.misc import size_in_bytes
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom import elements as el
from edgeseg.dicom.frames import FrameInfo, frame_infos, is_enhanced, n_frames, sop_class_name
from edgeseg.dicom.geometry import IOP_TOL, orientation
from edgeseg.dicom.mosaic import is_mosaic, mosaic_reason

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Modalities that carry pixel data but are not images to segment.
NON_IMAGE_MODALITIES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTIMAGE", "RTRECORD", "SR", "KO", "PR", "REG"}
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
PHOTOMETRIC_TERMS = GRAYSCALE | {
    "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
}  # fmt: skip


@dataclass
class SeriesRef:
    """One stackable part of a series: files that :func:`load_volume` assembles into a Volume.

    ``label`` is short and free of patient data: modality, series number, description and,
    when the series was split, which part this is.
    """

    series_instance_uid: str
    modality: str
    files: list[Path]
    n_instances: int
    label: str
    # Datasets parsed by the scan (pixel data deferred), so loading does not parse them again, and
    # the per-frame geometry the scan derived from each (with the dataset it came from), so
    # loading does not derive it again.
    # When the series splits into parts: which one ("part 2/3: <why>") and a key that names it
    # stably across runs (a hash of its SOP Instance UIDs and why it is a part), for output
    # names that never collide. Both empty for a series that is one part.
    part: str = ""
    part_key: str = ""
    datasets: dict[Path, Dataset] = field(default_factory=dict, repr=False, compare=False)
    frame_infos: dict[Path, tuple[Dataset, list[FrameInfo]]] = field(
        default_factory=dict, repr=False, compare=False
    )


@dataclass
class ScanResult:
    """What :func:`find_series` found.

    ``rejected`` holds DICOM files that cannot be used, each with a reason; ``skipped`` holds
    files that are not DICOM images and are not errors (non-DICOM files, DICOMDIR indexes).
    """

    series: list[SeriesRef] = field(default_factory=list)
    rejected: list[DicomInputError] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


@dataclass
class _Instance:
    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    rows: int
    cols: int
    iop: np.ndarray | None
    ipp: np.ndarray | None
    multiframe: bool
    instance_number: int
    header: Dataset  # the parsed file; series number and description are read from it for labels
    infos: list[FrameInfo]
    dataset: Dataset | None = None  # the same, when it has pixel data: load reuses it


# -- reading headers --------------------------------------------------------------------


def _looks_like_raw_dataset(path: Path) -> bool:
    # A DICOM stream without preamble starts with a group 0x0002 or 0x0008 tag (little endian);
    # only then is force=True safe enough to try: on other files it invents garbage datasets.
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] < b"\x00\x01"


def quiet_dcmread(path: Path, **kwargs) -> Dataset:
    """dcmread without pydicom's validation chatter (invalid UI/DS values and the like):
    those warnings are noise for a reader that tolerates them, and may quote header values."""
    with quiet_pydicom():
        return dcmread(path, **kwargs)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value-validation warnings; it converts values lazily, on access, so
    whole scans and loads run under this (warnings state is process-wide, not per thread)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
        yield


# A scan parses each file once and loading reuses the dataset. A file is read whole, in one
# call, and parsed from memory (faster than pydicom's many small reads from the file); values
# larger than DEFER_SIZE (pixel data) are left out of the dataset, so a scan holds headers only,
# and loading reads the pixel bytes from their offset in the file, straight into the volume.
DEFER_SIZE = "64 KB"
_DEFER_BYTES = size_in_bytes(DEFER_SIZE)
# Larger files (big multi-frame instances) are parsed from the file, so a scan never holds one whole.
READ_WHOLE_MAX = 32 * 2**20


def parse_file(path: Path) -> Dataset:
    """The whole file parsed, with values larger than DEFER_SIZE left on disk."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = None
        # Only Part 10 files are read whole: a large non-DICOM file in a scanned folder is not.
        if st.st_size <= READ_WHOLE_MAX and fh.read(132)[128:] == b"DICM":
            fh.seek(0)
            data = fh.read()
    if data is None:
        return dcmread(path, defer_size=DEFER_SIZE)
    ds = _parse_part10(data)
    if ds is None:
        ds = dcmread(io.BytesIO(data), defer_size=DEFER_SIZE)
    if el.get(ds.file_meta, "TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # Offsets into the inflated dataset are not offsets into the file: keep every value.
        ds = dcmread(io.BytesIO(data))
    # As dcmread(path) leaves it: named after the file (deferred values are read from there),
    # not holding the buffer.
    ds.filename = os.fspath(path)
    ds.fileobj_type = open
    ds.buffer = None
    ds.timestamp = st.st_mtime
    return ds


_TAG_HEAD = struct.Struct("<HH")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_SHORT_VRS = {vr.encode() for vr in STANDARD_VR - EXPLICIT_VR_LENGTH_32}
_LONG_VRS = {vr.encode() for vr in EXPLICIT_VR_LENGTH_32 if vr != "SQ"}


def _parse_part10(data: bytes) -> FileDataset | None:
    """What ``dcmread(io.BytesIO(data), defer_size=DEFER_SIZE)`` returns, for a Part 10 file in
    memory whose file meta is plain Explicit VR Little Endian; None for anything else.

    pydicom's file meta reading (a generic dataset read, then its checks) costs ~50 µs for a
    handful of elements, a third of parsing a small MR slice; the meta is read here into the same
    raw elements, and the dataset itself by pydicom's ``read_dataset``, as ``read_partial`` does.
    None (dcmread decides) for file meta that is not Explicit VR Little Endian, a command set
    after it, no dataset, and transfer syntaxes with a reading of their own (big endian,
    deflate, private, none).
    """
    end, pos, meta = len(data), 132, {}
    while pos + 8 <= end:
        group, element = _TAG_HEAD.unpack_from(data, pos)
        if group != 2:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _SHORT_VRS:
            length, start = _US.unpack_from(data, pos + 6)[0], pos + 8
        elif vr in _LONG_VRS and pos + 12 <= end:
            length, start = _UL.unpack_from(data, pos + 8)[0], pos + 12
        else:
            return None  # a sequence, an unknown VR or none (implicit VR file meta)
        if start + length > end:
            return None
        tag = BaseTag(group << 16 | element)
        meta[tag] = RawDataElement(tag, vr.decode(), length, data[start : start + length], start, False, True)
        pos = start + length
    syntax_elem = meta.get(BaseTag(0x00020010))
    if pos + 8 > end or data[pos : pos + 2] == b"\x00\x00" or syntax_elem is None:
        return None
    syntax = syntax_elem.value.decode(default_encoding, "replace").rstrip("\0 ")
    if (
        syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
        or syntax in pydicom_uid.PrivateTransferSyntaxes
    ):
        return None
    implicit = syntax == ImplicitVRLittleEndian
    file_meta = FileMetaDataset(meta)
    file_meta.set_original_encoding(False, True, default_encoding)
    fp = io.BytesIO(data)
    fp.seek(pos)
    dataset = read_dataset(fp, implicit, True, defer_size=_DEFER_BYTES)
    ds = FileDataset(fp, dataset, data[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def read_header(path: Path, *, keep_dataset: bool = False) -> Dataset | None:
    """The header of ``path``, or None when it is not a DICOM file.

    With ``keep_dataset`` the whole file is parsed with large values deferred (so the dataset
    can be decoded later without parsing again); otherwise parsing stops before the pixel data.

    Raises
    ------
    DicomInputError
        When the file claims to be DICOM but its header cannot be parsed.
    """
    with quiet_pydicom():
        return _read_header(path, keep_dataset)


def _read_header(path: Path, keep_dataset: bool) -> Dataset | None:
    if keep_dataset:
        try:
            ds = parse_file(path)
            if el.has(ds, "SOPInstanceUID"):
                return ds
        except Exception:
            pass  # the header-only read below reports (or forgives) what is wrong
    try:
        return dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except OSError as exc:  # permissions, a file removed while scanning, an I/O error: not damage
        raise DicomInputError(path, f"it cannot be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:
        raise DicomInputError(
            path, f"the DICOM header cannot be parsed ({type(exc).__name__}); the file is damaged"
        ) from None
    if _looks_like_raw_dataset(path):
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            ds = None
        if ds is not None and "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            return ds
    if path.suffix.lower() in (".dcm", ".dicom", ".dic"):
        raise DicomInputError(path, "named as DICOM but has no DICOM preamble or readable header")
    return None


def unusable_reason(ds: Dataset) -> str | None:
    """Why an instance cannot become part of a grayscale volume, or None when it can."""
    sop = str(el.get(ds, "SOPClassUID", "") or "")
    modality = str(el.get(ds, "Modality", "") or "").upper()
    if not sop:
        return "the header has no SOP Class UID, so it is not a usable image instance"
    if modality in NON_IMAGE_MODALITIES:
        return f"it is a {sop_class_name(sop)} ({modality}) object, not an image to segment"
    if not el.has(ds, "Rows") or not el.has(ds, "Columns"):
        # Tags only: iterating the dataset would convert (and may choke on) every element.
        overlays = any(t >> 16 & 0xFF01 == 0x6000 and t & 0xFFFF == 0x3000 for t in ds._dict)
        if overlays:
            return "it holds only overlay planes, no image pixel data"
        return f"it has no image pixel data ({sop_class_name(sop)})"
    ts = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    if ts is not None and not isinstance(ts, str):
        return "its Transfer Syntax UID is not a single UID; the file meta information is damaged"
    photometric = el.get(ds, "PhotometricInterpretation", "MONOCHROME2")
    photometric = photometric.strip().upper() if isinstance(photometric, str) else ""
    samples = el.get_int(ds, "SamplesPerPixel", 1)
    if samples != 1 or photometric not in GRAYSCALE:
        # Only a known term is quoted: a damaged value may hold other header bytes.
        what = (
            photometric if photometric in PHOTOMETRIC_TERMS else "SamplesPerPixel > 1" if samples != 1 else ""
        )
        if not what:
            return "its PhotometricInterpretation is not a known term, so its pixels cannot be decoded"
        return f"it is a colour image ({what}); only grayscale images can be segmented"
    missing = [k for k in ("BitsAllocated", "BitsStored", "PixelRepresentation") if el.get(ds, k) is None]
    if missing:
        return f"its header lacks {', '.join(missing)} (Image Pixel module), so its pixels cannot be decoded"
    rows, cols = el.get_int(ds, "Rows"), el.get_int(ds, "Columns")
    if rows is None or cols is None or rows < 1 or cols < 1:
        return "its Rows or Columns is not one positive number, so its pixels cannot be decoded"
    bits = el.get_int(ds, "BitsAllocated")
    if bits is None:
        return "its BitsAllocated is not one number, so its pixels cannot be decoded"
    if bits not in (8, 16, 32):
        return f"its pixels have {bits} bits allocated (binary or unsupported); not a grayscale image"
    stored = el.get_int(ds, "BitsStored")
    if stored is None or not 1 <= stored <= bits:
        return f"its BitsStored is not a number from 1 to its BitsAllocated ({bits}), so its pixels cannot be decoded"
    if el.get_int(ds, "PixelRepresentation") not in (0, 1):
        return (
            "its PixelRepresentation is neither 0 (unsigned) nor 1 (signed), so its pixels cannot be decoded"
        )
    if el.has(ds, "FloatPixelData") or el.has(ds, "DoubleFloatPixelData"):
        return "it stores floating-point pixel data, which is not supported"
    image_type = [str(v).upper() for v in (el.get(ds, "ImageType") or [])]
    if "MOSAIC" in image_type:
        return mosaic_reason(ds)  # a Siemens tiled volume: usable when its CSA header un-tiles it
    try:
        count = n_frames(ds)
    except (TypeError, ValueError, OverflowError):
        return "its NumberOfFrames is not a number"
    if count < 1:
        return f"its NumberOfFrames is {count}, so it holds no image"
    if count > 1 and not is_enhanced(ds):
        return (
            f"it is a multi-frame image ({count} frames) without per-frame positions, "
            "so its frames cannot be placed in space"
        )
    per_frame = el.get(ds, "PerFrameFunctionalGroupsSequence")
    if count > 1 and per_frame is not None and len(per_frame) != count:
        # PS3.3 C.7.6.16: one item per frame; another count means a damaged header, and
        # trusting NumberOfFrames alone could mean millions of frames from one flipped digit.
        return f"its NumberOfFrames ({count}) differs from its {len(per_frame)} per-frame functional groups"
    return None


def _instance(path: Path, ds: Dataset) -> _Instance:
    infos = frame_infos(ds)
    first = infos[0]
    ipp = first.ipp
    iop = first.iop
    if iop is not None:
        try:
            orientation(iop)
        except ValueError:
            iop = None
    try:
        number = int(el.get(ds, "InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return _Instance(
        path=path,
        series_uid=str(el.get(ds, "SeriesInstanceUID", "") or ""),
        sop_uid=str(el.get(ds, "SOPInstanceUID")),
        modality=str(el.get(ds, "Modality", "") or "").upper() or "OT",
        rows=int(el.get(ds, "Rows")),
        cols=int(el.get(ds, "Columns")),
        iop=iop,
        ipp=ipp,
        multiframe=is_enhanced(ds) or n_frames(ds) > 1 or is_mosaic(ds),  # a MOSAIC is a whole volume
        instance_number=number,
        header=ds,
        infos=infos,
        dataset=ds if el.has(ds, "PixelData") else None,
    )


# -- walking ----------------------------------------------------------------------------


def _dicomdir_files(path: Path, ds: Dataset) -> tuple[list[Path], list[DicomInputError]]:
    """Files referenced by a DICOMDIR, resolved against its folder (File IDs are relative)."""
    found: list[Path] = []
    missing: list[DicomInputError] = []
    for record in ds.get("DirectoryRecordSequence") or []:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        target = path.parent.joinpath(*[str(p) for p in parts])
        if target.is_file():
            found.append(target)
        else:
            missing.append(DicomInputError(target, "listed in a DICOMDIR but the file does not exist"))
    return found, missing


def _walk(inputs: Iterable[str | Path], missing: list[DicomInputError]) -> Iterable[Path]:
    for item in inputs:
        p = item if isinstance(item, Path) else Path(item)
        try:
            mode = os.stat(p).st_mode  # one stat for Path.is_dir() and is_file()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                raise  # as Path.is_dir() does
            mode = 0
        except ValueError:
            mode = 0
        if stat.S_ISDIR(mode):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif stat.S_ISREG(mode):
            yield p
        else:
            missing.append(DicomInputError(p, "no such file or folder"))


def _resolved(path: Path, folders: dict[str, str]) -> str:
    """``str(path.resolve())``, resolving each folder once (the slices of a series share one)."""
    text = os.fspath(path)
    head, name = os.path.split(text)
    if name in ("", ".", "..") or os.path.islink(text):
        return str(Path(text).resolve())
    folder = folders.get(head)
    if folder is None:
        folder = folders[head] = os.path.realpath(head or ".")  # = Path.resolve() of a folder
    return os.path.join(folder, name)


# -- grouping ---------------------------------------------------------------------------


def _split_by_orientation(items: list[_Instance]) -> list[list[_Instance]]:
    clusters: list[list[_Instance]] = []
    for inst in items:
        for cluster in clusters:
            ref = cluster[0]
            if (ref.rows, ref.cols) == (inst.rows, inst.cols) and np.max(
                np.abs(ref.iop - inst.iop)
            ) <= IOP_TOL:
                cluster.append(inst)
                break
        else:
            clusters.append([inst])
    return clusters


def _split_repeats(items: list[_Instance]) -> list[list[_Instance]]:
    """Split k instances per position into k volumes when they are distinct acquisitions."""
    _, _, normal = orientation(items[0].iop)
    by_pos: dict[float, list[_Instance]] = defaultdict(list)
    for inst in items:
        by_pos[round(float(inst.ipp @ normal), 2)].append(inst)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1 or counts == {1}:
        return [items]  # no repeats, or an irregular mix: load_volume decides (duplicates)
    k = counts.pop()
    # Identical InstanceNumbers at one position look like re-sent copies: keep together so
    # load_volume can compare their pixels (identical -> keep one, different -> refuse).
    if any(len({i.instance_number for i in group}) < k for group in by_pos.values()):
        return [items]
    parts: list[list[_Instance]] = [[] for _ in range(k)]
    for group in by_pos.values():
        for rank, inst in enumerate(sorted(group, key=lambda i: (i.instance_number, str(i.path)))):
            parts[rank].append(inst)
    return parts


def _label(inst: _Instance, part: int, n_parts: int, why: str) -> str:
    text = inst.modality
    series_number = _label_text(inst.header, "SeriesNumber")
    description = _label_text(inst.header, "SeriesDescription").strip()
    if series_number:
        text += f" #{series_number}"
    if description:
        text += f" {description[:48]}"
    if n_parts > 1:
        text += f" [part {part}/{n_parts}: {why}]"
    return text


def _label_text(ds: Dataset, keyword: str) -> str:
    # pydicom's own value (str() of an IS keeps "05"); a damaged element just leaves it out.
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:
        return ""


def _copies(members: list[_Instance]) -> list[list[_Instance]]:
    """Split files that repeat a SOP Instance UID (the same image stored twice, e.g. once
    uncompressed and once JPEG 2000) into copy sets: the k-th file of each UID goes to set k."""
    sets: list[list[_Instance]] = []
    seen: dict[str, int] = defaultdict(int)
    for inst in members:
        k = seen[inst.sop_uid]
        seen[inst.sop_uid] += 1
        if k == len(sets):
            sets.append([])
        sets[k].append(inst)
    return sets


def _parts_of(members: list[_Instance], copy_note: str) -> list[tuple[list[_Instance], str]]:
    parts: list[tuple[list[_Instance], str]] = []
    for m in members:
        if m.multiframe:
            mosaic = is_mosaic(m.header)
            kind = f"MOSAIC volume, instance {m.instance_number}" if mosaic else "multi-frame instance"
            parts.append(([m], f"{kind}{copy_note}"))
        elif m.iop is None or m.ipp is None:
            parts.append(([m], f"image without position{copy_note}"))
    stackable = [m for m in members if not m.multiframe and m.iop is not None and m.ipp is not None]
    for cluster in _split_by_orientation(stackable):
        ref = cluster[0]
        why = f"{ref.cols}x{ref.rows} orientation {np.round(ref.iop, 2).tolist()}{copy_note}"
        repeats = _split_repeats(cluster)
        for index, part in enumerate(repeats, 1):
            parts.append((part, why if len(repeats) == 1 else f"{why}, volume {index}"))
    return parts


def _group(instances: list[_Instance]) -> list[SeriesRef]:
    by_series: dict[str, list[_Instance]] = defaultdict(list)
    for inst in instances:
        by_series[inst.series_uid].append(inst)
    refs: list[SeriesRef] = []
    for uid, members in by_series.items():
        copy_sets = _copies(members)
        parts: list[tuple[list[_Instance], str]] = []
        for k, copy_set in enumerate(copy_sets, 1):
            parts.extend(_parts_of(copy_set, f", copy {k}" if len(copy_sets) > 1 else ""))
        for index, (part, why) in enumerate(parts, 1):
            part.sort(key=lambda i: (i.instance_number, str(i.path)))
            key = ""
            if len(parts) > 1:
                ident = "\n".join(sorted(i.sop_uid for i in part)) + "|" + why
                key = hashlib.sha256(ident.encode()).hexdigest()[:8]
            refs.append(
                SeriesRef(
                    series_instance_uid=uid,
                    modality=part[0].modality,
                    files=[i.path for i in part],
                    n_instances=len(part),
                    label=_label(part[0], index, len(parts), why),
                    part=f"part {index}/{len(parts)}: {why}" if len(parts) > 1 else "",
                    part_key=key,
                    datasets={i.path: i.dataset for i in part if i.dataset is not None},
                    frame_infos={i.path: (i.dataset, i.infos) for i in part if i.dataset is not None},
                )
            )
    return refs


def find_series(inputs: Sequence[str | Path] | str | Path) -> ScanResult:
    """Find the image series in files, folders (recursively) and DICOMDIR files.

    Each file is parsed once, with its pixel data left on disk when larger than 64 KB; the
    datasets and their per-frame geometry go with each part, and the pixel data is decoded
    later by :func:`load_volume`, which may still reject a part whose pixels are damaged.

    Parameters
    ----------
    inputs:
        Files, folders or DICOMDIR files, in any mix (a single path is accepted too).

    Returns
    -------
    ScanResult
        Usable series parts, rejected DICOM files with reasons, skipped non-DICOM files.

    A path that does not exist is reported in ``rejected``.
    """
    with quiet_pydicom():
        return _find_series([inputs] if isinstance(inputs, (str, Path)) else list(inputs))


def _find_series(inputs: list[str | Path]) -> ScanResult:
    result = ScanResult()
    seen: set[str] = set()
    instances: list[_Instance] = []
    folders: dict[str, str] = {}
    queue = deque(_walk(inputs, result.rejected))
    while queue:
        path = queue.popleft()
        key = _resolved(path, folders)
        if key in seen:
            continue
        seen.add(key)
        try:
            ds = _read_header(path, True)
            if ds is None:
                result.skipped.append(path)
                continue
            inst = _examine(path, ds, result, queue, seen, folders)
        except DicomInputError as err:
            result.rejected.append(err)
            continue
        except el.HeaderValueError as err:
            result.rejected.append(DicomInputError(path, str(err)))
            continue
        except Exception as exc:  # safety net: one damaged file must not stop the scan of the others
            result.rejected.append(
                DicomInputError(
                    path, f"its header cannot be interpreted ({type(exc).__name__}); the file is damaged"
                )
            )
            continue
        if inst is not None:
            instances.append(inst)
    result.series = _group(instances)
    return result


def _examine(
    path: Path, ds: Dataset, result: ScanResult, queue: deque[Path], seen: set[str], folders: dict[str, str]
) -> _Instance | None:
    """Sort one parsed file: follow a DICOMDIR, reject an unusable instance, or return it."""
    sop_class = str(
        el.get(ds, "SOPClassUID", "") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")
    )
    if el.has(ds, "DirectoryRecordSequence") or sop_class == MEDIA_STORAGE_DIRECTORY:
        # A DICOMDIR is an index: follow it, do not count it as an image or an error.
        files, missing = _dicomdir_files(path, ds)
        for err in missing:
            key = _resolved(Path(err.path), folders)
            if key not in seen:
                seen.add(key)
                result.rejected.append(err)
        queue.extend(files)
        result.skipped.append(path)
        return None
    reason = unusable_reason(ds)
    if reason:
        modality = str(el.get(ds, "Modality", "") or "").upper()
        raise DicomInputError(path, reason, not_an_image=modality in NON_IMAGE_MODALITIES)
    return _instance(path, ds)
