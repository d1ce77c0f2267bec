"""A DICOM header's values by keyword, the simple ones decoded without pydicom's machinery.

Discovery reads the header of every file of an input (0.65 ms a file on the 2-core
machine, a third of a converter worker's whole time for a slice), and most of that was
not the parsing but pydicom turning about twenty elements into Python values, 8-12 µs
each through its hooks, VR tables and value classes, and our asking for some of them
several times. `Header` decodes the numbers, UIDs and code strings a scan needs straight
from the bytes pydicom has read (`Dataset.get_item`: the raw element, not converted),
exactly as pydicom's own converters would (`convert_UI`, `convert_string`, the DS/IS
strings, `struct` for US), and hands everything else (names and IDs in the study's
character set, sequences, ambiguous VRs, empty, multi-valued, deferred or unusual
values, and any value pydicom's rules call invalid, so that pydicom warns of it as
before) to pydicom. Each value is decoded once, and ``in`` decodes nothing (as
pydicom's). The scan's values and warnings are pydicom's, in the same order;
`tests/data_tools/test_dicom_header.py` compares every keyword, presence, value and
warnings, on pydicom's and pydicom-data's test files and on edge values.
"""

from __future__ import annotations

import math
import struct

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import MAX_VALUE_LEN, STR_VR_REGEXES

from data_tools.privacy import elide_raw

_ABSENT = object()


class CorruptElement(ValueError):
    """An element pydicom cannot turn into a value (a damaged VR or length): the file is
    corrupt, which `data_tools.dicom_io` says as the reason it is skipped."""


_DECODED_VRS = ("US", "DS", "IS", "UI", "CS")
_US = {True: struct.Struct("<H"), False: struct.Struct(">H")}


def _words(raw: bytes) -> list[str]:
    """The values of a text element as pydicom splits them (trailing padding removed);
    pydicom's default encoding, ISO 8859-1, which the VRs decoded here are limited to."""
    return raw.decode("iso8859").rstrip(" \x00").split("\\")


def _decode(vr: str, raw: bytes, little_endian: bool):
    """The value of a raw element of a VR in `_DECODED_VRS`, or `_ABSENT` when it is not
    a single plain value (pydicom then decides)."""
    if vr == "US":
        return _US[little_endian].unpack(raw)[0] if len(raw) == 2 else _ABSENT
    words = _words(raw)
    if len(words) != 1 and vr != "DS":
        return _ABSENT
    for word in words:  # an invalid value goes to pydicom, which warns of it
        # fullmatch: a regex's "$" also matches before a final newline, which UID() strips
        if len(word) > MAX_VALUE_LEN[vr] or not STR_VR_REGEXES[vr].fullmatch(word):
            return _ABSENT
    if vr in ("UI", "CS"):
        return words[0]
    # float() and int() take what the regexes let through, padding spaces included.
    numbers = [float(word) if vr == "DS" else int(word) for word in words]
    if not all(map(math.isfinite, numbers)):
        return _ABSENT
    # Several values as pydicom gives them (a MultiValue: errors and reprs name it).
    return numbers[0] if len(numbers) == 1 else MultiValue(float, numbers)


class Header:
    """Read-only values of a pydicom dataset by keyword (``get``, ``in``), each decoded
    once; ``dataset`` is the dataset itself. Numbers come as Python ``float``/``int``
    (pydicom's DSfloat/IS are their subclasses; several as a pydicom ``MultiValue``) and
    UIDs as ``str``."""

    __slots__ = ("dataset", "_values")

    def __init__(self, dataset: pydicom.Dataset):
        self.dataset = dataset
        self._values = {}

    @classmethod
    def of(cls, source) -> Header:
        """`source` as a `Header` (a dataset is wrapped; a `Header` is itself)."""
        return source if isinstance(source, Header) else cls(source)

    def get(self, keyword: str, default=None):
        try:
            value = self._values[keyword]
        except KeyError:
            value = self._values[keyword] = self._value(keyword)
        return default if value is _ABSENT else value

    def __contains__(self, keyword: str) -> bool:
        """Whether the element is there, as pydicom's ``in``: its value not decoded (a
        broken value raises, or warns, only when asked for)."""
        if keyword == "file_meta":
            return getattr(self.dataset, "file_meta", None) is not None
        tag = _tag(keyword)
        return (keyword if tag is None else tag) in self.dataset  # pydicom's word on a typo

    def meta(self) -> Header:
        """The file meta information (empty when the file has none)."""
        meta = self.get("file_meta")  # a Header, its values kept for the next call
        return Header(pydicom.dataset.FileMetaDataset()) if meta is None else meta

    def _value(self, keyword: str):
        if keyword == "file_meta":
            meta = getattr(self.dataset, "file_meta", None)
            return _ABSENT if meta is None else Header(meta)
        tag = _tag(keyword)
        element = None if tag is None else self.dataset.get_item(tag, keep_deferred=True)
        if element is None:
            return _ABSENT
        vr = _DECODED.get(tag)
        if (
            vr is not None
            and isinstance(element, RawDataElement)
            and element.VR in (None, vr)
            and element.value  # None: deferred; b"": empty (pydicom's None or "")
        ):
            value = _decode(vr, element.value, element.is_little_endian)
            if value is not _ABSENT:
                return value
        try:
            value = self.dataset[tag].value
        except Exception as e:  # NotImplementedError (unknown VR), struct.error, ...
            message = elide_raw(f"{type(e).__name__}: {e}")
            raise CorruptElement(f"{keyword} cannot be read ({message})") from None
        if vr not in (None, "US") and _holds_binary(value):
            # A damaged length made pydicom read the elements after it as this value: the
            # patient's name among them, which a skip reason would then print.
            raise CorruptElement(f"{keyword} holds bytes that are not text (a damaged length)")
        return value


def _holds_binary(value) -> bool:
    """Whether a text value (or any of several) holds control characters before its
    padding: header bytes, not a code string, UID or number."""
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    for v in values:
        text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        if any(ord(c) < 32 for c in text.rstrip(" \x00")):
            return True
    return False


def _decoded_tags() -> dict:
    """The tags of the keywords a scan reads whose dictionary VR is one decoded here."""
    keywords = (
        "Modality",
        "SOPClassUID",
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
    )
    tags = {tag_for_keyword(k): dictionary_VR(tag_for_keyword(k)) for k in keywords}
    return {tag: vr for tag, vr in tags.items() if vr in _DECODED_VRS}


_DECODED = _decoded_tags()
_TAGS = {pydicom.datadict.keyword_for_tag(tag): tag for tag in _DECODED}


def _tag(keyword: str) -> int | None:
    """The tag of a keyword (None: no such keyword), the scan's from a dict."""
    return _TAGS.get(keyword) or tag_for_keyword(keyword)
