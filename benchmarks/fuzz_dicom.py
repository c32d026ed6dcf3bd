"""Mutation fuzzer for edgeseg's DICOM reader: every case must end in a Volume or a DicomInputError.

Seeds are the real DICOM files in ``../shared/data/dicom`` and pydicom's bundled test files
(deduplicated by content), single files and small series folders. Case ``i`` of seed ``s`` is
fully determined by ``(s, i)``: it picks a seed and stacks one to three mutations on it — bit
and byte flips, truncations, bad length fields (element, sequence and item lengths, pixel data
fragments), deleted and duplicated spans (whole elements or random bytes), a different or
broken Transfer Syntax UID, a different or invalid VR. Single files go through
``read_volume(file)``; series folders (one or two files mutated) through ``find_series`` and
``load_volume`` of every part found.

Cases run in worker subprocesses (plain ``python fuzz_dicom.py --worker`` children talking
JSON lines), so a native segfault or abort is counted as a crash and a case that runs past the
time limit as a hang; the worker is then replaced and the run goes on. Per case the outcome is:

- ``volume``: a Volume that holds together (3D, finite positive spacing, finite affine);
- ``error``: a DicomInputError naming the file (the case file, or the folder / a file in it);
- findings: ``escape:<type>`` (any other exception, BaseExceptions from native decoders
  included), ``unnamed`` (a DicomInputError that names no case file, or has no one-line reason),
  ``phi`` (a message quoting the seed's patient name or ID), ``badvol`` (an inconsistent
  Volume), ``hang`` and ``crash`` (the worker died).

Usage::

    .venv/bin/python benchmarks/fuzz_dicom.py                # 10^5 cases, prints a table
    .venv/bin/python benchmarks/fuzz_dicom.py -n 2000 --workers 2 --seed 7
    .venv/bin/python benchmarks/fuzz_dicom.py --case 1234     # rerun one case in-process, with traceback
    .venv/bin/python benchmarks/fuzz_dicom.py --save out/fuzz # keep the files of every finding
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))
DICOM = SHARED / "data" / "dicom"

# Seeds larger than this are left out: a mutated 6 MB radiograph costs as much as 100 small cases.
MAX_SEED_BYTES = 1_100_000
# Series folders fuzzed as a whole (relative to DICOM): small, and each a different vendor/layout.
SERIES_SEEDS = [
    "dicom2nifti_headers_random_pixels/mr_ge_dti_noext",
    "dicom2nifti_headers_random_pixels/mr_hitachi",
    "dicom2nifti_headers_random_pixels/mr_pmod_rescale_nonisotropic",
    "pydicom/dicomdir_series/77654033/CT2",
    "pydicom/dicomdir_series/98892001/CT5N",
    "pydicom/dicomdir_series/98892003/MR2",
    "pydicom/dicomdir_series/TINY_ALPHA/PT000000/ST000000/SE000000",
    "tcia_brain_tumor_progression/PGBM-003_Study3/11_HCropVolume",
    "pydicom/dicomdir_series",  # a DICOMDIR and the folders it indexes
]
SERIES_SHARE = 0.3  # of the cases
NOT_DICOM_SUFFIXES = {".md", ".txt", ".png", ".nrrd", ".gz", ".json", ".py"}

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.999",  # unknown
    "",
    "1.2.840.10008.1.2\\1.2.840.10008.1.2.1",
    "not a uid",
    "1" * 70,
]
VRS = [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
    "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
    "UT", "UV",
]  # fmt: skip
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
BAD_VRS = [b"ZZ", b"\x00\x00", b"ob", b"  ", b"\xff\xff", b"O\x00"]
FINDINGS = ("escape", "unnamed", "phi", "badvol", "hang", "crash")


# -- seeds ------------------------------------------------------------------------------


@dataclass
class Seed:
    kind: str  # "file" or "series"
    path: Path  # the file, or the series folder
    files: list[Path] = field(default_factory=list)  # series: the files, relative to path

    @property
    def name(self) -> str:
        try:
            return self.path.relative_to(DICOM).as_posix()
        except ValueError:
            return "pydicom-data/" + self.path.name


def _is_dicom_candidate(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() not in NOT_DICOM_SUFFIXES and path.name != "DICOMDIR"


def collect_seeds(max_bytes: int = MAX_SEED_BYTES, pydicom_files: bool = True) -> list[Seed]:
    """Every seed, in a fixed order (so a case number means the same case on every machine)."""
    seeds: list[Seed] = []
    hashes: set[str] = set()
    candidates = sorted(p for p in DICOM.rglob("*") if _is_dicom_candidate(p)) if DICOM.is_dir() else []
    if pydicom_files:
        try:
            from pydicom.data import get_testdata_files

            candidates += sorted(Path(p) for p in get_testdata_files() if _is_dicom_candidate(Path(p)))
        except Exception:
            pass  # no bundled test files in this pydicom
    for path in candidates:
        if path.stat().st_size > max_bytes:
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in hashes:
            continue
        hashes.add(digest)
        seeds.append(Seed("file", path))
    for rel in SERIES_SEEDS:
        folder = DICOM / rel
        if folder.is_dir():
            files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
            seeds.append(Seed("series", folder, files))
    return seeds


# -- a light element walker (where the length fields, VRs and values are) ------------------


@dataclass
class Elem:
    start: int  # offset of the tag
    tag: int
    vr_at: int | None  # offset of an explicit VR
    len_at: int  # offset of the length field
    len_size: int  # 2 or 4
    little: bool
    value_at: int
    length: int  # as stored (0xFFFFFFFF: undefined)
    kind: str  # "elem", "item", "delim", "frag"

    @property
    def end(self) -> int:
        return self.value_at + (0 if self.length == 0xFFFFFFFF else self.length)


def walk(data: bytes, limit: int = 4000) -> list[Elem]:
    """The elements of a Part 10 stream (nested sequences, items, fragments), as far as they parse."""
    out: list[Elem] = []
    pos = 132 if data[128:132] == b"DICM" else 0
    try:
        pos = _walk_level(data, pos, len(data), True, True, out, limit, meta=True, depth=0)
        ts = _ts_of(data, out)
        if ts == "1.2.840.10008.1.2.1.99":
            return out  # deflated: nothing more to see without inflating
        explicit = ts != "1.2.840.10008.1.2"
        little = ts != "1.2.840.10008.1.2.2"
        _walk_level(data, pos, len(data), explicit, little, out, limit, meta=False, depth=0)
    except (struct.error, IndexError, ValueError, RecursionError):
        pass
    return out


def _ts_of(data: bytes, elems: list[Elem]) -> str:
    for e in elems:
        if e.tag == 0x00020010:
            return data[e.value_at : e.end].decode("ascii", "replace").rstrip("\x00 ")
    return "1.2.840.10008.1.2"


def _walk_level(
    data: bytes,
    pos: int,
    end: int,
    explicit: bool,
    little: bool,
    out: list[Elem],
    limit: int,
    *,
    meta: bool = False,
    depth: int = 0,
    until_delim: bool = False,
) -> int:
    from pydicom.datadict import dictionary_VR

    order = "<" if little else ">"
    while pos + 8 <= end and len(out) < limit:
        group, element = struct.unpack_from(order + "HH", data, pos)
        if meta and group != 2:
            return pos
        tag = group << 16 | element
        if group == 0xFFFE:
            (length,) = struct.unpack_from(order + "I", data, pos + 4)
            kind = "item" if element == 0xE000 else "delim"
            out.append(Elem(pos, tag, None, pos + 4, 4, little, pos + 8, length, kind))
            if kind == "delim":
                return pos + 8
            pos += 8
            continue
        if explicit or meta:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                (length,) = struct.unpack_from(order + "I", data, pos + 8)
                elem = Elem(pos, tag, pos + 4, pos + 8, 4, little, pos + 12, length, "elem")
            else:
                (length,) = struct.unpack_from(order + "H", data, pos + 6)
                elem = Elem(pos, tag, pos + 4, pos + 6, 2, little, pos + 8, length, "elem")
            is_sq = vr == b"SQ"
        else:
            (length,) = struct.unpack_from(order + "I", data, pos + 4)
            elem = Elem(pos, tag, None, pos + 4, 4, little, pos + 8, length, "elem")
            try:
                is_sq = dictionary_VR(tag) == "SQ"
            except KeyError:
                is_sq = length == 0xFFFFFFFF and tag != 0x7FE00010
        out.append(elem)
        if length == 0xFFFFFFFF:
            if tag == 0x7FE00010:
                pos = _walk_fragments(data, elem.value_at, end, order, out, limit)
            elif is_sq or depth < 8:
                pos = _walk_items(data, elem.value_at, end, explicit, little, out, limit, depth + 1, None)
            else:
                return end
        elif is_sq and depth < 8:
            _walk_items(
                data, elem.value_at, min(end, elem.end), explicit, little, out, limit, depth + 1, elem.end
            )
            pos = elem.end
        else:
            pos = elem.end
    return pos


def _walk_items(data, pos, end, explicit, little, out, limit, depth, defined_end) -> int:
    order = "<" if little else ">"
    while pos + 8 <= end and len(out) < limit:
        group, element = struct.unpack_from(order + "HH", data, pos)
        (length,) = struct.unpack_from(order + "I", data, pos + 4)
        if group != 0xFFFE:
            return pos if defined_end is None else defined_end
        kind = "item" if element == 0xE000 else "delim"
        out.append(Elem(pos, group << 16 | element, None, pos + 4, 4, little, pos + 8, length, kind))
        pos += 8
        if element == 0xE0DD:
            return pos
        if element != 0xE000:
            continue
        if length == 0xFFFFFFFF:
            pos = _walk_level(data, pos, end, explicit, little, out, limit, depth=depth, until_delim=True)
        else:
            _walk_level(data, pos, min(end, pos + length), explicit, little, out, limit, depth=depth)
            pos += length
    return pos


def _walk_fragments(data, pos, end, order, out, limit) -> int:
    while pos + 8 <= end and len(out) < limit:
        group, element = struct.unpack_from(order + "HH", data, pos)
        (length,) = struct.unpack_from(order + "I", data, pos + 4)
        out.append(Elem(pos, group << 16 | element, None, pos + 4, 4, order == "<", pos + 8, length, "frag"))
        pos += 8
        if element == 0xE0DD or group != 0xFFFE:
            return pos
        pos += length
    return pos


# -- mutations --------------------------------------------------------------------------


def _header_end(data: bytes, elems: list[Elem]) -> int:
    for e in elems:
        if e.tag == 0x7FE00010:
            return e.value_at + 64
    return min(len(data), 8192)


def _put_len(buf: bytearray, e: Elem, value: int) -> None:
    fmt = ("<" if e.little else ">") + ("I" if e.len_size == 4 else "H")
    struct.pack_into(fmt, buf, e.len_at, value & (0xFFFFFFFF if e.len_size == 4 else 0xFFFF))


def m_flip(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    buf = bytearray(data)
    hi = _header_end(data, elems) if rng.random() < 0.8 else len(buf)
    n = rng.choice((1, 1, 2, 4, 8, 32))
    for _ in range(n):
        at = rng.randrange(min(hi, len(buf)))
        if rng.random() < 0.5:
            buf[at] ^= 1 << rng.randrange(8)
        else:
            buf[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x5C, 0x20, rng.randrange(256)))
    return bytes(buf), f"flip {n} byte(s) below {hi}"


def m_truncate(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    if elems and rng.random() < 0.6:
        e = rng.choice(elems)
        at = max(
            0, min(len(data) - 1, rng.choice((e.start, e.len_at, e.value_at, e.end)) + rng.randint(-2, 2))
        )
    else:
        at = rng.randrange(len(data))
    return data[:at], f"truncate at {at}/{len(data)}"


def m_length(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    if not elems:
        return m_flip(rng, data, elems)
    weights = [4 if e.kind in ("item", "frag") or e.length == 0xFFFFFFFF else 1 for e in elems]
    e = rng.choices(elems, weights)[0]
    full = 0xFFFFFFFF if e.len_size == 4 else 0xFFFF
    value = rng.choice(
        (
            0,
            1,
            e.length + 1,
            e.length - 1,
            e.length + 2,
            e.length * 2,
            len(data) - e.value_at,
            len(data),
            full,
            full - 1,
            0x7FFFFFFF,
            rng.randrange(full + 1),
        )
    )
    buf = bytearray(data)
    _put_len(buf, e, value)
    return bytes(buf), f"length of {e.kind} ({e.tag:08X}) at {e.len_at}: {e.length} -> {value & full}"


def _span(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[int, int, str]:
    if elems and rng.random() < 0.6:
        e = rng.choice(elems)
        return e.start, min(len(data), max(e.end, e.value_at)), f"element {e.tag:08X}"
    start = rng.randrange(len(data))
    return start, min(len(data), start + rng.choice((1, 2, 4, 8, 64, 1024))), "bytes"


def m_delete(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    a, b, what = _span(rng, data, elems)
    return data[:a] + data[b:], f"delete {what} [{a}:{b}]"


def m_duplicate(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    a, b, what = _span(rng, data, elems)
    return data[:b] + data[a:b] + data[b:], f"duplicate {what} [{a}:{b}]"


def m_insert(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    at = rng.randrange(_header_end(data, elems))
    junk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 3, 4, 8, 16))))
    return data[:at] + junk + data[at:], f"insert {len(junk)} byte(s) at {at}"


def m_transfer_syntax(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    ts = [e for e in elems if e.tag == 0x00020010]
    if not ts:
        return m_flip(rng, data, elems)
    e = ts[0]
    new = rng.choice(TRANSFER_SYNTAXES).encode()
    if rng.random() < 0.7:  # consistent: the value and its length replaced together
        if len(new) % 2:
            new += b"\x00"
        buf = bytearray(data[: e.value_at] + new + data[e.end :])
        _put_len(buf, e, len(new))
        return bytes(buf), f"transfer syntax -> {new!r}"
    # In place: the old length kept, but never past the file's end (an earlier mutation may have
    # inflated the length field to gigabytes; building that value would be the fuzzer's own crash).
    n = max(0, min(e.length, len(data) - e.value_at))
    value = (new + b"\x00" * n)[:n]
    return data[: e.value_at] + value + data[e.value_at + n :], f"transfer syntax in place -> {value[:64]!r}"


def m_vr(rng: random.Random, data: bytes, elems: list[Elem]) -> tuple[bytes, str]:
    explicit = [e for e in elems if e.vr_at is not None]
    if not explicit:
        return m_flip(rng, data, elems)
    e = rng.choice(explicit)
    new = rng.choice(BAD_VRS) if rng.random() < 0.3 else rng.choice(VRS).encode()
    buf = bytearray(data)
    buf[e.vr_at : e.vr_at + 2] = new
    return bytes(buf), f"VR of {e.tag:08X} -> {new!r}"


MUTATIONS = [
    (m_flip, 4),
    (m_truncate, 2),
    (m_length, 4),
    (m_delete, 2),
    (m_duplicate, 2),
    (m_insert, 1),
    (m_transfer_syntax, 1),
    (m_vr, 2),
]


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, list[str]]:
    steps: list[str] = []
    for _ in range(rng.choices((1, 2, 3), (6, 3, 1))[0]):
        if not data:
            break
        fn = rng.choices([m for m, _ in MUTATIONS], [w for _, w in MUTATIONS])[0]
        data, what = fn(rng, data, walk(data))
        steps.append(what)
    return data, steps


# -- one case ----------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    seed: Seed
    rng_seed: str


def case_of(index: int, seeds: list[Seed], master: int) -> Case:
    rng = random.Random(f"{master}:{index}")
    series = [s for s in seeds if s.kind == "series"]
    files = [s for s in seeds if s.kind == "file"]
    pool = series if series and rng.random() < SERIES_SHARE else files
    return Case(index, rng.choice(pool), f"{master}:{index}:mutate")


class Runner:
    """Builds a case's files under ``root`` and runs edgeseg on them (in the calling process)."""

    def __init__(self, root: Path):
        self.root = root
        self._bytes: dict[Path, bytes] = {}
        self._phi: dict[Path, set[str]] = {}

    def _data(self, path: Path) -> bytes:
        if path not in self._bytes:
            self._bytes[path] = path.read_bytes()
        return self._bytes[path]

    def _identities(self, paths: list[Path]) -> set[str]:
        out: set[str] = set()
        for path in paths:
            if path not in self._phi:
                self._phi[path] = _identities_of(path)
            out |= self._phi[path]
        return out

    def build(self, case: Case) -> tuple[Path, list[str], list[Path]]:
        """Write the case's files; returns (what to read, mutation steps, seed files used)."""
        rng = random.Random(case.rng_seed)
        where = self.root / f"case{case.index}"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        seed = case.seed
        if seed.kind == "file":
            target = where / seed.path.name
            data, steps = mutate(rng, self._data(seed.path))
            target.write_bytes(data)
            return target, steps, [seed.path]
        chosen = rng.sample(seed.files, k=min(len(seed.files), rng.choice((1, 1, 2))))
        steps: list[str] = []
        for rel in seed.files:
            dst = where / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in chosen:
                data, what = mutate(rng, self._data(seed.path / rel))
                dst.write_bytes(data)
                steps += [f"{rel}: {w}" for w in what]
            else:
                os.symlink(seed.path / rel, dst)
        return where, steps, [seed.path / rel for rel in seed.files]

    def run(self, case: Case) -> dict:
        target, steps, sources = self.build(case)
        try:
            outcome, detail, notes = run_reader(target, case.seed.kind, self._identities(sources))
        finally:
            shutil.rmtree(self.root / f"case{case.index}", ignore_errors=True)
        return {"outcome": outcome, "detail": detail, "steps": steps, "notes": notes}


def _identities_of(path: Path) -> set[str]:
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"], force=True)
        values = (ds.get("PatientName"), ds.get("PatientID"))
    except Exception:
        return set()
    out = set()
    for value in values:
        text = str(value or "").strip()
        if len(text) >= 4 and not text.isdigit():
            out.add(text)
    return out


def _names_case_file(err, target: Path, kind: str) -> bool:
    # The case file itself, or (a DICOMDIR's missing target, a series) a path in the case folder.
    if not err.path:
        return False
    path = os.path.abspath(err.path)
    base = os.path.abspath(target.parent if kind == "file" else target)
    return path == base or path.startswith(base + os.sep)


def _check_volume(volume) -> str | None:
    import numpy as np

    stored = volume.stored
    nz = stored.shape[0] if stored.ndim == 3 else -1
    if stored.ndim != 3 or nz < 1 or min(stored.shape) < 1:
        return f"stored has shape {stored.shape}"
    if len(volume.sop_instance_uids) != nz or len(volume.frame_numbers) != nz or len(volume.slope) != nz:
        return "per-slice lists do not match the slice count"
    spacing = np.asarray(volume.spacing, dtype=float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        return f"spacing {spacing.tolist()}"
    if not np.all(np.isfinite(np.asarray(volume.affine, dtype=float))):
        return "affine is not finite"
    if not (np.all(np.isfinite(volume.slope)) and np.all(np.isfinite(volume.intercept))):
        return "slope/intercept not finite"
    return None


def _escape_of(fn) -> tuple[str, str] | None:
    """Run ``fn``; (outcome, detail) of anything it raises, BaseExceptions included, else None."""
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the point is to see every kind
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        where = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
        ours = next((f for f in reversed(frames) if "/edgeseg/" in f.filename), None)
        via = f" via {Path(ours.filename).name}:{ours.lineno}" if ours else ""
        return f"escape:{type(exc).__name__}", f"{str(exc)[:160]!r} at {where}{via}"
    return None


class _Panic(BaseException):
    """Stands in for pyo3's PanicException (a BaseException) in the harness probes."""


def _probe(index: int) -> dict:
    """Negative case numbers check the harness itself: each must come out as a finding."""

    def escape() -> None:
        raise TypeError("probe: an exception that is not a DicomInputError")

    def panic() -> None:
        raise _Panic("probe: a BaseException from a native extension")

    def hang() -> None:
        time.sleep(3600)

    def segfault() -> None:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV

    fn = {-1: escape, -2: panic, -3: hang, -4: segfault}[index]
    outcome, detail = _escape_of(fn) or ("volume", "")
    return {"outcome": outcome, "detail": detail, "steps": [f"probe {fn.__name__}"]}


# Reasons only the safety nets give: the error was mapped, but no code that knows the file did it.
NET_REASONS = ("its header cannot be interpreted (", "the series cannot be assembled (")


def _dirty_header(volume) -> bool:
    """True when a header the Volume keeps holds an element pydicom cannot convert (the SEG
    writer copies from these headers)."""
    for header in volume.headers:
        for tag in list(header._dict):
            try:
                header[tag]
            except Exception:
                return True
    return False


def run_reader(target: Path, kind: str, identities: set[str]) -> tuple[str, str, list[str]]:
    """Run the reader on one case: (outcome, detail, notes)."""
    from edgeseg import DicomInputError
    from edgeseg.dicom import find_series, load_volume, read_volume

    results: list = []

    def read() -> None:
        if kind == "file":
            try:
                results.append(read_volume(target))
            except DicomInputError as err:
                results.append(err)
        else:
            scan = find_series(target)
            results.extend(scan.rejected)
            for ref in scan.series:
                try:
                    results.append(load_volume(ref))
                except DicomInputError as err:
                    results.append(err)

    escaped = _escape_of(read)
    if escaped:
        return escaped[0], escaped[1], []
    outcome, detail, notes = "volume", "", []
    for item in results:
        if isinstance(item, DicomInputError):
            text = str(item)
            if any(identity in text for identity in identities):
                return "phi", "a message quotes the seed's patient name or ID", []
            if not _names_case_file(item, target, kind) or not item.reason or "\n" in item.reason:
                return "unnamed", f"path={item.path!r} reason={item.reason[:120]!r}", []
            outcome, detail = "error", item.reason[:160]
            if item.reason.startswith(NET_REASONS) and "net" not in notes:
                notes.append("net")
        else:
            bad = _check_volume(item)
            if bad:
                return "badvol", bad, []
            if "dirty-header" not in notes and _dirty_header(item):
                notes.append("dirty-header")
    if not results:
        outcome, detail = "error", "nothing found (all files skipped)"  # find_series only
    return outcome, detail, notes


# -- the worker pool ------------------------------------------------------------------------


def worker_main(master: int, max_bytes: int, pydicom_files: bool) -> None:
    """Read case numbers from stdin, write one JSON result per line to the original stdout."""
    import resource

    # Huge allocations from mutated sizes fail (MemoryError) instead of swapping the machine.
    limit = int(os.environ.get("EDGESEG_FUZZ_MEM", str(4 * 2**30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    seeds = collect_seeds(max_bytes, pydicom_files)
    root = Path(
        tempfile.mkdtemp(prefix="edgeseg-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    runner = Runner(root)
    import edgeseg.dicom  # noqa: F401 - imported before the first case, not timed in it

    proto.write("ready\n")
    try:
        for line in sys.stdin:
            index = int(line)
            result = _probe(index) if index < 0 else runner.run(case_of(index, seeds, master))
            result["index"] = index
            proto.write(json.dumps(result) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Worker:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
        self.case: int | None = None
        self.since = 0.0
        self.ready = False

    def send(self, index: int) -> None:
        self.case, self.since = index, time.monotonic()
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # "net", "dirty-header": counted, not findings
    findings: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seeds: int = 0
    series_seeds: int = 0

    @property
    def escapes(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.split(":")[0] in FINDINGS)


def run_cases(
    indices: list[int],
    *,
    master: int = 0,
    workers: int = 2,
    timeout: float = 30.0,
    max_bytes: int = MAX_SEED_BYTES,
    pydicom_files: bool = True,
    save: Path | None = None,
    nice: int = 0,
    progress: bool = False,
) -> Report:
    """Run the cases in ``workers`` subprocesses, each case limited to ``timeout`` seconds."""
    seeds = collect_seeds(max_bytes, pydicom_files)
    report = Report(
        seeds=sum(s.kind == "file" for s in seeds), series_seeds=sum(s.kind == "series" for s in seeds)
    )
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(master)]
    args += ["--max-seed-bytes", str(max_bytes)] + ([] if pydicom_files else ["--no-pydicom-files"])
    if nice:
        args = ["nice", "-n", str(nice)] + args
    todo = list(reversed(indices))
    pool = [_Worker(args) for _ in range(max(1, min(workers, len(indices))))]
    start = time.monotonic()
    done = 0

    def record(index: int, result: dict) -> None:
        nonlocal done
        done += 1
        report.outcomes[result["outcome"]] += 1
        report.notes.update(result.get("notes", []))
        if result["outcome"].split(":")[0] in FINDINGS:
            case = case_of(index, seeds, master) if index >= 0 else None
            result = {**result, "index": index, "seed": case.seed.name if case else "probe"}
            report.findings.append(result)
            if save is not None and case is not None:
                _save_case(case, save, result)
        if progress and done % 1000 == 0:
            rate = done / (time.monotonic() - start)
            print(
                f"  {done}/{len(indices)} cases, {rate:.0f}/s, {report.escapes} finding(s)", file=sys.stderr
            )

    def feed(w: _Worker) -> None:
        if todo:
            w.send(todo.pop())
        else:
            w.case = None

    try:
        while True:
            busy = [w for w in pool if w.case is not None or not w.ready]
            if not busy and not todo:
                break
            now = time.monotonic()
            wait = min((timeout - (now - w.since) for w in busy if w.ready), default=timeout)
            readable, _, _ = select.select([w.proc.stdout for w in busy], [], [], max(0.0, wait))
            for w in list(pool):
                if w.proc.stdout in readable:
                    line = w.proc.stdout.readline()
                    if line == "ready\n":
                        w.ready = True
                        feed(w)
                        continue
                    if line:
                        result = json.loads(line)
                        record(w.case, result)
                        feed(w)
                        continue
                    # EOF: the worker died (a native crash, or the memory limit's kill).
                    rc = w.proc.wait()
                    if w.case is not None:
                        record(
                            w.case,
                            {
                                "outcome": f"crash:{_signal_name(rc)}",
                                "detail": f"exit status {rc}",
                                "steps": [],
                            },
                        )
                    elif not w.ready:
                        raise RuntimeError(f"a fuzz worker failed to start (exit status {rc})")
                    _replace(pool, w, args)
                elif w.ready and w.case is not None and time.monotonic() - w.since > timeout:
                    w.kill()
                    record(w.case, {"outcome": "hang", "detail": f"over {timeout:.0f} s", "steps": []})
                    _replace(pool, w, args)
    finally:
        for w in pool:
            w.kill()
    report.cases = done
    report.seconds = time.monotonic() - start
    return report


def _replace(pool: list[_Worker], dead: _Worker, args: list[str]) -> None:
    dead.kill()
    pool[pool.index(dead)] = _Worker(args)


def _signal_name(rc: int) -> str:
    import signal

    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            pass
    return f"exit{rc}"


def _save_case(case: Case, save: Path, result: dict) -> None:
    out = save / f"case{case.index}"
    runner = Runner(save / ".build")
    target, _, _ = runner.build(case)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(target.parent if case.seed.kind == "file" else target, out, symlinks=False)
    (out / "finding.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(save / ".build", ignore_errors=True)


# -- command line ------------------------------------------------------------------------------


def format_report(report: Report, workers: int) -> str:
    rows = [
        ("seeds (files + series folders)", f"{report.seeds} + {report.series_seeds}"),
        ("cases", f"{report.cases}"),
        ("Volume", f"{report.outcomes['volume']}"),
        ("DicomInputError naming the file", f"{report.outcomes['error']}"),
        ("  of which only via a safety net (info)", f"{report.notes['net']}"),
    ]
    escapes = {k: n for k, n in report.outcomes.items() if k.startswith("escape:")}
    rows.append(("escapes (other exceptions)", f"{sum(escapes.values())}"))
    for kind, n in sorted(escapes.items(), key=lambda kv: -kv[1]):
        rows.append((f"  {kind.split(':', 1)[1]}", f"{n}"))
    for kind in ("unnamed", "phi", "badvol"):
        rows.append((f"{kind}", f"{report.outcomes[kind]}"))
    rows.append(("Volumes keeping an unconvertible element (info)", f"{report.notes['dirty-header']}"))
    rows.append(("hangs", f"{report.outcomes['hang']}"))
    crashes = {k: n for k, n in report.outcomes.items() if k.startswith("crash:")}
    rows.append(("crashes", f"{sum(crashes.values())}" + (f" ({dict(crashes)})" if crashes else "")))
    rows.append(("wall time", f"{report.seconds:.1f} s on {workers} worker(s)"))
    rows.append(("cases/s", f"{report.cases / max(report.seconds, 1e-9):.1f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--cases", type=int, default=100_000)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang"
    )
    parser.add_argument("--max-seed-bytes", type=int, default=MAX_SEED_BYTES)
    parser.add_argument("--no-pydicom-files", action="store_true", help="only the shared data as seeds")
    parser.add_argument("--nice", type=int, default=0, help="run the workers at this nice level")
    parser.add_argument("--save", type=Path, help="keep the files of every finding under this folder")
    parser.add_argument("--case", type=int, help="rerun one case in this process and show its traceback")
    parser.add_argument("--show", type=int, default=20, help="findings listed after the table")
    parser.add_argument("--findings", type=Path, help="write every finding to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.seed, args.max_seed_bytes, not args.no_pydicom_files)
        return 0
    if not DICOM.is_dir():
        print(f"shared DICOM data not found at {DICOM} (set EDGESEG_SHARED)", file=sys.stderr)
    if args.case is not None:
        return _one(args)
    report = run_cases(
        list(range(args.start, args.start + args.cases)),
        master=args.seed,
        workers=args.workers,
        timeout=args.timeout,
        max_bytes=args.max_seed_bytes,
        pydicom_files=not args.no_pydicom_files,
        save=args.save,
        nice=args.nice,
        progress=True,
    )
    print(format_report(report, args.workers))
    if args.findings:
        args.findings.write_text(json.dumps(report.findings, indent=1))
    for f in report.findings[: args.show]:
        print(f"case {f['index']} ({f['seed']}): {f['outcome']} {f['detail']} | {'; '.join(f['steps'])}")
    return 1 if report.escapes else 0


def _one(args) -> int:
    seeds = collect_seeds(args.max_seed_bytes, not args.no_pydicom_files)
    case = case_of(args.case, seeds, args.seed)
    root = Path(tempfile.mkdtemp(prefix="edgeseg-fuzz-one-"))
    runner = Runner(root)
    target, steps, _ = runner.build(case)
    print(f"case {args.case}: seed {case.seed.name}; {'; '.join(steps)}\nfiles in {target}")
    from edgeseg import DicomInputError
    from edgeseg.dicom import find_series, load_volume, read_volume

    if case.seed.kind == "file":
        try:
            print(read_volume(target))
        except DicomInputError as err:
            print(f"DicomInputError: {err}")
    else:
        scan = find_series(target)
        for err in scan.rejected:
            print(f"rejected: {err}")
        for ref in scan.series:
            try:
                print(load_volume(ref))
            except DicomInputError as err:
                print(f"DicomInputError: {err}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
