"""Header values by keyword, read from the raw element bytes where that gives exactly pydicom's value.

``get(ds, "Rows")`` is ``ds.get("Rows")`` without pydicom's keyword lookup and element
conversion on the hot path (a series' headers are read once each; pydicom's ``__getattr__``
plus the raw-to-DataElement conversion cost more than the parse for small slices). Only plain
forms are parsed here — a single-valued US of two bytes, ASCII UI without a backslash, ASCII
CS (several values as a list of str), IS and DS made of plain decimal numbers — in the element's own byte order, and only when the
element's VR is the dictionary VR (or implicit). Anything else (multi-valued text, UN or other
VRs, empty values, sequences, odd numbers such as ``nan`` or ``1.5e``) is left to pydicom, so
the result is always the value pydicom would give (as a plain int / str / float / list of
float where parsed here; callers only ever convert it further with int(), str() or float()).

Text that depends on the Specific Character Set (LO, SH, PN …) is never parsed here, and IS
values whose string form matters (``str()`` of a pydicom IS keeps the original text, e.g.
SeriesNumber ``"05"``) should be read with pydicom's ``ds.get`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

_NO: Any = object()  # "not a plain form: ask pydicom"


class HeaderValueError(ValueError):
    """An element's raw bytes cannot be turned into a value (an unknown VR, a length that is not
    a multiple of the value size, a sequence that does not parse …): the file is damaged.

    ``keyword`` and ``tag`` say which element; the message never quotes the value.
    """

    def __init__(self, keyword: str, tag: int, cause: BaseException):
        self.keyword = keyword
        self.tag = tag
        where = f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        super().__init__(
            f"its header element {where} cannot be read ({type(cause).__name__}); the file is damaged"
        )


_DS = re.compile(rb" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS = re.compile(rb" *[+-]?[0-9]+ *")


def _us(raw: bytes, little: bool) -> Any:
    if len(raw) != 2:
        return _NO
    return raw[0] | raw[1] << 8 if little else raw[1] | raw[0] << 8


def _text(raw: bytes, little: bool) -> Any:
    # pydicom: decode, strip trailing spaces and NULs, split on backslash (UI strips "\0 " too).
    if b"\\" in raw or not raw.isascii():
        return _NO
    return raw.decode("ascii").rstrip(" \x00")


def _cs(raw: bytes, little: bool) -> Any:
    # Several values (ImageType) as a list of str, as pydicom's MultiValue holds them.
    if not raw.isascii():
        return _NO
    items = raw.decode("ascii").rstrip(" \x00").split("\\")
    return items[0] if len(items) == 1 else items


def _is(raw: bytes, little: bool) -> Any:
    text = raw.rstrip(b" \x00")
    return int(text) if _IS.fullmatch(text) else _NO


def _ds(raw: bytes, little: bool) -> Any:
    parts = raw.rstrip(b" \x00").split(b"\\")
    for part in parts:
        if not _DS.fullmatch(part):
            return _NO
    if len(parts) == 1:
        return float(parts[0])
    return [float(p) for p in parts]


_PARSERS: dict[str, Callable[[bytes, bool], Any]] = {"US": _us, "UI": _text, "CS": _cs, "IS": _is, "DS": _ds}
_SPECS: dict[str, tuple[int, str | None]] = {}


def tag_of(keyword: str) -> int:
    """The tag of a dictionary keyword (KeyError for an unknown one)."""
    return _spec(keyword)[0]


def _spec(keyword: str) -> tuple[int, str | None]:
    spec = _SPECS.get(keyword)
    if spec is None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"unknown DICOM keyword {keyword!r}")
        vr = dictionary_VR(tag)
        spec = _SPECS[keyword] = (tag, vr if vr in _PARSERS else None)
    return spec


def get_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """The element's value as one int; ``default`` when absent or empty, None when it is not a
    single integer (several values, text, a fraction)."""
    value = get(ds, keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, MultiValue, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number.is_integer() else None


def has(ds: Dataset, keyword: str) -> bool:
    """``keyword in ds``."""
    return _spec(keyword)[0] in ds._dict


def get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``: the element's value, ``default`` when it is absent."""
    tag, vr = _SPECS.get(keyword) or _spec(keyword)
    elem = ds._dict.get(tag)
    if elem is None:
        return default
    if elem.__class__ is not RawDataElement:
        return elem.value
    raw = elem.value
    if vr is not None and raw is not None and (elem.VR is None or elem.VR == vr):
        value = _PARSERS[vr](raw, elem.is_little_endian)
        if value is not _NO:
            return value
    try:
        return ds[tag].value  # pydicom converts (and keeps the converted element)
    except Exception as exc:  # unknown VR, bad length, broken sequence, no memory for a huge length …
        raise HeaderValueError(keyword, tag, exc) from None
